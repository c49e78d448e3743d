"""Causal 1-D convolutions that stream: chunked calls do the math of one call on the whole signal.

Both layers have one code path: outside a streaming block they start from the initial (zero or replicated)
left context, so a one-shot call is exactly the first streaming call on the whole input.

Speed notes (CPU): the transposed conv runs as an equivalent ordinary conv on its input frames
(:func:`polyphase_weight`), which oneDNN runs 1.2-2.5x faster and which turns the streaming overlap into a
plain left context; and both layers accept the activation that precedes them, so that with autograd off an ELU
is written straight into the left-padded input (:func:`with_context`) instead of being copied there.

Key nesting follows Kyutai's checkpoints: ``conv.conv.weight`` for :class:`StreamingConv1d` and
``convtr.convtr.weight`` for :class:`StreamingConvTranspose1d` (the middle level once held weight norm, which
the published weights have folded away).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._unsupported import unsupported_names
from .streaming import State, StreamingModule

PAD_MODES = ("constant", "replicate")
# Row lengths (samples) for which torch's vectorised elementwise kernels need no scalar remainder.
_WHOLE_VECTORS = 64


# Weight parametrisations a conv accepts: the published weights have weight norm folded in.
CONV_NORMALIZATIONS = frozenset({"none"})


def _check_norm(norm: str) -> None:
    if norm not in CONV_NORMALIZATIONS:
        raise ValueError(f"norm={norm!r} is not supported: only 'none' (weight norm folded into the weights)")


def apply_parametrization_norm(module: nn.Module, norm: str = "none") -> nn.Module:
    """``module`` with the weight parametrisation ``norm``; only ``"none"`` (the module as is) is supported.

    The published Mimi weights have weight norm folded in, so inference needs no parametrisation.
    """
    _check_norm(norm)
    return module


def get_extra_padding_for_conv1d(x: torch.Tensor, kernel_size: int, stride: int, padding_total: int = 0) -> int:
    """Zeros to append to ``x [..., L]`` (already padded by ``padding_total``) so that its last window is full.

    A conv of kernel ``kernel_size`` and stride ``stride`` drops the samples after its last full window; with
    these extra samples every input sample reaches an output frame, and the output has
    ``ceil((L - kernel_size + padding_total) / stride) + 1`` frames.
    """
    length = x.shape[-1]
    frames = -(-(length - kernel_size + padding_total) // stride) + 1
    needed = (frames - 1) * stride + kernel_size - padding_total
    return max(needed - length, 0)


def pad_for_conv1d(x: torch.Tensor, kernel_size: int, stride: int, padding_total: int = 0) -> torch.Tensor:
    """``x`` right-padded with zeros by :func:`get_extra_padding_for_conv1d` (whole windows only)."""
    extra = get_extra_padding_for_conv1d(x, kernel_size, stride, padding_total)
    return nn.functional.pad(x, (0, extra))


def pad1d(
    x: torch.Tensor, paddings: tuple[int, int], mode: str = "constant", value: float = 0.0
) -> torch.Tensor:
    """Pads the last axis of ``x`` by ``paddings = (left, right)``.

    ``mode="reflect"`` also works on inputs no longer than a padding (where ``torch`` refuses): the input is
    first extended with zeros on the right, reflected, and the zeros are cut again.
    """
    left, right = paddings
    if left < 0 or right < 0:
        raise ValueError(f"paddings must be non-negative, got {paddings}")
    if mode != "reflect":
        return nn.functional.pad(x, (left, right), mode, value)
    length = x.shape[-1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = nn.functional.pad(x, (0, extra))
    padded = nn.functional.pad(x, (left, right), mode)
    return padded[..., : padded.shape[-1] - extra]


def unpad1d(x: torch.Tensor, paddings: tuple[int, int]) -> torch.Tensor:
    """Removes ``paddings = (left, right)`` samples from the ends of the last axis (inverse of :func:`pad1d`)."""
    left, right = paddings
    if left < 0 or right < 0 or left + right > x.shape[-1]:
        raise ValueError(f"cannot remove paddings {paddings} from a length of {x.shape[-1]}")
    return x[..., left : x.shape[-1] - right]


class NormConv1d(nn.Module):
    """An ``nn.Conv1d`` at ``.conv`` (gives the ``conv.conv.weight`` key nesting of Mimi's checkpoints).

    Args:
        *args: positional arguments of ``nn.Conv1d``.
        causal (bool): recorded for the owner; the conv itself pads nothing.
        norm (str): must be ``"none"``: the published weights have weight norm folded in.
        norm_kwargs (dict | None): arguments of the norm (none apply with ``"none"``).
        **kwargs: keyword arguments of ``nn.Conv1d``.
    """

    def __init__(
        self, *args: Any, causal: bool = False, norm: str = "none", norm_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        super().__init__()
        self.conv = apply_parametrization_norm(nn.Conv1d(*args, **kwargs), norm)
        self.causal = causal
        self.norm_type = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class NormConvTranspose1d(nn.Module):
    """An ``nn.ConvTranspose1d`` at ``.convtr`` (gives the ``convtr.convtr.weight`` key nesting).

    Takes the same arguments as :class:`NormConv1d`, for ``nn.ConvTranspose1d``.
    """

    def __init__(
        self, *args: Any, causal: bool = False, norm: str = "none", norm_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        super().__init__()
        self.convtr = apply_parametrization_norm(nn.ConvTranspose1d(*args, **kwargs), norm)
        self.causal = causal
        self.norm_type = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convtr(x)


def _keep_where(exec_mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` for executed batch items, ``old`` for the others (``[B, ...]`` tensors)."""
    if bool(exec_mask.all()):
        return new
    return torch.where(exec_mask.view(-1, *([1] * (new.dim() - 1))), new, old)


def with_context(context: torch.Tensor, x: torch.Tensor, activation: nn.Module | None = None) -> torch.Tensor:
    """``cat([context, activation(x)], dim=-1)`` (``activation`` optional).

    With autograd off, an ``nn.ELU`` writes its output straight into the concatenation: at Mimi's high rates
    this saves a full pass over each activation, about 5% of a one-shot call. Only when ``x`` has contiguous
    rows whose length is a multiple of 64: torch's vectorised ELU hands the last ``length % 32`` (AVX-512)
    samples of each row to a scalar ``expm1`` that rounds differently, and the rows of the concatenation are
    shorter than the flat tensor an unfused call sweeps; with whole vectors on every row both paths do the
    same math, and their results are equal up to float32 rounding (vector width, FMA and where the threads
    split the work can differ between the two kernels).
    """
    if activation is None:
        return torch.cat([context, x], dim=-1)
    fusable = (
        type(activation) is nn.ELU
        and not activation.inplace
        and x.stride(-1) == 1
        and x.shape[-1] % _WHOLE_VECTORS == 0
    )
    if not fusable or torch.is_grad_enabled():
        return torch.cat([context, activation(x)], dim=-1)
    pad = context.shape[-1]
    out = x.new_empty(*x.shape[:-1], pad + x.shape[-1])
    out[..., :pad].copy_(context)
    torch.ops.aten.elu.out(x, activation.alpha, 1.0, 1.0, out=out[..., pad:])
    return out


@dataclass
class _ConvState(State):
    """Left context of a causal conv: the last ``P`` input samples (``previous [B, C_in, P]``).

    ``first [B]`` marks streams that have not seen a sample yet; ``replicate`` padding then uses their first
    sample instead of ``previous``.
    """

    previous: torch.Tensor
    first: torch.Tensor

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.previous[:] = torch.where(reset_mask[:, None, None], 0.0, self.previous)
        self.first[:] = self.first | reset_mask


class StreamingConv1d(StreamingModule[_ConvState]):
    """Causal conv: all ``P = (kernel_size - 1) * dilation + 1 - stride`` padding samples go on the left.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        kernel_size (int): kernel size.
        stride (int): stride; the input length of every call must be a positive multiple of it.
        dilation (int): dilation.
        groups (int): groups.
        bias (bool): add a bias.
        causal (bool): must be True (only causal convs exist in Moshi's codec).
        norm (str): must be ``"none"``.
        norm_kwargs (dict | None): arguments of the norm (none apply with ``"none"``).
        pad_mode (str): ``"constant"`` (zeros) or ``"replicate"`` (copies of the first sample).
        device (torch.device | str | None): where the weights live.
        dtype (torch.dtype | None): weight dtype.

    Input ``[B, in_channels, T]`` -> output ``[B, out_channels, T / stride]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        causal: bool = True,
        norm: str = "none",
        norm_kwargs: dict | None = None,
        pad_mode: str = "constant",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not causal:
            raise ValueError("causal=False is not supported: Mimi's convolutions are causal")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        effective_kernel = (kernel_size - 1) * dilation + 1
        if effective_kernel < stride:
            raise ValueError(f"effective kernel size {effective_kernel} is smaller than the stride {stride}")
        self.conv = NormConv1d(
            in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups, bias=bias,
            causal=causal, norm=norm, norm_kwargs=norm_kwargs, device=device, dtype=dtype,
        )
        self.pad_mode = pad_mode
        self.padding_total = effective_kernel - stride

    @property
    def stride(self) -> int:
        return self.conv.conv.stride[0]

    def _init_streaming_state(self, batch_size: int) -> _ConvState:
        weight = self.conv.conv.weight
        previous = torch.zeros(
            batch_size, self.conv.conv.in_channels, self.padding_total, device=weight.device, dtype=weight.dtype
        )
        first = torch.ones(batch_size, dtype=torch.bool, device=weight.device)
        return _ConvState(batch_size, weight.device, previous=previous, first=first)

    def forward(self, x: torch.Tensor, activation: nn.Module | None = None) -> torch.Tensor:
        """``conv1d(pad_left(activation(x)))``.

        Args:
            x (torch.Tensor): ``[B, in_channels, T]``.
            activation (nn.Module | None): applied to ``x`` first. Passing it here rather than calling it
                before lets an ELU write its output straight after the left context (see :func:`with_context`).
        """
        batch, _, length = x.shape
        if length == 0 or length % self.stride != 0:
            raise ValueError(f"input length must be a positive multiple of the stride {self.stride}, got {length}")
        streaming = self._streaming_state is not None
        state = self._streaming_state if streaming else self._init_streaming_state(batch)
        if state.batch_size != batch:
            raise ValueError(f"streaming batch size is {state.batch_size}, got an input of batch {batch}")
        pad = self.padding_total
        if activation is not None and (pad == 0 or self.pad_mode == "replicate"):
            x, activation = activation(x), None
        if pad > 0:
            previous = state.previous.to(x.dtype)
            if self.pad_mode == "replicate":
                first_sample = x[..., :1].expand(-1, -1, pad)
                if not streaming:
                    previous = first_sample
                else:
                    previous = torch.where(state.first[:, None, None], first_sample, previous)
            x = with_context(previous, x, activation)
            if streaming:
                state.previous[:] = _keep_where(state.exec_mask, x[..., -pad:], state.previous)
        if streaming:
            state.first[:] = state.first & ~state.exec_mask
        return self.conv(x)


def _version_of(tensor: torch.Tensor) -> int | None:
    """The in-place version counter of ``tensor``, or None for inference tensors, which do not keep one."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def polyphase_weight(weight: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
    """Rewrites a transposed-conv weight as the weight of an equivalent causal stride-1 conv.

    A transposed conv with stride ``S`` writes ``S`` output phases per input frame; phase ``j`` of frame ``t``
    is ``sum_i x[t - i] . W[:, :, i * S + j]``. That is an ordinary conv over the input frames with
    ``C_out * S`` output channels and ``m = ceil(K / S)`` taps, which oneDNN runs far faster than its
    transposed conv and which needs no overlap-add.

    Args:
        weight (torch.Tensor): ``[C_in, C_out / groups, K]`` (``nn.ConvTranspose1d`` layout).
        stride (int): the stride ``S``.
        groups (int): the groups of the transposed conv (kept by the equivalent conv).

    Returns:
        torch.Tensor: ``[C_out * S, C_in / groups, m]``; output channel ``c * S + j`` is phase ``j`` of
        channel ``c``, and tap ``k`` reads input frame ``t - (m - 1 - k)``.
    """
    c_in, c_out_per_group, kernel_size = weight.shape
    taps = -(-kernel_size // stride)
    if taps * stride != kernel_size:
        weight = nn.functional.pad(weight, (0, taps * stride - kernel_size))
    # [g, C_in/g, C_out/g, i, j] with kernel index i * S + j; tap k = m - 1 - i.
    split = weight.reshape(groups, c_in // groups, c_out_per_group, taps, stride).flip(3)
    return split.permute(0, 2, 4, 1, 3).reshape(groups * c_out_per_group * stride, c_in // groups, taps)


@dataclass
class _ConvTrState(State):
    """Last ``m - 1`` input frames of a transposed conv (``previous [B, C_in, m - 1]``, zeros at the start).

    With the polyphase form (:func:`polyphase_weight`) the overlap of successive frames is an ordinary left
    context, so a streamed call does the same math as the one-shot call on the same samples (equal up to
    float32 rounding: the chunk shapes differ).
    """

    previous: torch.Tensor

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.previous[:] = torch.where(reset_mask[:, None, None], 0.0, self.previous)


class StreamingConvTranspose1d(StreamingModule[_ConvTrState]):
    """Causal transposed conv: ``T`` frames in, ``T * stride`` samples out (``K - S`` trimmed on the right).

    It runs as the equivalent stride-1 conv of :func:`polyphase_weight` on the input frames with ``m - 1``
    frames of left context (``m = ceil(K / S)``), then interleaves the ``S`` phases. That equals
    ``conv_transpose1d`` trimmed by ``K - S`` up to float rounding; streaming keeps the last ``m - 1`` input
    frames, so chunked output equals one-shot output.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        kernel_size (int): kernel size ``K`` (at least the stride).
        stride (int): stride ``S``.
        groups (int): groups.
        bias (bool): add a bias.
        causal (bool): must be True.
        norm (str): must be ``"none"``.
        trim_right_ratio (float): share of the ``K - S`` overhang trimmed on the right; must be 1.0 (causal).
        norm_kwargs (dict | None): arguments of the norm (none apply with ``"none"``).
        device (torch.device | str | None): where the weights live.
        dtype (torch.dtype | None): weight dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        causal: bool = True,
        norm: str = "none",
        trim_right_ratio: float = 1.0,
        norm_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not causal:
            raise ValueError("causal=False is not supported: Mimi's convolutions are causal")
        if trim_right_ratio != 1.0:
            raise ValueError(f"trim_right_ratio={trim_right_ratio} is not supported: a causal conv trims right")
        if kernel_size < stride:
            raise ValueError(f"kernel_size {kernel_size} is smaller than the stride {stride}")
        self.convtr = NormConvTranspose1d(
            in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias, causal=causal, norm=norm,
            norm_kwargs=norm_kwargs, device=device, dtype=dtype,
        )
        self.context_frames = -(-kernel_size // stride) - 1
        self._cache_key: tuple | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def stride(self) -> int:
        return self.convtr.convtr.stride[0]

    def _init_streaming_state(self, batch_size: int) -> _ConvTrState:
        weight = self.convtr.convtr.weight
        previous = torch.zeros(
            batch_size, self.convtr.convtr.in_channels, self.context_frames, device=weight.device, dtype=weight.dtype
        )
        return _ConvTrState(batch_size, weight.device, previous=previous)

    def _conv_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Polyphase weight and per-phase bias, cached while the parameters are unchanged.

        Rebuilding them costs a full pass over the weight (33.5 MB for Mimi's first decoder layer), as much as
        a streaming frame's convolution itself. They are rebuilt on every call when autograd must reach the
        parameters. Like the codebook cache, the key is the parameters' identity, storage and in-place
        version, so edits through ``.data`` (which bypass the version counter) are not seen.
        """
        convtr = self.convtr.convtr
        params = [p for p in (convtr.weight, convtr.bias) if p is not None]
        grad = torch.is_grad_enabled()
        if grad and any(p.requires_grad for p in params):
            return self._build_conv_params()
        versions = tuple(_version_of(p) for p in params)
        key = tuple((id(p), p.data_ptr(), p.device, p.dtype) for p in params) + versions
        stale = self._cache is None or key != self._cache_key or None in versions
        # An inference-mode cache must not be saved for backward (when the input requires grad).
        if stale or (grad and self._cache is not None and self._cache[0].is_inference()):
            self._cache, self._cache_key = self._build_conv_params(), key
        return self._cache

    def _build_conv_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        convtr = self.convtr.convtr
        stride = self.stride
        bias = None if convtr.bias is None else convtr.bias.repeat_interleave(stride)
        return polyphase_weight(convtr.weight, stride, convtr.groups).contiguous(), bias

    def forward(self, x: torch.Tensor, activation: nn.Module | None = None) -> torch.Tensor:
        """Frames ``[B, in_channels, T]`` -> samples ``[B, out_channels, T * stride]``.

        ``activation`` (optional) is applied to ``x`` first, fused with the left-context copy as in
        :meth:`StreamingConv1d.forward`.
        """
        batch, _, length = x.shape
        if length == 0:
            raise ValueError("input of the transposed conv is empty")
        streaming = self._streaming_state is not None
        state = self._streaming_state if streaming else None
        if state is not None and state.batch_size != batch:
            raise ValueError(f"streaming batch size is {state.batch_size}, got an input of batch {batch}")
        context = self.context_frames
        if context == 0 and activation is not None:
            x = activation(x)
        if context > 0:
            previous = state.previous.to(x.dtype) if state is not None else x.new_zeros(batch, x.shape[1], context)
            x = with_context(previous, x, activation)
            if state is not None:
                state.previous[:] = _keep_where(state.exec_mask, x[..., -context:], state.previous)
        weight, bias = self._conv_params()
        phases = nn.functional.conv1d(x, weight, bias, groups=self.convtr.convtr.groups)
        stride = self.stride
        out_channels = self.convtr.convtr.out_channels
        # [B, C_out * S, T] -> [B, C_out, T, S]: phase j of frame t is sample t * S + j.
        return phases.view(batch, out_channels, stride, length).transpose(2, 3).reshape(batch, out_channels, -1)


# Kyutai's layer norm over the channels of conv activations serves ``norm="layer_norm"``, which Mimi does not use.
__getattr__ = unsupported_names(__name__, {"TransposedLayerNorm": "layer norm for norm='layer_norm' convs"})
