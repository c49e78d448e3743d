"""Per-codebook masked cross entropy, the loss of Moshi's multi-stream outputs."""

from __future__ import annotations

import torch


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    logits_soft_clip: float | None = None,
) -> torch.Tensor:
    """Cross entropy of every target, kept per codebook and time step so callers can weight codebooks.

    Args:
        logits (torch.Tensor): ``[B, K, T, card]``; may hold anything (e.g. the NaNs of an LM output) where
            ``mask`` is false: those positions are replaced before the softmax, so their gradient is 0.
        targets (torch.Tensor): ``[B, K, T]`` integer codes; may hold anything where ``mask`` is false.
        mask (torch.Tensor): ``[B, K, T]`` bool, true where the target counts.
        dtype (torch.dtype): dtype of the computation and of the result (the logits are cast to it).
        logits_soft_clip (float | None): if set to ``c``, the logits become ``c * tanh(logits / c)`` first,
            bounding them to ``(-c, c)``.

    Returns:
        torch.Tensor: ``[B, K, T]`` of ``dtype``: ``logsumexp(logits) - logits[target]``, and 0 where ``mask``
        is false.

    Raises:
        ValueError: the shapes do not agree.
    """
    if logits.shape[:-1] != targets.shape or mask.shape != targets.shape:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} plus a class "
            f"axis, and mask {tuple(mask.shape)} must match targets"
        )
    mask = mask.bool()
    scores = logits.to(dtype).masked_fill(~mask[..., None], 0.0)
    if logits_soft_clip is not None:
        scores = logits_soft_clip * torch.tanh(scores / logits_soft_clip)
    safe_targets = targets.masked_fill(~mask, 0).long()
    target_scores = scores.gather(-1, safe_targets[..., None])[..., 0]
    ce = torch.logsumexp(scores, dim=-1) - target_scores
    return ce.masked_fill(~mask, 0.0)
