"""Builders shared by the LM tests: the small model with the deterministic fill, and the fixture inputs."""

from __future__ import annotations

from typing import Any

import torch

from moshi.models.lm import LMModel
from moshi.modules.lora import init_lora_for_training, replace_all_linear_with_lora

from .configs import small_lm_kwargs
from .fill import fill_state_dict


def filled_small_lm(dtype: torch.dtype = torch.float32, **overrides: Any) -> LMModel:
    """The small LM with the deterministic fill's weights, in eval mode."""
    model = LMModel(**small_lm_kwargs(**overrides), dtype=dtype)
    fill_state_dict(model)
    return model.eval()


def small_lora_lm(seed: int = 0) -> LMModel:
    """The small LM, seeded, with LoRA (rank 4, scaling 2) on every Linear and only the LoRA factors trainable."""
    torch.manual_seed(seed)
    model = LMModel(**small_lm_kwargs())
    replace_all_linear_with_lora(model, rank=4, scaling=2.0)
    init_lora_for_training(model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
    return model


def fixture_codes(batch: int = 2, steps: int = 6) -> torch.Tensor:
    """Fixture codes ``[B, 5, T]``: text ``(11b + 13t) % 100``, audio ``(7b + 3k + 5t) % 32``."""
    b = torch.arange(batch).view(-1, 1, 1)
    t = torch.arange(steps).view(1, 1, -1)
    k = torch.arange(1, 5).view(1, -1, 1)
    audio = (7 * b + 3 * k + 5 * t) % 32
    text = (11 * b + 13 * t) % 100
    return torch.cat([text, audio], dim=1).long()


def fixture_user_codes(step: int, batch: int = 2) -> torch.Tensor:
    """Fixture user codes of one step ``[B, 2, 1]``: ``(7b + 3(j + 3) + 5s) % 32``."""
    b = torch.arange(batch).view(-1, 1, 1)
    j = torch.arange(2).view(1, -1, 1)
    return ((7 * b + 3 * (j + 3) + 5 * step) % 32).long()
