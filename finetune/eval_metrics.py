"""Teacher-forced metrics of a model on eval batches: the training loss and where it comes from.

The eval loss is the training loss itself (:func:`finetune.loss.moshi_loss_terms` with the loss's own PAD
weight and codebook-0 multiplier), so its number is comparable with the training curve. Around it, the
breakdown a researcher needs to see what moved: per audio codebook the cross-entropy and top-1 accuracy
(unweighted: every valid position counts once, so codebooks compare with each other), and the text
stream's cross-entropy and accuracy both over every valid position and over the non-PAD positions only —
PAD dominates the text stream, so accuracy with PAD mostly measures when the model stays silent.

Every mean is a ratio of sums accumulated over all batches (a batch with few valid positions weighs its
share); perplexities are ``exp`` of natural-log cross-entropies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.loss import LossTerms, MoshiLoss, moshi_loss_terms


def masked_ce_and_hits(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy (float32) and top-1 hit (0/1), both exactly 0 where ``mask`` is false.

    ``logits`` ``[..., V]`` may hold NaN and ``targets`` -1 at masked positions.
    """
    valid = mask.bool()
    z = logits.float().masked_fill(~valid.unsqueeze(-1), 0.0)
    y = targets.masked_fill(~valid, 0)
    ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="none").reshape(y.shape)
    hit = (z.argmax(dim=-1) == y).float()
    return ce * valid, hit * valid


@dataclass
class MetricSums:
    """Sums over batches; add with ``+``. Audio tensors are ``[dep_q]``, text ones ``[2]`` (all, non-PAD)."""

    terms: LossTerms
    audio_ce: torch.Tensor
    audio_hits: torch.Tensor
    audio_count: torch.Tensor
    text_ce: torch.Tensor
    text_hits: torch.Tensor
    text_count: torch.Tensor
    batches: int = 1

    def __add__(self, other: MetricSums) -> MetricSums:
        return MetricSums(self.terms + other.terms, self.audio_ce + other.audio_ce,
                          self.audio_hits + other.audio_hits, self.audio_count + other.audio_count,
                          self.text_ce + other.text_ce, self.text_hits + other.text_hits,
                          self.text_count + other.text_count, self.batches + other.batches)


def batch_sums(out: Any, codes: torch.Tensor, loss: MoshiLoss) -> MetricSums:
    """The sums of one batch from an ``LMOutput`` (``model(codes)``) and its input codes ``[B, K, T]``."""
    dep_q = out.logits.shape[1]
    terms = moshi_loss_terms(out.text_logits, out.text_mask, out.logits, out.mask, codes, loss.beta, loss.alpha,
                             loss.pad_ids)
    a_ce, a_hit = masked_ce_and_hits(out.logits, codes[:, 1 : 1 + dep_q], out.mask)
    text_targets = codes[:, :1]
    t_ce, t_hit = masked_ce_and_hits(out.text_logits, text_targets, out.text_mask)
    is_pad = torch.zeros_like(text_targets, dtype=torch.bool)
    for pad_id in loss.pad_ids:
        is_pad |= text_targets == pad_id
    keep = torch.stack([out.text_mask, out.text_mask & ~is_pad]).float()  # [2, B, 1, T]
    dims = (0, 2)  # batch and frames of [B, dep_q, T]
    return MetricSums(
        terms=terms.detach(),
        audio_ce=a_ce.sum(dims), audio_hits=a_hit.sum(dims), audio_count=out.mask.float().sum(dims),
        text_ce=(keep * t_ce).flatten(1).sum(1), text_hits=(keep * t_hit).flatten(1).sum(1),
        text_count=keep.flatten(1).sum(1),
    )


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
    return [float(n) / float(d) if d > 0 else None for n, d in zip(num.reshape(-1), den.reshape(-1))]


def _exp(x: float | None) -> float | None:
    return None if x is None else (math.exp(x) if x < 700 else math.inf)


def summarize(sums: MetricSums) -> dict[str, Any]:
    """The metrics as plain numbers: losses, perplexities, text accuracies and one record per audio codebook.

    A quantity with no valid position (e.g. non-PAD text of silent audio) is ``None``.
    """
    t = sums.terms
    text_loss, audio_loss = float(t.text_loss), float(t.audio_loss)
    text_ce, text_ce_no_pad = _ratio(sums.text_ce, sums.text_count)
    text_acc, text_acc_no_pad = _ratio(sums.text_hits, sums.text_count)
    ce = _ratio(sums.audio_ce, sums.audio_count)
    acc = _ratio(sums.audio_hits, sums.audio_count)
    return {
        "eval_loss": text_loss + audio_loss, "text_loss": text_loss, "audio_loss": audio_loss,
        "perplexity": _exp(text_loss + audio_loss), "text_perplexity": _exp(text_loss),
        "audio_perplexity": _exp(audio_loss),
        "text_ce": text_ce, "text_ce_no_pad": text_ce_no_pad,
        "text_accuracy": text_acc, "text_accuracy_no_pad": text_acc_no_pad,
        "text_positions": int(sums.text_count[0]), "text_positions_no_pad": int(sums.text_count[1]),
        "codebooks": [
            {"codebook": k, "ce": ce[k], "perplexity": _exp(ce[k]), "accuracy": acc[k],
             "positions": int(sums.audio_count[k])}
            for k in range(len(ce))
        ],
        "batches": sums.batches,
    }


@torch.no_grad()
def evaluate_metrics(model: nn.Module, batches: Iterable[torch.Tensor], loss: MoshiLoss, device: torch.device,
                     progress: bool = True, total: int | None = None) -> dict[str, Any]:
    """Runs ``model(codes)`` on every batch (codes ``[B, K, T]``) and summarizes; the model's mode is restored."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    sums: MetricSums | None = None
    try:
        for codes in tqdm(batches, desc="eval batches", unit="batch", total=total, disable=not progress):
            codes = codes.to(device)
            part = batch_sums(model(codes), codes, loss)
            sums = part if sums is None else sums + part
    finally:
        model.train(was_training)
    if sums is None:
        raise ValueError("no eval batch: the eval data yielded nothing")
    return summarize(sums)
