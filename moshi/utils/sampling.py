"""Token sampling for streaming generation.

Sampling uses the "exponential race" (``argmax p_i / E_i`` with ``E_i ~ Exp(1)``), which draws from ``p`` without
a host sync and consumes the RNG exactly like Kyutai's sampler, so seeded runs can be compared with theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# One generator for the whole tensor, or one per item along the first axis (each item's draws then depend only on
# its own generator, so an item sampled in a batch draws what it would draw alone).
Generators = torch.Generator | Sequence[torch.Generator] | None


def exponential_noise(like: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """``Exp(1)`` draws shaped like ``like``, from one generator or from one generator per first-axis item."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.empty_like(like).exponential_(1, generator=generator)
    if len(generator) != like.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]} items")
    return torch.stack([torch.empty_like(like[i]).exponential_(1, generator=g) for i, g in enumerate(generator)])


def multinomial_exponential(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """One sample per row of ``probs [..., V]`` → ``[..., 1]`` (indices)."""
    return torch.argmax(probs / exponential_noise(probs, generator), dim=-1, keepdim=True)


def multinomial(
    input: torch.Tensor, num_samples: int, replacement: bool = False, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``torch.multinomial`` over the last axis of ``input [..., V]`` (probabilities, any number of leading
    axes) → int64 indices ``[..., num_samples]``.

    A single draw without replacement goes through :func:`multinomial_exponential`, which needs no host sync
    (``torch.multinomial`` synchronises with the device); other cases use ``torch.multinomial`` row by row.
    """
    rows = input.reshape(-1, input.shape[-1])
    if replacement or num_samples != 1:
        out = torch.multinomial(rows, num_samples=num_samples, replacement=replacement, generator=generator)
    else:
        out = multinomial_exponential(rows, generator=generator)
    return out.reshape(*input.shape[:-1], out.shape[-1])


def sample_top_k(probs: torch.Tensor, k: int, generator: Generators = None) -> torch.Tensor:
    """Samples among the ``k`` most likely entries of ``probs [..., V]`` → ``[..., 1]``."""
    k = min(k, probs.shape[-1])
    top_probs, top_indices = torch.topk(probs, k, dim=-1)
    choice = multinomial_exponential(top_probs, generator=generator)
    return top_indices.gather(-1, choice)


def sample_top_p(probs: torch.Tensor, p: float, generator: Generators = None) -> torch.Tensor:
    """Nucleus sampling: keeps the smallest set of entries whose mass reaches ``p`` → ``[..., 1]``."""
    sorted_probs, sorted_indices = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs = torch.where(cumulative - sorted_probs > p, torch.zeros_like(sorted_probs), sorted_probs)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = multinomial_exponential(sorted_probs, generator=generator)
    return sorted_indices.gather(-1, choice)


def sample_token(
    logits: torch.Tensor,
    use_sampling: bool = False,
    temp: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: Generators = None,
) -> torch.Tensor:
    """Picks one token per row of ``logits [..., V]`` → int64 ``[...]``.

    Greedy (argmax) unless ``use_sampling`` and ``temp > 0``; then samples ``softmax(logits / temp)`` restricted
    to the top ``top_k`` (if > 0) or the top-``top_p`` mass (if > 0). ``generator`` may be a sequence of one
    generator per item of the first axis.
    """
    if use_sampling and temp > 0.0:
        probs = torch.softmax(logits / temp, dim=-1)
        if top_p > 0.0:
            token = sample_top_p(probs, top_p, generator=generator)
        elif top_k > 0:
            token = sample_top_k(probs, top_k, generator=generator)
        else:
            token = multinomial_exponential(probs, generator=generator)
    else:
        token = torch.argmax(logits, dim=-1, keepdim=True)
    return token[..., 0]
