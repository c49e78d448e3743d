"""Kyutai's TTS command line.

Not implemented by this package: importing it raises :class:`~moshi._unsupported.UnsupportedError`.
"""

from ._unsupported import raise_unsupported

raise_unsupported(__name__, "the text-to-speech command line")
