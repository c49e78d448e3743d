"""The three analysis scripts on checkpoints written by the training code: a tiny Moshi LoRA run and a tiny
DSAA run (both with an eval every step, so each checkpoint's eval loss is in metrics.eval.jsonl)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.args import TrainArgs
from tests.helpers.scripts import run_script
from tests.helpers.tiny_run import make_tiny_assets, run_trainer, tiny_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

COMMON = {"max_steps": 2, "ckpt_freq": 1, "do_eval": True, "eval_freq": 1, "eval_batches": 1, "batch_size": 2}


def _train(cfg: dict, folder: Path) -> Path:
    config = folder / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_trainer(TrainArgs.load(config))
    return config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lora_run")
    assets = make_tiny_assets(root / "assets", files=2, eval_files=1)
    cfg = tiny_config(assets, root / "run", cache_dir=root / "cache", **COMMON)
    return _train(cfg, root), root / "run"


@pytest.fixture(scope="module")
def dsaa_run(tmp_path_factory) -> tuple[Path, Path]:
    import setup_new_model
    from tests.dsaa.tiny_llm import make_tiny_llm

    root = tmp_path_factory.mktemp("dsaa_run")
    assets = make_tiny_assets(root / "assets", files=2, eval_files=1)
    llm = make_tiny_llm(root / "llm", hidden=32, max_pos=64, seed=5)
    cfg = tiny_config(assets, root / "run", cache_dir=root / "cache", **COMMON)
    cfg.update({"full_finetuning": True, "lora": {"enable": False}, "audio_loss_skip_every": 0,
                "text_llm": {"enable": True, "hf_repo_id": str(llm), "proj_hidden": 48},
                "optim": {"proj_lr": 1e-3, "finetune_lr": 1e-3, "pct_start": 0.5}})
    setup = root / "setup.yaml"
    setup.write_text(yaml.safe_dump(cfg))
    weights = setup_new_model.run(setup, root / "weights")
    cfg["moshi_paths"]["moshi_path"] = str(weights / "model.safetensors")
    return _train(cfg, root), root / "run"


def _eval_losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.eval.jsonl").read_text().splitlines()
    return {r["step"]: r["eval_loss"] for r in map(json.loads, lines)}


def _ckpt(run: Path, step: int) -> str:
    return str(run / "checkpoints" / f"checkpoint_{step:06d}")


@pytest.mark.parametrize("which", ["lora_run", "dsaa_run"])
def test_loss_landscape_on_a_trained_checkpoint(which, request, tmp_path):
    config, run = request.getfixturevalue(which)
    evals = _eval_losses(run)
    base = ["--device", "cpu", "--seed", "3"]

    out = tmp_path / "grid"
    assert run_script("loss_landscape", str(config), "grid", *base, "--out", str(out), "--checkpoint",
                      _ckpt(run, 2), "--dims", "2", "--points", "3") == 0
    grid = json.loads((out / "landscape.json").read_text())
    centre = next(r for r in grid["grid"] if r["alpha"] == 0 and r["beta"] == 0)
    assert centre["loss"] == grid["centre_eval_loss"]
    # The same batches and weights as the run's own evaluation after step 2 (saved in float32, same code path).
    assert grid["centre_eval_loss"] == pytest.approx(evals[2], rel=1e-5)
    assert len(grid["grid"]) == 9 and (out / "landscape.png").exists() and (out / "landscape.csv").exists()

    out = tmp_path / "line"
    assert run_script("loss_landscape", str(config), "line", *base, "--out", str(out), _ckpt(run, 1), _ckpt(run, 2),
                      "--points", "3", "--from", "0", "--to", "1.5") == 0
    line = json.loads((out / "interpolation.json").read_text())
    assert line["loss_a"] == pytest.approx(evals[1], rel=1e-5) and line["loss_b"] == pytest.approx(evals[2], rel=1e-5)
    assert [r["alpha"] for r in line["line"]] == [0.0, 0.75, 1.0, 1.5]

    out = tmp_path / "frames"
    assert run_script("loss_landscape", str(config), "frames", *base, "--out", str(out), "--checkpoint",
                      _ckpt(run, 2), "--files", "5") == 0
    summary = json.loads((out / "summary.json").read_text())
    terms = summary["loss_terms"]
    # All eval chunks are covered, so the per-frame terms give the run's eval loss.
    assert terms["text_loss"] + terms["audio_loss"] == pytest.approx(evals[2], rel=1e-5)
    with open(out / "frames.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["frames"] > 0 and not any("nan" in v.lower() for r in rows for v in r.values())
    assert (out / "frames_000.png").exists()


@pytest.mark.parametrize("which", ["lora_run", "dsaa_run"])
def test_analyze_state_and_plot_metrics_on_a_run(which, request, tmp_path):
    _, run = request.getfixturevalue(which)
    out = tmp_path / "state"
    assert run_script("analyze_state", _ckpt(run, 2), _ckpt(run, 1), "--out", str(out), "--device", "cpu") == 0
    summary = json.loads((out / "summary.json").read_text())
    if which == "lora_run":
        assert summary["kind"] == "lora" and summary["lora"]["modules"] > 0
        with open(out / "lora.csv") as f:
            assert all(0 < float(r["effective_rank"]) <= int(r["rank"]) + 1e-6 for r in csv.DictReader(f))
    else:
        assert summary["kind"] == "dsaa" and list(summary["alpha"]) == ["text_projector.alpha"]
    assert summary["change"]["compared"] == summary["tensors"]

    out = tmp_path / "curves"
    assert run_script("plot_metrics", str(run), "--out", str(out)) == 0
    curves = json.loads((out / "summary.json").read_text())
    assert curves["runs"]["run"]["train"]["records"] == 2 and "loss.png" in curves["plots"]


def test_grid_under_torchrun_splits_the_batches_and_gives_the_one_process_losses(lora_run, tmp_path):
    config, run = lora_run
    cfg = yaml.safe_load(config.read_text())
    cfg["batch_size"] = 1  # 2 eval batches of one chunk: the same two chunks for one process and for two ranks
    one_batch = tmp_path / "b1.yaml"
    one_batch.write_text(yaml.safe_dump(cfg))
    args = ["grid", "--device", "cpu", "--checkpoint", _ckpt(run, 2), "--points", "3", "--eval-batches", "2"]
    assert run_script("loss_landscape", str(one_batch), *args, "--out", str(tmp_path / "one")) == 0
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         str(REPO / "scripts" / "loss_landscape.py"), str(one_batch), *args, "--out", str(tmp_path / "two")],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "landscape.json").read_text()) for d in ("one", "two"))
    assert one["eval_batches"] == two["eval_batches"] == 2 and two["provenance"]["world_size"] == 2
    # Same chunks and weights; only the order of the float32 sums over batches differs.
    for a, b in zip(one["grid"], two["grid"], strict=True):
        assert a["alpha"] == b["alpha"] and b["loss"] == pytest.approx(a["loss"], rel=1e-6)
