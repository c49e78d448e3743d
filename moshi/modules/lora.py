"""LoRA as module replacement, with Kyutai's tensor names so LoRA files are interchangeable.

Every ``nn.Linear`` becomes a :class:`LoRALinear` holding the original layer as ``frozen_W`` plus two low-rank
factors ``lora_A`` and ``lora_B``; a plain checkpoint still loads thanks to a key-renaming pre-hook, and
:func:`replace_lora_with_linear` folds the factors back for inference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``y = frozen_W(x) + scaling · lora_B(lora_A(x))``.

    Args:
        in_features (int), out_features (int): shapes of the wrapped Linear.
        rank (int): LoRA rank.
        scaling (float): multiplier of the low-rank update.
        bias (bool): bias on ``frozen_W`` (Kyutai's models never use one).
        device, dtype: of the new parameters; ``dtype`` defaults to bfloat16 like Kyutai's class.

    Note:
        Both factors get PyTorch's default Linear init, so ``lora_B`` is **not** zero and a fresh LoRA model
        differs from its base (this mirrors Kyutai's package). Call :func:`init_lora_for_training` before
        fine-tuning.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        scaling: float,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scaling = scaling
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.frozen_W = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_load_state_dict_pre_hook(_load_plain_linear_hook)

    @classmethod
    def wrap(
        cls,
        linear: nn.Linear,
        rank: int,
        scaling: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LoRALinear:
        """A LoRALinear whose ``frozen_W`` is ``linear`` itself (its parameters are kept, not copied)."""
        device = linear.weight.device if device is None else device
        dtype = linear.weight.dtype if dtype is None else dtype
        lora = cls(linear.in_features, linear.out_features, rank, scaling, bias=False, device="meta", dtype=dtype)
        lora.frozen_W = linear
        lora.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=dtype)
        lora.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=dtype)
        # Re-register so the state-dict order is lora_A, lora_B, frozen_W as in Kyutai's files.
        modules = lora._modules
        lora._modules = {name: modules[name] for name in ("lora_A", "lora_B", "frozen_W")}
        return lora

    def merge_weight(self) -> torch.Tensor:
        """``W + scaling · B @ A`` in the dtype of ``W`` (:func:`merged_lora_weight`)."""
        return merged_lora_weight(self.frozen_W.weight, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen_W(x) + self.scaling * self.lora_B(self.lora_A(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling}"


def merged_lora_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The plain weight a LoRA layer computes: ``W + scaling · B @ A``.

    The product and the sum run in float32 whatever the storage dtype, so merging bfloat16 factors rounds once,
    at the end, to the dtype of ``W``.
    """
    with torch.no_grad():
        return (weight.float() + scaling * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def merge_lora_state_dict(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict with every LoRA triple folded into a plain weight (:func:`merged_lora_weight`), under the
    base names (``<prefix>.weight`` for ``<prefix>.frozen_W.weight``), as a plain model loads it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".frozen_W." in key:
            prefix, leaf = key.split(".frozen_W.")
            if leaf == "weight":
                value = merged_lora_weight(
                    value, state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"], scaling
                )
            out[f"{prefix}.{leaf}"] = value
        else:
            out[key] = value
    return out


def _load_plain_linear_hook(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """Renames ``<prefix>weight``/``bias`` of a plain Linear checkpoint to ``<prefix>frozen_W.*``."""
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict:
            state_dict[prefix + "frozen_W." + name] = state_dict.pop(key)


def replace_all_linear_with_lora(
    module: nn.Module,
    rank: int,
    scaling: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Replaces, recursively and in place, **every** ``nn.Linear`` under ``module`` by a :class:`LoRALinear`.

    Device and dtype of the new factors default to those of each replaced Linear.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, LoRALinear.wrap(child, rank, scaling, device=device, dtype=dtype))
        else:
            replace_all_linear_with_lora(child, rank, scaling, device=device, dtype=dtype)


def replace_lora_with_linear(module: nn.Module) -> None:
    """Fuses, recursively and in place, every :class:`LoRALinear` into a plain ``nn.Linear``."""
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            weight = child.merge_weight()
            bias = child.frozen_W.bias
            fused = nn.Linear(
                child.in_features, child.out_features, bias=bias is not None, device="meta", dtype=weight.dtype
            )
            fused.weight = nn.Parameter(weight, requires_grad=child.frozen_W.weight.requires_grad)
            if bias is not None:
                fused.bias = bias
            setattr(module, name, fused)
        else:
            replace_lora_with_linear(child)


def init_lora_for_training(module: nn.Module) -> None:
    """Fine-tuning init: ``lora_A`` kaiming-uniform (a=√5), ``lora_B`` = 0, so training starts from the base."""
    for sub in module.modules():
        if isinstance(sub, LoRALinear):
            with torch.no_grad():
                nn.init.kaiming_uniform_(sub.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(sub.lora_B.weight)


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors only (``<path>.lora_A.weight``/``lora_B.weight``), as Kyutai's ``lora.safetensors``."""
    return {
        key: value
        for key, value in module.state_dict().items()
        if key.endswith((".lora_A.weight", ".lora_B.weight"))
    }


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key belongs to a LoRA factor."""
    return ".lora_A." in key or ".lora_B." in key or key.startswith(("lora_A.", "lora_B."))
