"""The DSAA blocks: the modules that couple Moshi's audio transformer with a Hugging Face text LLM.

Their module and parameter names are the names published DSAA checkpoints store
(``text_projector.fusion.{0,1,4}``, ``text_projector.alpha``, ``depformer_projectors.{j}.{norm,fc1,fc2,skip}``,
``depformer_text_emb.emb.weight``), so the attribute names here must not change (see ``docs/dsaa.md``).

- :class:`TextPreservingProjector`: residual correction of the LLM state by an MLP over ``[h, a]``.
- :class:`ResidualDepformerProjector`: the per-step depformer input (MLP plus a linear skip).
- :class:`MaskedEmbedding`: an embedding where id ``-1`` (Moshi's zero token) gives a zero vector.
- :class:`StreamingLLM`: the decoder body of a ``transformers`` causal LM, teacher-forced or streamed with
  its KV cache held in our streaming state.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..utils.constants import ZERO_TOKEN_ID
from .streaming import State, StreamingModule


class TextPreservingProjector(nn.Module):
    """Predicts the text hidden state as ``h + alpha * fusion(cat([h, a]))``.

    The LLM state ``h`` passes through unchanged and the audio-aware MLP only adds a small, learned
    correction, so a freshly initialised model predicts text exactly like the LLM up to ``alpha * fusion``
    (``fusion.4`` starts near zero).

    Args:
        text_dim (int): ``D_l``, width of the LLM state.
        audio_dim (int): ``D_m``, width of Moshi's temporal transformer output.
        hidden_dim (int): ``H``, hidden width of the MLP.
        dropout (float): dropout after the GELU (``fusion.3``).
        alpha (float): initial value of the scalar ``alpha``.
    """

    def __init__(
        self,
        text_dim: int,
        audio_dim: int,
        hidden_dim: int,
        dropout: float = 0.1,
        alpha: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.text_dim = text_dim
        self.audio_dim = audio_dim
        self.fusion = nn.Sequential(
            nn.LayerNorm(text_dim + audio_dim, **factory),
            nn.Linear(text_dim + audio_dim, hidden_dim, **factory),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, text_dim, **factory),
        )
        self.alpha = nn.Parameter(torch.full((), alpha, **factory))
        self.reset_output_layer()

    def reset_output_layer(self) -> None:
        """Output layer: weight ~ N(0, 0.01), bias 0, so the correction starts near zero."""
        nn.init.normal_(self.fusion[4].weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fusion[4].bias)

    def forward(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``h`` ``[..., D_l]`` (LLM state), ``a`` ``[..., D_m]`` (Moshi state) -> ``[..., D_l]``."""
        return h + self.alpha * self.fusion(torch.cat([h, a], dim=-1))


class ResidualDepformerProjector(nn.Module):
    """Maps ``[z, e_k]`` (``D_l + D_m + D_d``) to one depformer input step (``D_d``).

    ``out = fc2(dropout(gelu(fc1(norm(x))))) + skip(x)``. The skip reads the **un-normalised** input, as in
    the DSAA fork, so that the published weights give the same outputs.

    Args:
        input_dim (int): ``D_l + D_m + D_d``.
        hidden_dim (int): ``H``.
        output_dim (int): ``D_d``.
        dropout (float): dropout between ``fc1`` and ``fc2``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        dropout: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(input_dim, **factory)
        self.fc1 = nn.Linear(input_dim, hidden_dim, **factory)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, output_dim, **factory)
        self.skip = nn.Linear(input_dim, output_dim, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises norm 1/0, fc1 kaiming-normal (relu, fan_in), fc2 and skip xavier-uniform, biases 0."""
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.kaiming_normal_(self.fc1.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.fc1.bias)
        nn.init.xavier_uniform_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        nn.init.xavier_uniform_(self.skip.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., input_dim]`` -> ``[..., output_dim]``."""
        return self.fc2(self.drop(self.act(self.fc1(self.norm(x))))) + self.skip(x)


class MaskedEmbedding(nn.Module):
    """An embedding table (key ``emb.weight``) where id ``-1`` gives an exact zero vector.

    Moshi marks "no token" with ``-1``; the LLM vocabulary has no such row. Other negative ids are not
    clamped: they fail in the lookup, so a bad id cannot silently read row 0.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(num_embeddings, embedding_dim, device=device, dtype=dtype)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> MaskedEmbedding:
        """A masked copy of ``embedding`` (same shape, device and dtype; the weight is copied, not shared)."""
        weight = embedding.weight
        masked = cls(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            masked.emb.weight.copy_(weight)
        return masked

    @property
    def weight(self) -> torch.Tensor:
        return self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` int ``[...]`` -> ``[..., dim]``; zero where ``ids == -1``."""
        return masked_lookup(self.emb, ids)


def masked_lookup(embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """Looks ``ids`` up in ``embedding`` with id ``-1`` mapped to an exact zero vector."""
    is_zero = ids == ZERO_TOKEN_ID
    out = embedding(torch.where(is_zero, torch.zeros_like(ids), ids))
    return out.masked_fill(is_zero[..., None], 0.0)


@dataclass
class _LLMState(State):
    """Streaming state of :class:`StreamingLLM`.

    The HF KV cache has one length for the whole batch, so each item says which cached positions it may attend
    to (``visible [B, L]``) and where its next token sits (``positions [B]``, the RoPE position ids). Resetting
    an item hides its past and restarts its positions at 0; an item outside the exec mask writes a hidden
    entry and does not advance. Entries older than the context window are dropped after every call.
    """

    make_cache: Callable[[], Any]
    cache: Any = None
    visible: torch.Tensor = None  # type: ignore[assignment]  # bool [B, L]
    positions: torch.Tensor = None  # type: ignore[assignment]  # int64 [B]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cache = self.make_cache()
        self.visible = torch.zeros(self.batch_size, 0, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        if bool(reset_mask.all()):  # a fresh cache frees the memory
            self.cache = self.make_cache()
            self.visible = self.visible[:, :0]
        else:
            self.visible &= ~reset_mask.view(-1, 1)
        self.positions.masked_fill_(reset_mask, 0)


def _keep_last(cache: Any, keep: int) -> None:
    """Drops all but the last ``keep`` positions of every layer of an HF ``DynamicCache``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[..., -keep:, :]
                layer.values = layer.values[..., -keep:, :]
        return
    for i in range(len(cache.key_cache)):  # transformers before 4.56 keeps per-layer lists
        cache.key_cache[i] = cache.key_cache[i][..., -keep:, :]
        cache.value_cache[i] = cache.value_cache[i][..., -keep:, :]


class StreamingLLM(StreamingModule[_LLMState]):
    """The decoder body of a ``transformers`` causal LM, as a streaming module.

    The HF model's top-level children are registered directly on this module, so its state-dict names are
    exactly the names ``save_pretrained`` writes (``model.layers.0...``, ``lm_head.weight``): a DSAA model
    holding it as ``text_llm`` stores ``text_llm.model.layers.0...``, the names DSAA checkpoints use.

    Outside a streaming block, :meth:`forward` is a teacher-forced pass with no cache. Inside
    ``with llm.streaming(B):`` each call appends its positions to an HF ``DynamicCache`` kept in the state,
    which enters, leaves and resets together with every other streaming layer of the parent model, item by
    item. Each position attends to itself and the ``context - 1`` positions before it (older cache entries are
    dropped), so a conversation of any length runs in bounded memory; while it is shorter than ``context`` the
    steps equal the teacher-forced pass.

    Args:
        model (nn.Module): a ``transformers`` ``*ForCausalLM`` (``PreTrainedModel``) instance.
        context (int | None): positions the streamed LLM attends to (default and upper bound: the LLM's
            ``max_position_embeddings``, the distances its positional encoding was trained on).

    Note:
        Both paths return the final-norm ``last_hidden_state`` and never compute LM-head logits or attention
        maps; :meth:`lm_logits` applies the LLM's own head when a caller needs it. The whole-model gradient
        is off unless some LLM parameter requires grad (DSAA freezes the LLM).
    """

    def __init__(self, model: nn.Module, context: int | None = None) -> None:
        super().__init__()
        if (
            next(model.named_parameters(recurse=False), None) is not None
            or next(model.named_buffers(recurse=False), None) is not None
        ):
            raise ValueError(
                f"{type(model).__name__} has parameters or buffers at its top level; StreamingLLM only supports "
                "models whose weights all live in submodules (as every transformers *ForCausalLM does)"
            )
        # The HF model itself is not registered (its children are), so names stay the save_pretrained ones.
        object.__setattr__(self, "hf_model", model)
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "body", model.base_model)
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.context = context

    # -- sizes ------------------------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.hf_model.config

    @property
    def hidden_size(self) -> int:
        """``D_l``."""
        return int(self.hf_model.get_input_embeddings().weight.shape[1])

    @property
    def input_vocab(self) -> int:
        """``V_in``: rows of the input embedding."""
        return int(self.hf_model.get_input_embeddings().weight.shape[0])

    @property
    def output_vocab(self) -> int:
        """``V``: rows of the output embedding (LM head)."""
        return int(self.output_embedding().weight.shape[0])

    @property
    def max_positions(self) -> int | None:
        """``max_position_embeddings`` of the LLM config, or None when the config has none."""
        value = getattr(self.config, "max_position_embeddings", None)
        return int(value) if value is not None else None

    def input_embedding(self) -> nn.Embedding:
        return self.hf_model.get_input_embeddings()

    def output_embedding(self) -> nn.Module:
        head = self.hf_model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(self.hf_model).__name__} has no output embedding (LM head)")
        return head

    # -- forward ----------------------------------------------------------------------------------------------
    @property
    def window(self) -> int | None:
        """Positions the streamed LLM keeps: ``context`` capped by ``max_position_embeddings``."""
        limits = [v for v in (self.context, self.max_positions) if v is not None]
        return min(limits) if limits else None

    def _init_streaming_state(self, batch_size: int) -> _LLMState:
        device = self.input_embedding().weight.device
        return _LLMState(batch_size, device, make_cache=self._new_cache)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.config)
        except TypeError:  # older transformers take no config
            return DynamicCache()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings of ``ids`` ``[B, T]``, with id ``-1`` giving a zero vector."""
        return masked_lookup(self.input_embedding(), ids)

    def _check_positions(self, end: int) -> None:
        limit = self.max_positions
        if limit is not None and end > limit:
            raise ValueError(
                f"the text LLM would run {end} positions, past its max_position_embeddings={limit} "
                f"({type(self.hf_model).__name__}); use shorter sequences"
            )

    def forward(
        self, ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Runs the decoder body on ``ids`` ``[B, T]`` (``-1`` = zero vector) or ``inputs_embeds`` ``[B, T, D_l]``.

        Returns:
            torch.Tensor: ``last_hidden_state`` ``[B, T, D_l]`` (after the final norm, before the LM head).
        """
        if (ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of ids and inputs_embeds")
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(needs_grad):
            if inputs_embeds is None:
                inputs_embeds = self.embed(ids)
            length = inputs_embeds.shape[1]
            state = self._streaming_state
            if state is None:
                self._check_positions(length)
                out = self.body(inputs_embeds=inputs_embeds, use_cache=False)
                return out.last_hidden_state
            if inputs_embeds.shape[0] != state.batch_size:
                raise ValueError(
                    f"streaming batch size is {state.batch_size}, got input batch {inputs_embeds.shape[0]}"
                )
            window = self.window
            if window is not None and length > window:
                raise ValueError(f"{length} positions in one call exceed the text LLM's context of {window}")
            steps = torch.arange(length, device=state.positions.device)
            new = state.exec_mask.view(-1, 1).expand(-1, length)
            mask = torch.cat([state.visible, torch.ones_like(new)], dim=1)
            kwargs = {self._cache_kwarg: state.cache}
            out = self.body(
                inputs_embeds=inputs_embeds,
                attention_mask=mask.long(),
                position_ids=state.positions.view(-1, 1) + steps,
                use_cache=True,
                **kwargs,
            )
            state.visible = torch.cat([state.visible, new], dim=1)
            state.positions += length * state.exec_mask.long()
            if window is not None and state.visible.shape[1] >= window:
                # each position attends to itself and the window - 1 before it, as Moshi's `context` does
                _keep_last(state.cache, window - 1)
                state.visible = state.visible[:, state.visible.shape[1] - window + 1 :]
            return out.last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LLM's own next-token logits for ``hidden`` ``[..., D_l]`` (its LM head)."""
        return self.output_embedding()(hidden)


__all__ = ["MaskedEmbedding", "ResidualDepformerProjector", "StreamingLLM", "TextPreservingProjector", "masked_lookup"]
