"""The one configurable streaming transformer: Mimi's encoder/decoder transformers, the temporal LM and the
depformer are all :class:`StreamingTransformer` instances with different keyword arguments.

Tensor names follow Kyutai's ``moshi`` package so checkpoints load unchanged, including the legacy stacked
attention names (``self_attn.in_proj_weight``/``out_proj.weight``) that published checkpoints use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .gating import ActivationGating, get_activation
from .lora import LoRALinear
from .rope import RotaryEmbedding
from .streaming import State, StreamingContainer, StreamingModule

Device = torch.device | str | None

# ----------------------------------------------------------------------------------------------------------------
# Norms and layer scale


class RMSNorm(nn.Module):
    """Root-mean-square norm with Kyutai's layout: parameter ``alpha`` of shape ``[1, 1, dim]``, eps **inside** the
    square root, optionally computed in ``dtype`` (float32 for ``rms_norm_f32``) and cast back.

    Args:
        dim (int): normalised (last) dimension.
        eps (float): added to the mean square before the root.
        dtype (torch.dtype | None): dtype of the computation (``None``: the input's) and, unless ``param_dtype``
            is given, of ``alpha``.
        param_dtype (torch.dtype | None): dtype of ``alpha`` when it differs from the computation's (a float32
            norm inside a bf16 model).
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        dtype: torch.dtype | None = None,
        device: Device = None,
        param_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.compute_dtype = dtype
        self.alpha = nn.Parameter(torch.ones(1, 1, dim, device=device, dtype=param_dtype or dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        alpha = self.alpha.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
            return _RMSNormFunction.apply(x, alpha, self.eps).to(x_dtype)
        # Nothing to differentiate: the same ops without the autograd.Function call (tens of microseconds each,
        # a few milliseconds over a streaming frame's dozens of norms).
        return _rms_norm(x, alpha, self.eps)[0].to(x_dtype)


def _rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x · (alpha · r), r)`` with ``r = rsqrt(eps + mean(x²))`` over the last axis."""
    r = torch.rsqrt(eps + torch.mean(x * x, dim=-1, keepdim=True))
    return x * (alpha * r), r


class _RMSNormFunction(torch.autograd.Function):
    """``x · (alpha · rsqrt(eps + mean(x²)))`` over the last axis, with a closed-form backward.

    The forward is the same ops as the definition (same bits). Autograd's backward of that chain takes about twice
    as many passes over ``x``-sized tensors (one per product in the chain, a broadcast division for the mean, the
    sums over rows), which is most of the norm's cost on the depformer's ``[B·T, steps, D]`` activations. With
    ``r = rsqrt(eps + mean(x²))`` and ``s = Σ_d g_d·alpha_d·x_d`` per row, ``dx = g·alpha·r - x·r³·s/D`` and
    ``d alpha = Σ_rows g·x·r``, the two sums being matrix-vector products.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        out, r = _rms_norm(x, alpha, eps)
        ctx.save_for_backward(x, alpha, r)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        x, alpha, r = ctx.saved_tensors
        D = x.shape[-1]
        need_x, need_alpha = ctx.needs_input_grad[:2]
        grad_x = grad_alpha = None
        gx = (grad * x).reshape(-1, D)
        if need_alpha:
            grad_alpha = torch.mv(gx.t(), r.reshape(-1)).view(alpha.shape)
        if need_x:
            coef = torch.mv(gx, alpha.reshape(-1)).view(r.shape) * r.pow(3) * (-1.0 / D)
            grad_x = torch.addcmul(x * coef, grad, alpha * r)
        return grad_x, grad_alpha, None


class LayerNormF32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the parameter/input dtype, then cast back."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(input.float(), self.normalized_shape, weight, bias, self.eps).to(input.dtype)


NORM_TYPES = ("layer_norm", "layer_norm_f32", "rms_norm", "rms_norm_f32")


def create_norm_fn(norm_type: str, dim: int, device: Device = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Builds the norm named ``norm_type`` (one of :data:`NORM_TYPES`) over the last dimension ``dim``."""
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=1e-5, device=device, dtype=dtype)
    if norm_type == "layer_norm_f32":
        return LayerNormF32(dim, eps=1e-8, device=device, dtype=dtype)
    if norm_type == "rms_norm":
        return RMSNorm(dim, eps=1e-5, device=device, param_dtype=dtype)
    if norm_type == "rms_norm_f32":
        return RMSNorm(dim, eps=1e-8, dtype=torch.float32, device=device, param_dtype=dtype)
    raise ValueError(f"unknown norm {norm_type!r}; expected one of {list(NORM_TYPES)}")


class LayerScale(nn.Module):
    """Per-channel multiplier ``scale`` (``[channels]``), initialised to ``init``.

    Args:
        channels (int): number of channels.
        init (float): initial value of every entry.
        channel_last (bool): channels are the last axis (else axis 1).
    """

    def __init__(
        self,
        channels: int,
        init: float = 1e-4,
        channel_last: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channel_last = channel_last
        self.scale = nn.Parameter(torch.full((channels,), init, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_last:
            return self.scale * x
        return self.scale[:, None] * x


def create_sin_embedding(
    positions: torch.Tensor, dim: int, max_period: float = 10_000.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal embedding ``cat(cos φ, sin φ)`` with ``φ[p, i] = p / max_period^(i / (dim/2 - 1))``.

    Args:
        positions (torch.Tensor): positions ``[B, T, 1]``.
        dim (int): embedding width (even).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding needs an even dimension, got {dim}")
    half = dim // 2
    positions = positions.to(dtype)
    adim = torch.arange(half, device=positions.device, dtype=dtype).view(1, 1, -1)
    period = torch.full([], max_period, device=positions.device, dtype=dtype)
    phase = positions / (period ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Per-step weights


def step_indices(num_steps: int, offset: int, schedule: Sequence[int] | None) -> list[int]:
    """Weight-set index of each of ``num_steps`` positions starting at streaming position ``offset``."""
    steps = range(offset, offset + num_steps)
    if schedule is None:
        return list(steps)
    if offset + num_steps > len(schedule):
        raise ValueError(f"step {offset + num_steps - 1} is past the weights_per_step_schedule {list(schedule)}")
    return [schedule[s] for s in steps]


def _ring_spans(src_begin: int, slot: int, count: int, capacity: int) -> list[tuple[int, int, int]]:
    """``(source index, slot, length)`` runs that write ``count`` steps from ``src_begin`` into a ring buffer of
    ``capacity`` slots starting at ``slot``: one run, or two when the write passes the end."""
    head = min(count, capacity - slot)
    spans = [(src_begin, slot, head)]
    if head < count:
        spans.append((src_begin + head, 0, count - head))
    return spans


@functools.lru_cache(maxsize=1024)
def _aligned_chunk_mask(start: int, T: int, C: int, context: int | None, device: torch.device) -> torch.Tensor:
    """Causal visibility ``[T, S]`` of a ``T``-step chunk at position ``start`` over the keys an aligned ring
    buffer of ``C`` slots returns (see ``StreamingMultiheadAttention._append_kv_aligned``).

    Before the chunk could wrap (``start + T <= C``) the keys are slots ``0 .. start + T - 1``, slot ``i``
    holding position ``i``; otherwise they are the ``min(C, start)`` old slots, slot ``j`` holding position
    ``start - C + (j - start) mod C``, followed by the chunk's own steps. Query ``t`` (position ``start + t``)
    sees the keys at most ``context - 1`` steps older than itself and none after it.
    """
    steps = torch.arange(T)
    if start + T > C:
        used = min(C, start)
        old = start - C + torch.remainder(torch.arange(used) - start, C)
        positions = torch.cat([old, start + steps])
    else:
        positions = torch.arange(start + T)
    delta = (start + steps).view(T, 1) - positions.view(1, -1)
    mask = delta >= 0
    if context is not None:
        mask &= delta < context
    return mask.to(device)


def _is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.bias is None


class _PerStepMatmul(torch.autograd.Function):
    """``y[:, t] = x[:, t] @ weights[t]ᵀ`` with one matmul per step written in place into ``y``.

    Same numbers as a batched matmul on stacked weights, without its copies: the stack of the weights in
    forward and, in backward, a weight gradient per step that is a strided view of the stacked gradient (which
    autograd then copies into each parameter's ``.grad``). Here every step's weight gradient is its own
    contiguous matmul output, and no stacked copy of the weights is kept for backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.new_empty(x.shape[0], x.shape[1], weights[0].shape[0])
        for t, w in enumerate(weights):
            torch.mm(x[:, t], w.t(), out=out[:, t])
        ctx.save_for_backward(x, *weights)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, *weights = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
            for t, w in enumerate(weights):
                torch.mm(grad[:, t], w, out=grad_x[:, t])
        grad_w = [grad[:, t].t().mm(x[:, t]) if ctx.needs_input_grad[1 + t] else None for t in range(len(weights))]
        return (grad_x, *grad_w)


def apply_per_step_linear(
    modules: Sequence[nn.Module], x: torch.Tensor, offset: int = 0, schedule: Sequence[int] | None = None
) -> torch.Tensor:
    """Applies ``modules[set(t)]`` to ``x[:, t]`` for every step ``t`` of ``x [B, T, in]``.

    With one module this is a plain call. With several (per-step weights), bias-free Linears, and LoRALinears over
    them, run one matmul per step into a shared output (:class:`_PerStepMatmul`; the parameter names stay
    ``{name}.{s}.weight``); other modules fall back to a loop over steps.
    """
    if len(modules) == 1:
        return modules[0](x)
    T = x.shape[1]
    idx = step_indices(T, offset, schedule)
    if T == 1:
        return modules[idx[0]](x)
    chosen = [modules[i] for i in idx]
    if all(_is_plain_linear(m) for m in chosen):
        return _PerStepMatmul.apply(x, *[m.weight for m in chosen])
    if all(isinstance(m, LoRALinear) and _is_plain_linear(m.frozen_W) for m in chosen):
        base = _PerStepMatmul.apply(x, *[m.frozen_W.weight for m in chosen])
        low = _PerStepMatmul.apply(x, *[m.lora_A.weight for m in chosen])
        update = _PerStepMatmul.apply(low, *[m.lora_B.weight for m in chosen])
        scaling = torch.tensor([m.scaling for m in chosen], device=x.device, dtype=update.dtype)
        return base + scaling.view(1, T, 1) * update
    return torch.cat([m(x[:, t : t + 1]) for t, m in enumerate(chosen)], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Attention

# Legacy (pre-2025) attention key suffixes, stacked over weight sets, and the module key they map to.
_LEGACY_ATTENTION_KEYS: dict[str, tuple[str, str]] = {
    "in_proj_weight": ("in_projs", "weight"),
    "in_proj_weight_scb": ("in_projs", "weight_scb"),
    "in_proj.weight": ("in_projs", "weight"),
    "in_proj.weight_scb": ("in_projs", "weight_scb"),
    "in_proj.lora_A.weight": ("in_projs", "lora_A.weight"),
    "in_proj.lora_B.weight": ("in_projs", "lora_B.weight"),
    "out_proj.weight": ("out_projs", "weight"),
    "out_proj.weight_scb": ("out_projs", "weight_scb"),
    "out_proj.lora_A.weight": ("out_projs", "lora_A.weight"),
    "out_proj.lora_B.weight": ("out_projs", "lora_B.weight"),
}


@dataclass
class _AttentionState(State):
    kv_cache: torch.Tensor  # [2, B, H_kv, capacity, head_dim], keys already rotated
    offset: torch.Tensor  # [B] int64: tokens seen per item (rope positions and ring-buffer end)
    offset_cpu: int = 0  # tokens seen by this module (all items), selects per-step weights
    # Known on the host: every item has run exactly `offset_cpu` steps and runs the next call (no masked reset,
    # no exec mask with a false entry, no CUDA graph capture since the last full reset). The ring slots and the
    # visible keys then follow from `offset_cpu` alone, so a step needs no per-item index arithmetic.
    aligned: bool = True

    def set_exec_mask(self, exec_mask: torch.Tensor) -> None:
        super().set_exec_mask(exec_mask)
        # Only a host mask is inspected: asking the device would cost a sync per call.
        self.aligned = self.aligned and exec_mask.device.type == "cpu" and bool(exec_mask.all())

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.offset[:] = torch.where(reset_mask, torch.zeros_like(self.offset), self.offset)
        self.aligned = bool(reset_mask.all())
        if self.aligned:
            self.offset_cpu = 0

    def reset_all(self) -> None:
        State.reset(self, torch.ones_like(self.exec_mask))
        self.offset.zero_()
        self.offset_cpu = 0
        self.aligned = True


class StreamingMultiheadAttention(StreamingModule[_AttentionState]):
    """Causal self-attention with fused projections, RoPE, a sliding ``context`` and a ring KV cache.

    Args:
        embed_dim (int): width ``E``.
        num_heads (int): query heads ``H`` (head dim ``E/H``).
        causal (bool): causal mask; with ``False`` no mask is used and ``context`` is ignored.
        context (int | None): keys with ``0 <= pos_q - pos_k < context`` are visible; also the KV-cache capacity.
        rope (RotaryEmbedding | None): rotary embedding applied to q and k.
        kv_repeat (int): query heads per key/value head (grouped-query attention).
        weights_per_step (int): number of per-step weight sets (0: one set for all positions).
        weights_per_step_schedule (list[int] | None): step → weight-set map.
        cross_attention (bool): not supported (only used by conditioned models); only ``False`` is accepted.
        cache_cross_attention (bool): caching of cross-attention keys; without cross-attention it has no effect.

    Parameters are ``in_projs.{s}`` (Linear ``E → E + 2·kv_dim``, packed ``[q | k | v]`` with contiguous heads)
    and ``out_projs.{s}`` (Linear ``E → E``), registered ``out_projs`` first as in Kyutai's files.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        causal: bool = False,
        context: int | None = None,
        rope: RotaryEmbedding | None = None,
        kv_repeat: int = 1,
        weights_per_step: int = 0,
        weights_per_step_schedule: list[int] | None = None,
        cross_attention: bool = False,
        cache_cross_attention: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cross_attention:
            raise NotImplementedError("cross_attention=True (conditioned models) is not supported")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if num_heads % kv_repeat:
            raise ValueError(f"num_heads {num_heads} is not divisible by kv_repeat {kv_repeat}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.causal = causal
        self.context = context
        self.rope = rope
        self.kv_repeat = kv_repeat
        self.head_dim = embed_dim // num_heads
        self.num_kv_heads = num_heads // kv_repeat
        self.weights_per_step = weights_per_step
        self.weights_per_step_schedule = weights_per_step_schedule
        num_sets = 1
        if weights_per_step:
            num_sets = weights_per_step
            if weights_per_step_schedule is not None:
                if len(weights_per_step_schedule) != weights_per_step:
                    raise ValueError(
                        f"weights_per_step_schedule has {len(weights_per_step_schedule)} entries, "
                        f"expected weights_per_step={weights_per_step}"
                    )
                num_sets = max(weights_per_step_schedule) + 1
        self.num_sets = num_sets
        out_dim = embed_dim + 2 * self.num_kv_heads * self.head_dim
        self.out_projs = nn.ModuleList(
            [nn.Linear(embed_dim, embed_dim, bias=False, device=device, dtype=dtype) for _ in range(num_sets)]
        )
        self.in_projs = nn.ModuleList(
            [nn.Linear(embed_dim, out_dim, bias=False, device=device, dtype=dtype) for _ in range(num_sets)]
        )
        self.register_load_state_dict_pre_hook(self._load_legacy_keys)

    def _load_legacy_keys(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Splits legacy stacked keys (``in_proj_weight [sets·(E+2kv), E]``, ...) into per-set keys."""
        for legacy, (target, suffix) in _LEGACY_ATTENTION_KEYS.items():
            key = prefix + legacy
            if key not in state_dict:
                continue
            tensor = state_dict.pop(key)
            if tensor.shape[0] % self.num_sets:
                raise ValueError(
                    f"{key}: {tensor.shape[0]} rows cannot be split into {self.num_sets} weight sets"
                )
            for s, chunk in enumerate(tensor.chunk(self.num_sets, dim=0)):
                state_dict[f"{prefix}{target}.{s}.{suffix}"] = chunk

    @property
    def capacity(self) -> int | None:
        """KV-cache size: ``context``, else ``weights_per_step`` (the depformer), else ``None``."""
        if self.context is not None:
            return self.context
        if self.weights_per_step:
            return self.weights_per_step
        return None

    def _init_streaming_state(self, batch_size: int) -> _AttentionState:
        capacity = self.capacity
        if capacity is None:
            raise RuntimeError("streaming attention needs a `context` or `weights_per_step` to size its KV cache")
        weight = self.in_projs[0].weight if not isinstance(self.in_projs[0], LoRALinear) else (
            self.in_projs[0].frozen_W.weight
        )
        kv_cache = torch.zeros(
            2, batch_size, self.num_kv_heads, capacity, self.head_dim, device=weight.device, dtype=weight.dtype
        )
        offset = torch.zeros(batch_size, dtype=torch.long, device=weight.device)
        return _AttentionState(batch_size, weight.device, kv_cache=kv_cache, offset=offset)

    def _append_kv_aligned(
        self, state: _AttentionState, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`_append_kv` for an aligned state (see ``_AttentionState.aligned``): the same keys, values and
        visibility, with the ring slots and the mask ``[T, S]`` (``None``: every key is visible) derived from
        ``offset_cpu`` on the host instead of from per-item positions on the device.

        The general path spends a dozen small kernels per step on positions, gathers and mask arithmetic; the
        attention of the temporal transformer, the depformer and Mimi's transformers is called about forty times
        per frame, so this is a large share of a streaming frame at batch 1. A single step needs no mask: the
        slot it overwrites is ``capacity`` steps old, and every key left is within ``context`` of the query.
        """
        cache = state.kv_cache
        C = cache.shape[3]
        T = k.shape[2]
        start = state.offset_cpu
        concatenate = T > 1 and start + T > C
        if concatenate:  # the write could evict keys the chunk's first queries still see
            used = min(C, start)
            keys = torch.cat([cache[0, :, :, :used], k.to(cache.dtype)], dim=2)
            values = torch.cat([cache[1, :, :, :used], v.to(cache.dtype)], dim=2)
        n_write = min(T, C)  # only the last C steps of the chunk stay in the buffer
        first = (start + T - n_write) % C
        for src_begin, slot, count in _ring_spans(T - n_write, first, n_write, C):
            cache[0, :, :, slot : slot + count] = k[:, :, src_begin : src_begin + count]
            cache[1, :, :, slot : slot + count] = v[:, :, src_begin : src_begin + count]
        if not concatenate:
            used = min(C, start + T)
            keys, values = cache[0, :, :, :used], cache[1, :, :, :used]
        mask = None
        if T > 1 and self.causal:
            # The mask depends on `start` only through `start % C` once the ring has wrapped.
            phase = start if start < C else C + start % C
            mask = _aligned_chunk_mask(phase, T, C, self.context, k.device)
        return keys, values, mask

    def _append_kv(
        self, state: _AttentionState, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Writes ``k, v [B, H_kv, T, D]`` into the ring buffer; returns the keys/values to attend to and their
        absolute positions ``[B, S]`` (negative for slots never written).

        With ``T == 1`` the new step is written first and the buffer is returned (the overwritten slot is
        exactly ``context`` steps old, hence invisible). With ``T > 1`` a write could evict keys still visible to
        the first queries of the chunk, so once the buffer may wrap the old buffer and the new steps are returned
        concatenated: chunked streaming then equals the full-sequence pass for any chunk size. Before that
        (``offset_cpu + T <= capacity``) nothing is evicted and slot ``i`` holds position ``i``, so the steps
        are written first and the buffer's prefix is returned: the same keys in the same order, without copying
        the whole prefix twice per call (Mimi's 25 Hz transformers take two steps per frame).

        Until the buffer has wrapped, only its first ``offset_cpu`` (+ ``T``) slots can hold keys (no item has
        run more steps than the module), so only those are returned: the attention of a conversation shorter
        than the context reads what was written, not the whole capacity. The slots left out are masked anyway.
        While a CUDA graph is being captured the whole buffer is returned: the graph is replayed at later steps
        with the shapes of the capture, and only the mask, computed on the device, follows the step.
        """
        cache = state.kv_cache
        _, B, Hkv, C, D = cache.shape
        T = k.shape[2]
        device = k.device
        exec_mask = state.exec_mask
        arange_c = torch.arange(C, device=device)

        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:  # replays do not advance `offset_cpu`, so the host no longer knows where the items are
            state.aligned = False

        def written(steps: int) -> int:
            return C if capturing else min(C, steps)

        def slot_positions(end: torch.Tensor, used: int) -> torch.Tensor:
            return end.view(B, 1) - C + (arange_c[:used].view(1, used) - end.view(B, 1)) % C

        # A captured graph is replayed after the ring wraps, so it always takes the concatenating path.
        concatenate = T > 1 and (capturing or state.offset_cpu + T > C)
        if concatenate:
            used = written(state.offset_cpu)
            pos_old = slot_positions(state.offset, used)
            keys = torch.cat([cache[0, :, :, :used], k.to(cache.dtype)], dim=2)
            values = torch.cat([cache[1, :, :, :used], v.to(cache.dtype)], dim=2)
            pos_new = state.offset.view(B, 1) + torch.arange(T, device=device)
            positions = torch.cat([pos_old, pos_new], dim=1)
        # Only the last C steps of the chunk can stay in the buffer.
        n_write = min(T, C)
        slots = (state.offset.view(B, 1) + torch.arange(T - n_write, T, device=device)) % C  # [B, n_write]
        index = slots.view(1, B, 1, n_write, 1).expand(2, B, Hkv, n_write, D)
        new = torch.stack([k[:, :, T - n_write :], v[:, :, T - n_write :]]).to(cache.dtype)
        old = cache.gather(3, index)
        cache.scatter_(3, index, torch.where(exec_mask.view(1, B, 1, 1, 1), new, old))
        if concatenate:
            return keys, values, positions
        end = state.offset + T * exec_mask.long()
        used = written(state.offset_cpu + T)
        return cache[0, :, :, :used], cache[1, :, :, :used], slot_positions(end, used)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Self-attention of ``query [B, T, E]`` → ``[B, T, E]``.

        Keys and values are projected from ``query``; ``key`` and ``value`` exist for the three-argument call
        ``attn(x, x, x)`` and must be ``None`` or ``query`` itself (attending to another source is
        cross-attention, which is not supported).
        """
        for name, other in (("key", key), ("value", value)):
            if other is not None and other is not query:
                raise NotImplementedError(
                    f"StreamingMultiheadAttention.forward: {name} must be None or the query tensor "
                    "(cross-attention is not supported)"
                )
        x = query
        state = self._streaming_state
        B, T, E = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        offset_cpu = 0 if state is None else state.offset_cpu
        schedule = self.weights_per_step_schedule
        projected = apply_per_step_linear(self.in_projs, x, offset_cpu, schedule)  # [B, T, E + 2·kv_dim]
        aligned = state is not None and state.aligned and not (
            x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        )
        rope_offset: torch.Tensor | int = 0 if state is None else (offset_cpu if aligned else state.offset)
        # split/unbind rather than slices: their backwards concatenate or stack the gradients, where each slice's
        # backward would zero-fill a buffer the size of `projected`.
        if Hkv == H:  # q, k and v have the same shape: one rotation for q and k, one gradient buffer
            packed = projected.view(B, T, 3, H, D)
            if self.rope is not None:
                q, k, v = self.rope.rotate_packed_qkv(packed, rope_offset)
            else:
                q, k, v = packed.unbind(2)
        else:
            q, k, v = projected.split([E, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
            if self.rope is not None:
                q, k = self.rope.rotate(q, rope_offset), self.rope.rotate(k, rope_offset)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        attn_mask: torch.Tensor | None = None
        is_causal = False
        if state is None:
            if self.causal:
                if self.context is None or T <= self.context:
                    is_causal = True
                else:
                    pos = torch.arange(T, device=x.device)
                    delta = pos.view(T, 1) - pos.view(1, T)
                    attn_mask = (delta >= 0) & (delta < self.context)
        elif aligned:
            k, v, attn_mask = self._append_kv_aligned(state, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            k, v, pos_k = self._append_kv(state, k, v)
            pos_q = state.offset.view(B, 1) + torch.arange(T, device=x.device)  # [B, T]
            attn_mask = (pos_k >= 0).view(B, 1, 1, -1)
            if self.causal:
                delta = pos_q.view(B, 1, T, 1) - pos_k.view(B, 1, 1, -1)
                attn_mask = attn_mask & (delta >= 0)
                if self.context is not None:
                    attn_mask = attn_mask & (delta < self.context)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.kv_repeat > 1:
            k = k.repeat_interleave(self.kv_repeat, dim=1)
            v = v.repeat_interleave(self.kv_repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(B, T, E)
        out = apply_per_step_linear(self.out_projs, out, offset_cpu, schedule)
        if state is not None:
            if aligned:
                state.offset += T
            else:
                state.offset += T * state.exec_mask.long()
            state.offset_cpu += T
        return out


def set_attention_context(model: nn.Module, context: int | None = None) -> None:
    """Sets the attention window of every :class:`StreamingMultiheadAttention` in ``model`` to ``context``
    (``None``: unlimited), for good rather than for a scope, so a recomputed (checkpointed) forward sees the
    same window as the first one.

    Note:
        The KV-cache capacity follows ``context``, so call this outside a streaming block.
    """
    for module in model.modules():
        if isinstance(module, StreamingMultiheadAttention):
            module.context = context


# ----------------------------------------------------------------------------------------------------------------
# Layers


@dataclass
class _LayerState(State):
    offset_cpu: int = 0  # selects the per-step FFN weights

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        if bool(reset_mask.all()):
            self.offset_cpu = 0

    def reset_all(self) -> None:
        State.reset(self, torch.ones_like(self.exec_mask))
        self.offset_cpu = 0


class StreamingTransformerLayer(StreamingModule[_LayerState]):
    """Pre-norm layer: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(ffn(norm2(x)))``.

    Args:
        d_model (int): width.
        num_heads (int): attention heads.
        dim_feedforward (int | list[int]): FFN width (one per weight set when a list).
        causal (bool), context (int | None), rope: see :class:`StreamingMultiheadAttention`.
        norm (str): norm type (:func:`create_norm_fn`).
        layer_scale (float | None): LayerScale init; ``None`` for none (no keys).
        gating (str): ``"none"`` for ``linear1``/``linear2`` FFN, else the activation of an
            :class:`ActivationGating` (``gating`` or ``gating.{s}`` per step).
        kv_repeat (int): grouped-query attention factor.
        weights_per_step (int), weights_per_step_schedule (list[int] | None): per-step weight sets.
        activation (Callable | str): activation of the non-gated FFN (default exact GELU).
        skip_self_attn (bool): no attention block (no ``self_attn``/``norm1``).
        cross_attention (bool): not supported; only ``False`` is accepted.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int | list[int] = 2048,
        causal: bool = False,
        context: int | None = None,
        rope: RotaryEmbedding | None = None,
        norm: str = "layer_norm",
        layer_scale: float | None = None,
        gating: str = "none",
        kv_repeat: int = 1,
        weights_per_step: int = 0,
        weights_per_step_schedule: list[int] | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | str = F.gelu,
        skip_self_attn: bool = False,
        cross_attention: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cross_attention:
            raise NotImplementedError("cross_attention=True (conditioned models) is not supported")
        if isinstance(activation, str):
            activation = get_activation(activation)
        self.weights_per_step = weights_per_step
        self.weights_per_step_schedule = weights_per_step_schedule
        self.skip_self_attn = skip_self_attn
        if not skip_self_attn:
            self.self_attn = StreamingMultiheadAttention(
                d_model,
                num_heads,
                causal=causal,
                context=context,
                rope=rope,
                weights_per_step=weights_per_step,
                weights_per_step_schedule=weights_per_step_schedule,
                kv_repeat=kv_repeat,
                device=device,
                dtype=dtype,
            )
            self.norm1 = create_norm_fn(norm, d_model, device=device, dtype=dtype)
        self.norm2 = create_norm_fn(norm, d_model, device=device, dtype=dtype)

        num_sets = 1
        if weights_per_step:
            num_sets = weights_per_step if weights_per_step_schedule is None else max(weights_per_step_schedule) + 1
        if isinstance(dim_feedforward, (list, tuple)):
            if len(dim_feedforward) != num_sets:
                raise ValueError(
                    f"dim_feedforward has {len(dim_feedforward)} entries, expected one per weight set ({num_sets})"
                )
            ff_sizes = list(dim_feedforward)
        else:
            ff_sizes = [dim_feedforward] * num_sets

        self.gating: ActivationGating | nn.ModuleList | None = None
        if gating == "none":
            if weights_per_step:
                raise ValueError("weights_per_step requires a gated FFN (gating != 'none')")
            self.activation = activation
            self.linear1 = nn.Linear(d_model, ff_sizes[0], bias=False, device=device, dtype=dtype)
            self.linear2 = nn.Linear(ff_sizes[0], d_model, bias=False, device=device, dtype=dtype)
        else:
            act = get_activation(gating)
            if weights_per_step:
                self.gating = nn.ModuleList(
                    [ActivationGating(d_model, ff, act, device=device, dtype=dtype) for ff in ff_sizes]
                )
            else:
                self.gating = ActivationGating(d_model, ff_sizes[0], act, device=device, dtype=dtype)

        self.layer_scale_1: nn.Module
        self.layer_scale_2: nn.Module
        if layer_scale is None:
            self.layer_scale_1 = nn.Identity()
            self.layer_scale_2 = nn.Identity()
        else:
            self.layer_scale_1 = LayerScale(d_model, layer_scale, device=device, dtype=dtype)
            self.layer_scale_2 = LayerScale(d_model, layer_scale, device=device, dtype=dtype)

    def _init_streaming_state(self, batch_size: int) -> _LayerState:
        device = next(self.parameters()).device
        return _LayerState(batch_size, device)

    def _ff_block(self, x: torch.Tensor, offset_cpu: int) -> torch.Tensor:
        if self.gating is None:
            return self.linear2(self.activation(self.linear1(x)))
        if isinstance(self.gating, ActivationGating):
            return self.gating(x)
        gates = list(self.gating)
        T = x.shape[1]
        idx = step_indices(T, offset_cpu, self.weights_per_step_schedule)
        if T == 1:
            return gates[idx[0]](x)
        if len({g.hidden for g in gates}) == 1:
            schedule = self.weights_per_step_schedule
            u = apply_per_step_linear([g.linear_in for g in gates], x, offset_cpu, schedule)
            h = gates[0].gate(u)
            return apply_per_step_linear([g.linear_out for g in gates], h, offset_cpu, schedule)
        return torch.cat([gates[i](x[:, t : t + 1]) for t, i in enumerate(idx)], dim=1)

    def forward(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, T, d_model]`` → same shape; ``cross_attention_src`` must be ``None`` (no cross-attention)."""
        if cross_attention_src is not None:
            raise NotImplementedError(
                "StreamingTransformerLayer.forward: cross_attention_src must be None (cross-attention is not supported)"
            )
        state = self._streaming_state
        offset_cpu = 0 if state is None else state.offset_cpu
        if not self.skip_self_attn:
            update = self.layer_scale_1(self.self_attn(self.norm1(x)))
            x = x.to(update.dtype) + update
        update = self.layer_scale_2(self._ff_block(self.norm2(x), offset_cpu))
        x = x.to(update.dtype) + update
        if state is not None:
            state.offset_cpu += x.shape[1]
        return x


# ----------------------------------------------------------------------------------------------------------------
# Transformers

POSITIONAL_EMBEDDINGS = ("sin", "rope", "sin_rope", "none", "rope_concat")


@dataclass
class _TransformerState(State):
    offsets: torch.Tensor  # [B] int64, positions of the sinusoidal embedding

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.offsets[:] = torch.where(reset_mask, torch.zeros_like(self.offsets), self.offsets)


class StreamingTransformer(StreamingModule[_TransformerState]):
    """A stack of :class:`StreamingTransformerLayer` with a positional embedding.

    Args:
        d_model (int): width.
        num_heads (int): attention heads.
        num_layers (int): number of layers.
        dim_feedforward (int | list[int]): FFN width.
        causal (bool), context (int | None): attention masking (see :class:`StreamingMultiheadAttention`).
        positional_embedding (str): one of :data:`POSITIONAL_EMBEDDINGS`.
        max_period (float): period of the sinusoidal embedding and of RoPE.
        positional_scale (float): multiplier of the sinusoidal embedding.
        betas (tuple[float, float] | None): kept for config compatibility (optimizer betas of Kyutai's trainer).
        layer_class (type): layer class.
        quantize (bool): int8 weights; not supported, only ``False`` is accepted.
        checkpointing (bool): non-reentrant activation checkpointing of every layer in training.
        **kwargs: passed to every layer (``norm``, ``layer_scale``, ``gating``, ``weights_per_step``, ...); an
            unknown key raises ``TypeError`` naming it.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int | list[int] = 2048,
        causal: bool = False,
        context: int | None = None,
        positional_embedding: str = "sin",
        max_period: float = 10_000,
        positional_scale: float = 1.0,
        betas: tuple[float, float] | None = None,
        layer_class: type[StreamingTransformerLayer] = StreamingTransformerLayer,
        quantize: bool = False,
        checkpointing: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if quantize:
            raise NotImplementedError("StreamingTransformer(quantize=True): int8 quantisation is not supported")
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        if positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ValueError(
                f"unknown positional_embedding {positional_embedding!r}; expected one of {list(POSITIONAL_EMBEDDINGS)}"
            )
        self.d_model = d_model
        self.positional_embedding = positional_embedding
        self.max_period = max_period
        self.positional_scale = positional_scale
        self.betas = betas
        self.checkpointing = checkpointing
        self.rope: RotaryEmbedding | None = None
        if positional_embedding in ("rope", "sin_rope", "rope_concat"):
            self.rope = RotaryEmbedding(interleave=positional_embedding != "rope_concat", max_period=max_period)
        self.layers = nn.ModuleList(
            [
                layer_class(
                    d_model,
                    num_heads,
                    dim_feedforward=dim_feedforward,
                    causal=causal,
                    context=context,
                    rope=self.rope,
                    device=device,
                    dtype=dtype,
                    **kwargs,
                )
                for _ in range(num_layers)
            ]
        )

    def _init_streaming_state(self, batch_size: int) -> _TransformerState:
        device = next(self.parameters()).device
        offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        return _TransformerState(batch_size, device, offsets=offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, d_model]`` → same shape, in the input dtype."""
        B, T, C = x.shape
        input_dtype = x.dtype
        state = self._streaming_state
        if self.positional_embedding in ("sin", "sin_rope"):
            positions = torch.arange(T, device=x.device).view(1, -1, 1)
            if state is not None:
                positions = positions + state.offsets.view(-1, 1, 1)
            pos_emb = create_sin_embedding(positions, C, max_period=self.max_period, dtype=x.dtype)
            x = x + self.positional_scale * pos_emb
        use_checkpoint = self.checkpointing and self.training and state is None and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpoint:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        if state is not None:
            state.offsets += T * state.exec_mask.long()
        return x.to(input_dtype)


class ProjectedTransformer(StreamingContainer):
    """A :class:`StreamingTransformer` with optional input/output projections (Mimi's wrapper).

    Args:
        input_dimension (int): input channels; a bias-free ``input_proj`` maps them to ``d_model`` if different.
        output_dimensions (Sequence[int]): one output per entry; ``output_projs.{i}`` is Identity when equal to
            ``d_model``, else a bias-free Linear.
        d_model (int): transformer width.
        conv_layout (bool): inputs/outputs are ``[B, C, T]`` instead of ``[B, T, C]``.
        **kwargs: passed to :class:`StreamingTransformer`.

    Returns (forward):
        list[torch.Tensor]: one tensor per output dimension.
    """

    def __init__(
        self,
        input_dimension: int,
        output_dimensions: Sequence[int],
        d_model: int,
        *,
        conv_layout: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.transformer = StreamingTransformer(d_model=d_model, device=device, dtype=dtype, **kwargs)
        self.input_dimension = input_dimension
        self.output_dimensions = list(output_dimensions)
        self.conv_layout = conv_layout
        self.input_proj: nn.Linear | None = None
        if d_model != input_dimension:
            self.input_proj = nn.Linear(input_dimension, d_model, bias=False, device=device, dtype=dtype)
        self.output_projs = nn.ModuleList()
        for dim in self.output_dimensions:
            if dim == d_model:
                self.output_projs.append(nn.Identity())
            else:
                self.output_projs.append(nn.Linear(d_model, dim, bias=False, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.conv_layout:
            x = x.transpose(1, 2)
        if self.input_proj is not None:
            x = self.input_proj(x)
        z = self.transformer(x)
        ys = []
        for proj in self.output_projs:
            y = proj(z)
            if self.conv_layout:
                y = y.transpose(1, 2)
            ys.append(y)
        return ys


__all__ = [
    "RMSNorm",
    "LayerNormF32",
    "LayerScale",
    "NORM_TYPES",
    "POSITIONAL_EMBEDDINGS",
    "ProjectedTransformer",
    "StreamingMultiheadAttention",
    "StreamingTransformer",
    "StreamingTransformerLayer",
    "apply_per_step_linear",
    "create_norm_fn",
    "create_sin_embedding",
    "set_attention_context",
]
