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
from torch.nn.modules import module as _nn_module

from ..modules.lora import LoRALinear
from ..modules.streaming import StreamingContainer
from ..modules.transformer import (
    StreamingTransformer,
    StreamingTransformerLayer,
    apply_per_step_linear,
    create_norm_fn,
)
from ..utils import recycled_buffers

Device = torch.device | str | None

ZERO_TOKEN_ID = -1
UNGENERATED_TOKEN_ID = -2


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
    a fused chunked cross-entropy over ``text_hidden`` never materialises them and forms the softmax gradient in
    place. :meth:`full_text_logits` gives :attr:`LMOutput.text_logits` exactly (NaN positions included:
    un-delaying fills ``text_hidden`` with NaN where ``text_logits`` would be NaN).

    Attributes:
        logits (torch.Tensor): ``[B, dep_q, T, card]`` audio logits, as in :class:`LMOutput`.
        mask (torch.Tensor): bool ``[B, dep_q, T]``.
        text_hidden (torch.Tensor): ``[B, 1, T, D]``, the text head's input.
        text_mask (torch.Tensor): bool ``[B, 1, T]``.
        text_head_weight (torch.Tensor): ``[V, D]``, the head's weight (the parameter itself, so gradients flow).
        text_head_bias (torch.Tensor | None): ``[V]``.
        text_extra (tuple): ``(input [B, 1, T, r], weight [V, r])`` terms added to the logits: a LoRA head's
            scaled low-rank path ``(scaling · lora_A(h), lora_B.weight)``.
    """

    logits: torch.Tensor
    mask: torch.Tensor
    text_hidden: torch.Tensor
    text_mask: torch.Tensor
    text_head_weight: torch.Tensor
    text_head_bias: torch.Tensor | None = None
    text_extra: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def full_text_logits(self) -> torch.Tensor:
        """``[B, 1, T, V]``: the logits the text head would give (as :attr:`LMOutput.text_logits`)."""
        z = F.linear(self.text_hidden, self.text_head_weight, self.text_head_bias)
        for h, w in self.text_extra:
            z = z + F.linear(h, w)
        return z


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
        demux_second_stream (bool): tokens encode a pair ``left + N·(right + 1)`` (``right = -1``: none), embedded
            as ``out1(table[left]) + out2(table[right])``.

    Note:
        Despite the name there is no scaling in the forward pass ("scaled" referred to a learning-rate option in
        Kyutai's code); other negative ids silently read row 0, as upstream.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *args: Any,
        norm: bool = False,
        zero_idx: int = -1,
        low_rank: int | None = None,
        demux_second_stream: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_embeddings, low_rank or embedding_dim, *args, **kwargs)
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

    def _lookup(self, index: torch.Tensor) -> torch.Tensor:
        if self.padding_idx is None and self.max_norm is None and not self.sparse and not self.scale_grad_by_freq:
            return recycled_buffers.embedding(index, self.weight)
        return super().forward(index)

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
        y = self._lookup(input.clamp(min=0))
        if self.norm is not None:
            y = self.norm(y)
        y = torch.where(is_zero.unsqueeze(-1), torch.zeros_like(y), y)
        if self.low_rank is not None:
            y = self.low_rank(y)
        return y


def _has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or global ones) that a direct functional call would skip."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks
        or getattr(_nn_module, "_global_forward_hooks", None) or getattr(_nn_module, "_global_forward_pre_hooks", None)
    )


def _summed_lookup(tables: Sequence[ScaledEmbedding], tokens: torch.Tensor) -> torch.Tensor:
    """``Σ_a tables[a](tokens[:, a])`` for ``tokens [B, A, T]`` → ``[B, T, D]``.

    Plain tables are concatenated and summed by one ``embedding_bag`` (zero tokens get weight 0), which avoids
    ``A`` lookups plus ``A - 1`` additions and never materialises the ``[B, A, T, D]`` intermediate.
    """
    B, A, T = tokens.shape
    if all(t.is_plain for t in tables):
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
    """Moshi LM with Kyutai's constructor keywords and tensor names.

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
        **kwargs: passed to the temporal transformer; ``depformer_X`` keys go to the depformer as ``X``. Unknown
            keys raise ``TypeError`` naming the key.
    """

    def __init__(
        self,
        delays: list[int] | None = None,
        n_q: int = 8,
        dep_q: int = 8,
        card: int = 1024,
        text_card: int = 32000,
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
        existing_text_padding_id: int = 3,
        existing_text_end_padding_id: int = 0,
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
        text_card_out: int | None = None,
        demux_second_text_stream: bool = False,
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

        self.n_q = n_q
        self.dep_q = dep_q
        self.card = card
        self.text_card = text_card
        self.delays = delays
        self.dim = dim
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
        self.text_emb = ScaledEmbedding(
            text_card + 1, dim, norm=norm_emb, demux_second_stream=demux_second_text_stream, **factory
        )
        self.text_linear = nn.Linear(dim, text_card_out or text_card, bias=bias_proj, **factory)
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
            for required in ("num_heads", "num_layers"):
                if required not in dep_kwargs:
                    raise ValueError(f"depformer_{required} is required when dep_q > 0")
            num_in = 1
            if depformer_multi_linear:
                num_in = dep_q if schedule is None else max(schedule) + 1
            self.depformer_in = nn.ModuleList(
                [nn.Linear(dim, depformer_dim, bias=False, **factory) for _ in range(num_in)]
            )
            low_rank = depformer_low_rank_embeddings
            self.depformer_emb = nn.ModuleList(
                [ScaledEmbedding(card + 1, depformer_dim, low_rank=low_rank, **factory) for _ in range(dep_q - 1)]
            )
            self.depformer_text_emb = ScaledEmbedding(
                text_card + 1,
                depformer_dim,
                low_rank=low_rank,
                demux_second_stream=demux_second_text_stream,
                **factory,
            )
            if depformer_dim_feedforward is None:
                depformer_dim_feedforward = int(hidden_scale * depformer_dim)
            transformer_kwargs = dict(main_kwargs)
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
        return self.text_card

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
        return self.text_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_emb.weight.dtype

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
        ``text_linear``, every Linear of the temporal transformer and ``linears``; depformer layers and
        ``depformer_in`` keep PyTorch's defaults; norms start at 1."""
        tables = list(self.emb) + [self.text_emb]
        if self.depformer is not None:
            tables += list(self.depformer_emb) + [self.depformer_text_emb]
        for table in tables:
            _init_params(table, ("weight",))
        linears: list[nn.Module] = [self.text_linear]
        linears += [m for m in self.transformer.modules() if isinstance(m, nn.Linear)]
        if self.depformer is not None:
            linears += list(self.linears)
        for linear in linears:
            _init_params(linear, ("weight", "bias"))

    # -- teacher forcing -------------------------------------------------------------------------------------

    def embed_audio(self, sequence: torch.Tensor) -> torch.Tensor:
        """Sum of the audio embeddings of ``sequence [B, n_q, T]`` (audio rows only) → ``[B, T, dim]``."""
        return _summed_lookup(list(self.emb), sequence)

    def embed_codes(self, sequence: torch.Tensor) -> torch.Tensor:
        """Temporal transformer input for ``sequence [B, K, T]``: audio embeddings summed, then text added."""
        x = self.embed_audio(sequence[:, self.audio_offset : self.audio_offset + self.n_q])
        return x + self.text_emb(sequence[:, 0])

    def forward_text(
        self,
        sequence: torch.Tensor,
        sum_condition: torch.Tensor | None = None,
        cross_attention_src: torch.Tensor | None = None,
        with_text_head: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Temporal pass over already-delayed ``sequence [B, K, T]``.

        Args:
            sequence (torch.Tensor): int64 ``[B, K, T]``, delayed layout.
            sum_condition (torch.Tensor | None): ``[B, T or 1, dim]`` added to the input embeddings (the "sum"
                conditioning of conditioned models), cast to their dtype.
            cross_attention_src: not supported (must be None).
            with_text_head (bool): compute the text logits (else ``None`` is returned in their place).

        Returns:
            ``(transformer_out [B, T, dim], text_logits [B, 1, T, text_card_out])``; ``transformer_out`` is after
            ``out_norm`` and feeds both heads.
        """
        if cross_attention_src is not None:
            raise NotImplementedError("cross-attention conditioning is not supported")
        B, K, T = sequence.shape
        if K != self.num_codebooks:
            raise ValueError(f"sequence has {K} streams, expected {self.num_codebooks}")
        x = self.embed_codes(sequence)
        if sum_condition is not None:
            x = x + sum_condition.to(x.dtype)
        transformer_out = self.out_norm(self.transformer(x))
        if not with_text_head:
            return transformer_out, None
        return transformer_out, self._text_logits(transformer_out)

    def _text_logits(self, transformer_out: torch.Tensor) -> torch.Tensor:
        """``text_linear`` of ``[B, T, dim]`` → ``[B, 1, T, text_card_out]``.

        On CPU a bare head (no bias, LoRA or forward hooks to honour) writes the logits, 64 MB a step for
        moshiko's training batches, and its weight gradient into recycled memory.
        """
        head = self.text_linear
        if transformer_out.device.type == "cpu" and type(head) is nn.Linear and head.bias is None \
                and not _has_forward_hooks(head):
            return recycled_buffers.linear(transformer_out, head.weight)[:, None]
        return head(transformer_out)[:, None]

    def _depformer_in_index(self, step: int) -> int:
        if not self.depformer_multi_linear:
            return 0
        if self.depformer_weights_per_step_schedule is not None:
            return self.depformer_weights_per_step_schedule[step]
        return step

    def depformer_projections(self, transformer_out: torch.Tensor) -> torch.Tensor:
        """``depformer_in`` of every codebook step: ``[B, T, dim]`` → ``[B, T, dep_q, depformer_dim]``.

        With per-step linears this is one matmul on the concatenated weights.
        """
        B, T, _ = transformer_out.shape
        modules = [self.depformer_in[self._depformer_in_index(c)] for c in range(self.dep_q)]
        if len(self.depformer_in) == 1:
            proj = self.depformer_in[0](transformer_out)
            return proj.unsqueeze(2).expand(B, T, self.dep_q, proj.shape[-1])
        if all(type(m) is nn.Linear and m.bias is None for m in modules):
            weight = torch.cat([m.weight for m in modules])
            return F.linear(transformer_out, weight).view(B, T, self.dep_q, -1)
        return torch.stack([m(transformer_out) for m in modules], dim=2)

    def depformer_token_embeddings(self, sequence: torch.Tensor) -> torch.Tensor:
        """Token inputs of the depformer steps for ``sequence [B, K, T]`` (delayed targets) →
        ``[B, T, dep_q, depformer_dim]``: step 0 embeds the text token, step ``c`` the audio token ``c - 1``."""
        text = self.depformer_text_emb(sequence[:, 0]).unsqueeze(2)
        if self.dep_q == 1:
            return text
        audio = _stacked_lookup(list(self.depformer_emb), sequence[:, 1 : self.dep_q])
        return torch.cat([text, audio], dim=2)

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
            transformer_out (torch.Tensor): ``[B, T, dim]``.

        Returns:
            Logits ``[B, dep_q, T, card]`` (delayed layout).
        """
        inputs = self.depformer_projections(transformer_out) + self.depformer_token_embeddings(sequence)
        return self.run_depformer(inputs)

    def _hidden_and_audio_logits(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(transformer_out [B, T, dim], audio logits, audio mask)`` of teacher forcing on ``codes``."""
        B, K, T = codes.shape
        if K != self.num_codebooks:
            raise ValueError(f"codes has {K} streams, expected num_codebooks = {self.num_codebooks}")
        delayed = delay_codes(codes, self.delays, self.initial_tokens(codes.device))
        transformer_out, _ = self.forward_text(delayed[:, :, :-1], with_text_head=False)
        if self.depformer is not None:
            logits = self.forward_depformer_training(delayed[:, :, 1:], transformer_out)
        else:
            logits = transformer_out.new_zeros(B, 0, T, self.card)
        dq = self.dep_q
        logits, mask = undelay_logits(logits, self.delays[1 : 1 + dq], codes[:, 1 : 1 + dq] != ZERO_TOKEN_ID)
        return transformer_out, logits, mask

    def forward(self, codes: torch.Tensor, condition_tensors: Any = None) -> LMOutput:
        """Teacher forcing on ``codes [B, K, T]`` (int64, ``-1`` = zero token) → :class:`LMOutput`."""
        if condition_tensors:
            raise NotImplementedError("condition_tensors (conditioned models) are not supported")
        transformer_out, logits, mask = self._hidden_and_audio_logits(codes)
        text_logits = self._text_logits(transformer_out)
        text_logits, text_mask = undelay_logits(text_logits, self.delays[:1], codes[:, :1] != ZERO_TOKEN_ID)
        return LMOutput(logits, mask, text_logits, text_mask)

    def forward_train(self, codes: torch.Tensor) -> LMTrainOutput:
        """:meth:`forward` with the text head left to the loss (see :class:`LMTrainOutput`).

        Under FSDP2 register it as a forward method and keep the root unsharded after forward: the loss reads
        ``text_linear``'s weight after this returns.
        """
        transformer_out, logits, mask = self._hidden_and_audio_logits(codes)
        valid = codes[:, :1] != ZERO_TOKEN_ID
        head = self.text_linear
        extra: list[tuple[torch.Tensor, torch.Tensor]] = []
        if isinstance(head, LoRALinear):
            low = head.lora_A(transformer_out) * head.scaling
            low, _ = undelay_logits(low[:, None], self.delays[:1], valid)
            extra.append((low, head.lora_B.weight))
            head = head.frozen_W
        if not isinstance(head, nn.Linear):
            raise TypeError(f"forward_train needs a Linear (or LoRA) text head, got {type(head).__name__}")
        hidden, text_mask = undelay_logits(transformer_out[:, None], self.delays[:1], valid)
        return LMTrainOutput(logits, mask, hidden, text_mask, head.weight, head.bias, tuple(extra))

    # -- streaming -------------------------------------------------------------------------------------------

    def forward_depformer(
        self, depformer_cb_index: int, sequence: torch.Tensor, transformer_out: torch.Tensor
    ) -> torch.Tensor:
        """One streaming depformer step (inside ``with model.depformer.streaming(B)``).

        Args:
            depformer_cb_index (int): codebook step ``c``.
            sequence (torch.Tensor): ``[B, 1, 1]`` previous token (text at ``c = 0``, audio ``c - 1`` after).
            transformer_out (torch.Tensor): ``[B, 1, dim]``.

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
        x = self.depformer_in[self._depformer_in_index(c)](transformer_out)
        table = self.depformer_text_emb if c == 0 else self.depformer_emb[c - 1]
        x = x + table(sequence[:, 0])
        out = self.depformer(x)
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
    "LMModel",
    "LMOutput",
    "LMTrainOutput",
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
