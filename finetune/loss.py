"""The training loss: masked, weighted cross-entropy of the text and audio heads, and its fused text CE.

Each part returns a weighted *sum* and the *sum of weights* instead of a mean, so the trainer can
normalise by the weight total of the whole optimizer step (all micro-batches, all ranks); a micro-batch
with few real tokens then weighs exactly its share.

Weights:
  text:  m · (text_padding_weight if target ∈ {PAD, EPAD} else 1)
  audio: m · (first_codebook_weight_multiplier if codebook == 0 else 1)
where m is the model's validity mask (code != -1 and not in the undelayed tail). Masked positions
contribute exactly 0 to value and gradient even though the model fills them with NaN.

:func:`chunked_linear_cross_entropy` computes ``CE(head(hidden))`` chunk by chunk so that a large-vocabulary
head (32k for Moshi, ~150k for a DSAA LLM head) never materialises float32 logits for all rows.
:class:`MoshiLoss` puts the pieces together for the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moshi.models.lm import LMTrainOutput
from moshi.modules.lora import LoRALinear
from moshi.utils.constants import MOSHI_TEXT_END_PADDING_ID, MOSHI_TEXT_PADDING_ID

# The text targets down-weighted by `text_padding_weight` unless a model names its own: Moshi's PAD and EPAD.
MOSHI_PADDING_IDS: tuple[int, ...] = (MOSHI_TEXT_PADDING_ID, MOSHI_TEXT_END_PADDING_ID)


@dataclass
class LossTerms:
    """Weighted CE sums and weight sums of one or more micro-batches (all 0-dim float32 tensors).

    Terms add up (``a + b``) across micro-batches; :meth:`total` normalises by given weight totals.
    """

    text_sum: torch.Tensor
    text_weight: torch.Tensor
    audio_sum: torch.Tensor
    audio_weight: torch.Tensor

    def __add__(self, other: LossTerms) -> LossTerms:
        return LossTerms(
            self.text_sum + other.text_sum,
            self.text_weight + other.text_weight,
            self.audio_sum + other.audio_sum,
            self.audio_weight + other.audio_weight,
        )

    def detach(self) -> LossTerms:
        return LossTerms(*(t.detach() for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.text_sum, self.text_weight, self.audio_sum, self.audio_weight

    def as_vector(self) -> torch.Tensor:
        """``[text_sum, text_weight, audio_sum, audio_weight]``: one tensor, so one all-reduce."""
        return torch.stack([t.float() for t in self.as_tuple()])

    @classmethod
    def from_vector(cls, v: torch.Tensor) -> LossTerms:
        return cls(v[0], v[1], v[2], v[3])

    def total(
        self, text_weight_total: torch.Tensor | float | None = None,
        audio_weight_total: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``text_sum / W_text + audio_sum / W_audio`` (the weight totals default to this object's own)."""
        wt = self.text_weight if text_weight_total is None else text_weight_total
        wa = self.audio_weight if audio_weight_total is None else audio_weight_total
        return _safe_div(self.text_sum, wt) + _safe_div(self.audio_sum, wa)

    @property
    def text_loss(self) -> torch.Tensor:
        """Weighted mean text CE (natural log)."""
        return _safe_div(self.text_sum, self.text_weight)

    @property
    def audio_loss(self) -> torch.Tensor:
        """Weighted mean audio CE (natural log)."""
        return _safe_div(self.audio_sum, self.audio_weight)


def _safe_div(num: torch.Tensor, den: torch.Tensor | float) -> torch.Tensor:
    # A part with no valid target (e.g. a chunk of silence with all text masked) contributes 0, not NaN.
    den_t = torch.as_tensor(den, dtype=torch.float32, device=num.device)
    return num / den_t.clamp_min(1e-12)


def weighted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ w · CE(logits, targets), Σ w)`` in float32; positions with ``w == 0`` contribute exactly 0.

    Args:
        logits (Tensor): ``[..., V]``, any float dtype, may hold NaN where ``weights == 0``.
        targets (Tensor): ``[...]`` int64, may hold -1 where ``weights == 0``.
        weights (Tensor): ``[...]`` float, ≥ 0.
    """
    if logits.shape[:-1] != targets.shape or targets.shape != weights.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
            f"weights {tuple(weights.shape)}"
        )
    weights = weights.float()
    valid = weights > 0
    # Non-in-place fill: the gradient at masked positions is 0 and NaNs never reach the softmax.
    z = logits.float().masked_fill(~valid.unsqueeze(-1), 0.0)
    y = targets.masked_fill(~valid, 0)
    ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="none")
    return (ce * weights.reshape(-1)).sum(), weights.sum()


def text_loss_weights(
    targets: torch.Tensor, mask: torch.Tensor, text_padding_weight: float,
    text_padding_ids: Sequence[int] = MOSHI_PADDING_IDS,
) -> torch.Tensor:
    """Per-position text weights ``[B, 1, T]`` (float32): mask × (α for PAD/EPAD targets, else 1)."""
    is_pad = torch.zeros_like(targets, dtype=torch.bool)
    for pad_id in text_padding_ids:
        is_pad |= targets == pad_id
    w = torch.where(is_pad, float(text_padding_weight), 1.0)
    return w * mask.float()


def audio_loss_weights(mask: torch.Tensor, first_codebook_weight_multiplier: float) -> torch.Tensor:
    """Per-position audio weights ``[B, K, T]`` (float32): mask × (β on codebook 0, else 1)."""
    k = mask.shape[1]
    per_codebook = torch.ones(k, dtype=torch.float32, device=mask.device)
    if k:  # a model without depformer (dep_q = 0) has no audio terms
        per_codebook[0] = float(first_codebook_weight_multiplier)
    return mask.float() * per_codebook[None, :, None]


def moshi_loss_terms(
    text_logits: torch.Tensor,
    text_mask: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor,
    codes: torch.Tensor,
    first_codebook_weight_multiplier: float = 1.0,
    text_padding_weight: float = 0.5,
    text_padding_ids: Sequence[int] = MOSHI_PADDING_IDS,
) -> LossTerms:
    """The loss terms of one micro-batch from an ``LMOutput``'s fields and the input codes.

    Args:
        text_logits (Tensor): ``[B, 1, T, text_card]``.
        text_mask (Tensor): bool ``[B, 1, T]``.
        logits (Tensor): ``[B, dep_q, T, card]``.
        mask (Tensor): bool ``[B, dep_q, T]``.
        codes (Tensor): ``[B, K, T]``; row 0 is the text target, rows ``1..dep_q`` the audio targets.
    """
    dep_q = logits.shape[1]
    text_targets = codes[:, :1]
    audio_targets = codes[:, 1 : 1 + dep_q]
    wt = text_loss_weights(text_targets, text_mask, text_padding_weight, text_padding_ids)
    wa = audio_loss_weights(mask, first_codebook_weight_multiplier)
    ts, tw = weighted_cross_entropy(text_logits, text_targets, wt)
    aus, aw = weighted_cross_entropy(logits, audio_targets, wa)
    return LossTerms(ts, tw, aus, aw)


def train_output_loss_terms(
    out: LMTrainOutput,
    codes: torch.Tensor,
    first_codebook_weight_multiplier: float = 1.0,
    text_padding_weight: float = 0.5,
    text_padding_ids: Sequence[int] = MOSHI_PADDING_IDS,
    chunk_rows: int | None = None,
    with_audio: bool = True,
) -> LossTerms:
    """:func:`moshi_loss_terms` from a model's ``forward_train`` output, the text head fused into the CE.

    Only positions with a text weight go through the text head, in row chunks
    (:func:`chunked_linear_cross_entropy`), so the ``[B, T, V]`` logits never exist. The value equals
    :func:`moshi_loss_terms` on ``forward``'s output up to float rounding. ``with_audio=False`` leaves the
    audio terms at 0 (DSAA's text-only steps) and skips their CE.
    """
    targets = codes[:, :1]
    w_text = text_loss_weights(targets, out.text_mask, text_padding_weight, text_padding_ids).reshape(-1)
    keep = w_text > 0

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])[keep]

    ts, tw = chunked_linear_cross_entropy(rows(out.text_hidden), out.text_head, targets.reshape(-1)[keep],
                                          w_text[keep], chunk_rows)
    if not with_audio:
        zero = ts.new_zeros(())
        return LossTerms(ts, tw, zero, zero)
    w_audio = audio_loss_weights(out.mask, first_codebook_weight_multiplier)
    aus, aw = weighted_cross_entropy(out.logits, codes[:, 1 : 1 + out.logits.shape[1]], w_audio)
    return LossTerms(ts, tw, aus, aw)


def loss_weight_sums_from_codes(
    codes: torch.Tensor,
    delays: Sequence[int],
    dep_q: int,
    first_codebook_weight_multiplier: float = 1.0,
    text_padding_weight: float = 0.5,
    text_padding_ids: Sequence[int] = MOSHI_PADDING_IDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(text, audio)`` weight sums :func:`moshi_loss_terms` will find, computed before the forward.

    The model's masks depend only on the codes (``!= -1``) and the delays (the last ``d`` frames of a
    stream with delay ``d`` have no target), so the trainer can know the step's normaliser before any
    backward and give every micro-batch its exact share of the gradient.
    """
    t = codes.shape[-1]
    frames = torch.arange(t, device=codes.device)

    def _mask(rows: slice, row_delays: Sequence[int]) -> torch.Tensor:
        d = torch.tensor(list(row_delays), device=codes.device)
        return (codes[:, rows] != -1) & (frames[None, None, :] < (t - d)[None, :, None])

    text_mask = _mask(slice(0, 1), delays[:1])
    audio_mask = _mask(slice(1, 1 + dep_q), delays[1 : 1 + dep_q])
    wt = text_loss_weights(codes[:, :1], text_mask, text_padding_weight, text_padding_ids)
    wa = audio_loss_weights(audio_mask, first_codebook_weight_multiplier)
    return wt.sum(), wa.sum()


# Rows per chunk of the fused text CE: up to 16M float32 logits (64 MB) per chunk, and never under 256 rows so
# the chunk matmuls stay efficient. For Moshi's 32k vocabulary the mid benchmark's 500 rows are then one chunk:
# its logits matmul ran at 280 GFLOP/s on 2 CPU cores against 257 for two 262-row chunks, 8 ms less per step.
# For DSAA's 152k vocabulary, 256-row chunks (0.15 GB) were no slower than 1024-row ones and peaked lower.
CHUNK_LOGITS = 16 * 2**20
MIN_CHUNK_ROWS = 256


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk of :func:`chunked_linear_cross_entropy` for a head of ``vocab`` outputs."""
    return max(MIN_CHUNK_ROWS, CHUNK_LOGITS // max(vocab, 1))


class _ChunkedLinearCE(torch.autograd.Function):
    """Fused ``Σ_i hidden_i @ weight_iᵀ (+ bias) → float32 CE`` over row chunks; gradients are computed in
    the forward pass.

    Computing the gradient while the chunk's logits are at hand (instead of saving them or recomputing
    them in backward) keeps peak memory at one chunk of logits and costs no extra matmul. The softmax
    gradient is formed in place in the chunk's logits buffer. Backward scales the saved gradients in place
    (a second ``[V, D]`` copy of the head's gradient would double its memory), so it may run only once:
    a second backward through a retained graph raises instead of returning scaled-twice gradients.

    Inputs after the fixed arguments are ``bias`` (or None) then ``hidden_0, weight_0, hidden_1, weight_1,
    ...``: a LoRA head is ``(h, W)`` plus ``(scaling · h Aᵀ, B)``.
    """

    @staticmethod
    def forward(ctx, targets, weights, chunk_size, grad_enabled, bias, *pairs):  # type: ignore[override]
        hiddens, heads = list(pairs[0::2]), list(pairs[1::2])
        n = hiddens[0].shape[0]
        # Grad mode is always off inside forward; the caller's mode comes in as `grad_enabled`.
        need = ctx.needs_input_grad
        need_h = [grad_enabled and need[5 + 2 * i] for i in range(len(hiddens))]
        need_w = [grad_enabled and need[6 + 2 * i] for i in range(len(heads))]
        need_b = grad_enabled and bias is not None and need[4]
        device = hiddens[0].device
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_h = [torch.empty(h.shape, dtype=h.dtype, device=device) if nh else None for h, nh in zip(hiddens, need_h)]
        grad_w: list[torch.Tensor | None] = [None] * len(heads)  # float32 accumulators, created by chunk 0
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=device) if need_b else None
        any_grad = any(need_h) or any(need_w) or need_b
        w_all = weights.float()
        workspace = torch.empty((min(n, chunk_size), heads[0].shape[0]), dtype=hiddens[0].dtype, device=device)
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            rows = [h[start:stop] for h in hiddens]
            w = w_all[start:stop]
            y = targets[start:stop].clamp_min(0)
            z = torch.mm(rows[0], heads[0].t(), out=workspace[: stop - start])  # [c, V], rounded as F.linear(h, W)
            for h, head in zip(rows[1:], heads[1:]):
                z.addmm_(h, head.t())
            if bias is not None:
                z += bias
            # Softmax in place in the chunk's own buffer (logsumexp would allocate a shifted copy):
            # z - max, then exp, then the row sums; CE = log(sum) - (z_y - max).
            z = z.float()
            z.sub_(z.amax(dim=-1, keepdim=True))
            tgt = z.gather(1, y[:, None]).squeeze(1)
            sums = z.exp_().sum(dim=-1)
            total += ((sums.log() - tgt) * w).sum()
            if not any_grad:
                continue
            # d(w·CE)/dz = w·softmax(z) - w·onehot(y).
            g = z.mul_((w / sums)[:, None])
            g[torch.arange(stop - start, device=device), y] -= w
            if need_b:
                grad_b += g.sum(0)
            g = g.to(hiddens[0].dtype)
            for i, (h, head) in enumerate(zip(rows, heads)):
                if need_h[i]:
                    torch.mm(g, head, out=grad_h[i][start:stop])
                if need_w[i]:  # accumulate in float32 in place: no [V, D] temporary per chunk
                    if grad_w[i] is None:
                        grad_w[i] = torch.mm(g.t().float(), h.float())
                    else:
                        grad_w[i].addmm_(g.t().float(), h.float())
        saved = list(grad_h)
        saved += [None if gw is None else gw.to(head.dtype) for gw, head in zip(grad_w, heads)]
        saved.append(None if grad_b is None else grad_b.to(bias.dtype))
        ctx.n_pairs = len(hiddens)
        ctx.backward_done = False
        ctx.save_for_backward(*saved)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.backward_done:
            raise RuntimeError(
                "chunked_linear_cross_entropy: backward ran twice through the same graph (retain_graph=True); "
                "its gradients are computed once in forward and consumed by the first backward, so run the "
                "loss's forward again before another backward"
            )
        ctx.backward_done = True
        saved = ctx.saved_tensors
        k = ctx.n_pairs
        scaled = [None if t is None else t.mul_(grad_out.to(t.dtype)) for t in saved]
        grad_h, grad_w, grad_b = scaled[:k], scaled[k : 2 * k], scaled[2 * k]
        pairs = [g for pair in zip(grad_h, grad_w) for g in pair]
        return (None, None, None, None, grad_b, *pairs)


def _head_terms(head: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """``(bias, [hidden, W, (low, B)...])`` of a Linear or LoRA head applied to ``hidden`` rows.

    A LoRA head's low-rank input ``scaling · lora_A(hidden)`` is computed here, on the rows the loss keeps,
    and goes through ordinary autograd to ``lora_A`` and ``hidden``.
    """
    if isinstance(head, LoRALinear):
        bias, pairs = _head_terms(head.frozen_W, hidden)
        return bias, pairs + [head.lora_A(hidden) * head.scaling, head.lora_B.weight]
    if isinstance(head, nn.Linear):
        return head.bias, [hidden, head.weight]
    raise TypeError(f"the fused text CE needs an nn.Linear or LoRALinear text head, got {type(head).__name__}")


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ w · CE(head(hidden), targets), Σ w)`` without float32 logits for all rows at once.

    Args:
        hidden (Tensor): ``[N, D]`` rows (rows with weight 0 may be anything finite; better: drop them).
        head (nn.Module): the text head, an ``nn.Linear`` (with or without bias) or a ``LoRALinear``; its
            parameters receive gradients.
        targets (Tensor): ``[N]`` int64; entries with weight 0 may be -1.
        weights (Tensor): ``[N]`` ≥ 0.
        chunk_size (int | None): rows per chunk (default :func:`default_chunk_rows`); peak extra memory ≈
            ``chunk_size × V × 4`` bytes.

    Raises:
        RuntimeError: on a second backward through the same result (see :class:`_ChunkedLinearCE`).
    """
    bias, pairs = _head_terms(head, hidden)
    weight = pairs[1]
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, D] and a head weight [V, D], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    n = hidden.shape[0]
    if targets.shape != (n,) or weights.shape != (n,):
        raise ValueError(f"targets/weights must be [N={n}], got {tuple(targets.shape)}, {tuple(weights.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_rows(weight.shape[0])
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    total = _ChunkedLinearCE.apply(targets, weights.detach(), int(chunk_size), torch.is_grad_enabled(), bias, *pairs)
    return total, weights.float().sum()


# ----------------------------------------------------------------------------- the trainer's loss


class LossFn(Protocol):
    """What the training loop and evaluation need from a loss."""

    def weight_sums(self, codes: torch.Tensor) -> torch.Tensor: ...  # [2]: text, audio weight sums

    def token_counts(self, codes: torch.Tensor) -> torch.Tensor: ...  # [2]: positions with a target, all

    def __call__(self, model: nn.Module, codes: torch.Tensor) -> LossTerms: ...

    def begin_step(self, step: int) -> None: ...  # before the step's first `weight_sums` (1-based step)


class MoshiLoss:
    """The weighted text + audio CE of an ``LMModel`` (Moshi or DSAA text path), text head fused into the CE.

    The audio terms can be switched off on a schedule: always with ``only_text``, and on every training step
    ``step % audio_loss_skip_every == 0`` (1-based step, announced by :meth:`begin_step`). They are left out
    of both the loss and the step's weight totals, and only in training (``model.training``): evaluation
    always reports both parts. Without a schedule every step has both parts.
    """

    def __init__(self, delays: Sequence[int], dep_q: int, first_codebook_weight_multiplier: float,
                 text_padding_weight: float, text_padding_ids: Sequence[int], only_text: bool = False,
                 audio_loss_skip_every: int = 0, chunk_rows: int | None = None) -> None:
        self.delays = list(delays)
        self.dep_q = dep_q
        self.beta = first_codebook_weight_multiplier
        self.alpha = text_padding_weight
        self.pad_ids = tuple(text_padding_ids)
        self.only_text = only_text
        self.skip_every = audio_loss_skip_every
        self.chunk_rows = chunk_rows
        self.audio_off = only_text

    @classmethod
    def for_model(cls, model: nn.Module, first_codebook_weight_multiplier: float, text_padding_weight: float,
                  only_text: bool = False, audio_loss_skip_every: int = 0) -> MoshiLoss:
        """The loss of ``model``: its delays, depformer codebooks and PAD/EPAD ids."""
        return cls(model.delays, model.dep_q, first_codebook_weight_multiplier, text_padding_weight,
                   (model.existing_text_padding_id, model.existing_text_end_padding_id), only_text=only_text,
                   audio_loss_skip_every=audio_loss_skip_every)

    def skips_audio(self, step: int) -> bool:
        """Whether training step ``step`` (1-based) leaves the audio loss out."""
        return self.only_text or (self.skip_every > 0 and step % self.skip_every == 0)

    def begin_step(self, step: int) -> None:
        """Called by the trainer before each optimizer step's first forward."""
        self.audio_off = self.skips_audio(step)

    def weight_sums(self, codes: torch.Tensor) -> torch.Tensor:
        wt, wa = loss_weight_sums_from_codes(codes, self.delays, self.dep_q, self.beta, self.alpha, self.pad_ids)
        return torch.stack([wt, wa * 0.0 if self.audio_off else wa])

    def token_counts(self, codes: torch.Tensor) -> torch.Tensor:
        """``[real, all]`` predicted positions: those with a target (text and audio), and all of them."""
        wt, wa = loss_weight_sums_from_codes(codes, self.delays, self.dep_q, 1.0, 1.0, ())
        total = codes.shape[0] * codes.shape[-1] * (1 + self.dep_q)
        return torch.stack([wt + wa, wt.new_tensor(float(total))])

    def __call__(self, model: nn.Module, codes: torch.Tensor) -> LossTerms:
        with_audio = not (self.audio_off and model.training)
        return train_output_loss_terms(model.forward_train(codes), codes, self.beta, self.alpha,  # type: ignore[operator]
                                       self.pad_ids, self.chunk_rows, with_audio)
