"""Kyutai's conditioners (text, tensor and voice conditioning).

Not implemented by this package: importing it raises :class:`~moshi._unsupported.UnsupportedError`.
"""

from .._unsupported import raise_unsupported

raise_unsupported(__name__, "conditioning modules for TTS and conditioned generation")
