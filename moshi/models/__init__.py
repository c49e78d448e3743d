"""Moshi models: the LM (:class:`LMModel`), streaming generation (:class:`LMGen`), Mimi and the loaders."""

from . import loaders
from .compression import CompressionModel, MimiModel
from .lm import LMModel, LMOutput
from .lm_gen import LMGen
from .loaders import get_mimi, get_moshi_lm

__all__ = [
    "CompressionModel",
    "LMGen",
    "LMModel",
    "LMOutput",
    "MimiModel",
    "get_mimi",
    "get_moshi_lm",
    "loaders",
]
