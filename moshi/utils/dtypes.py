"""The floating dtypes a config may name, and their lookup."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """The ``torch.dtype`` of a config value such as ``"bfloat16"``.

    Raises:
        ValueError: ``name`` is not one of :data:`DTYPES` (the message lists them).
    """
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None
