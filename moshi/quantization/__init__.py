"""Vector quantisers of the Mimi codec (inference only) and the quantiser interface."""

from .base import BaseQuantizer, DummyQuantizer, QuantizedResult
from .core_vq import EuclideanCodebook, ResidualVectorQuantization, VectorQuantization
from .vq import ResidualVectorQuantizer, SplitResidualVectorQuantizer

__all__ = [
    "BaseQuantizer",
    "DummyQuantizer",
    "EuclideanCodebook",
    "QuantizedResult",
    "ResidualVectorQuantization",
    "ResidualVectorQuantizer",
    "SplitResidualVectorQuantizer",
    "VectorQuantization",
]
