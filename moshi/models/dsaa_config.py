"""The `text_llm` settings of a DSAA model, shared by the loaders and the training config.

Kept in a module of its own, free of model code, so `finetune.args` can build its config
section on it without importing the DSAA model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TextLLMSpec:
    """The ``text_llm`` keys the loaders need; ``finetune.args.TextLLMArgs`` adds ``enable`` to them."""

    hf_repo_id: str = "Qwen/Qwen2.5-3B-Instruct"
    revision: str | None = None
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    pad_token: str | None = None
    epad_token: str | None = None
    bos_token: str | None = None
    proj_hidden: int | None = None
    proj_dropout: float = 0.1
    save_weights: bool = True
    frozen_modules: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: Any) -> TextLLMSpec:
        """From a ``TextLLMArgs``, a dict or a ``TextLLMSpec`` (unknown attributes are ignored)."""
        if type(args) is cls:
            return args
        get = args.get if isinstance(args, Mapping) else lambda k, d: getattr(args, k, d)
        defaults = cls()
        return cls(**{k: get(k, getattr(defaults, k)) for k in asdict(defaults)})
