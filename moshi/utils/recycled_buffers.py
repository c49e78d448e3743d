"""Large per-step CPU tensors (gradients of big tables, text logits) whose memory is recycled across steps.

PyTorch has no caching allocator on CPU, and glibc serves blocks over 32 MiB with a fresh ``mmap`` that it
unmaps on free. A large parameter's gradient (Moshi's ``[32001, 512]`` text embedding and text head: 64 MB each)
or the text logits are therefore faulted in page by page every step once the previous step's tensor is gone:
16k page faults, 15-40 ms per tensor on a 2-core VM, where filling memory already mapped takes 2 ms. CUDA's
caching allocator already reuses such blocks, so this acts on CPU only.

:func:`recycled_empty` keeps one buffer per ``(owner, role)`` and hands out a new tensor over the same memory when
nothing else refers to it any more (the previous ``.grad`` was set to None, the previous logits were dropped).
Memory still referenced (a ``.grad`` kept across micro-batches, logits a caller holds on to) is never reused:
a fresh tensor is returned instead, so nothing handed out earlier is ever overwritten. The cost is that each
buffer stays allocated until its owner is freed or :func:`release` is called, as CUDA's cache does.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# Below this size glibc already reuses freed blocks from its heap.
MIN_RECYCLED_BYTES = 4 * 2**20

# Reference count of a tensor's storage (private API; without it nothing is recycled).
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(t: torch.Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)


class _Entry:
    __slots__ = ("owner", "buffer", "idle_count")

    def __init__(self, owner: torch.Tensor, buffer: torch.Tensor) -> None:
        self.owner = weakref.ref(owner)
        self.buffer = buffer
        self.idle_count = _use_count(buffer)  # the count when only this entry holds the memory


_entries: dict[tuple[int, str], _Entry] = {}
_watched: set[int] = set()  # owners with a finalizer that drops their entries
_lock = threading.Lock()


def _forget(owner_id: int) -> None:
    with _lock:
        _watched.discard(owner_id)
        for key in [k for k in _entries if k[0] == owner_id]:
            del _entries[key]


def _recyclable(owner: torch.Tensor, numel: int, dtype: torch.dtype) -> bool:
    # Plain CPU tensors only: a tensor subclass (DTensor, ...) needs a gradient of its own kind.
    return (
        _storage_use_count is not None
        and type(owner) in (torch.Tensor, nn.Parameter)
        and owner.device.type == "cpu"
        and numel * dtype.itemsize >= MIN_RECYCLED_BYTES
    )


def recycled_empty(owner: torch.Tensor, role: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor, on CPU over the memory of the last one handed out for
    ``(owner, role)`` if no tensor refers to that memory any more.

    Args:
        owner (Tensor): the parameter the buffer belongs to (its lifetime bounds the buffer's).
        role (str): which of the owner's buffers (``"grad"``, ``"output"``, ...).
        shape, dtype: of the tensor. A smaller request reuses the front of a bigger buffer; a bigger one or
            another dtype replaces it.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    if not _recyclable(owner, numel, dtype):
        return torch.empty(shape, dtype=dtype, device=owner.device)
    key = (id(owner), role)
    with _lock:
        entry = _entries.get(key)
        if entry is not None and entry.owner() is owner:
            if _use_count(entry.buffer) != entry.idle_count:
                return torch.empty(shape, dtype=dtype)  # still in use: leave it to its holder
            if entry.buffer.dtype == dtype and entry.buffer.numel() >= numel:
                return entry.buffer[:numel].view(shape)  # a new tensor over the same memory
        entry = _entries.pop(key, None)
        del entry  # free the old buffer before allocating its replacement
        if key[0] not in _watched:
            weakref.finalize(owner, _forget, key[0])
            _watched.add(key[0])
        buffer = torch.empty(numel, dtype=dtype)
        _entries[key] = _Entry(owner, buffer)
        return buffer[:numel].view(shape)


def gradient_buffer(param: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor shaped like ``param`` to return as its gradient (see :func:`recycled_empty`)."""
    return recycled_empty(param, "grad", param.shape, param.dtype if dtype is None else dtype)


def release() -> None:
    """Frees every recycled buffer (tensors handed out stay valid: they keep their own memory alive)."""
    with _lock:
        _entries.clear()


class _Embedding(torch.autograd.Function):
    """``weight[index]`` whose weight gradient is accumulated in a :func:`gradient_buffer`.

    The backward is the one of ``F.embedding``: zeros, then the rows of ``grad`` added at their indices in order,
    so the same sums in the same order; only the memory differs.
    """

    @staticmethod
    def forward(ctx, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.weight = weight  # the buffer is keyed by the parameter itself
        return F.embedding(index, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        grad_weight = gradient_buffer(ctx.weight, grad.dtype).zero_()
        grad_weight.index_add_(0, index.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        return None, grad_weight


class _Linear(torch.autograd.Function):
    """``x @ weightᵀ`` (no bias) with the output and the weight gradient in recycled buffers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        out = recycled_empty(weight, "output", (x2.shape[0], weight.shape[0]), x.dtype)
        torch.mm(x2, weight.t(), out=out)
        ctx.save_for_backward(x, weight)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(g2.t(), x.reshape(-1, x.shape[-1]), out=gradient_buffer(weight, grad.dtype))
        return grad_x, grad_w


def embedding(index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding(index, weight)``; on CPU a large table's gradient is written into a recycled buffer."""
    if weight.requires_grad and torch.is_grad_enabled() and _recyclable(weight, weight.numel(), weight.dtype):
        return _Embedding.apply(index, weight)
    return F.embedding(index, weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias); on CPU a large output and weight gradient use recycled buffers."""
    out_numel = x.numel() // max(x.shape[-1], 1) * weight.shape[0]
    if (
        x.dtype == weight.dtype
        and not torch.is_autocast_enabled(x.device.type)  # autocast picks its own dtype for F.linear
        and _recyclable(weight, max(out_numel, weight.numel()), weight.dtype)
    ):
        return _Linear.apply(x, weight)
    return F.linear(x, weight)
