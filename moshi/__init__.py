"""Our re-implementation of Kyutai's Moshi LM and Mimi codec, weight-compatible with theirs.

The public module paths and names follow Kyutai's ``moshi`` package, so scripts written against it run on
this one; the parts of that package not implemented here raise :class:`moshi._unsupported.UnsupportedError`.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from . import models, modules, quantization, utils

try:
    __version__ = version("moshi-finetune")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# Subpackages of Kyutai's package that this one does not implement: importing them raises a clear error.
_UNSUPPORTED_SUBMODULES = ("conditioners",)


def __getattr__(name: str) -> ModuleType:
    if name in _UNSUPPORTED_SUBMODULES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["models", "modules", "quantization", "utils"]
