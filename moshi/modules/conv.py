"""Causal 1-D convolutions that stream: chunked calls give the same output as one call on the whole signal.

Both layers have one code path. Outside a streaming block they build a throwaway initial state, so a one-shot
call is exactly the first streaming call on the whole input.

Key nesting follows Kyutai's checkpoints: ``conv.conv.weight`` for :class:`StreamingConv1d` and
``convtr.convtr.weight`` for :class:`StreamingConvTranspose1d` (the middle level once held weight norm, which
the published weights have folded away).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .streaming import State, StreamingModule

PAD_MODES = ("constant", "replicate")


def _check_norm(norm: str) -> None:
    if norm != "none":
        raise ValueError(f"norm={norm!r} is not supported: only 'none' (weight norm folded into the weights)")


class _Conv1dHolder(nn.Module):
    """Holds the ``nn.Conv1d`` at ``.conv`` (gives the ``conv.conv.weight`` key nesting)."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _ConvTranspose1dHolder(nn.Module):
    """Holds the ``nn.ConvTranspose1d`` at ``.convtr`` (gives the ``convtr.convtr.weight`` key nesting)."""

    def __init__(self, convtr: nn.ConvTranspose1d) -> None:
        super().__init__()
        self.convtr = convtr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convtr(x)


def _keep_where(exec_mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` for executed batch items, ``old`` for the others (``[B, ...]`` tensors)."""
    if bool(exec_mask.all()):
        return new
    return torch.where(exec_mask.view(-1, *([1] * (new.dim() - 1))), new, old)


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
        pad_mode: str = "constant",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not causal:
            raise ValueError("causal=False is not supported: Mimi's convolutions are causal")
        _check_norm(norm)
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        effective_kernel = (kernel_size - 1) * dilation + 1
        if effective_kernel < stride:
            raise ValueError(f"effective kernel size {effective_kernel} is smaller than the stride {stride}")
        self.conv = _Conv1dHolder(
            nn.Conv1d(
                in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups, bias=bias,
                device=device, dtype=dtype,
            )
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, length = x.shape
        if length == 0 or length % self.stride != 0:
            raise ValueError(f"input length must be a positive multiple of the stride {self.stride}, got {length}")
        streaming = self._streaming_state is not None
        state = self._streaming_state if streaming else self._init_streaming_state(batch)
        if state.batch_size != batch:
            raise ValueError(f"streaming batch size is {state.batch_size}, got an input of batch {batch}")
        pad = self.padding_total
        if pad > 0:
            previous = state.previous.to(x.dtype)
            if self.pad_mode == "replicate":
                first_sample = x[..., :1].expand(-1, -1, pad)
                if not streaming:
                    previous = first_sample
                else:
                    previous = torch.where(state.first[:, None, None], first_sample, previous)
            x = torch.cat([previous, x], dim=-1)
            if streaming:
                state.previous[:] = _keep_where(state.exec_mask, x[..., -pad:], state.previous)
        if streaming:
            state.first[:] = state.first & ~state.exec_mask
        return self.conv(x)


@dataclass
class _ConvTrState(State):
    """Overlap of a transposed conv not yet emitted (``partial [B, C_out, K - S]``, without the bias)."""

    partial: torch.Tensor

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.partial[:] = torch.where(reset_mask[:, None, None], 0.0, self.partial)


class StreamingConvTranspose1d(StreamingModule[_ConvTrState]):
    """Causal transposed conv: ``T`` frames in, ``T * stride`` samples out (``K - S`` trimmed on the right).

    While streaming, the trimmed overlap (minus the bias, which the next call adds again) is kept and added to
    the start of the next output, so chunked output equals one-shot output.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        kernel_size (int): kernel size ``K`` (at least the stride).
        stride (int): stride ``S``.
        groups (int): groups.
        bias (bool): add a bias.
        causal (bool): must be True.
        norm (str): must be ``"none"``.
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not causal:
            raise ValueError("causal=False is not supported: Mimi's convolutions are causal")
        _check_norm(norm)
        if kernel_size < stride:
            raise ValueError(f"kernel_size {kernel_size} is smaller than the stride {stride}")
        self.convtr = _ConvTranspose1dHolder(
            nn.ConvTranspose1d(
                in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias, device=device, dtype=dtype
            )
        )
        self.overlap = kernel_size - stride

    def _init_streaming_state(self, batch_size: int) -> _ConvTrState:
        weight = self.convtr.convtr.weight
        partial = torch.zeros(
            batch_size, self.convtr.convtr.out_channels, self.overlap, device=weight.device, dtype=weight.dtype
        )
        return _ConvTrState(batch_size, weight.device, partial=partial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if x.shape[-1] == 0:
            raise ValueError("input of the transposed conv is empty")
        streaming = self._streaming_state is not None
        state = self._streaming_state if streaming else self._init_streaming_state(batch)
        if state.batch_size != batch:
            raise ValueError(f"streaming batch size is {state.batch_size}, got an input of batch {batch}")
        y = self.convtr(x)
        overlap = self.overlap
        if overlap == 0:
            return y
        if streaming:
            # A fresh tensor (not an in-place add) keeps autograd valid for the conv's output.
            y = torch.cat([y[..., :overlap] + state.partial.to(y.dtype), y[..., overlap:]], dim=-1)
            tail = y[..., -overlap:]
            bias = self.convtr.convtr.bias
            if bias is not None:
                tail = tail - bias[:, None]
            state.partial[:] = _keep_where(state.exec_mask, tail, state.partial)
        return y[..., :-overlap]
