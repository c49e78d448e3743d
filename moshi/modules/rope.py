"""Rotary positional embedding, computed in float32 whatever the activation dtype.

Positions reach the millions in long sessions and bf16 cannot represent them, which is why the angles and the
rotation are done in float32 and only the result is cast back.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_angles(
    num_steps: int, offset: torch.Tensor | int, head_dim: int, max_period: float, device: torch.device
) -> torch.Tensor:
    """Rotation angles ``[B|1, T, D/2]`` (float32) of steps ``offset + t``; ``offset`` is an int or ``[B]``."""
    half = head_dim // 2
    freqs = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-math.log(max_period) * 2 / head_dim))
    ts = torch.arange(num_steps, device=device, dtype=torch.float32)
    if isinstance(offset, torch.Tensor):
        ts = offset.to(device=device, dtype=torch.float32).view(-1, 1) + ts  # [B, T]
    else:
        ts = (ts + offset).view(1, num_steps)
    return ts.unsqueeze(-1) * freqs


def rotate_time_major(x: torch.Tensor, theta: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotates ``x [B, T, ..., D]`` by the angles ``theta [B|1, T, D/2]`` (float32), in float32.

    Each pair ``(r, m)`` becomes ``(r·cos - m·sin, r·sin + m·cos)``, computed as ``x·C + swap(x)·S`` with
    ``C = (cos, cos)`` and ``S = (-sin, sin)``: the same products and sums (so the same bits) in four kernels
    forward and four backward, with no per-half slices whose backward would zero-fill full-size buffers.
    """
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rope needs an even head dimension, got {D}")
    half = D // 2
    extra = x.dim() - 3  # axes between T and D (heads, or q/k and heads)
    theta = theta.view(theta.shape[0], theta.shape[1], *([1] * extra), half)
    cos, sin = torch.cos(theta), torch.sin(theta)
    pair_axis = -1 if interleave else -2
    c = torch.stack([cos, cos], dim=pair_axis)
    s = torch.stack([-sin, sin], dim=pair_axis)
    shape = (*x.shape[:-1], half, 2) if interleave else (*x.shape[:-1], 2, half)
    xf = x.float().view(shape)
    out = xf * c + xf.flip(pair_axis) * s
    return out.view(x.shape).to(x.dtype)


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
    theta = rope_angles(q.shape[2], offset, q.shape[-1], max_period, q.device)
    rq = rotate_time_major(q.transpose(1, 2), theta, interleave).transpose(1, 2)
    rk = rotate_time_major(k.transpose(1, 2), theta, interleave).transpose(1, 2)
    return rq, rk


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

    def rotate(self, x: torch.Tensor, offset: torch.Tensor | int) -> torch.Tensor:
        """Rotates time-major ``x [B, T, ..., D]`` (e.g. queries and keys stacked as ``[B, T, 2, H, D]``)."""
        theta = rope_angles(x.shape[1], offset, x.shape[-1], self.max_period, x.device)
        return rotate_time_major(x, theta, self.interleave)
