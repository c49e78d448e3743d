"""The training loss resolved per frame: text cross-entropy by kind of frame, audio cross-entropy per codebook.

Every number uses the masks and weights of :class:`finetune.loss.MoshiLoss`: a position has a loss only where
the model's validity mask is set (its target is not the zero token -1 and lies outside the undelayed tail), so
no NaN logit and no -1 target ever reaches a cross-entropy; elsewhere the loss is NaN and the weight 0. Summing
``weight × CE`` over frames gives the loss's own weighted sums.

Text frames fall into three kinds by their target: padding (PAD or EPAD, the ids the loss down-weights),
``transition`` (the first non-padding target after a padding one: a word or turn starting after silence) and
``speech`` (any other non-padding target). The text logits are computed in row chunks so a 150k-word LLM head
never holds the logits of a whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.loss import MoshiLoss, audio_loss_weights, default_chunk_rows, text_loss_weights

NONE, PAD, SPEECH, TRANSITION = -1, 0, 1, 2
CATEGORY_NAMES = {PAD: "pad", SPEECH: "speech", TRANSITION: "transition"}


@dataclass
class FrameLosses:
    """Per-position losses of a batch of ``B`` samples and ``T`` frames (float32, on the model's device).

    Attributes:
        text_ce: ``[B, T]`` natural-log CE of the text target, NaN where there is none.
        text_weight: ``[B, T]`` the loss's text weight (0 where there is no target).
        text_target: ``[B, T]`` the text target ids.
        category: ``[B, T]`` int: :data:`PAD`, :data:`SPEECH`, :data:`TRANSITION`, or :data:`NONE` (no target).
        audio_ce: ``[B, K, T]`` CE per depformer codebook, NaN where masked.
        audio_weight: ``[B, K, T]`` the loss's audio weight.
    """

    text_ce: torch.Tensor
    text_weight: torch.Tensor
    text_target: torch.Tensor
    category: torch.Tensor
    audio_ce: torch.Tensor
    audio_weight: torch.Tensor

    @classmethod
    def cat(cls, parts: list[FrameLosses]) -> FrameLosses:
        """The samples of several batches of the same length as one."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def rows(self, files: list[str], offsets: list[float], frame_rate: float) -> list[dict[str, Any]]:
        """One CSV row per sample and frame: file, time in the file, target, kind, text CE and weight, audio CE
        and weight per codebook; a CE without a target is ``None`` (an empty cell), never NaN.

        A transition also gets ``padding_before``, the number of padding frames just before it in its chunk:
        every word after a pause is a transition, so a threshold on it (e.g. 13 frames, about 1 s) tells
        turn starts from word starts.

        ``files[j]`` and ``offsets[j]`` (seconds) are sample ``j``'s audio file and its chunk's start in it.
        """
        out = []
        k = self.audio_ce.shape[1]
        text_ce, audio_ce = self.text_ce.cpu().tolist(), self.audio_ce.cpu().tolist()
        text_w, audio_w = self.text_weight.cpu().tolist(), self.audio_weight.cpu().tolist()
        targets, kinds = self.text_target.cpu().tolist(), self.category.cpu().tolist()
        for j in range(len(text_ce)):
            run = 0
            for t in range(len(text_ce[j])):
                kind = kinds[j][t]
                row: dict[str, Any] = {
                    "file": files[j], "time_s": round(offsets[j] + t / frame_rate, 4), "sample": j, "frame": t,
                    "text_target": targets[j][t], "kind": CATEGORY_NAMES.get(kind, ""),
                    "padding_before": run if kind == TRANSITION else None,
                    "text_ce": _value(text_ce[j][t]), "text_weight": text_w[j][t],
                }
                run = run + 1 if kind == PAD else 0
                for c in range(k):
                    row[f"audio_ce_{c}"] = _value(audio_ce[j][c][t])
                    row[f"audio_weight_{c}"] = audio_w[j][c][t]
                out.append(row)
        return out

    def weighted_sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Σ w·CE_text, Σ w_text, Σ w·CE_audio, Σ w_audio)``, the loss's terms, as float64 sums."""
        def total(ce: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return (torch.nan_to_num(ce.double()) * w.double()).sum()

        return (total(self.text_ce, self.text_weight), self.text_weight.double().sum(),
                total(self.audio_ce, self.audio_weight), self.audio_weight.double().sum())


def _value(x: float) -> float | None:
    return None if math.isnan(x) else x


def text_categories(targets: torch.Tensor, valid: torch.Tensor, padding_ids: tuple[int, ...]) -> torch.Tensor:
    """The kind of each text frame ``[B, T]`` (see the module docstring); the first frame has no predecessor
    and is never a transition."""
    is_pad = torch.zeros_like(targets, dtype=torch.bool)
    for pad_id in padding_ids:
        is_pad |= targets == pad_id
    after_pad = torch.zeros_like(is_pad)
    after_pad[:, 1:] = is_pad[:, :-1]
    cat = torch.full(targets.shape, SPEECH, dtype=torch.int8, device=targets.device)
    cat[is_pad] = PAD
    cat[~is_pad & after_pad] = TRANSITION
    cat[~valid] = NONE
    return cat


@torch.no_grad()
def frame_losses(model: nn.Module, codes: torch.Tensor, loss: MoshiLoss, chunk_rows: int | None = None
                 ) -> FrameLosses:
    """Teacher-forced per-position losses of ``codes [B, K, T]`` under ``loss``'s weights.

    The model runs in whatever mode it is in (use eval mode for dropout-free numbers). ``chunk_rows``: text rows
    per head matmul (default: as many as the training loss puts in one chunk for this vocabulary).
    """
    out = model.forward_train(codes)
    b, _, t = codes.shape
    text_target = codes[:, 0]
    text_valid = out.text_mask[:, 0]
    text_weight = text_loss_weights(codes[:, :1], out.text_mask, loss.alpha, loss.pad_ids)[:, 0]
    rows = out.text_hidden[:, 0].reshape(b * t, -1)
    flat_valid = text_valid.reshape(-1)
    index = flat_valid.nonzero().squeeze(1)
    text_ce = torch.full((b * t,), float("nan"), dtype=torch.float32, device=codes.device)
    targets = text_target.reshape(-1)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(int(model.text_card))
    for start in range(0, index.numel(), chunk_rows):
        sel = index[start : start + chunk_rows]
        logits = out.text_head(rows[sel]).float()
        text_ce[sel] = F.cross_entropy(logits, targets[sel], reduction="none")
    dep_q = out.logits.shape[1]
    audio_target = codes[:, 1 : 1 + dep_q]
    audio_weight = audio_loss_weights(out.mask, loss.beta)
    logits = out.logits.float().masked_fill(~out.mask.unsqueeze(-1), 0.0)
    audio_ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), audio_target.clamp_min(0).reshape(-1),
                               reduction="none").reshape(audio_target.shape)
    audio_ce = audio_ce.masked_fill(~out.mask, float("nan"))
    return FrameLosses(
        text_ce=text_ce.reshape(b, t), text_weight=text_weight, text_target=text_target,
        category=text_categories(text_target, text_valid, loss.pad_ids), audio_ce=audio_ce, audio_weight=audio_weight,
    )


def category_means(losses: FrameLosses) -> dict[str, dict[str, float]]:
    """Unweighted mean text CE and frame count per kind of frame (NaN mean for a kind with no frame)."""
    out = {}
    for code, name in CATEGORY_NAMES.items():
        sel = losses.category == code
        n = int(sel.sum())
        out[name] = {"frames": n, "mean_ce": float(losses.text_ce[sel].double().mean()) if n else float("nan")}
    return out


def codebook_means(losses: FrameLosses) -> list[dict[str, float]]:
    """Mean audio CE and number of positions with a target, per depformer codebook."""
    valid = losses.audio_weight > 0
    out = []
    for k in range(losses.audio_ce.shape[1]):
        sel = valid[:, k]
        n = int(sel.sum())
        out.append({"codebook": k, "positions": n,
                    "mean_ce": float(losses.audio_ce[:, k][sel].double().mean()) if n else float("nan")})
    return out
