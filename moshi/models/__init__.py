"""Moshi models: the LM (:class:`LMModel`), streaming generation (:class:`LMGen`) and the loaders."""

from . import loaders
from .compression import MimiModel
from .lm import LMModel, LMOutput
from .lm_gen import LMGen

__all__ = ["LMGen", "LMModel", "LMOutput", "MimiModel", "loaders"]
