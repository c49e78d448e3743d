"""scripts/moshi_benchmark.py on the tiny config: what it prints and writes (no timing assertions)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "moshi_benchmark.py"
PARTS = ("encode", "lm", "decode", "frame")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = _run("--config", "tiny", "--models", "moshi,dsaa", "--batch-sizes", "1,2", "--frames", "3",
                "--warmup", "1", "--threads", "1", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_one_line_per_setting_then_the_json_object_written_to_out(tiny_run):
    proc, out = tiny_run
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5
    assert [line.split(" ")[:2] for line in lines[:4]] == [["moshi", "B=1"], ["moshi", "B=2"], ["dsaa", "B=1"],
                                                          ["dsaa", "B=2"]]
    printed = json.loads(lines[-1])
    assert printed == json.loads((out / "moshi_benchmark.json").read_text())
    assert (printed["device"], printed["dtype"], printed["frames"], printed["warmup"]) == ("cpu", "float32", 3, 1)
    assert printed["budget_ms"] == 80.0
    assert printed["provenance"]["command"][0] == "moshi_benchmark.py"


def test_every_setting_counts_the_asked_frames_and_has_every_quantile(tiny_run):
    _, out = tiny_run
    settings = json.loads((out / "moshi_benchmark.json").read_text())["settings"]
    assert [(s["model"], s["batch"]) for s in settings] == [("moshi", 1), ("moshi", 2), ("dsaa", 1), ("dsaa", 2)]
    for s in settings:
        assert s["frames"] == 3
        for part in PARTS:
            q = s[part]
            assert set(q) == {"p50", "p90", "p99"}
            assert 0 <= q["p50"] <= q["p90"] <= q["p99"]
        assert s["real_time_factor"] > 0
        assert 0 <= s["frames_over_budget"] <= 3
        assert s["peak_memory_gib"] > 0 and s["peak_memory_kind"] == "process peak RSS"
    with open(out / "moshi_benchmark.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["batch"]) for r in rows] == [("moshi", "1"), ("moshi", "2"), ("dsaa", "1"), ("dsaa", "2")]
    assert {f"{part}_{q}_ms" for part in PARTS for q in ("p50", "p90", "p99")} <= set(rows[0])
    assert (out / "moshi_benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-sizes", "1,0", "--batch-sizes: expected comma-separated positive integers"),
    ("--models", "moshi,gpt", "--models: expected a comma-separated subset of ['moshi', 'dsaa']"),
])
def test_bad_lists_are_refused_naming_the_flag(tmp_path, flag, value, message):
    proc = _run("--config", "tiny", flag, value, "--out", str(tmp_path))
    assert proc.returncode == 2
    assert message in proc.stderr


def test_a_trained_checkpoint_is_timed_under_its_kind(tmp_path_factory, tmp_path):
    from tests.helpers import checkpoints as ck

    assets = ck.shared_base_assets(tmp_path_factory)
    export = ck.write_moshi_export(tmp_path_factory.mktemp("lora_run") / "run", assets, ck.lora_lm(assets), "lora")
    proc = _run("--checkpoint", str(export), "--hf-repo", str(assets), "--batch-sizes", "1", "--frames", "2", "--warmup", "1",
                "--threads", "1", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "moshi_benchmark.json").read_text())
    assert result["source"] == str(export)
    assert [(s["model"], s["batch"], s["frames"]) for s in result["settings"]] == [("lora", 1, 2)]
    assert list(result["provenance"]["checkpoints"]) == [str(export)]
