"""Writes a tiny random Hugging Face causal LM and its tokenizer, offline, for the DSAA demo and tests.

    python scripts/make_tiny_llm.py --out demo_run/tiny_llm [--hidden 48] [--arch qwen2] [--seed 0]

Nothing comes from the hub: a byte-level BPE tokenizer (Qwen-like: no BOS token, ``" "`` is one token,
``<|im_start|>`` is the initial text token) is trained on a few sentences, and a 2-layer Qwen2 or Llama
model is built from its config with N(0, 0.2) weights (so its hidden states are not all near zero) and
saved with ``save_pretrained``; ``text_llm.hf_repo_id`` can then name the folder.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("make_tiny_llm")

CORPUS = [
    "hello world this is a tiny corpus for a tiny tokenizer",
    "the quick brown fox jumps over the lazy dog",
    "moshi listens and speaks while the text model reads every word",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(special: list[str] = SPECIAL, vocab_size: int = 300) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :data:`CORPUS` (deterministic)."""
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
) -> Any:
    """A 2-layer ``Qwen2Config`` or ``LlamaConfig`` of width ``hidden`` (``D_l``) and ``vocab`` rows (``V``)."""
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
    raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")


def build_tiny_llm(
    hidden: int = 32, arch: str = "qwen2", tie: bool = True, vocab: int = 320, max_pos: int = 64, seed: int = 0
) -> Any:
    """The random float32 LLM (``AutoModelForCausalLM.from_config``), seeded; the global RNG is left alone."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_llm_config(hidden, arch, tie, vocab, max_pos)).float()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
    return model


def make_tiny_llm(
    out: str | Path, hidden: int = 32, arch: str = "qwen2", tie: bool = True, vocab: int = 320,
    max_pos: int = 64, seed: int = 0, tokenizer: Any = None,
) -> Path:
    """Saves the tiny LLM and its tokenizer into ``out`` (``save_pretrained`` layout); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_llm(hidden, arch, tie, vocab, max_pos, seed).save_pretrained(out)
    (tokenizer if tokenizer is not None else train_tokenizer()).save_pretrained(out)
    logger.info("tiny %s LLM (D_l=%d, V=%d, max positions %d) and tokenizer in %s", arch, hidden, vocab, max_pos, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_run/tiny_llm")
    p.add_argument("--hidden", type=int, default=48, help="D_l, the LLM width")
    p.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    p.add_argument("--max-pos", type=int, default=512, help="max_position_embeddings (>= frames per sample)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_tiny_llm(a.out, hidden=a.hidden, arch=a.arch, max_pos=a.max_pos, seed=a.seed)


if __name__ == "__main__":
    main()
