"""Resolution of PAD / EPAD / BOS in the LLM vocabulary (rules in ``docs/dsaa.md``)."""

from __future__ import annotations

import pytest

from moshi.models.dsaa_tokens import resolve_special_tokens
from tests.dsaa.tiny_llm import train_tokenizer


def test_defaults_follow_the_fork(tiny_tokenizer):
    tokens = resolve_special_tokens(tiny_tokenizer)
    space = tiny_tokenizer.encode(" ", add_special_tokens=False)
    assert tokens.pad_id == space[0] and tokens.epad_id == tokens.pad_id
    assert tiny_tokenizer.bos_token_id is None
    assert tokens.bos_id == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (tokens.pad_str, tokens.bos_str) == ("Ġ", "<|im_start|>")


def test_configured_tokens_override_defaults(tiny_tokenizer):
    tokens = resolve_special_tokens(
        tiny_tokenizer, pad_token="<|im_end|>", epad_token=" ", bos_token="<|endoftext|>"
    )
    assert tokens.pad_id == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokens.epad_id == tiny_tokenizer.encode(" ", add_special_tokens=False)[0]
    assert tokens.bos_id == tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_bos_token_id_of_the_tokenizer_wins_over_im_start():
    tok = train_tokenizer()
    tok.bos_token = "<|im_end|>"
    assert resolve_special_tokens(tok).bos_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_no_bos_candidate_is_an_error_naming_the_key():
    tok = train_tokenizer(special=["<|endoftext|>"])
    with pytest.raises(ValueError, match="no BOS candidate.*text_llm.bos_token"):
        resolve_special_tokens(tok)


def test_multi_token_string_is_an_error_naming_the_key(tiny_tokenizer):
    with pytest.raises(ValueError, match="text_llm.pad_token='zebra quokka' is not a single token"):
        resolve_special_tokens(tiny_tokenizer, pad_token="zebra quokka")
