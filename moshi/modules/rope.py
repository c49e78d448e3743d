"""Rotary positional embedding, computed in float32 whatever the activation dtype.

Positions reach the millions in long sessions and bf16 cannot represent them, which is why the angles and the
rotation are done in float32 and only the result is cast back.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    offset: torch.Tensor | int,
    max_period: float = 10_000.0,
    interleave: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates queries and keys by their absolute positions.

    Args:
        q (torch.Tensor): queries ``[B, H, T, D]``.
        k (torch.Tensor): keys ``[B, Hkv, T, D]``.
        offset (torch.Tensor | int): position of the first time step, a python int or an int64 ``[B]`` tensor
            (per-item streaming offsets).
        max_period (float): period of the slowest frequency.
        interleave (bool): pairs are ``(x[2i], x[2i+1])`` when true (Kyutai's ``rope``), ``(x[i], x[i+D/2])``
            otherwise (``rope_concat``).

    Returns:
        The rotated ``(q, k)`` in their input dtypes.
    """
    B, _, T, D = q.shape
    if D % 2:
        raise ValueError(f"rope needs an even head dimension, got {D}")
    device = q.device
    half = D // 2
    freqs = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-math.log(max_period) * 2 / D))
    ts = torch.arange(T, device=device, dtype=torch.float32)
    if isinstance(offset, torch.Tensor):
        ts = offset.to(device=device, dtype=torch.float32).view(-1, 1) + ts  # [B, T]
        ts = ts.view(-1, 1, T, 1)
    else:
        ts = (ts + offset).view(1, 1, T, 1)
    theta = ts * freqs  # [B|1, 1, T, D/2]
    cos, sin = torch.cos(theta), torch.sin(theta)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if interleave:
            xf = xf.view(*x.shape[:-1], half, 2)
            r, m = xf[..., 0], xf[..., 1]
            out = torch.stack([r * cos - m * sin, r * sin + m * cos], dim=-1)
        else:
            r, m = xf[..., :half], xf[..., half:]
            out = torch.cat([r * cos - m * sin, r * sin + m * cos], dim=-1)
        return out.reshape(x.shape).to(x.dtype)

    return rotate(q), rotate(k)


class RotaryEmbedding(nn.Module):
    """Parameter-free rotary embedding shared by all layers of a transformer (no state-dict keys).

    Args:
        max_period (float): period of the slowest frequency.
        interleave (bool): see :func:`apply_rope`.
    """

    def __init__(self, max_period: float = 10_000.0, interleave: bool = True) -> None:
        super().__init__()
        self.max_period = max_period
        self.interleave = interleave

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, offset, self.max_period, self.interleave)
