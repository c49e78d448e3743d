"""Learnt resampling between Mimi's encoder rate (25 Hz) and its frame rate (12.5 Hz)."""

from __future__ import annotations

import torch

from .conv import StreamingConv1d, StreamingConvTranspose1d
from .streaming import StreamingContainer


def _check_learnt(learnt: bool, dimension: int | None) -> int:
    """The channel count of a learnt resampler; fixed (average) resampling is not part of Mimi."""
    if not learnt:
        raise ValueError("learnt=False (fixed averaging resampler) is not supported by this package; pass learnt=True")
    if dimension is None:
        raise ValueError("a learnt resampler needs its channel count: pass dimension")
    return dimension


class ConvDownsample1d(StreamingContainer):
    """Downsamples ``[B, C, T]`` -> ``[B, C, T / stride]`` with a learnt conv (kernel ``2 * stride``).

    The conv has no bias and pads on the left with copies of the first frame (``replicate``), as Kyutai's
    Mimi does. Key: ``conv.conv.conv.weight`` of shape ``[C, C, 2 * stride]`` (``[C, 1, 2 * stride]`` when
    channel-wise).

    Args:
        stride (int): downsampling factor.
        dimension (int | None): channels (required).
        causal (bool): must be True.
        learnt (bool): must be True (Mimi's resamplers are learnt).
        channel_wise (bool): one kernel per channel (depthwise) instead of a full conv.
        device (torch.device | str | None): where the weights live.
        dtype (torch.dtype | None): weight dtype.
    """

    def __init__(
        self,
        stride: int,
        dimension: int | None = None,
        causal: bool = True,
        learnt: bool = False,
        channel_wise: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channels = _check_learnt(learnt, dimension)
        self.conv = StreamingConv1d(
            channels, channels, kernel_size=2 * stride, stride=stride, groups=channels if channel_wise else 1,
            bias=False, causal=causal, pad_mode="replicate", device=device, dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvTrUpsample1d(StreamingContainer):
    """Upsamples ``[B, C, T]`` -> ``[B, C, T * stride]`` with a learnt transposed conv (kernel ``2 * stride``).

    Kyutai's Mimi uses the channel-wise (depthwise) form: each channel has its own kernel. Key:
    ``convtr.convtr.convtr.weight`` of shape ``[C, 1, 2 * stride]`` (``[C, C, 2 * stride]`` for a full conv).

    Args:
        stride (int): upsampling factor.
        dimension (int | None): channels (required).
        causal (bool): must be True.
        learnt (bool): must be True (Mimi's resamplers are learnt).
        channel_wise (bool): one kernel per channel (depthwise) instead of a full transposed conv.
        device (torch.device | str | None): where the weights live.
        dtype (torch.dtype | None): weight dtype.
    """

    def __init__(
        self,
        stride: int,
        dimension: int | None = None,
        causal: bool = True,
        learnt: bool = False,
        channel_wise: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channels = _check_learnt(learnt, dimension)
        self.convtr = StreamingConvTranspose1d(
            channels, channels, kernel_size=2 * stride, stride=stride, groups=channels if channel_wise else 1,
            bias=False, causal=causal, device=device, dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convtr(x)
