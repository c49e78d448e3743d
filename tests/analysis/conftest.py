"""Tiny runs for the analysis scripts, made by the training code: a Moshi LoRA run and a DSAA run.

Both use the demo's generated assets (4 training and 2 eval files of 6-8 s, 2 s chunks). The DSAA run is set
up by ``setup_new_model`` from the assets' Moshi and a tiny random LLM, then trained, as the DSAA demo does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers.tiny_run import make_tiny_assets, run_trainer, tiny_config


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("analysis_assets"))


def _train(cfg: dict, folder: Path) -> tuple[Path, Path]:
    from finetune.args import TrainArgs

    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_trainer(TrainArgs.load(config))
    checkpoints = sorted((Path(cfg["run_dir"]) / "checkpoints").glob("checkpoint_*"))
    return config, checkpoints[-1]


@pytest.fixture(scope="session")
def moshi_lora_run(tiny_assets, tmp_path_factory) -> tuple[Path, Path]:
    """``(config.yaml, checkpoint_N)`` of a 2-step LoRA run."""
    folder = tmp_path_factory.mktemp("moshi_lora_run")
    cfg = tiny_config(tiny_assets, folder / "run", max_steps=2, ckpt_freq=2, eval_batches=2)
    return _train(cfg, folder)


@pytest.fixture(scope="session")
def dsaa_run(tiny_assets, tmp_path_factory) -> tuple[Path, Path]:
    """``(config.yaml, checkpoint_N/consolidated)`` of a 2-step DSAA run."""
    import setup_new_model
    from tests.dsaa.tiny_llm import make_tiny_llm

    folder = tmp_path_factory.mktemp("dsaa_run")
    llm = make_tiny_llm(folder / "llm", hidden=32, max_pos=64)
    cfg = tiny_config(
        tiny_assets, folder / "run", max_steps=2, ckpt_freq=2, eval_batches=2,
        **{"text_llm.enable": True, "text_llm.hf_repo_id": str(llm), "text_llm.proj_hidden": 32,
           "text_llm.save_weights": True, "lora.enable": False, "full_finetuning": True,
           "moshi_paths.moshi_path": str(folder / "weights" / "model.safetensors")},
    )
    cfg.pop("optim")
    setup = folder / "setup.yaml"
    setup.write_text(yaml.safe_dump(cfg))
    setup_new_model.run(setup, folder / "weights", source="repo")
    config, checkpoint = _train(cfg, folder)
    return config, checkpoint / "consolidated"
