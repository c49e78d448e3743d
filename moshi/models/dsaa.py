"""DSAA: Moshi with a frozen, pretrained Hugging Face text LLM (``shared/design/dsaa.md`` is the contract).

Moshi's temporal transformer becomes text-blind (it reads only audio). The text stream, in the LLM's vocabulary,
runs through the frozen LLM at one position per frame. The two per-frame states are concatenated into
``z = [h, a]``; a residual "text-preserving" MLP plus a copy of the LLM's LM head predict the text token, and
each depformer step reads a residual MLP over ``[z, token embedding]`` instead of Moshi's ``depformer_in``.

:class:`DSAAModel` subclasses :class:`~moshi.models.lm.LMModel`: the audio branch, the delays, the depformer and
the un-delaying are Moshi's code and keep Kyutai's tensor names. :class:`DSAALMGen` is Moshi's ``LMGen``: the
LLM's KV cache lives in the model's streaming state, so it enters, leaves and resets with Moshi's caches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modules import MaskedEmbedding, ResidualDepformerProjector, StreamingLLM, TextPreservingProjector

from .lm import ZERO_TOKEN_ID, LMModel, LMOutput, LMTrainOutput, delay_codes, undelay_logits
from .lm_gen import LMGen

Device = torch.device | str | None

# Moshi modules whose tensors DSAA drops (its own text path replaces them).
REMOVED_MOSHI_MODULES = ("text_emb", "text_linear", "depformer_in", "depformer_text_emb")
# DSAA modules that setup_new_model initialises (the LLM is loaded, the rest is Moshi's).
DSAA_MODULES = (
    "text_projector",
    "text_head",
    "depformer_projectors",
    "depformer_text_emb",
    "depformer_text_proj",
)


@dataclass(frozen=True)
class DSAADims:
    """Every width of a DSAA model, derived from the Moshi kwargs and the LLM (contract: "Symbols")."""

    dim: int  # D_m
    depformer_dim: int  # D_d
    text_dim: int  # D_l
    text_in_vocab: int  # V_in
    text_vocab: int  # V
    proj_hidden: int  # H
    num_projectors: int  # P
    n_q: int
    dep_q: int
    card: int


# DSAA's training output is Moshi's: the text head (the LLM's LM head) is applied by the chunked loss.
DSAATrainOutput = LMTrainOutput


def _module_vocab_and_width(llm: nn.Module) -> tuple[int, int, int]:
    """``(D_l, V_in, V)`` of an HF causal LM, read from its embedding shapes (works on ``meta`` too)."""
    inp = llm.get_input_embeddings()
    out = llm.get_output_embeddings()
    if inp is None or out is None:
        raise ValueError(f"{type(llm).__name__} needs an input embedding and an LM head to be used by DSAA")
    return int(inp.weight.shape[1]), int(inp.weight.shape[0]), int(out.weight.shape[0])


class DSAAModel(LMModel):
    """Moshi's audio branch plus a frozen HF text LLM, with Kyutai's and the DSAA fork's tensor names.

    Args:
        text_llm (nn.Module): a ``transformers`` causal LM (``*ForCausalLM``); stored as ``text_llm`` with its
            ``save_pretrained`` names and frozen. Its parameters may be on ``meta`` (weights loaded later).
        bos_id (int), pad_id (int), epad_id (int): resolved special ids in the LLM vocabulary
            (:func:`moshi.models.dsaa_tokens.resolve_special_tokens`). ``bos_id`` is the initial text token.
        proj_hidden (int | None): ``H``, hidden width of every projector (default ``D_m``).
        proj_dropout (float): dropout inside the projectors.
        device, dtype: of the Moshi and DSAA modules (the LLM keeps its own).
        **lm_kwargs: Moshi ``LMModel`` kwargs (``dim``, ``depformer_dim``, ``delays``, ...). ``text_card``,
            ``existing_text_padding_id`` and ``existing_text_end_padding_id`` are replaced by the LLM values.

    Note:
        Moshi's ``text_emb``, ``text_linear``, ``depformer_in`` and ``depformer_text_emb`` are built tiny by the
        parent constructor and then removed, so they never exist at full size. The number of depformer
        projectors ``P`` equals the number of ``depformer_in`` linears Moshi would build, and step ``k`` uses
        projector ``j_k`` exactly as it would use ``depformer_in[j_k]``.
    """

    def __init__(
        self,
        text_llm: nn.Module,
        *,
        bos_id: int,
        pad_id: int,
        epad_id: int,
        proj_hidden: int | None = None,
        proj_dropout: float = 0.1,
        device: Device = None,
        dtype: torch.dtype | None = None,
        **lm_kwargs: Any,
    ) -> None:
        text_dim, text_in_vocab, text_vocab = _module_vocab_and_width(text_llm)
        if lm_kwargs.get("demux_second_text_stream") or lm_kwargs.get("demux_second_stream"):
            raise ValueError(
                "demux_second_text_stream is not supported by DSAA (the text stream is the LLM's)"
            )
        if lm_kwargs.get("text_card_out") is not None:
            raise ValueError(
                "text_card_out is not supported by DSAA (the text head has the LLM's vocabulary)"
            )
        moshi_kwargs = {
            k: v
            for k, v in lm_kwargs.items()
            if k
            not in ("text_card", "existing_text_padding_id", "existing_text_end_padding_id", "text_card_out")
        }
        super().__init__(
            text_card=1,  # Moshi's text modules are built tiny and removed below.
            existing_text_padding_id=pad_id,
            existing_text_end_padding_id=epad_id,
            device=device,
            dtype=dtype,
            **moshi_kwargs,
        )
        if self.dep_q == 0 or self.depformer is None:
            raise ValueError("DSAA needs a Moshi config with a depformer (dep_q > 0)")
        for name, value in (("bos_id", bos_id), ("pad_id", pad_id), ("epad_id", epad_id)):
            if not 0 <= value < min(text_in_vocab, text_vocab):
                raise ValueError(
                    f"{name}={value} is outside the LLM vocabulary (input {text_in_vocab}, output {text_vocab} rows)"
                )
        num_projectors = len(self.depformer_in)
        for name in REMOVED_MOSHI_MODULES:
            delattr(self, name)
        self.text_card = text_vocab
        self.bos_id = int(bos_id)
        self.pad_id = int(pad_id)
        self.epad_id = int(epad_id)
        self.proj_dropout = float(proj_dropout)
        hidden = self.dim if proj_hidden is None else int(proj_hidden)
        if hidden <= 0:
            raise ValueError(f"proj_hidden must be > 0, got {proj_hidden}")
        self.dims = DSAADims(
            dim=self.dim,
            depformer_dim=int(moshi_kwargs.get("depformer_dim", 256)),
            text_dim=text_dim,
            text_in_vocab=text_in_vocab,
            text_vocab=text_vocab,
            proj_hidden=hidden,
            num_projectors=num_projectors,
            n_q=self.n_q,
            dep_q=self.dep_q,
            card=self.card,
        )
        # The Moshi kwargs this model was built from, with the DSAA text values (config.json of checkpoints).
        self.moshi_config: dict[str, Any] = dict(moshi_kwargs)
        self.moshi_config.update(
            text_card=text_vocab,
            existing_text_padding_id=self.pad_id,
            existing_text_end_padding_id=self.epad_id,
        )

        d = self.dims
        factory = {"device": device, "dtype": dtype}
        self.text_llm = StreamingLLM(text_llm)
        self.text_llm.requires_grad_(False)
        self.text_projector = TextPreservingProjector(
            d.text_dim, d.dim, d.proj_hidden, proj_dropout, **factory
        )
        self.text_head = nn.Linear(d.text_dim, d.text_vocab, bias=False, **factory)
        in_dim = d.text_dim + d.dim + d.depformer_dim
        self.depformer_projectors = nn.ModuleList(
            [
                ResidualDepformerProjector(in_dim, d.proj_hidden, d.depformer_dim, proj_dropout, **factory)
                for _ in range(d.num_projectors)
            ]
        )
        self.depformer_text_emb = MaskedEmbedding(d.text_in_vocab, d.text_dim, **factory)
        self.depformer_text_proj = nn.Linear(d.text_dim, d.depformer_dim, **factory)

    # -- ids and sizes ---------------------------------------------------------------------------------------

    @property
    def text_initial_token_id(self) -> int:
        """The LLM reads ``[BOS, w_0, w_1, ...]``: the initial text token is ``bos_id``."""
        return self.bos_id

    @property
    def device(self) -> torch.device:
        return self.emb[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.emb[0].weight.dtype

    def _init_weights(self) -> None:
        # Moshi's init runs on the Moshi part only; the DSAA modules are initialised by their constructors and
        # by ``setup_new_model`` (copies from the LLM, PCA).
        if hasattr(self, "text_emb"):
            super()._init_weights()

    # -- parameter groups ------------------------------------------------------------------------------------

    def param_groups_prefixes(
        self, only_text: bool = False, frozen_modules: Sequence[str] = ()
    ) -> dict[str, tuple[str, ...]]:
        """Module prefixes of the contract's parameter groups ``proj``, ``finetune`` and ``frozen``.

        Args:
            only_text (bool): ``only_text``: only ``text_projector`` (proj) and ``text_head`` (finetune) train.
            frozen_modules (Sequence[str]): ``text_llm.frozen_modules``, extra prefixes to freeze; they take
                precedence over the other groups (a prefix may name a sub-module, e.g. ``depformer.layers.0``).

        Note:
            Beyond the contract's lists (our choice): ``depformer_norms`` (norms between the depformer and
            ``linears``, only present with ``depformer_norm``) join ``finetune``, and Moshi's ``extra_heads``
            stay frozen.

        Raises:
            ValueError: a ``frozen_modules`` entry names no module of this model.
        """
        names = {name for name, _ in self.named_modules()}
        for prefix in frozen_modules:
            if prefix not in names or prefix == "":
                raise ValueError(f"text_llm.frozen_modules: {prefix!r} is not a module of the DSAA model")
        if only_text:
            proj: tuple[str, ...] = ("text_projector",)
            finetune: tuple[str, ...] = ("text_head",)
        else:
            proj = ("text_projector", "depformer_projectors")
            finetune = (
                "text_head",
                "depformer_text_emb",
                "depformer_text_proj",
                "depformer",
                "depformer_emb",
                "linears",
                "depformer_norms",
            )
        top_level = [name for name, _ in self.named_children()]
        frozen = [name for name in top_level if name not in proj + finetune]
        frozen += [p for p in frozen_modules if p not in frozen]
        return {"proj": proj, "finetune": finetune, "frozen": tuple(frozen)}

    def param_groups(
        self, only_text: bool = False, frozen_modules: Sequence[str] = ()
    ) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter in exactly one group (by :meth:`param_groups_prefixes`; ``frozen`` wins)."""
        prefixes = self.param_groups_prefixes(only_text, frozen_modules)

        def matches(name: str, group: str) -> bool:
            return any(name == p or name.startswith(p + ".") for p in prefixes[group])

        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"proj": [], "finetune": [], "frozen": []}
        for name, param in self.named_parameters():
            if matches(name, "frozen"):
                groups["frozen"].append((name, param))
                continue
            hits = [g for g in ("proj", "finetune") if matches(name, g)]
            if len(hits) != 1:
                raise RuntimeError(f"parameter {name} is in {len(hits)} parameter groups {hits}")
            groups[hits[0]].append((name, param))
        return groups

    def set_trainable(
        self, only_text: bool = False, frozen_modules: Sequence[str] = ()
    ) -> dict[str, list[str]]:
        """Sets ``requires_grad`` from the groups (frozen: False, proj and finetune: True); returns the names."""
        groups = self.param_groups(only_text, frozen_modules)
        for group, params in groups.items():
            for _, param in params:
                param.requires_grad_(group != "frozen")
        return {group: [name for name, _ in params] for group, params in groups.items()}

    # -- teacher forcing -------------------------------------------------------------------------------------

    def embed_codes(self, sequence: torch.Tensor) -> torch.Tensor:
        """The temporal transformer's input is audio only (text-blind): ``[B, K, T]`` -> ``[B, T, D_m]``."""
        return self.embed_audio(sequence[:, self.audio_offset : self.audio_offset + self.n_q])

    def forward_states(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two per-frame states for already-delayed ``sequence [B, K, T]``.

        Returns:
            ``(h [B, T, D_l], a [B, T, D_m])``: the LLM's final-norm state for the text row, and Moshi's
            ``out_norm(transformer(audio embeddings))``. Inside a streaming block both use their caches.
        """
        B, K, T = sequence.shape
        if K != self.num_codebooks:
            raise ValueError(f"sequence has {K} streams, expected {self.num_codebooks}")
        a = self.out_norm(self.transformer(self.embed_codes(sequence)))
        h = self.text_llm(ids=sequence[:, 0]).to(a.dtype)
        return h, a

    def text_hidden(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The text head input ``h + alpha * fusion(cat([h, a]))`` ``[B, T, D_l]``."""
        return self.text_projector(h, a)

    def forward_text(
        self, sequence: torch.Tensor, condition_tensors: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame pass over delayed ``sequence [B, K, T]`` (also LMGen's step).

        Returns:
            ``(z [B, T, D_l + D_m], text_logits [B, 1, T, V])``. ``z`` plays the role of Moshi's
            ``transformer_out``: it is what the depformer steps read.
        """
        if condition_tensors:
            raise NotImplementedError("condition_tensors are not supported")
        h, a = self.forward_states(sequence)
        text_logits = self.text_head(self.text_hidden(h, a))[:, None]
        return torch.cat([h, a], dim=-1), text_logits

    def depformer_token_input(self, step: int, tokens: torch.Tensor) -> torch.Tensor:
        """``e_k`` for depformer step ``k``: ``tokens [B, T]`` -> ``[B, T, D_d]``.

        Step 0 reads this frame's text token through ``depformer_text_proj(depformer_text_emb(.))``; step
        ``k >= 1`` reads audio codebook ``k - 1`` through ``depformer_emb[k - 1]``.
        """
        if step == 0:
            return self.depformer_text_proj(self.depformer_text_emb(tokens))
        return self.depformer_emb[step - 1](tokens)

    def depformer_input(self, step: int, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``u_k = depformer_projectors[j_k](cat([z, e_k]))`` ``[B, T, D_d]``."""
        e = self.depformer_token_input(step, tokens).to(z.dtype)
        return self.depformer_projectors[self._depformer_in_index(step)](torch.cat([z, e], dim=-1))

    def forward_depformer_training(
        self, sequence: torch.Tensor, transformer_out: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced depformer over the delayed targets ``sequence [B, K, T]`` and ``z`` ``[B, T, D_l+D_m]``.

        Returns:
            Logits ``[B, dep_q, T, card]`` (delayed layout).
        """
        inputs = torch.stack(
            [self.depformer_input(k, transformer_out, sequence[:, k]) for k in range(self.dep_q)], dim=2
        )
        return self.run_depformer(inputs)

    def _teacher_forced(self, codes: torch.Tensor, with_text_head: bool) -> tuple[torch.Tensor, ...]:
        B, K, T = codes.shape
        if K != self.num_codebooks:
            raise ValueError(f"codes has {K} streams, expected num_codebooks = {self.num_codebooks}")
        delayed = delay_codes(codes, self.delays, self.initial_tokens(codes.device))
        h, a = self.forward_states(delayed[:, :, :-1])
        text = self.text_hidden(h, a)
        if with_text_head:
            text = self.text_head(text)
        logits = self.forward_depformer_training(delayed[:, :, 1:], torch.cat([h, a], dim=-1))
        dq = self.dep_q
        logits, mask = undelay_logits(logits, self.delays[1 : 1 + dq], codes[:, 1 : 1 + dq] != ZERO_TOKEN_ID)
        text, text_mask = undelay_logits(text[:, None], self.delays[:1], codes[:, :1] != ZERO_TOKEN_ID)
        return logits, mask, text, text_mask

    def forward(self, codes: torch.Tensor, condition_tensors: Any = None) -> LMOutput:
        """Teacher forcing on ``codes [B, K, T]`` (text row in LLM ids, ``-1`` = zero token) -> :class:`LMOutput`
        with ``text_logits [B, 1, T, V]``; same alignment, NaN and mask rules as Moshi."""
        if condition_tensors:
            raise NotImplementedError("condition_tensors are not supported")
        return LMOutput(*self._teacher_forced(codes, with_text_head=True))

    def forward_train(self, codes: torch.Tensor) -> DSAATrainOutput:
        """:meth:`forward` without materialising ``[B, 1, T, V]`` text logits (see :class:`DSAATrainOutput`)."""
        logits, mask, text_hidden, text_mask = self._teacher_forced(codes, with_text_head=False)
        return DSAATrainOutput(logits, mask, text_hidden, text_mask, self.text_head)

    def dsaa_vectors(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """The ``1 + dep_q`` projector inputs for ``codes [B, K, T]`` (the fork's ``get_vectors``).

        Returns:
            ``[z, cat(z, e_0), ..., cat(z, e_{dep_q-1})]``: ``z [B, T, D_l + D_m]`` is the text projector's input
            and ``cat(z, e_k) [B, T, D_l + D_m + D_d]`` the input of depformer projector ``j_k``, at the model's
            (delayed) time steps.
        """
        delayed = delay_codes(codes, self.delays, self.initial_tokens(codes.device))
        h, a = self.forward_states(delayed[:, :, :-1])
        z = torch.cat([h, a], dim=-1)
        targets = delayed[:, :, 1:]
        vectors = [z]
        for k in range(self.dep_q):
            vectors.append(torch.cat([z, self.depformer_token_input(k, targets[:, k]).to(z.dtype)], dim=-1))
        return vectors

    # -- streaming -------------------------------------------------------------------------------------------

    def forward_depformer(
        self, depformer_cb_index: int, sequence: torch.Tensor, transformer_out: torch.Tensor
    ) -> torch.Tensor:
        """One streaming depformer step (inside ``with model.depformer.streaming(B)``).

        Args:
            depformer_cb_index (int): step ``k``.
            sequence (torch.Tensor): ``[B, 1, 1]`` previous token (text at ``k = 0``, audio ``k - 1`` after).
            transformer_out (torch.Tensor): ``z`` ``[B, 1, D_l + D_m]`` from :meth:`forward_text`.

        Returns:
            Logits ``[B, 1, 1, card]``.
        """
        if not self.depformer.is_streaming:
            raise RuntimeError(
                "forward_depformer must run inside `with model.depformer.streaming(batch_size)`"
            )
        if sequence.shape[1:] != (1, 1):
            raise ValueError(
                f"forward_depformer takes one token per item [B, 1, 1], got {tuple(sequence.shape)}"
            )
        k = depformer_cb_index
        out = self.depformer(self.depformer_input(k, transformer_out, sequence[:, 0]))
        return self.linears[k](self.depformer_norms[k](out))[:, None]


class DSAALMGen(LMGen):
    """Streaming generation with a :class:`DSAAModel`; same API, sampling and delay bookkeeping as ``LMGen``.

    Each :meth:`step` runs one Moshi transformer step and one LLM step (the previous text token, with the
    LLM's KV cache), samples the text token (``temp_text``, ``top_k_text``), then runs the ``dep_q``
    depformer steps through the projectors. The LLM cache is part of the model's streaming state: it enters,
    leaves and resets (whole batch only) with Moshi's caches, and a step past the LLM's
    ``max_position_embeddings`` raises ``ValueError``. Greedy decoding is ``use_sampling=False``.
    """

    def __init__(self, lm_model: DSAAModel, **kwargs: Any) -> None:
        if not isinstance(lm_model, DSAAModel):
            raise TypeError(f"DSAALMGen needs a DSAAModel, got {type(lm_model).__name__}")
        super().__init__(lm_model, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Initialisation (setup_new_model)


def pca_projection(embeddings: torch.Tensor, out_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """PCA init of ``depformer_text_proj`` (contract): ``proj(e) = W (e - mu)``.

    The rows of ``W`` are the top principal directions of the centred embedding rows, each signed so that its
    largest-magnitude entry is positive; ``b = -W mu``. Computed on CPU in float64 (eigen-decomposition of the
    ``D_l x D_l`` covariance) so that the result is reproducible.

    Args:
        embeddings (torch.Tensor): ``E`` ``[V_in, D_l]``.
        out_dim (int): ``D_d``. When ``D_l < D_d``, rows after the first ``D_l`` are zero.

    Returns:
        ``(W [D_d, D_l] float32, b [D_d] float32, number of non-zero rows)``.
    """
    e = embeddings.detach().to("cpu", torch.float64)
    mu = e.mean(dim=0)
    centred = e - mu
    cov = centred.T @ centred
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    rank = min(out_dim, e.shape[1])
    directions = eigvecs[:, torch.argsort(eigvals, descending=True, stable=True)[:rank]].T  # [rank, D_l]
    peak = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
    directions = directions * torch.where(peak < 0, -1.0, 1.0)
    weight = torch.zeros(out_dim, e.shape[1], dtype=torch.float64)
    weight[:rank] = directions
    bias = -(weight @ mu)
    return weight.to(torch.float32), bias.to(torch.float32), rank


@torch.no_grad()
def initialize_dsaa_modules(
    model: DSAAModel, seed: int, modules: Iterable[str] = DSAA_MODULES, warn: Any = None
) -> None:
    """Replaces the named DSAA modules by freshly initialised CPU float32 ones (contract: module table).

    ``text_projector`` and ``depformer_projectors`` get their contract init from a generator seeded with
    ``seed``; ``text_head`` copies the LLM's LM head; ``depformer_text_emb`` copies the LLM input embedding;
    ``depformer_text_proj`` is the PCA projection. The LLM weights must be loaded (not ``meta``).

    Args:
        model (DSAAModel): the model to initialise (its other modules are untouched).
        seed (int): the ``seed`` key of the config.
        modules (Iterable[str]): subset of :data:`DSAA_MODULES` to initialise.
        warn (Callable[[str], None] | None): receives the ``D_l < D_d`` warning (default: ``warnings.warn``).
    """
    import warnings

    d = model.dims
    wanted = list(modules)
    unknown = [m for m in wanted if m not in DSAA_MODULES]
    if unknown:
        raise ValueError(f"not DSAA modules: {unknown} (expected a subset of {list(DSAA_MODULES)})")
    llm = model.text_llm
    factory = {"device": "cpu", "dtype": torch.float32}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Always draw in the same order, so the values do not depend on which subset is initialised.
        projector = TextPreservingProjector(d.text_dim, d.dim, d.proj_hidden, model.proj_dropout, **factory)
        in_dim = d.text_dim + d.dim + d.depformer_dim
        projectors = nn.ModuleList(
            [
                ResidualDepformerProjector(
                    in_dim, d.proj_hidden, d.depformer_dim, model.proj_dropout, **factory
                )
                for _ in range(d.num_projectors)
            ]
        )
    if "text_projector" in wanted:
        model.text_projector = projector
    if "depformer_projectors" in wanted:
        model.depformer_projectors = projectors
    if "text_head" in wanted:
        model.text_head = nn.Linear(d.text_dim, d.text_vocab, bias=False, device="meta")
        model.text_head.weight = _cpu_float32_param(llm.output_embedding().weight)
    if "depformer_text_emb" in wanted:
        model.depformer_text_emb = MaskedEmbedding(d.text_in_vocab, d.text_dim, device="meta")
        model.depformer_text_emb.emb.weight = _cpu_float32_param(llm.input_embedding().weight)
    if "depformer_text_proj" in wanted:
        weight, bias, rank = pca_projection(llm.input_embedding().weight, d.depformer_dim)
        if rank < d.depformer_dim:
            message = (
                f"the LLM width D_l={d.text_dim} is smaller than depformer_dim D_d={d.depformer_dim}: "
                f"depformer_text_proj rows {rank}..{d.depformer_dim - 1} are zero"
            )
            (warn or warnings.warn)(message)
        model.depformer_text_proj = nn.Linear(d.text_dim, d.depformer_dim, device="meta")
        model.depformer_text_proj.weight = nn.Parameter(weight)
        model.depformer_text_proj.bias = nn.Parameter(bias)
    for name in wanted:
        getattr(model, name).train(model.training)


def _cpu_float32_param(tensor: torch.Tensor) -> nn.Parameter:
    """A float32 CPU copy (never a view of the LLM's tensor, so training the copy leaves the LLM intact)."""
    return nn.Parameter(tensor.detach().to("cpu", torch.float32, copy=True))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "DSAA_MODULES",
    "DSAADims",
    "DSAALMGen",
    "DSAAModel",
    "DSAATrainOutput",
    "REMOVED_MOSHI_MODULES",
    "initialize_dsaa_modules",
    "pca_projection",
]
