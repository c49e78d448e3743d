"""Deterministic, portable weight fill used by the numeric fixtures.

The value of each element depends only on the state-dict key, the shape and the flat index, through integer
hashing, so the same numbers come out on any machine and in any framework; that is what lets our fixtures be
compared with numbers computed by Kyutai's package.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

_MASK32 = np.uint64(0xFFFFFFFF)


def hash_uniform(key_sum: int, numel: int) -> np.ndarray:
    """Returns ``u`` in ``[-1, 1)`` (float64) for flat indices ``0..numel-1`` and key byte sum ``key_sum``."""
    n = np.arange(numel, dtype=np.uint64)
    h = (n + np.uint64(1000003 * key_sum)) & _MASK32
    for _ in range(2):
        h = (((h >> np.uint64(16)) ^ h) * np.uint64(0x45D9F3B)) & _MASK32
    h = (h >> np.uint64(16)) ^ h
    return h.astype(np.float64) / 2.0**31 - 1.0


def fill_value(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor this fill assigns to state-dict key ``key`` with shape ``shape``."""
    numel = math.prod(shape)
    u = hash_uniform(sum(key.encode("utf-8")), numel)
    last = key.rsplit(".", 1)[-1]
    if last == "_initialized":
        values = np.ones(numel)
    elif last in ("cluster_usage", "alpha", "scale") or (last == "weight" and len(shape) == 1):
        values = 1.0 + 0.1 * u
    elif len(shape) >= 2:
        values = u * math.sqrt(3.0 * shape[0] / numel)
    else:
        values = 0.1 * u
    return torch.from_numpy(values.reshape(shape)).to(torch.float32)


def fill_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fills every floating tensor of ``model.state_dict()`` with this fill's values, in place.

    Returns the filled state dict (float32 values, cast to each tensor's dtype on load).
    """
    filled = {}
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            filled[key] = fill_value(key, tuple(tensor.shape))
        else:
            filled[key] = tensor
    model.load_state_dict(filled, strict=True)
    return filled
