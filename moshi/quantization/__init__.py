"""Vector quantisers of the Mimi codec (inference only)."""

from .core_vq import EuclideanCodebook, ResidualVectorQuantization, VectorQuantization
from .vq import ResidualVectorQuantizer, SplitResidualVectorQuantizer

__all__ = [
    "EuclideanCodebook",
    "ResidualVectorQuantization",
    "ResidualVectorQuantizer",
    "SplitResidualVectorQuantizer",
    "VectorQuantization",
]
