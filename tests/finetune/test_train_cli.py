"""`python -m train` reports user errors as one message and exit status 1, without a traceback."""

import subprocess
import sys

import pytest

from finetune.args import ConfigError, TrainArgs
from tests.helpers.tiny_run import REPO


def test_cli_reports_config_errors_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n  train_data: x.jsonl\nrun_dir: r\nlora:\n  enabel: true\nmax_step: 3\n")
    proc = subprocess.run([sys.executable, "-m", "train", str(cfg)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: invalid configuration")
    assert "unknown key 'lora.enabel' (did you mean 'lora.enable'?)" in proc.stderr
    assert "unknown key 'max_step' (did you mean 'max_steps'?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_resume_and_overwrite_together_is_a_config_error(tmp_path):
    raw = {"data": {"train_data": str(tmp_path / "x.jsonl")}, "run_dir": str(tmp_path / "run"),
           "lora": {"enable": True}, "resume": True, "overwrite_run_dir": True}
    with pytest.raises(ConfigError, match="resume: true and overwrite_run_dir: true contradict"):
        TrainArgs.from_dict(raw)
