"""The tiny end-to-end setting of the trainer tests: generated assets and a config dict for `TrainArgs`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers.scripts import load_script

REPO = Path(__file__).resolve().parents[2]


def make_tiny_assets(out: Path, files: int = 4, eval_files: int = 2, seed: int = 0) -> Path:
    """Small and short: 4 + 2 files of 6-8 s (about 16 chunks of 2 s)."""
    return load_script("make_tiny_assets").make_assets(out, seed=seed, files=files, eval_files=eval_files,
                                           min_sec=6.0, max_sec=8.0)


def tiny_config(assets: Path, run_dir: Path, cache_dir: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """A `TrainArgs` mapping for the assets: LoRA, 2 s chunks, batch 2, 4 steps; `overrides` use dotted keys."""
    cfg: dict[str, Any] = {
        "data": {"train_data": str(assets / "data" / "train.jsonl"), "eval_data": str(assets / "data" / "eval.jsonl"),
                 "shuffle": True, "cache_dir": str(cache_dir) if cache_dir else None},
        "moshi_paths": {"hf_repo_id": str(assets)},
        "run_dir": str(run_dir),
        "lora": {"enable": True, "rank": 4, "scaling": 2.0},
        "full_finetuning": False,
        "duration_sec": 2.0, "batch_size": 2, "max_steps": 4, "log_freq": 1,
        "optim": {"lr": 3e-3, "pct_start": 0.25},
        "param_dtype": "float32", "gradient_checkpointing": False, "tensorboard": False,
        "do_eval": False, "eval_duration_sec": 2.0, "eval_batches": 2,
        "do_ckpt": True, "ckpt_freq": 2, "num_ckpt_keep": None, "seed": 0,
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def run_trainer(args: Any) -> Any:
    """Runs a Trainer in this process the way `train.py` does: setup, train, always close."""
    from finetune.trainer import Trainer

    trainer = Trainer(args, device="cpu")
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
    return trainer
