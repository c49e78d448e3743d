"""Nothing is written to run_dir until the model files, wandb, the data and a resume's config are checked;
a resumed run records the config it ran with; a resume refuses every key that changes the math."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from finetune.args import TrainArgs
from finetune.checkpointing import ResumeMismatchError
from finetune.preflight import PreflightError, preflight
from finetune.trainer import Trainer
from tests.helpers.tiny_run import make_tiny_assets, run_trainer, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets")


def _setup_fails(args: TrainArgs, exc: type[Exception]) -> str:
    trainer = Trainer(args, device="cpu")
    try:
        with pytest.raises(exc) as info:
            trainer.setup()
    finally:
        trainer.close()
    return str(info.value)


def _broken_copy(assets: Path, tmp_path: Path) -> Path:
    """The train manifest with its second file missing and a malformed alignment for the third."""
    lines = (assets / "data" / "train.jsonl").read_text().splitlines()
    root = tmp_path / "data"
    root.mkdir()
    out = []
    for i, line in enumerate(lines):
        obj = json.loads(line)
        src = (assets / "data" / obj["path"]).resolve()
        if i != 1:
            (root / src.name).write_bytes(src.read_bytes())
        json_src = src.with_suffix(".json")
        (root / json_src.name).write_text("{not json" if i == 2 else json_src.read_text())
        out.append(json.dumps({"path": src.name, "duration": obj["duration"]}))
    manifest = root / "train.jsonl"
    manifest.write_text("\n".join(out) + "\n")
    return manifest


def test_every_problem_is_reported_and_nothing_is_written(assets, tmp_path):
    manifest = _broken_copy(assets, tmp_path)
    run_dir = tmp_path / "run"
    cfg = tiny_config(assets, run_dir, None, **{"data.train_data": str(manifest),
                                                "moshi_paths.moshi_path": str(tmp_path / "nope.safetensors"),
                                                "wandb.project": "demo"})
    msg = _setup_fails(TrainArgs.from_dict(cfg), PreflightError)
    assert "nothing was written" in msg
    assert f"moshi_paths.moshi_path: {tmp_path / 'nope.safetensors'} does not exist" in msg
    assert f"{manifest}:2: audio file not found" in msg
    assert f"{manifest}:3: " in msg and "not valid JSON" in msg
    if importlib.util.find_spec("wandb") is None:
        assert "wandb.project is set ('demo') but the wandb package is not installed" in msg
    assert not run_dir.exists()


def test_wrong_hf_repo_id_is_found_before_the_run_dir(assets, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(assets, run_dir, None, **{"moshi_paths.hf_repo_id": str(tmp_path / "no-such-repo")})
    msg = _setup_fails(TrainArgs.from_dict(cfg), PreflightError)
    assert "model files of moshi_paths" in msg and "no-such-repo" in msg
    assert not run_dir.exists()


def test_preflight_returns_the_model_files(assets, tmp_path):
    info = preflight(TrainArgs.from_dict(tiny_config(assets, tmp_path / "run")))
    assert Path(info.moshi_weights).is_file() and Path(info.mimi_weights).is_file()


def test_resume_records_its_config_and_refuses_math_changes_before_writing(assets, tmp_path):
    run_dir = tmp_path / "run"
    cache = tmp_path / "cache"
    run_trainer(TrainArgs.from_dict(tiny_config(assets, run_dir, cache, max_steps=2, ckpt_freq=2)))
    recorded = (run_dir / "args.yaml").read_text()

    for key, value in (("text_padding_weight", 0.25), ("first_codebook_weight_multiplier", 2.0),
                       ("max_norm", 0.5), ("data.aug.noise_prob", 0.5), ("optim.weight_decay", 0.0)):
        cfg = tiny_config(assets, run_dir, cache, max_steps=2, ckpt_freq=2, resume=True, **{key: value})
        msg = _setup_fails(TrainArgs.from_dict(cfg), ResumeMismatchError)
        assert f"{key}: " in msg and "in the checkpoint" in msg
        assert (run_dir / "args.yaml").read_text() == recorded  # the refused config was not recorded
        assert not (run_dir / "args.previous.yaml").exists()

    # Keys that cannot change the result may change; the resumed run records the config it ran with.
    cfg = tiny_config(assets, run_dir, cache, max_steps=2, ckpt_freq=2, resume=True, log_freq=2, eval_freq=7,
                      num_ckpt_keep=1, tensorboard=True, **{"data.cache_dir": str(tmp_path / "cache2")})
    run_trainer(TrainArgs.from_dict(cfg))
    assert yaml.safe_load((run_dir / "args.yaml").read_text())["log_freq"] == 2
    assert (run_dir / "args.previous.yaml").read_text() == recorded
