"""Tiny checkpoints of every kind, written by the code the trainer and the demos use.

- :func:`make_base_assets`: the demo's hub-layout folder (``scripts/make_tiny_assets.py``), small;
- :func:`write_moshi_export`: a training run folder with one ``consolidated/`` export written by
  :func:`finetune.checkpointing.moshi_export_writer` (adapters, merged or full) and the run's ``args.yaml``;
- :func:`write_dsaa_checkpoint`: a DSAA checkpoint written by ``save_dsaa_checkpoint`` as training exports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from moshi.models.lm import LMModel
from moshi.modules.lora import replace_all_linear_with_lora

from .scripts import load_script

LORA_RANK = 4
LORA_SCALING = 2.0


def make_base_assets(out: Path, seed: int = 0) -> Path:
    """The demo's assets with two short training files (enough frames to fit the 64-entry codebooks): model.safetensors, config.json, Mimi, tokenizer."""
    return load_script("make_tiny_assets").make_assets(out, seed=seed, files=2, eval_files=0, min_sec=3.0, max_sec=3.5)


def shared_base_assets(tmp_path_factory: Any) -> Path:
    """:func:`make_base_assets` once per test session (every module asking gets the same folder)."""
    out = tmp_path_factory.getbasetemp() / "tiny_base_assets"
    if not (out / "config.json").is_file():
        make_base_assets(out)
    return out


def base_config(assets: Path) -> dict[str, Any]:
    return json.loads((assets / "config.json").read_text())


def base_lm(assets: Path) -> LMModel:
    """The LM the assets hold, built directly from its config and tensors (float32, eval)."""
    config = base_config(assets)
    lm_keys = {k: v for k, v in config.items() if not k.endswith("_name")}
    model = LMModel(**lm_keys)
    model.load_state_dict(load_file(str(assets / "model.safetensors")))
    return model.eval()


def lora_lm(assets: Path, seed: int = 1) -> LMModel:
    """The base LM with rank-4 LoRA factors on every Linear, ``lora_B`` non-zero so the adapters matter."""
    model = base_lm(assets)
    replace_all_linear_with_lora(model, LORA_RANK, LORA_SCALING)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model.eval()


def full_lm(assets: Path, seed: int = 2) -> LMModel:
    """The base LM with every weight perturbed (a full fine-tuning result)."""
    model = base_lm(assets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def write_moshi_export(run_dir: Path, assets: Path, model: LMModel, kind: str, step: int = 2) -> Path:
    """Writes ``run_dir/checkpoints/checkpoint_N/consolidated`` as the trainer does; returns ``checkpoint_N``.

    ``kind``: ``"lora"`` (adapters), ``"merged"`` (LoRA run, ``save_adapters: false``) or ``"full"``.
    """
    from finetune.checkpointing import checkpoint_dir, moshi_export_writer

    lora = kind in ("lora", "merged")
    save_adapters = kind == "lora"
    writer = moshi_export_writer(base_config(assets), lora, LORA_RANK, LORA_SCALING, save_adapters)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if save_adapters:  # the trainer gathers only the trained tensors for an adapters export
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    folder = checkpoint_dir(run_dir, step)
    (folder / "consolidated").mkdir(parents=True)
    writer(folder / "consolidated", state, torch.float32)
    args = {"lora": {"enable": lora, "rank": LORA_RANK, "scaling": LORA_SCALING}, "full_finetuning": not lora,
            "save_adapters": save_adapters, "moshi_paths": {"hf_repo_id": str(assets)}}
    (run_dir / "args.yaml").write_text(json.dumps(args))  # JSON is YAML
    return folder


def write_dsaa_checkpoint(out: Path, model: LMModel, tokenizer: Any, repo: str = "tiny-llm") -> Path:
    """A DSAA checkpoint folder as training exports it (``consolidated.safetensors``, embedded LLM)."""
    from moshi.models.dsaa_loading import save_dsaa_checkpoint

    return save_dsaa_checkpoint(model, out, tokenizer, hf_repo_id=repo, weights_name="consolidated.safetensors")


_DSAA: dict[Path, tuple[LMModel, Path]] = {}


def shared_dsaa_checkpoint(tmp_path_factory: Any) -> tuple[LMModel, Path]:
    """A tiny DSAA model whose audio side fits the base assets' Mimi (64 bins, 4 + 4 codebooks), initialised as
    ``setup_new_model`` does, and its checkpoint folder; built once per test session."""
    root = tmp_path_factory.getbasetemp()
    if root not in _DSAA:
        from tests.dsaa.tiny_llm import tiny_dsaa, train_tokenizer

        model = tiny_dsaa(card=64, n_q=8, dep_q=4, delays=[0] + [0, 1, 1, 1] * 2)
        _DSAA[root] = (model, write_dsaa_checkpoint(root / "tiny_dsaa" / "consolidated", model, train_tokenizer()))
    return _DSAA[root]
