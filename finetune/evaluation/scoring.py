"""Per-item scores from one teacher-forced forward: the `fork` protocol and the `standard` one.

The model's logits at frame t score the codes of frame t (the delays are already undone), and its masks
drop the positions without a prediction (an acoustic codebook's last frame) and every zero token (padding).

* `fork`: the weighted mean audio cross-entropy over the item channel's codebooks, codebook 0 weighted by
  `first_codebook_weight_multiplier` (the training loss's audio term on one item); lower is better.
  This is the score the DSAA fork's benchmarks compare, so a fork user gets the fork's numbers.
* `standard`: the summed log-likelihood over the chosen codebooks (and the text row when asked), higher is
  better. A sum over a causal model makes a shared prefix cancel between two items; `standard_mean`
  divides it by the item's frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from finetune.args import EvalArgs

FORK = "fork"
STANDARD = "standard"
STANDARD_MEAN = "standard_mean"
PROTOCOLS = (FORK, STANDARD, STANDARD_MEAN)


@dataclass(frozen=True)
class ScoreSpec:
    """Which logit rows each protocol reads (indices into the model's `dep_q` predicted codebooks)."""

    fork_codebooks: tuple[int, ...]
    standard_codebooks: tuple[int, ...]
    first_codebook_weight: float
    score_audio: bool = True
    score_text: bool = False
    audio_delays: tuple[int, ...] = ()  # per predicted codebook; empty: none

    def describe(self) -> dict[str, dict[str, object]]:
        """The `protocols` header of a results file."""
        streams = [s for s, on in (("audio", self.score_audio), ("text", self.score_text)) if on]
        return {
            FORK: {"score": "weighted mean audio CE", "better": "lower", "codebooks": list(self.fork_codebooks),
                   "first_codebook_weight": self.first_codebook_weight},
            STANDARD: {"score": "summed log-likelihood", "better": "higher",
                       "codebooks": list(self.standard_codebooks), "streams": streams},
            STANDARD_MEAN: {"score": "summed log-likelihood / frames", "better": "higher",
                            "codebooks": list(self.standard_codebooks), "streams": streams},
        }


def score_spec(model: nn.Module, settings: EvalArgs, first_codebook_weight: float) -> ScoreSpec:
    """The logit rows of the item's channel: Moshi's are rows 0..n-1, the user's n..2n-1 (n per channel)."""
    n_q, dep_q = int(model.n_q), int(model.dep_q)
    per_channel = n_q // 2
    first = 0 if settings.channel == "moshi" else per_channel
    if first + per_channel > dep_q:
        raise ValueError(f"evaluation.channel: {settings.channel!r} needs a model that predicts that channel's "
                         f"{per_channel} codebooks, but this one predicts {dep_q} (Moshi's channel only)")
    chosen = list(range(per_channel)) if settings.codebooks is None else list(settings.codebooks)
    if max(chosen) >= per_channel:
        raise ValueError(f"evaluation.codebooks {settings.codebooks} must be < {per_channel} "
                         "(codebooks per channel)")
    fork_rows = tuple(range(first, first + per_channel))
    delays = tuple(int(d) for d in getattr(model, "delays", [0] * (1 + dep_q))[1 : 1 + dep_q])
    return ScoreSpec(fork_rows, tuple(first + k for k in chosen), float(first_codebook_weight),
                     score_audio="audio" in settings.streams, score_text="text" in settings.streams,
                     audio_delays=delays)


def within_items(mask: torch.Tensor, frames: Sequence[int], delays: Sequence[int]) -> torch.Tensor:
    """``mask [B, K, T]`` limited to what each item alone would score: frame t of codebook k needs
    ``t + delay_k < frames_i``. Padding after an item would otherwise give its delayed codebooks a prediction
    for their last frames, made from the padding."""
    B, K, T = mask.shape
    d = torch.as_tensor(list(delays) or [0] * K, device=mask.device).view(1, K, 1)
    n = torch.as_tensor(list(frames), device=mask.device).view(B, 1, 1)
    return mask & (torch.arange(T, device=mask.device).view(1, 1, T) + d < n)


@dataclass
class Logits:
    audio: torch.Tensor  # [B, dep_q, T, card]
    audio_mask: torch.Tensor  # [B, dep_q, T]
    text: torch.Tensor | None  # [B, 1, T, V]
    text_mask: torch.Tensor  # [B, 1, T]


def forward_logits(model: nn.Module, codes: torch.Tensor, need_text: bool, text_frames: slice | None = None
                   ) -> Logits:
    """One teacher-forced forward: `forward_train` when the model has it (the form FSDP runs), else `model(codes)`.

    The text head is applied only when its logits are needed, and with ``text_frames`` only on those frames
    (`text` and `text_mask` then cover just them): with an LLM's vocabulary it is the largest matmul and
    its logits the largest tensor of the model.
    """
    frames = text_frames if text_frames is not None else slice(None)
    if hasattr(model, "forward_train"):
        out = model.forward_train(codes)
        text = out.text_head(out.text_hidden[:, :, frames]) if need_text else None
        return Logits(out.logits, out.mask, text, out.text_mask[:, :, frames])
    out = model(codes)
    return Logits(out.logits, out.mask, out.text_logits[:, :, frames] if need_text else None,
                  out.text_mask[:, :, frames])


def token_log_likelihoods(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` per position in float32, exactly 0 where the mask is false (NaN logits included)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ll = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, ll, torch.zeros_like(ll))


@dataclass
class ItemScores:
    """Per item of a batch (all ``[B]`` float64 on the CPU)."""

    fork: torch.Tensor
    standard: torch.Tensor
    standard_mean: torch.Tensor

    def row(self, i: int) -> dict[str, float]:
        return {FORK: float(self.fork[i]), STANDARD: float(self.standard[i]),
                STANDARD_MEAN: float(self.standard_mean[i])}


def stream_log_likelihoods(logits: Logits, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Audio ``[B, dep_q, T]`` and text ``[B, T]`` log-likelihoods of ``codes``, and the audio mask."""
    dep_q = logits.audio.shape[1]
    audio_ll = token_log_likelihoods(logits.audio, codes[:, 1 : 1 + dep_q], logits.audio_mask)
    if logits.text is not None:
        text_ll = token_log_likelihoods(logits.text[:, 0], codes[:, 0], logits.text_mask[:, 0])
    else:
        text_ll = torch.zeros(codes.shape[0], codes.shape[-1], device=codes.device)
    return audio_ll, text_ll, logits.audio_mask


def item_scores(logits: Logits, codes: torch.Tensor, frames: Sequence[int], spec: ScoreSpec) -> ItemScores:
    """Both protocols' scores of each item of a padded batch (``codes [B, K, T]``, real ``frames`` per item)."""
    audio_ll, text_ll, mask = stream_log_likelihoods(logits, codes)
    mask = within_items(mask, frames, spec.audio_delays)
    audio_ll = torch.where(mask, audio_ll, torch.zeros_like(audio_ll))
    audio_ll, text_ll = audio_ll.double(), text_ll.double()  # sums exact enough that equal items tie exactly
    fork_rows = list(spec.fork_codebooks)
    w = torch.ones(len(fork_rows), dtype=torch.float64, device=audio_ll.device)
    w[0] = spec.first_codebook_weight
    m = mask[:, fork_rows].double() * w.view(1, -1, 1)
    fork = -(audio_ll[:, fork_rows] * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1e-12)
    standard = torch.zeros(codes.shape[0], dtype=torch.float64, device=audio_ll.device)
    if spec.score_audio:
        standard = standard + audio_ll[:, list(spec.standard_codebooks)].sum((1, 2))
    if spec.score_text:
        standard = standard + text_ll.sum(1)
    n = torch.tensor(list(frames), dtype=torch.float64)
    standard = standard.cpu()
    return ItemScores(fork.cpu(), standard, standard / n)
