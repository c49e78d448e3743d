"""Learnt resampling between Mimi's encoder rate (25 Hz) and its frame rate (12.5 Hz)."""

from __future__ import annotations

import torch
from torch import nn

from .conv import StreamingConv1d, StreamingConvTranspose1d


class ConvDownsample1d(nn.Module):
    """Downsamples ``[B, C, T]`` -> ``[B, C, T / stride]`` with a learnt full conv (kernel ``2 * stride``).

    The conv has no bias and pads on the left with copies of the first frame (``replicate``), as Kyutai's
    Mimi does. Key: ``conv.conv.conv.weight [C, C, 2 * stride]``.

    Args:
        stride (int): downsampling factor.
        dimension (int): channels.
        causal (bool): must be True.
        device (torch.device | str | None): where the weights live.
        dtype (torch.dtype | None): weight dtype.
    """

    def __init__(
        self,
        stride: int,
        dimension: int,
        causal: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.conv = StreamingConv1d(
            dimension, dimension, kernel_size=2 * stride, stride=stride, bias=False, causal=causal,
            pad_mode="replicate", device=device, dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvTrUpsample1d(nn.Module):
    """Upsamples ``[B, C, T]`` -> ``[B, C, T * stride]`` with a learnt *depthwise* transposed conv.

    Each channel has its own kernel (groups = channels), as in Kyutai's Mimi. Key:
    ``convtr.convtr.convtr.weight [C, 1, 2 * stride]``.

    Args:
        stride (int): upsampling factor.
        dimension (int): channels.
        causal (bool): must be True.
        device (torch.device | str | None): where the weights live.
        dtype (torch.dtype | None): weight dtype.
    """

    def __init__(
        self,
        stride: int,
        dimension: int,
        causal: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.convtr = StreamingConvTranspose1d(
            dimension, dimension, kernel_size=2 * stride, stride=stride, groups=dimension, bias=False,
            causal=causal, device=device, dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convtr(x)
