"""Tiny Hugging Face tokenizers and LLM configs for the DSAA tests (built in code, nothing from the hub)."""

from __future__ import annotations

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


def tiny_llm_config(
    hidden: int = 32, arch: str = "qwen2", tie: bool = True, vocab: int = 320, max_pos: int = 64
):
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
