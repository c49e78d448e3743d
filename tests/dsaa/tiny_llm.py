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


def tiny_dsaa(
    hidden: int = 32,
    arch: str = "qwen2",
    tie: bool = True,
    max_pos: int = 64,
    proj_hidden: int | None = None,
    seed: int = 0,
    **lm_overrides,
):
    """A float32, eval-mode DSAA model: the small Moshi config, a tiny LLM built from its config (weights
    N(0, 0.2) so its outputs are not near zero), DSAA modules initialised as setup_new_model does."""
    import torch
    from transformers import AutoModelForCausalLM

    from moshi.models.dsaa import DSAAModel, initialize_dsaa_modules
    from tests.helpers.configs import small_lm_kwargs

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llm = AutoModelForCausalLM.from_config(tiny_llm_config(hidden, arch, tie, max_pos=max_pos)).float()
        with torch.no_grad():
            for p in llm.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
        model = DSAAModel(
            llm, bos_id=1, pad_id=223, epad_id=2, proj_hidden=proj_hidden, **small_lm_kwargs(**lm_overrides)
        )
        initialize_dsaa_modules(model, seed, warn=lambda message: None)
    return model.eval()


def random_codes(model, batch: int = 2, steps: int = 6, seed: int = 0):
    """Random codes ``[B, K, T]``: LLM ids in the text row, audio ids below ``card`` elsewhere."""
    import torch

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.card, (batch, model.num_codebooks, steps), generator=g)
    codes[:, 0] = torch.randint(0, model.dims.text_in_vocab, (batch, steps), generator=g)
    return codes
