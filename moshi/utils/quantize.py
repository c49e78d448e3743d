"""Kyutai's int8 weight quantisation.

Not implemented by this package: importing it raises :class:`~moshi._unsupported.UnsupportedError`.
"""

from .._unsupported import raise_unsupported

raise_unsupported(__name__, "int8 bitsandbytes quantisation of Linear layers")
