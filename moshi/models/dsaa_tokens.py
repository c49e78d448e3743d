"""Special text tokens of a DSAA model, resolved in the LLM's vocabulary (rules in ``docs/dsaa.md``).

The ids are resolved once (by ``setup_new_model`` or when a checkpoint without a ``dsaa`` block is loaded) and stored in the
checkpoint, so training, evaluation and inference all use the same ids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

IM_START = "<|im_start|>"


@dataclass(frozen=True)
class SpecialTokens:
    """Resolved special ids with their token strings (strings are for printing only)."""

    pad_id: int
    epad_id: int
    bos_id: int
    pad_str: str
    epad_str: str
    bos_str: str

    def ids(self) -> dict[str, int]:
        return {"pad_id": self.pad_id, "epad_id": self.epad_id, "bos_id": self.bos_id}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _token_string(tokenizer: Any, token_id: int) -> str:
    token = tokenizer.convert_ids_to_tokens(int(token_id))
    return str(token) if token is not None else f"<id {token_id}>"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _resolve_named(tokenizer: Any, token: str, key: str) -> int:
    """Id of ``token``: a vocabulary entry (e.g. ``<|im_start|>``) or a text that encodes to exactly one id."""
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return int(vocab[token])
    ids = _encode(tokenizer, token)
    if len(ids) != 1:
        raise ValueError(
            f"{key}={token!r} is not a single token of the LLM tokenizer: it encodes to {len(ids)} ids {ids}"
        )
    return int(ids[0])


def resolve_special_tokens(
    tokenizer: Any,
    pad_token: str | None = None,
    epad_token: str | None = None,
    bos_token: str | None = None,
) -> SpecialTokens:
    """Resolves PAD, EPAD and the initial text token (BOS) in the vocabulary of an HF tokenizer.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        pad_token (str | None): ``text_llm.pad_token``; default: the first id of ``tokenizer.encode(" ")``
            (a plain space, which needs no new token; 220 for Qwen).
        epad_token (str | None): ``text_llm.epad_token``; default: the PAD id.
        bos_token (str | None): ``text_llm.bos_token``; default: ``tokenizer.bos_token_id``, else the id of
            ``<|im_start|>``.

    Raises:
        ValueError: a configured token is not a single token, a space encodes to nothing, or no BOS
            candidate exists (the message names the ``text_llm.*`` key to set).
    """
    if pad_token is None:
        space_ids = _encode(tokenizer, " ")
        if not space_ids:
            raise ValueError("the LLM tokenizer encodes ' ' to no token; set text_llm.pad_token explicitly")
        pad_id = int(space_ids[0])
    else:
        pad_id = _resolve_named(tokenizer, pad_token, "text_llm.pad_token")
    epad_id = pad_id if epad_token is None else _resolve_named(tokenizer, epad_token, "text_llm.epad_token")
    if bos_token is not None:
        bos_id = _resolve_named(tokenizer, bos_token, "text_llm.bos_token")
    elif getattr(tokenizer, "bos_token_id", None) is not None:
        bos_id = int(tokenizer.bos_token_id)
    elif IM_START in tokenizer.get_vocab():
        bos_id = int(tokenizer.get_vocab()[IM_START])
    else:
        raise ValueError(
            f"no BOS candidate: the LLM tokenizer has no bos_token and no {IM_START!r} token; "
            "set text_llm.bos_token to the initial text token"
        )
    return SpecialTokens(
        pad_id=pad_id,
        epad_id=epad_id,
        bos_id=bos_id,
        pad_str=_token_string(tokenizer, pad_id),
        epad_str=_token_string(tokenizer, epad_id),
        bos_str=_token_string(tokenizer, bos_id),
    )
