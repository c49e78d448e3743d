"""Masked, weighted cross-entropy for Moshi's text and audio heads (reference 5.4).

Each part returns a weighted *sum* and the *sum of weights* instead of a mean, so the trainer can
normalise by the weight total of the whole optimizer step (all micro-batches, all ranks). Dividing
each micro-batch by its own weight sum (upstream) over-weights micro-batches with few real tokens;
with equal weight sums both give the same number.

Weights (5.4):
  text:  m · (text_padding_weight if target ∈ {PAD, EPAD} else 1)
  audio: m · (first_codebook_weight_multiplier if codebook == 0 else 1)
where m is the model's validity mask (code != -1 and not in the undelayed tail). Masked positions
contribute exactly 0 to value and gradient even though the model fills them with NaN.

:func:`chunked_linear_cross_entropy` computes ``CE(hidden @ weight.T)`` chunk by chunk so that a
large-vocabulary head (DSAA's ~150k text head) never materialises float32 logits for all rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moshi.models.lm import LMTrainOutput
from moshi.modules.lora import LoRALinear

# Moshi's text PAD (3) and EPAD (0) ids; both are down-weighted by `text_padding_weight`.
DEFAULT_TEXT_PADDING_IDS: tuple[int, ...] = (3, 0)


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
    text_padding_ids: Sequence[int] = DEFAULT_TEXT_PADDING_IDS,
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
    text_padding_ids: Sequence[int] = DEFAULT_TEXT_PADDING_IDS,
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
    text_padding_ids: Sequence[int] = DEFAULT_TEXT_PADDING_IDS,
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

    hidden = rows(out.text_hidden)
    head = out.text_head
    extra = []
    if isinstance(head, LoRALinear):
        extra.append((head.lora_A(hidden) * head.scaling, head.lora_B.weight))
        head = head.frozen_W
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the chunked text loss needs a Linear (or LoRA) text head, got {type(head).__name__}")
    ts, tw = chunked_linear_cross_entropy(hidden, head.weight, targets.reshape(-1)[keep],
                                          w_text[keep], chunk_rows, bias=head.bias, extra=extra)
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
    text_padding_ids: Sequence[int] = DEFAULT_TEXT_PADDING_IDS,
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
# its logits matmul ran at 280 GFLOP/s on 2 CPU cores against 257 for two 262-row chunks, 8 ms less per step
# (the 64 MB is the size of the logits upstream's loss materialises for those rows, before their gradient). For
# DSAA's 152k vocabulary, 256-row chunks (0.15 GB) were no slower than 1024-row ones and peaked lower.
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
    gradient is formed in place in the logits buffer, so a chunk allocates nothing of its size but the logits.

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
        # One chunk's logits buffer, reused by every chunk of this call.
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
        ctx.save_for_backward(*saved)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        # The saved gradients are ours alone and the graph is used once per step, so they are
        # scaled in place: a second [V, D] copy of the head's gradient would double peak memory.
        saved = ctx.saved_tensors
        k = ctx.n_pairs
        scaled = [None if t is None else t.mul_(grad_out.to(t.dtype)) for t in saved]
        grad_h, grad_w, grad_b = scaled[:k], scaled[k : 2 * k], scaled[2 * k]
        pairs = [g for pair in zip(grad_h, grad_w) for g in pair]
        return (None, None, None, None, grad_b, *pairs)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int | None = None,
    bias: torch.Tensor | None = None,
    extra: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ w · CE(hidden @ weight.T + Σ extra_h @ extra_W.T + bias, targets), Σ w)`` without float32 logits
    for all rows at once.

    Args:
        hidden (Tensor): ``[N, D]`` (rows with weight 0 may be anything finite; better: drop them).
        weight (Tensor): ``[V, D]`` head weight.
        targets (Tensor): ``[N]`` int64; entries with weight 0 may be -1.
        weights (Tensor): ``[N]`` ≥ 0.
        chunk_size (int | None): rows per chunk (default :func:`default_chunk_rows`); peak extra memory ≈
            ``chunk_size × V × 4`` bytes.
        bias (Tensor | None): ``[V]`` head bias.
        extra: more ``(hidden_i [N, D_i], weight_i [V, D_i])`` terms summed into the logits (a LoRA head's
            low-rank path).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, D] and weight [V, D], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    n, v = hidden.shape[0], weight.shape[0]
    for h, w in extra:
        if h.dim() != 2 or w.dim() != 2 or h.shape[0] != n or w.shape[0] != v or h.shape[1] != w.shape[1]:
            raise ValueError(f"extra term: expected hidden [{n}, r] and weight [{v}, r], "
                             f"got {tuple(h.shape)}, {tuple(w.shape)}")
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"bias must be [V={v}], got {tuple(bias.shape)}")
    if targets.shape != (n,) or weights.shape != (n,):
        raise ValueError(f"targets/weights must be [N={n}], got {tuple(targets.shape)}, {tuple(weights.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_rows(v)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    pairs = [t for pair in [(hidden, weight), *extra] for t in pair]
    total = _ChunkedLinearCE.apply(
        targets, weights.detach(), int(chunk_size), torch.is_grad_enabled(), bias, *pairs
    )
    return total, weights.float().sum()
