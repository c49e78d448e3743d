"""Building blocks of Moshi and Mimi: streaming convs, the SEANet codec networks and the transformer."""

from .conv import (
    NormConv1d,
    NormConvTranspose1d,
    StreamingConv1d,
    StreamingConvTranspose1d,
    pad1d,
    pad_for_conv1d,
    unpad1d,
)
from .seanet import SEANetDecoder, SEANetEncoder
from .transformer import StreamingTransformer

__all__ = [
    "NormConv1d",
    "NormConvTranspose1d",
    "SEANetDecoder",
    "SEANetEncoder",
    "StreamingConv1d",
    "StreamingConvTranspose1d",
    "StreamingTransformer",
    "pad1d",
    "pad_for_conv1d",
    "unpad1d",
]
