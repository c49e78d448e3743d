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


def _complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` float32 as ``[..., D/2]`` complex: a view when (re, im) pairs are adjacent and complex-aligned,
    else a copy's."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    return torch.view_as_complex(pairs)


def _rotate_pairs(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` with each interleaved pair multiplied by the complex ``rot`` (broadcast), in float32."""
    return torch.view_as_real(_complex_pairs(x.float()) * rot).view(x.shape)


def rotate_time_major(x: torch.Tensor, theta: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotates ``x [B, T, ..., D]`` by the angles ``theta [B|1, T, D/2]`` (float32), in float32.

    Each pair ``(r, m)`` becomes ``(r·cos - m·sin, r·sin + m·cos)``. Interleaved pairs are complex numbers in
    memory, so the rotation is one complex multiplication by ``cos + i·sin`` (one kernel forward and one
    backward, the same products and differences, hence the same bits, as the real formula). Half-split pairs
    (``rope_concat``) use ``x·C + swap(x)·S`` with ``C = (cos, cos)`` and ``S = (-sin, sin)``: four kernels, and
    no per-half slices whose backward would zero-fill full-size buffers.
    """
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rope needs an even head dimension, got {D}")
    half = D // 2
    extra = x.dim() - 3  # axes between T and D (heads, or q/k and heads)
    theta = theta.view(theta.shape[0], theta.shape[1], *([1] * extra), half)
    cos, sin = torch.cos(theta), torch.sin(theta)
    if interleave:
        return _rotate_pairs(x, torch.complex(cos, sin)).to(x.dtype)
    c = torch.stack([cos, cos], dim=-2)
    s = torch.stack([-sin, sin], dim=-2)
    xf = x.float().view(*x.shape[:-1], 2, half)
    out = xf * c + xf.flip(-2) * s
    return out.view(x.shape).to(x.dtype)


class _RotatedQKV(torch.autograd.Function):
    """``(rot(q), rot(k), v)`` from packed projections ``[B, T, 3, H, D]`` (interleaved pairs, ``Hkv == H``).

    Autograd's version (slice q|k, rotate, unbind; slice v) builds the projections' gradient with two copies:
    a stack of the q and k gradients, then a concatenation with v's. Here the rotated-back q and k gradients are
    written straight into one ``[B, T, 3, H, D]`` buffer and only v's gradient is copied in. ``v`` is returned
    as a view of the input, as a slice would be.
    """

    @staticmethod
    def forward(ctx, packed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):  # type: ignore[override]
        qk = _rotate_pairs(packed[:, :, :2], torch.complex(cos, sin))  # cos, sin: [B|1, T, 1, 1, D/2]
        q, k = qk.to(packed.dtype).unbind(2)
        ctx.save_for_backward(cos, sin)
        ctx.packed_shape, ctx.packed_dtype = packed.shape, packed.dtype
        return q, k, packed[:, :, 2]

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        back = torch.complex(cos, -sin)[:, :, 0]  # the inverse rotation, [B|1, T, 1, D/2]
        grad = torch.empty(ctx.packed_shape, dtype=ctx.packed_dtype, device=cos.device)
        for slot, g in enumerate((grad_q, grad_k, grad_v)):
            target = grad[:, :, slot]
            if g is None:
                target.zero_()
            elif slot == 2:
                target.copy_(g)
            elif target.dtype == torch.float32:  # a slot of a fresh buffer: always complex-aligned
                out = torch.view_as_complex(target.view(*target.shape[:-1], target.shape[-1] // 2, 2))
                torch.mul(_complex_pairs(g), back, out=out)
            else:
                target.copy_(_rotate_pairs(g, back))
        return grad, None, None


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    offset: torch.Tensor | int,
    max_period: float = 10_000.0,
    interleave: bool = True,
    time_before_heads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates queries and keys by their absolute positions.

    Args:
        q (torch.Tensor): queries ``[B, H, T, D]`` (``[B, T, H, D]`` with ``time_before_heads``).
        k (torch.Tensor): keys ``[B, Hkv, T, D]`` (``[B, T, Hkv, D]`` with ``time_before_heads``).
        offset (torch.Tensor | int): position of the first time step, a python int or an int64 ``[B]`` tensor
            (per-item streaming offsets).
        max_period (float): period of the slowest frequency.
        interleave (bool): pairs are ``(x[2i], x[2i+1])`` when true (Kyutai's ``rope``), ``(x[i], x[i+D/2])``
            otherwise (``rope_concat``).
        time_before_heads (bool): the time axis is axis 1 instead of axis 2.

    Returns:
        The rotated ``(q, k)`` in their input dtypes and layout.
    """
    if time_before_heads:
        theta = rope_angles(q.shape[1], offset, q.shape[-1], max_period, q.device)
        return rotate_time_major(q, theta, interleave), rotate_time_major(k, theta, interleave)
    theta = rope_angles(q.shape[2], offset, q.shape[-1], max_period, q.device)
    rq = rotate_time_major(q.transpose(1, 2), theta, interleave).transpose(1, 2)
    rk = rotate_time_major(k.transpose(1, 2), theta, interleave).transpose(1, 2)
    return rq, rk


class RotaryEmbedding(nn.Module):
    """Parameter-free rotary embedding shared by all layers of a transformer (no state-dict keys).

    Args:
        interleave (bool): see :func:`apply_rope`.
        max_period (float): period of the slowest frequency.
    """

    def __init__(self, interleave: bool = True, max_period: float = 10_000.0) -> None:
        super().__init__()
        self.max_period = max_period
        self.interleave = interleave

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor | int, time_before_heads: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, offset, self.max_period, self.interleave, time_before_heads)

    def rotate(self, x: torch.Tensor, offset: torch.Tensor | int) -> torch.Tensor:
        """Rotates time-major ``x [B, T, ..., D]`` (e.g. queries and keys stacked as ``[B, T, 2, H, D]``)."""
        theta = rope_angles(x.shape[1], offset, x.shape[-1], self.max_period, x.device)
        return rotate_time_major(x, theta, self.interleave)

    def rotate_packed_qkv(
        self, packed: torch.Tensor, offset: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rot(q), rot(k), v)``, each ``[B, T, H, D]``, from packed projections ``packed [B, T, 3, H, D]``."""
        theta = rope_angles(packed.shape[1], offset, packed.shape[-1], self.max_period, packed.device)
        if not self.interleave:
            qk, v = packed.split([2, 1], dim=2)
            q, k = rotate_time_major(qk, theta, interleave=False).unbind(2)
            return q, k, v.squeeze(2)
        theta = theta.view(theta.shape[0], theta.shape[1], 1, 1, -1)
        return _RotatedQKV.apply(packed, torch.cos(theta), torch.sin(theta))
