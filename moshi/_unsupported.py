"""One error for the parts of Kyutai's ``moshi`` API that this package does not implement.

Code written against Kyutai's package may import modules or names that exist there but not here (text and
tensor conditioners, the TTS model, int8 quantisation, CUDA-graph and compile helpers). Those raise
:class:`UnsupportedError`, naming what is missing, instead of a bare ``ModuleNotFoundError`` or
``AttributeError`` that would read like a broken install.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

PACKAGE = "moshi-finetune"


class UnsupportedError(ImportError, NotImplementedError):
    """A part of Kyutai's ``moshi`` API this package does not implement (catchable as either base)."""


def unsupported_message(what: str, name: str) -> str:
    return (
        f"{name} ({what}) is part of Kyutai's moshi package but is not supported by this package "
        f"({PACKAGE}), which implements the Moshi LM, LMGen, Mimi, LoRA and the loaders"
    )


def raise_unsupported(module_name: str, what: str) -> NoReturn:
    """Raises :class:`UnsupportedError` for importing ``module_name``; called at the top of a stub module."""
    raise UnsupportedError(unsupported_message(what, module_name), name=module_name)


def unsupported_names(module_name: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` raising :class:`UnsupportedError` for ``names`` (name -> what it is).

    Other missing names raise the usual ``AttributeError``.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            raise UnsupportedError(unsupported_message(names[name], f"{module_name}.{name}"), name=module_name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
