"""Tiny Hugging Face LLMs and tokenizers for the DSAA tests, built in code and saved with ``save_pretrained``.

Nothing comes from the hub: a byte-level BPE tokenizer is trained on a few sentences, and tiny Qwen2/Llama
models are built from configs, saved to a session temp dir and loaded back through ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

CORPUS = [
    "hello world this is a tiny corpus for a tiny tokenizer",
    "the quick brown fox jumps over the lazy dog",
    "moshi listens and speaks while the text model reads every word",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(special: list[str] = SPECIAL, vocab_size: int = 300):
    """A byte-level BPE tokenizer (Qwen-like: no BOS token, ``" "`` is one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special[0], pad_token=special[0])


def tiny_llm_config(hidden: int = 32, arch: str = "qwen2", tie: bool = True, vocab: int = 320, max_pos: int = 64):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4 if hidden % 8 == 0 else 2,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def make_llm_dir(tmp_path_factory, tiny_tokenizer) -> Callable[..., Path]:
    """``make_llm_dir(hidden=32, arch="qwen2", tie=True, vocab=320, max_pos=64)`` -> a local HF model folder
    (model + tokenizer), built once per distinct argument set."""
    from transformers import AutoModelForCausalLM

    cache: dict[tuple, Path] = {}

    def make(hidden: int = 32, arch: str = "qwen2", tie: bool = True, vocab: int = 320, max_pos: int = 64) -> Path:
        key = (hidden, arch, tie, vocab, max_pos)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"llm_{arch}_{hidden}_{'tied' if tie else 'untied'}_{vocab}_{max_pos}")
            with torch.random.fork_rng():
                torch.manual_seed(1234 + hidden)
                model = AutoModelForCausalLM.from_config(tiny_llm_config(hidden, arch, tie, vocab, max_pos))
                # Larger-than-default weights so that the tiny LLM's outputs are not all near zero.
                with torch.no_grad():
                    for p in model.parameters():
                        if p.dim() == 2:
                            p.normal_(0.0, 0.2)
            model.save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llm_dir(make_llm_dir) -> Path:
    return make_llm_dir()
