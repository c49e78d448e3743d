"""Kyutai's text-to-speech model.

Not implemented by this package: importing it raises :class:`~moshi._unsupported.UnsupportedError`.
"""

from .._unsupported import raise_unsupported

raise_unsupported(__name__, "the TTS model and its script state machine")
