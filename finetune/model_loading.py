"""The model a training config describes, ready for inference or evaluation: its base, or one of its checkpoints.

The base files are resolved exactly as training resolves them (``moshi_paths``; ``text_llm`` for DSAA), so an
evaluation script given the run's YAML reads the same weights the run started from, and a checkpoint of that run
is applied on top of them by the one loader, :func:`moshi.models.model_loading.load_model`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from finetune.args import TrainArgs
from finetune.model_build import resolve_checkpoint_info
from moshi.models.model_loading import LoadedModel, load_model


def load_from_config(
    args: TrainArgs,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Loads the model of ``args``: the base model (``checkpoint=None``) or a checkpoint of its run.

    Args:
        args (TrainArgs): the training configuration (``moshi_paths``, ``text_llm``).
        checkpoint: a run's ``checkpoints/checkpoint_N`` folder, its ``consolidated/`` export, or a weights file.
            LoRA adapters are fused into the base weights of ``moshi_paths``.
        device, dtype: see :func:`~moshi.models.model_loading.resolve_device` and
            :func:`~moshi.models.model_loading.resolve_dtype`.
    """
    info = resolve_checkpoint_info(args)
    if not args.text_llm.enable:
        return load_model(checkpoint, base=info, device=device, dtype=dtype)
    if not args.moshi_paths.config_path:
        # Training reads a fork checkpoint's LM keys from the config.json beside it unless config_path is set.
        info = dataclasses.replace(info, lm_config=None)
    source = checkpoint if checkpoint is not None else info.moshi_weights
    return load_model(source, base=info, text_llm=args.text_llm, device=device, dtype=dtype)
