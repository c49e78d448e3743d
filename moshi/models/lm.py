"""Moshi's language model: a temporal transformer over frames plus a small "depformer" over the audio
codebooks of each frame, weight- and keyword-compatible with Kyutai's ``LMModel``.

Streams are laid out as ``codes [B, K, T]`` with ``K = 1 + n_q``: row 0 is text, rows ``1..dep_q`` are the
model's own audio codebooks (predicted by the depformer) and the remaining rows the other speaker's audio.
Each stream is delayed by ``delays[k]`` frames before entering the model (:func:`delay_codes`) and the logits are
shifted back (:func:`undelay_logits`), so that ``logits[:, c, t]`` predicts ``codes[:, 1 + c, t]``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..modules.streaming import StreamingContainer
from ..modules.transformer import (
    StreamingTransformer,
    StreamingTransformerLayer,
    apply_per_step_linear,
    create_norm_fn,
)
from ..utils.constants import (
    MOSHI_TEXT_END_PADDING_ID,
    MOSHI_TEXT_PADDING_ID,
    UNGENERATED_TOKEN_ID,
    ZERO_TOKEN_ID,
)

Device = torch.device | str | None


@dataclass
class LMOutput:
    """Teacher-forced outputs, aligned with the input codes.

    Attributes:
        logits (torch.Tensor): ``[B, dep_q, T, card]`` audio logits, NaN where the delay leaves no prediction.
        mask (torch.Tensor): bool ``[B, dep_q, T]``, false at NaN positions and where the code is ``-1``.
        text_logits (torch.Tensor): ``[B, 1, T, text_card_out]``.
        text_mask (torch.Tensor): bool ``[B, 1, T]``.
    """

    logits: torch.Tensor
    mask: torch.Tensor
    text_logits: torch.Tensor
    text_mask: torch.Tensor


@dataclass
class LMTrainOutput:
    """Teacher-forced outputs with the text head left unapplied, for a loss that applies it in row chunks.

    The text head is the largest matmul of a step and its float32 logits the largest activation (``[B, T, V]``);
    a fused chunked cross-entropy over ``text_hidden`` never materialises them. The loss reads the head's
    weight, bias and LoRA factors from :attr:`text_head` itself. :meth:`full_text_logits` gives
    :attr:`LMOutput.text_logits` (NaN positions included: un-delaying fills ``text_hidden`` with NaN where
    ``text_logits`` would be NaN).

    Attributes:
        logits (torch.Tensor): ``[B, dep_q, T, card]`` audio logits, as in :class:`LMOutput`.
        mask (torch.Tensor): bool ``[B, dep_q, T]``.
        text_hidden (torch.Tensor): ``[B, 1, T, D]``, the input of the whole text head (for a LoRA head, the
            input of the ``LoRALinear``, which feeds both ``frozen_W`` and ``lora_A``).
        text_mask (torch.Tensor): bool ``[B, 1, T]``.
        text_head (nn.Module): the text head module (``nn.Linear`` or ``LoRALinear``).
    """

    logits: torch.Tensor
    mask: torch.Tensor
    text_hidden: torch.Tensor
    text_mask: torch.Tensor
    text_head: nn.Module

    def full_text_logits(self) -> torch.Tensor:
        """``[B, 1, T, V]``: the logits the text head gives (as :attr:`LMOutput.text_logits`)."""
        return self.text_head(self.text_hidden)


# ----------------------------------------------------------------------------------------------------------------
# Delays


def delay_codes(codes: torch.Tensor, delays: Sequence[int], initial_tokens: torch.Tensor) -> torch.Tensor:
    """Delays each stream and prepends the initial tokens: ``[B, K, T]`` → ``[B, K, T + 1]``.

    ``out[:, k, 0]`` is the initial token of stream ``k``, and ``out[:, k, t] = codes[:, k, t - 1 - delays[k]]`` for
    ``t >= 1``, or the initial token where that index is negative. The model input is ``out[..., :T]`` and the
    depformer's tokens/targets are ``out[..., 1:]``.

    Args:
        codes (torch.Tensor): int64 ``[B, K, T]``.
        delays (Sequence[int]): ``K`` non-negative delays.
        initial_tokens (torch.Tensor): ``[B or 1, K, 1]``.
    """
    B, K, T = codes.shape
    if len(delays) != K:
        raise ValueError(f"got {len(delays)} delays for {K} streams")
    device = codes.device
    d = torch.as_tensor(list(delays), device=device, dtype=torch.long).view(K, 1)
    src = torch.arange(T + 1, device=device).view(1, T + 1) - 1 - d  # [K, T + 1]
    gathered = codes.gather(2, src.clamp(min=0).unsqueeze(0).expand(B, K, T + 1))
    return torch.where(src.unsqueeze(0) >= 0, gathered, initial_tokens.to(codes.dtype).expand(B, K, 1))


def undelay_logits(
    logits: torch.Tensor, delays: Sequence[int], valid_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifts delayed predictions back onto the frames they predict.

    ``out[:, k, t] = logits[:, k, t + delays[k]]``; the last ``delays[k]`` frames have no prediction and are set
    to NaN with a false mask.

    Args:
        logits (torch.Tensor): ``[B, K, T, V]``.
        delays (Sequence[int]): ``K`` delays.
        valid_mask (torch.Tensor): bool ``[B, K, T]`` (false where the target code is ``-1``).

    Returns:
        ``(logits, mask)`` of shapes ``[B, K, T, V]`` and ``[B, K, T]``.
    """
    B, K, T, V = logits.shape
    if len(delays) != K:
        raise ValueError(f"got {len(delays)} delays for {K} streams")
    if all(d == 0 for d in delays):
        return logits, valid_mask
    device = logits.device
    d = torch.as_tensor(list(delays), device=device, dtype=torch.long).view(K, 1)
    src = torch.arange(T, device=device).view(1, T) + d  # [K, T]
    in_range = src < T
    index = src.clamp(max=T - 1).view(1, K, T, 1).expand(B, K, T, V)
    shifted = logits.gather(2, index)
    shifted = torch.where(in_range.view(1, K, T, 1), shifted, torch.full_like(shifted[:1, :1, :1, :1], math.nan))
    return shifted, valid_mask & in_range.unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------------
# Embeddings


class ScaledEmbedding(nn.Embedding):
    """Embedding table where token ``-1`` ("zero token") embeds to exact zeros.

    Args:
        num_embeddings (int): rows (``card + 1``: the last row is the initial token).
        embedding_dim (int): output width.
        norm (bool): LayerNorm (eps 1e-5) after the lookup.
        zero_idx (int): must be -1.
        low_rank (int | None): table width ``r`` followed by ``low_rank`` Linear(r → embedding_dim).
        lr (float | None): learning rate for this table, stored as ``self.lr`` for an optimiser's parameter groups
            (the model itself does not use it).
        demux_second_stream (bool): tokens encode a pair ``left + N·(right + 1)`` (``right = -1``: none), embedded
            as ``out1(table[left]) + out2(table[right])``.

    Note:
        There is no scaling in the forward pass (the name is kept for checkpoint and API compatibility); other
        negative ids read row 0.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *args: Any,
        norm: bool = False,
        zero_idx: int = -1,
        low_rank: int | None = None,
        lr: float | None = None,
        demux_second_stream: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_embeddings, low_rank or embedding_dim, *args, **kwargs)
        self.lr = lr
        if zero_idx != -1:
            raise ValueError(f"zero_idx must be -1, got {zero_idx}")
        if demux_second_stream and norm:
            raise ValueError("norm is not supported with demux_second_stream")
        factory = {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}
        width = low_rank or embedding_dim
        self.zero_idx = zero_idx
        self.demux_second_stream = demux_second_stream
        self.norm: nn.Module | None = None
        if norm:
            self.norm = nn.LayerNorm(width, eps=1e-5, **factory)
        self.low_rank: nn.Linear | None = None
        if low_rank is not None and not demux_second_stream:
            self.low_rank = nn.Linear(low_rank, embedding_dim, bias=False, **factory)
        if demux_second_stream:
            self.out1 = nn.Linear(width, embedding_dim, bias=False, **factory)
            self.out2 = nn.Linear(width, embedding_dim, bias=False, **factory)

    @property
    def is_plain(self) -> bool:
        """A bare table lookup (no norm, low rank or demux), which allows batched lookups across tables."""
        return self.norm is None and self.low_rank is None and not self.demux_second_stream

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        is_zero = input == self.zero_idx
        if self.demux_second_stream:
            n = self.num_embeddings
            tok = input.clamp(min=0)
            left, right = tok % n, tok // n - 1
            y = self.out1(super().forward(left))
            y2 = self.out2(super().forward(right.clamp(min=0)))
            y = y + torch.where((right >= 0).unsqueeze(-1), y2, torch.zeros_like(y2))
            return torch.where(is_zero.unsqueeze(-1), torch.zeros_like(y), y)
        y = super().forward(input.clamp(min=0))
        if self.norm is not None:
            y = self.norm(y)
        y = torch.where(is_zero.unsqueeze(-1), torch.zeros_like(y), y)
        if self.low_rank is not None:
            y = self.low_rank(y)
        return y


def _summed_lookup(tables: Sequence[ScaledEmbedding], tokens: torch.Tensor) -> torch.Tensor:
    """``Σ_a tables[a](tokens[:, a])`` for ``tokens [B, A, T]`` → ``[B, T, D]``.

    For sequences of at least one table's size, plain tables are concatenated and summed by one
    ``embedding_bag`` (zero tokens get weight 0), which avoids ``A`` lookups plus ``A - 1`` additions and never
    materialises the ``[B, A, T, D]`` intermediate. Shorter inputs (a streaming step reads ``B`` tokens per
    table) look each table up and add in the same order: copying all ``A`` tables would cost more than the sums.
    """
    B, A, T = tokens.shape
    if B * T >= tables[0].num_embeddings and all(t.is_plain for t in tables):
        rows = tables[0].num_embeddings
        if all(t.num_embeddings == rows for t in tables):
            weight = torch.cat([t.weight for t in tables]) if A > 1 else tables[0].weight
            offsets = torch.arange(A, device=tokens.device).view(1, A, 1) * rows
            index = (tokens.clamp(min=0) + offsets).permute(0, 2, 1).reshape(B * T, A)
            per_sample = (tokens != ZERO_TOKEN_ID).permute(0, 2, 1).reshape(B * T, A).to(weight.dtype)
            out = F.embedding_bag(index, weight, mode="sum", per_sample_weights=per_sample)
            return out.view(B, T, -1)
    out = tables[0](tokens[:, 0])
    for a in range(1, A):
        out = out + tables[a](tokens[:, a])
    return out


def _stacked_lookup(tables: Sequence[ScaledEmbedding], tokens: torch.Tensor) -> torch.Tensor:
    """``stack_a tables[a](tokens[:, a])`` for ``tokens [B, A, T]`` → ``[B, T, A, D]`` (one lookup if plain)."""
    B, A, T = tokens.shape
    rows = tables[0].num_embeddings
    if all(t.is_plain and t.num_embeddings == rows for t in tables):
        weight = torch.cat([t.weight for t in tables]) if A > 1 else tables[0].weight
        offsets = torch.arange(A, device=tokens.device).view(1, A, 1) * rows
        index = (tokens.clamp(min=0) + offsets).transpose(1, 2)  # [B, T, A]
        y = F.embedding(index, weight)
        return torch.where((tokens == ZERO_TOKEN_ID).transpose(1, 2).unsqueeze(-1), torch.zeros_like(y), y)
    return torch.stack([tables[a](tokens[:, a]) for a in range(A)], dim=2)


# ----------------------------------------------------------------------------------------------------------------
# Text paths


class TextPath:
    """How the text stream enters and leaves an :class:`LMModel`.

    The audio embeddings, the temporal transformer, the depformer and its output heads are the same for every
    model; the text path decides what the temporal transformer reads besides audio, which per-frame state the
    depformer reads, which module predicts the text token and what each depformer step receives. It creates its
    modules directly on the model, at top level, so their state-dict names are the model's own.
    Subclasses override every method; the constructor of :class:`LMModel` calls the ``build_*`` methods in
    registration order.
    """

    def resolve_text_config(
        self, text_card: int, padding_id: int, end_padding_id: int, text_card_out: int | None, demux: bool
    ) -> tuple[int, int, int]:
        """``(text_card, text PAD id, text EPAD id)`` the model uses, from the constructor's keywords."""
        raise NotImplementedError

    def build_input(self, model: LMModel, factory: dict[str, Any]) -> None:
        """Creates the modules the temporal side needs (called right after the audio embeddings)."""
        raise NotImplementedError

    def build_depformer_input(self, model: LMModel, num_inputs: int, factory: dict[str, Any]) -> None:
        """Creates the ``num_inputs`` per-step depformer input modules (before the depformer's audio tables)."""
        raise NotImplementedError

    def build_depformer_text(self, model: LMModel, factory: dict[str, Any]) -> None:
        """Creates the depformer's text-token input (after the depformer's audio tables)."""
        raise NotImplementedError

    def init_tables(self, model: LMModel, depformer: bool) -> list[nn.Module]:
        """Text embedding tables that take the model's truncated-normal init (temporal or depformer side)."""
        raise NotImplementedError

    def init_linears(self, model: LMModel) -> list[nn.Module]:
        """Text linears that take the model's truncated-normal init."""
        raise NotImplementedError

    def text_initial_token_id(self, model: LMModel) -> int:
        raise NotImplementedError

    def temporal_input(self, model: LMModel, sequence: torch.Tensor) -> torch.Tensor:
        """Temporal transformer input ``[B, T, dim]`` for delayed ``sequence [B, K, T]``."""
        raise NotImplementedError

    def frame_state(
        self, model: LMModel, sequence: torch.Tensor, transformer_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, text_hidden)``: the per-frame state every depformer step reads and the text head's input."""
        raise NotImplementedError

    def text_head(self, model: LMModel) -> nn.Module:
        """The module that maps ``text_hidden`` to text logits."""
        raise NotImplementedError

    def depformer_inputs(self, model: LMModel, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Inputs of all depformer steps, ``[B, T, dep_q, depformer_dim]``, for ``z [B, T, Z]`` and the delayed
        targets ``tokens [B, dep_q, T]`` (row 0 text, row ``c`` audio codebook ``c - 1``)."""
        raise NotImplementedError

    def depformer_step_input(self, model: LMModel, step: int, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Input of depformer step ``step``, ``[B, T, depformer_dim]``, for ``tokens [B, T]`` (the previous token:
        text at step 0, audio codebook ``step - 1`` after)."""
        raise NotImplementedError


class MoshiTextPath(TextPath):
    """Moshi's own text path.

    The text token's embedding ``text_emb`` is summed into the temporal input, ``text_linear`` reads the
    temporal output, and each depformer step reads ``depformer_in[j](transformer_out)`` plus the embedding of
    its previous token (``depformer_text_emb`` at step 0).
    """

    def __init__(self, norm_emb: bool = False, bias_proj: bool = False, low_rank: int | None = None) -> None:
        self.norm_emb = norm_emb
        self.bias_proj = bias_proj
        self.low_rank = low_rank
        self.demux = False
        self.text_card_out = 0

    def resolve_text_config(
        self, text_card: int, padding_id: int, end_padding_id: int, text_card_out: int | None, demux: bool
    ) -> tuple[int, int, int]:
        self.demux = demux
        self.text_card_out = text_card_out or text_card
        return text_card, padding_id, end_padding_id

    def build_input(self, model: LMModel, factory: dict[str, Any]) -> None:
        model.text_emb = ScaledEmbedding(
            model.text_card + 1, model.dim, norm=self.norm_emb, demux_second_stream=self.demux, **factory
        )
        model.text_linear = nn.Linear(model.dim, self.text_card_out, bias=self.bias_proj, **factory)

    def build_depformer_input(self, model: LMModel, num_inputs: int, factory: dict[str, Any]) -> None:
        model.depformer_in = nn.ModuleList(
            [nn.Linear(model.dim, model.depformer_dim, bias=False, **factory) for _ in range(num_inputs)]
        )

    def build_depformer_text(self, model: LMModel, factory: dict[str, Any]) -> None:
        model.depformer_text_emb = ScaledEmbedding(
            model.text_card + 1,
            model.depformer_dim,
            low_rank=self.low_rank,
            demux_second_stream=self.demux,
            **factory,
        )

    def init_tables(self, model: LMModel, depformer: bool) -> list[nn.Module]:
        return [model.depformer_text_emb] if depformer else [model.text_emb]

    def init_linears(self, model: LMModel) -> list[nn.Module]:
        return [model.text_linear]

    def text_initial_token_id(self, model: LMModel) -> int:
        return model.text_card

    def temporal_input(self, model: LMModel, sequence: torch.Tensor) -> torch.Tensor:
        return model.embed_audio(sequence[:, model.audio_offset : model.audio_offset + model.n_q]) + model.text_emb(
            sequence[:, 0]
        )

    def frame_state(
        self, model: LMModel, sequence: torch.Tensor, transformer_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return transformer_out, transformer_out

    def text_head(self, model: LMModel) -> nn.Module:
        return model.text_linear

    def _projections(self, model: LMModel, z: torch.Tensor) -> torch.Tensor:
        """``depformer_in`` of every step: ``[B, T, dim]`` → ``[B, T, dep_q, depformer_dim]``; plain per-step
        linears run as one matmul on their concatenated weights."""
        B, T, _ = z.shape
        dep_in = model.depformer_in
        if len(dep_in) == 1:
            proj = dep_in[0](z)
            return proj.unsqueeze(2).expand(B, T, model.dep_q, proj.shape[-1])
        modules = [dep_in[model.depformer_input_index(c)] for c in range(model.dep_q)]
        if all(type(m) is nn.Linear and m.bias is None for m in modules):
            weight = torch.cat([m.weight for m in modules])
            return F.linear(z, weight).view(B, T, model.dep_q, -1)
        return torch.stack([m(z) for m in modules], dim=2)

    def _token_embeddings(self, model: LMModel, tokens: torch.Tensor) -> torch.Tensor:
        text = model.depformer_text_emb(tokens[:, 0]).unsqueeze(2)
        if model.dep_q == 1:
            return text
        audio = _stacked_lookup(list(model.depformer_emb), tokens[:, 1 : model.dep_q])
        return torch.cat([text, audio], dim=2)

    def depformer_inputs(self, model: LMModel, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._projections(model, z) + self._token_embeddings(model, tokens)

    def depformer_step_input(self, model: LMModel, step: int, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        table = model.depformer_text_emb if step == 0 else model.depformer_emb[step - 1]
        return model.depformer_in[model.depformer_input_index(step)](z) + table(tokens)


# ----------------------------------------------------------------------------------------------------------------
# Model


def _init_params(module: nn.Module, which: tuple[str, ...]) -> None:
    """Truncated normal (±3σ) with ``σ = 1/sqrt(fan_in)`` for ``which`` parameters; zero biases."""
    with torch.no_grad():
        for name in which:
            p = getattr(module, name, None)
            if p is None or p.is_meta:
                continue
            if name == "bias":
                p.zero_()
                continue
            fan_in = p.shape[1]
            std = 1.0 / math.sqrt(fan_in)
            tmp = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            nn.init.trunc_normal_(tmp, mean=0.0, std=std, a=-3 * std, b=3 * std)
            p.copy_(tmp)


def _transformer_kwarg_names(layer_class: type) -> set[str]:
    names = set()
    for fn in (StreamingTransformer.__init__, layer_class.__init__):
        for pname, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and pname != "self":
                names.add(pname)
    return names


class LMModel(StreamingContainer):
    """Moshi LM with Kyutai's constructor keywords and tensor names; the text stream goes through a
    :class:`TextPath` (Moshi's own by default, or DSAA's frozen text LLM, see ``docs/dsaa.md``).

    Args:
        delays (list[int]): per-stream delay, ``n_q + 1`` entries.
        n_q (int): audio streams in the input (both speakers).
        dep_q (int): audio streams predicted by the depformer (the first ``dep_q``); 0 for none.
        card (int): audio vocabulary; tables have ``card + 1`` rows (last = initial token).
        text_card (int): text vocabulary; tables have ``text_card + 1`` rows.
        text_card_out (int | None): width of ``text_linear`` (default ``text_card``).
        demux_second_text_stream (bool): text tokens encode a pair (see :class:`ScaledEmbedding`).
        dim (int), num_heads (int), hidden_scale (float): temporal transformer width, heads, FFN ratio.
        norm (str): norm of every transformer layer and of ``out_norm``.
        norm_emb (bool): LayerNorm after the input embeddings.
        bias_proj (bool): bias on ``text_linear`` and ``linears``.
        depformer_dim (int), depformer_dim_feedforward (int | list[int] | None): depformer width and FFN.
        depformer_multi_linear (bool): one ``depformer_in`` per codebook.
        depformer_weights_per_step (bool): one depformer weight set per codebook.
        depformer_weights_per_step_schedule (list[int] | None): codebook → weight-set map.
        depformer_low_rank_embeddings (int | None): low-rank depformer embeddings.
        depformer_pos_emb (str): depformer positional embedding.
        depformer_norm (str | None): optional per-codebook norm before ``linears``.
        existing_text_padding_id (int), existing_text_end_padding_id (int): text PAD / end-of-padding ids.
        extra_heads_num_heads (int), extra_heads_dim (int): extra linear heads on the temporal output.
        context (int | None): temporal attention window (frames).
        causal (bool): causal attention in both transformers.
        condition_provider, fuser: conditioning (not supported; must be None).
        quantize (bool): int8 weights (not supported; must be False).
        gradient_checkpointing (bool): per-layer activation checkpointing in training.
        device, dtype: of every parameter (norm parameters included).
        text_path (TextPath | None): the text stream's modules and data flow (default :class:`MoshiTextPath`).
        **kwargs: passed to the temporal transformer (``num_layers`` among them); ``depformer_X`` keys go to the
            depformer as ``X``, and every transformer key the depformer does not get that way (``num_heads``,
            ``num_layers``, ``gating``, ...) takes the temporal transformer's value. Unknown keys raise
            ``TypeError`` naming the key.
    """

    def __init__(
        self,
        delays: list[int] | None = None,
        n_q: int = 8,
        dep_q: int = 8,
        card: int = 1024,
        text_card: int = 32000,
        text_card_out: int | None = None,
        demux_second_text_stream: bool = False,
        dim: int = 128,
        num_heads: int = 8,
        hidden_scale: float = 4,
        norm: str = "layer_norm",
        norm_emb: bool = False,
        bias_proj: bool = False,
        depformer_dim: int = 256,
        depformer_dim_feedforward: int | list[int] | None = None,
        depformer_multi_linear: bool = False,
        depformer_weights_per_step: bool = False,
        depformer_weights_per_step_schedule: list[int] | None = None,
        depformer_low_rank_embeddings: int | None = None,
        depformer_pos_emb: str = "sin",
        depformer_norm: str | None = None,
        existing_text_padding_id: int = MOSHI_TEXT_PADDING_ID,
        existing_text_end_padding_id: int = MOSHI_TEXT_END_PADDING_ID,
        extra_heads_num_heads: int = 0,
        extra_heads_dim: int = 6,
        context: int | None = None,
        causal: bool = True,
        condition_provider: nn.Module | None = None,
        fuser: nn.Module | None = None,
        quantize: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
        text_path: TextPath | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        delays = [0] if delays is None else list(delays)
        if len(delays) != n_q + 1:
            raise ValueError(f"delays has {len(delays)} entries, expected n_q + 1 = {n_q + 1}")
        if any(d < 0 for d in delays):
            raise ValueError(f"delays must be non-negative, got {delays}")
        if not 0 <= dep_q <= n_q:
            raise ValueError(f"dep_q must be in [0, n_q={n_q}], got {dep_q}")
        if condition_provider is not None or fuser is not None:
            raise NotImplementedError("conditioned models (condition_provider / fuser) are not supported")
        if quantize:
            raise NotImplementedError("quantize=True (bitsandbytes int8) is not supported")
        main_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("depformer_")}
        dep_kwargs = {k[len("depformer_") :]: v for k, v in kwargs.items() if k.startswith("depformer_")}
        accepted = _transformer_kwarg_names(main_kwargs.get("layer_class", StreamingTransformerLayer))
        for key in kwargs:
            base = key[len("depformer_") :] if key.startswith("depformer_") else key
            if base not in accepted or base in ("d_model", "device", "dtype", "rope"):
                raise TypeError(f"LMModel got an unexpected keyword argument {key!r}")

        self.text_path = text_path if text_path is not None else MoshiTextPath(
            norm_emb=norm_emb, bias_proj=bias_proj, low_rank=depformer_low_rank_embeddings
        )
        text_card, existing_text_padding_id, existing_text_end_padding_id = self.text_path.resolve_text_config(
            text_card, existing_text_padding_id, existing_text_end_padding_id, text_card_out,
            demux_second_text_stream,
        )
        self.n_q = n_q
        self.dep_q = dep_q
        self.card = card
        self.text_card = text_card
        self.delays = delays
        self.dim = dim
        self.depformer_dim = depformer_dim
        self.existing_text_padding_id = existing_text_padding_id
        self.existing_text_end_padding_id = existing_text_end_padding_id
        self.context = context
        self.depformer_multi_linear = depformer_multi_linear
        self.depformer_weights_per_step_schedule = depformer_weights_per_step_schedule
        self.gradient_checkpointing = gradient_checkpointing
        self.condition_provider = None
        self.fuser = None
        factory = {"device": device, "dtype": dtype}

        self.emb = nn.ModuleList(
            [ScaledEmbedding(card + 1, dim, norm=norm_emb, **factory) for _ in range(n_q)]
        )
        self.text_path.build_input(self, factory)
        self.transformer = StreamingTransformer(
            d_model=dim,
            num_heads=num_heads,
            dim_feedforward=int(hidden_scale * dim),
            norm=norm,
            context=context,
            causal=causal,
            checkpointing=gradient_checkpointing,
            **factory,
            **main_kwargs,
        )
        self.out_norm = create_norm_fn(norm, dim, **factory)

        self.depformer: StreamingTransformer | None = None
        if dep_q > 0:
            schedule = depformer_weights_per_step_schedule
            if schedule is not None and len(schedule) != dep_q:
                raise ValueError(
                    f"depformer_weights_per_step_schedule has {len(schedule)} entries, expected dep_q={dep_q}"
                )
            num_in = 1
            if depformer_multi_linear:
                num_in = dep_q if schedule is None else max(schedule) + 1
            self.text_path.build_depformer_input(self, num_in, factory)
            low_rank = depformer_low_rank_embeddings
            self.depformer_emb = nn.ModuleList(
                [ScaledEmbedding(card + 1, depformer_dim, low_rank=low_rank, **factory) for _ in range(dep_q - 1)]
            )
            self.text_path.build_depformer_text(self, factory)
            if depformer_dim_feedforward is None:
                depformer_dim_feedforward = int(hidden_scale * depformer_dim)
            transformer_kwargs = {"num_heads": num_heads, **main_kwargs}
            transformer_kwargs.update(dep_kwargs)
            transformer_kwargs["positional_embedding"] = depformer_pos_emb
            transformer_kwargs["context"] = None
            transformer_kwargs.pop("cross_attention", None)
            if depformer_weights_per_step:
                transformer_kwargs["weights_per_step"] = dep_q
            self.depformer = StreamingTransformer(
                d_model=depformer_dim,
                dim_feedforward=depformer_dim_feedforward,
                norm=norm,
                causal=causal,
                weights_per_step_schedule=schedule,
                checkpointing=gradient_checkpointing,
                **factory,
                **transformer_kwargs,
            )
            # The depformer streams over the codebooks of one frame; LMGen drives it frame by frame.
            self.depformer.set_streaming_detached(True)
            self.depformer_norms = nn.ModuleList(
                [
                    nn.Identity() if depformer_norm is None else create_norm_fn(depformer_norm, depformer_dim, **factory)
                    for _ in range(dep_q)
                ]
            )
            self.linears = nn.ModuleList(
                [nn.Linear(depformer_dim, card, bias=bias_proj, **factory) for _ in range(dep_q)]
            )
        self.extra_heads = nn.ModuleList(
            [nn.Linear(dim, extra_heads_dim, bias=False, **factory) for _ in range(extra_heads_num_heads)]
        )
        self._init_weights()

    # -- ids and sizes ---------------------------------------------------------------------------------------

    @property
    def initial_token_id(self) -> int:
        """Audio initial token: the last row of every audio table."""
        return self.card

    @property
    def text_initial_token_id(self) -> int:
        return self.text_path.text_initial_token_id(self)

    @property
    def text_padding_token_id(self) -> int:
        return self.existing_text_padding_id

    @property
    def end_of_text_padding_id(self) -> int:
        return self.existing_text_end_padding_id

    @property
    def zero_token_id(self) -> int:
        """Token embedded as exact zeros and excluded from the loss masks."""
        return ZERO_TOKEN_ID

    @property
    def ungenerated_token_id(self) -> int:
        """Placeholder for "not sampled yet" in LMGen; never embedded."""
        return UNGENERATED_TOKEN_ID

    @property
    def audio_offset(self) -> int:
        """Row of the first audio stream in ``codes``."""
        return 1

    @property
    def num_codebooks(self) -> int:
        return self.n_q + 1

    @property
    def num_audio_codebooks(self) -> int:
        return self.n_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def device(self) -> torch.device:
        """Device of the temporal transformer (a DSAA text LLM keeps its own)."""
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the temporal transformer (a DSAA text LLM keeps its own)."""
        return next(self.transformer.parameters()).dtype

    def initial_tokens(self, device: Device = None) -> torch.Tensor:
        """``[1, K, 1]`` int64: the text initial id in row 0, the audio initial id in the other rows."""
        tokens = torch.full((1, self.num_codebooks, 1), self.initial_token_id, dtype=torch.long, device=device)
        tokens[:, 0] = self.text_initial_token_id
        return tokens

    def _get_initial_token(self) -> torch.Tensor:
        """Alias of :meth:`initial_tokens` on the model device (Kyutai's name)."""
        return self.initial_tokens(self.device)

    # -- init ------------------------------------------------------------------------------------------------

    def _init_weights(self) -> None:
        """Kyutai's training init: truncated normal ``σ = 1/sqrt(fan_in)`` (±3σ) for the embedding tables,
        the text path's tables and linears, every Linear of the temporal transformer and ``linears``; depformer
        layers and the depformer inputs keep PyTorch's defaults; norms start at 1."""
        path = self.text_path
        tables = list(self.emb) + path.init_tables(self, depformer=False)
        if self.depformer is not None:
            tables += list(self.depformer_emb) + path.init_tables(self, depformer=True)
        for table in tables:
            _init_params(table, ("weight",))
        linears: list[nn.Module] = path.init_linears(self)
        linears += [m for m in self.transformer.modules() if isinstance(m, nn.Linear)]
        if self.depformer is not None:
            linears += list(self.linears)
        for linear in linears:
            _init_params(linear, ("weight", "bias"))

    # -- teacher forcing -------------------------------------------------------------------------------------

    def embed_audio(self, sequence: torch.Tensor) -> torch.Tensor:
        """Sum of the audio embeddings of ``sequence [B, n_q, T]`` (audio rows only) → ``[B, T, dim]``."""
        return _summed_lookup(list(self.emb), sequence)

    def text_head_module(self) -> nn.Module:
        """The module that maps the text hidden state to text logits (``text_linear`` for Moshi)."""
        return self.text_path.text_head(self)

    def forward_text(
        self,
        sequence: torch.Tensor,
        sum_condition: torch.Tensor | None = None,
        cross_attention_src: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over already-delayed ``sequence [B, K, T]`` (also LMGen's step).

        Args:
            sequence (torch.Tensor): int64 ``[B, K, T]``, delayed layout.
            sum_condition (torch.Tensor | None): ``[B, T or 1, dim]`` added to the input embeddings (the "sum"
                conditioning of conditioned models), cast to their dtype.
            cross_attention_src: not supported (must be None).

        Returns:
            ``(z, text_logits [B, 1, T, V])``: ``z [B, T, Z]`` is the per-frame state the depformer reads (the
            temporal output after ``out_norm`` for Moshi).
        """
        z, text_hidden = self.frame_states(sequence, sum_condition, cross_attention_src)
        return z, self.text_head_module()(text_hidden)[:, None]

    def frame_states(
        self,
        sequence: torch.Tensor,
        sum_condition: torch.Tensor | None = None,
        cross_attention_src: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, text_hidden)`` of the text path for delayed ``sequence [B, K, T]``."""
        if cross_attention_src is not None:
            raise NotImplementedError("cross-attention conditioning is not supported")
        B, K, T = sequence.shape
        if K != self.num_codebooks:
            raise ValueError(f"sequence has {K} streams, expected {self.num_codebooks}")
        x = self.text_path.temporal_input(self, sequence)
        if sum_condition is not None:
            x = x + sum_condition.to(x.dtype)
        transformer_out = self.out_norm(self.transformer(x))
        return self.text_path.frame_state(self, sequence, transformer_out)

    def depformer_input_index(self, step: int) -> int:
        """Which per-step depformer input module step ``step`` uses."""
        if not self.depformer_multi_linear:
            return 0
        if self.depformer_weights_per_step_schedule is not None:
            return self.depformer_weights_per_step_schedule[step]
        return step

    def run_depformer(self, depformer_inputs: torch.Tensor) -> torch.Tensor:
        """Depformer over the codebook axis: ``[B, T, dep_q, depformer_dim]`` → logits ``[B, dep_q, T, card]``."""
        if self.depformer is None:
            raise RuntimeError("this model has no depformer (dep_q = 0)")
        B, T, S, D = depformer_inputs.shape
        out = self.depformer(depformer_inputs.reshape(B * T, S, D))  # [B·T, S, D]
        if not all(isinstance(n, nn.Identity) for n in self.depformer_norms):
            out = torch.stack([self.depformer_norms[c](out[:, c : c + 1])[:, 0] for c in range(S)], dim=1)
        logits = _per_codebook_linear(list(self.linears[:S]), out)  # [B·T, S, card]
        return logits.view(B, T, S, -1).transpose(1, 2)

    def forward_depformer_training(self, sequence: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depformer.

        Args:
            sequence (torch.Tensor): ``delayed[:, :, 1:]`` ``[B, K, T]`` (the targets, delayed layout).
            transformer_out (torch.Tensor): the per-frame state ``z [B, T, Z]`` of :meth:`forward_text`.

        Returns:
            Logits ``[B, dep_q, T, card]`` (delayed layout).
        """
        return self.run_depformer(self.text_path.depformer_inputs(self, transformer_out, sequence[:, : self.dep_q]))

    def _teacher_forced(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(text_hidden [B, T, D], audio logits, audio mask)`` of teacher forcing on ``codes``."""
        B, K, T = codes.shape
        if K != self.num_codebooks:
            raise ValueError(f"codes has {K} streams, expected num_codebooks = {self.num_codebooks}")
        delayed = delay_codes(codes, self.delays, self.initial_tokens(codes.device))
        z, text_hidden = self.frame_states(delayed[:, :, :-1])
        if self.depformer is not None:
            logits = self.forward_depformer_training(delayed[:, :, 1:], z)
        else:
            logits = z.new_zeros(B, 0, T, self.card)
        dq = self.dep_q
        logits, mask = undelay_logits(logits, self.delays[1 : 1 + dq], codes[:, 1 : 1 + dq] != ZERO_TOKEN_ID)
        return text_hidden, logits, mask

    def forward(self, codes: torch.Tensor, condition_tensors: Any = None) -> LMOutput:
        """Teacher forcing on ``codes [B, K, T]`` (int64, ``-1`` = zero token) → :class:`LMOutput`."""
        if condition_tensors:
            raise NotImplementedError("condition_tensors (conditioned models) are not supported")
        text_hidden, logits, mask = self._teacher_forced(codes)
        text_logits = self.text_head_module()(text_hidden)[:, None]
        text_logits, text_mask = undelay_logits(text_logits, self.delays[:1], codes[:, :1] != ZERO_TOKEN_ID)
        return LMOutput(logits, mask, text_logits, text_mask)

    def forward_train(self, codes: torch.Tensor) -> LMTrainOutput:
        """:meth:`forward` with the text head left to the loss (see :class:`LMTrainOutput`).

        Under FSDP2 register it as a forward method and keep the root unsharded after forward: the loss reads
        the text head's weights after this returns.
        """
        text_hidden, logits, mask = self._teacher_forced(codes)
        valid = codes[:, :1] != ZERO_TOKEN_ID
        hidden, text_mask = undelay_logits(text_hidden[:, None], self.delays[:1], valid)
        return LMTrainOutput(logits, mask, hidden, text_mask, self.text_head_module())

    # -- streaming -------------------------------------------------------------------------------------------

    def forward_depformer(
        self, depformer_cb_index: int, sequence: torch.Tensor, transformer_out: torch.Tensor
    ) -> torch.Tensor:
        """One streaming depformer step (inside ``with model.depformer.streaming(B)``).

        Args:
            depformer_cb_index (int): codebook step ``c``.
            sequence (torch.Tensor): ``[B, 1, 1]`` previous token (text at ``c = 0``, audio ``c - 1`` after).
            transformer_out (torch.Tensor): the per-frame state ``z [B, 1, Z]`` of :meth:`forward_text`.

        Returns:
            Logits ``[B, 1, 1, card]``.
        """
        if self.depformer is None:
            raise RuntimeError("this model has no depformer (dep_q = 0)")
        if not self.depformer.is_streaming:
            raise RuntimeError("forward_depformer must run inside `with model.depformer.streaming(batch_size)`")
        B, K, S = sequence.shape
        if (K, S) != (1, 1):
            raise ValueError(f"forward_depformer takes one token per item [B, 1, 1], got {tuple(sequence.shape)}")
        c = depformer_cb_index
        out = self.depformer(self.text_path.depformer_step_input(self, c, transformer_out, sequence[:, 0]))
        logits = self.linears[c](self.depformer_norms[c](out))
        return logits[:, None]


def _per_codebook_linear(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``modules[c](x[:, c])`` for every ``c`` of ``x [N, S, D]``, batched when the modules allow it."""
    if len(modules) == 1:
        return modules[0](x)
    if all(type(m) is nn.Linear for m in modules) and all(m.bias is not None for m in modules):
        weight = torch.stack([m.weight for m in modules])
        bias = torch.stack([m.bias for m in modules])
        return torch.baddbmm(bias.unsqueeze(1), x.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)
    return apply_per_step_linear(modules, x)


__all__ = [
    "MOSHI_TEXT_END_PADDING_ID",
    "MOSHI_TEXT_PADDING_ID",
    "UNGENERATED_TOKEN_ID",
    "ZERO_TOKEN_ID",
    "LMModel",
    "LMOutput",
    "LMTrainOutput",
    "MoshiTextPath",
    "TextPath",
    "ScaledEmbedding",
    "delay_codes",
    "undelay_logits",
]


def __getattr__(name: str) -> Any:
    """Resolves ``LMGen`` lazily: it lives in :mod:`moshi.models.lm_gen`, which imports this module."""
    if name == "LMGen":
        from .lm_gen import LMGen

        return LMGen
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
