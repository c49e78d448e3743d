"""Tiny Hugging Face tokenizers and LLM configs for the DSAA tests (built in code, nothing from the hub)."""

from __future__ import annotations

from tests.helpers.scripts import load_script

# scripts/make_tiny_llm.py is the one implementation of the tiny LLM.
_script = load_script("make_tiny_llm")
CORPUS = _script.CORPUS
SPECIAL = _script.SPECIAL
train_tokenizer = _script.train_tokenizer
tiny_llm_config = _script.tiny_llm_config
build_tiny_llm = _script.build_tiny_llm
make_tiny_llm = _script.make_tiny_llm


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

    from moshi.models.dsaa import dsaa_lm_model, initialize_dsaa_modules
    from tests.helpers.configs import small_lm_kwargs

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llm = build_tiny_llm(hidden, arch, tie, max_pos=max_pos, seed=seed)
        model = dsaa_lm_model(
            llm, bos_id=1, pad_id=223, epad_id=2, proj_hidden=proj_hidden, **small_lm_kwargs(**lm_overrides)
        )
        initialize_dsaa_modules(model, seed, warn=lambda message: None)
    return model.eval()


def random_codes(model, batch: int = 2, steps: int = 6, seed: int = 0):
    """Random codes ``[B, K, T]``: LLM ids in the text row, audio ids below ``card`` elsewhere."""
    import torch

    from moshi.models.dsaa import dsaa_dims

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.card, (batch, model.num_codebooks, steps), generator=g)
    codes[:, 0] = torch.randint(0, dsaa_dims(model).text_in_vocab, (batch, steps), generator=g)
    return codes
