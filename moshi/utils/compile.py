"""Kyutai's torch.compile and CUDA-graph helpers.

Not implemented by this package: importing it raises :class:`~moshi._unsupported.UnsupportedError`.
"""

from .._unsupported import raise_unsupported

raise_unsupported(__name__, "torch.compile and CUDA-graph helpers")
