"""The DSAA text tokenizer: a real `transformers` tokenizer saved and loaded with `from_pretrained`."""

from __future__ import annotations

import pytest

from finetune.data.alignments import AlignedWord
from finetune.data.chunks import num_frames
from finetune.data.interleaver import Interleaver
from finetune.data.text_tokenizer import HFTextTokenizer

CORPUS = ["hello world how are you", "fine thanks and you", "good morning to you all", "speech model text"] * 20


def save_tiny_bpe(path, bos: str | None = None, extra_special: list[str] | None = None) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = (extra_special or []) + ([bos] if bos else [])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos)
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": extra_special})
    fast.save_pretrained(path)
    return str(path)


def test_defaults_pad_is_space_epad_is_pad_initial_is_bos(tmp_path):
    path = save_tiny_bpe(tmp_path / "t", bos="<s>")
    t = HFTextTokenizer.from_pretrained(path)
    space = t.tokenizer.encode(" ", add_special_tokens=False)
    assert t.pad_id == space[0] and t.epad_id == t.pad_id
    assert t.initial_id == t.tokenizer.convert_tokens_to_ids("<s>") == t.bos_id
    assert t.vocab_size == len(t.tokenizer)


def test_words_are_stripped_and_encoded_without_special_tokens(tmp_path):
    t = HFTextTokenizer.from_pretrained(save_tiny_bpe(tmp_path / "t", bos="<s>"))
    ids = t.encode_word("  hello ")
    assert ids == t.tokenizer.encode("hello", add_special_tokens=False)
    assert t.initial_id not in ids and t.decode(ids) == "hello"


def test_im_start_is_the_initial_token_without_bos(tmp_path):
    t = HFTextTokenizer.from_pretrained(save_tiny_bpe(tmp_path / "t", extra_special=["<|im_start|>"]))
    assert t.tokenizer.bos_token_id is None
    assert t.initial_id == t.tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_no_initial_candidate_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="text_llm.bos_token"):
        HFTextTokenizer.from_pretrained(save_tiny_bpe(tmp_path / "t"))


def test_configured_tokens_override(tmp_path):
    path = save_tiny_bpe(tmp_path / "t", bos="<s>", extra_special=["<pad>", "<epad>", "<|im_start|>"])
    t = HFTextTokenizer.from_pretrained(path, pad_token="<pad>", epad_token="<epad>", bos_token="<|im_start|>")
    conv = t.tokenizer.convert_tokens_to_ids
    assert (t.pad_id, t.epad_id, t.initial_id) == (conv("<pad>"), conv("<epad>"), conv("<|im_start|>"))
    with pytest.raises(ValueError, match="text_llm.pad_token"):
        HFTextTokenizer.from_pretrained(path, pad_token="hello world how")


def test_interleaver_uses_hf_ids(tmp_path):
    t = HFTextTokenizer.from_pretrained(save_tiny_bpe(tmp_path / "t", bos="<s>", extra_special=["<epad>"]),
                                        epad_token="<epad>")
    row = Interleaver(t).build([AlignedWord("hello", 0.5, 0.7)], 0.0, 1.0, num_frames(1.0))
    ids = t.encode_word("hello")
    f = 6  # floor(12.5 * 0.5)
    assert row[f : f + len(ids)].tolist() == ids and row[f - 1] == t.epad_id and row[0] == t.pad_id
