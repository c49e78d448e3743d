"""DSAA: Moshi whose text stream goes through a frozen, pretrained Hugging Face causal LM (see ``docs/dsaa.md``).

A DSAA model is an :class:`~moshi.models.lm.LMModel` built with a :class:`DSAATextPath`. Moshi's temporal
transformer becomes text-blind (it reads only audio). The text stream, in the LLM's vocabulary, runs through the
frozen LLM at one position per frame. The two per-frame states are concatenated into ``z = [h, a]``; a residual
"text-preserving" MLP plus a copy of the LLM's LM head predict the text token, and each depformer step reads a
residual MLP over ``[z, token embedding]`` in place of Moshi's ``depformer_in``. Teacher forcing, the depformer
and streaming generation (``LMGen``, with the LLM's KV cache in the model's streaming state) are the model's own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modules.dsaa_blocks import (
    MaskedEmbedding,
    ResidualDepformerProjector,
    StreamingLLM,
    TextPreservingProjector,
)
from .lm import LMModel, TextPath, delay_codes

Device = torch.device | str | None

# Modules of Moshi's text path, which a DSAA model does not have (its own text path replaces them).
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
    """Every width of a DSAA model, derived from the Moshi keywords and the LLM."""

    dim: int  # D_m, Moshi's temporal width
    depformer_dim: int  # D_d
    text_dim: int  # D_l, the LLM width
    text_in_vocab: int  # V_in, rows of the LLM input embedding
    text_vocab: int  # V, rows of the LLM head
    proj_hidden: int  # H, hidden width of every projector
    num_projectors: int  # P, one per depformer input weight set
    n_q: int
    dep_q: int
    card: int


def _module_vocab_and_width(llm: nn.Module) -> tuple[int, int, int]:
    """``(D_l, V_in, V)`` of an HF causal LM, read from its embedding shapes (works on ``meta`` too)."""
    inp = llm.get_input_embeddings()
    out = llm.get_output_embeddings()
    if inp is None or out is None:
        raise ValueError(f"{type(llm).__name__} needs an input embedding and an LM head to be used by DSAA")
    return int(inp.weight.shape[1]), int(inp.weight.shape[0]), int(out.weight.shape[0])


class DSAATextPath(TextPath):
    """DSAA's text path: the frozen LLM reads the text stream, the temporal transformer reads audio only.

    It creates, at the model's top level, ``text_llm`` (the LLM with its ``save_pretrained`` names, frozen),
    ``text_projector`` and ``text_head`` (``V x D_l``, the LLM head's shape), then ``depformer_projectors``
    (one per depformer input weight set) and ``depformer_text_emb`` plus ``depformer_text_proj``. A path
    object builds one model.

    Args:
        text_llm (nn.Module): a ``transformers`` causal LM (``*ForCausalLM``); its parameters may be on ``meta``
            (weights loaded later).
        bos_id (int), pad_id (int), epad_id (int): special ids in the LLM vocabulary
            (:func:`moshi.models.dsaa_tokens.resolve_special_tokens`); ``bos_id`` is the initial text token.
        proj_hidden (int | None): ``H``, hidden width of every projector (default ``D_m``).
        proj_dropout (float): dropout inside the projectors.
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
    ) -> None:
        text_dim, text_in_vocab, text_vocab = _module_vocab_and_width(text_llm)
        for name, value in (("bos_id", bos_id), ("pad_id", pad_id), ("epad_id", epad_id)):
            if not 0 <= value < min(text_in_vocab, text_vocab):
                raise ValueError(
                    f"{name}={value} is outside the LLM vocabulary (input {text_in_vocab}, output {text_vocab} rows)"
                )
        if proj_hidden is not None and int(proj_hidden) <= 0:
            raise ValueError(f"proj_hidden must be > 0, got {proj_hidden}")
        self._llm: nn.Module | None = text_llm
        self.bos_id = int(bos_id)
        self.pad_id = int(pad_id)
        self.epad_id = int(epad_id)
        self.proj_hidden = None if proj_hidden is None else int(proj_hidden)
        self.proj_dropout = float(proj_dropout)
        self._widths = (text_dim, text_in_vocab, text_vocab)
        self.dims: DSAADims | None = None
        # The Moshi keywords the model was built from, with the DSAA text values (a checkpoint's config.json).
        self.moshi_config: dict[str, Any] = {}

    def resolve_text_config(
        self, text_card: int, padding_id: int, end_padding_id: int, text_card_out: int | None, demux: bool
    ) -> tuple[int, int, int]:
        if demux:
            raise ValueError("demux_second_text_stream is not supported by DSAA (the text stream is the LLM's)")
        if text_card_out is not None:
            raise ValueError("text_card_out is not supported by DSAA (the text head has the LLM's vocabulary)")
        return self._widths[2], self.pad_id, self.epad_id

    def build_input(self, model: LMModel, factory: dict[str, Any]) -> None:
        if self._llm is None:
            raise RuntimeError("a DSAATextPath builds one model; make a new one for another model")
        text_dim, _, text_vocab = self._widths
        hidden = model.dim if self.proj_hidden is None else self.proj_hidden
        # The LLM streams over the same window as Moshi's temporal transformer (capped by its positions).
        model.text_llm = StreamingLLM(self._llm, context=model.context)
        model.text_llm.requires_grad_(False)
        self._llm = None
        model.text_projector = TextPreservingProjector(text_dim, model.dim, hidden, self.proj_dropout, **factory)
        model.text_head = nn.Linear(text_dim, text_vocab, bias=False, **factory)

    def build_depformer_input(self, model: LMModel, num_inputs: int, factory: dict[str, Any]) -> None:
        text_dim, text_in_vocab, text_vocab = self._widths
        hidden = model.dim if self.proj_hidden is None else self.proj_hidden
        self.dims = DSAADims(
            dim=model.dim,
            depformer_dim=model.depformer_dim,
            text_dim=text_dim,
            text_in_vocab=text_in_vocab,
            text_vocab=text_vocab,
            proj_hidden=hidden,
            num_projectors=num_inputs,
            n_q=model.n_q,
            dep_q=model.dep_q,
            card=model.card,
        )
        in_dim = text_dim + model.dim + model.depformer_dim
        model.depformer_projectors = nn.ModuleList(
            [
                ResidualDepformerProjector(in_dim, hidden, model.depformer_dim, self.proj_dropout, **factory)
                for _ in range(num_inputs)
            ]
        )

    def build_depformer_text(self, model: LMModel, factory: dict[str, Any]) -> None:
        text_dim, text_in_vocab, _ = self._widths
        model.depformer_text_emb = MaskedEmbedding(text_in_vocab, text_dim, **factory)
        model.depformer_text_proj = nn.Linear(text_dim, model.depformer_dim, **factory)

    def init_tables(self, model: LMModel, depformer: bool) -> list[nn.Module]:
        # The DSAA modules are initialised by their constructors and by setup_new_model (LLM copies, PCA).
        return []

    def init_linears(self, model: LMModel) -> list[nn.Module]:
        return []

    def text_initial_token_id(self, model: LMModel) -> int:
        """The LLM reads ``[BOS, w_0, w_1, ...]``: the initial text token is ``bos_id``."""
        return self.bos_id

    def temporal_input(self, model: LMModel, sequence: torch.Tensor) -> torch.Tensor:
        return model.embed_audio(sequence[:, model.audio_offset : model.audio_offset + model.n_q])

    def frame_state(
        self, model: LMModel, sequence: torch.Tensor, transformer_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = model.text_llm(ids=sequence[:, 0]).to(transformer_out.dtype)
        return torch.cat([h, transformer_out], dim=-1), model.text_projector(h, transformer_out)

    def text_head(self, model: LMModel) -> nn.Module:
        return model.text_head

    def token_input(self, model: LMModel, step: int, tokens: torch.Tensor) -> torch.Tensor:
        """``e_k`` of depformer step ``k``, ``[B, T, D_d]``: step 0 reads the text token through
        ``depformer_text_proj(depformer_text_emb(.))``, step ``k >= 1`` audio codebook ``k - 1`` through
        ``depformer_emb[k - 1]``."""
        if step == 0:
            return model.depformer_text_proj(model.depformer_text_emb(tokens))
        return model.depformer_emb[step - 1](tokens)

    def depformer_step_input(self, model: LMModel, step: int, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        e = self.token_input(model, step, tokens).to(z.dtype)
        return model.depformer_projectors[model.depformer_input_index(step)](torch.cat([z, e], dim=-1))

    def depformer_inputs(self, model: LMModel, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [self.depformer_step_input(model, k, z, tokens[:, k]) for k in range(model.dep_q)], dim=2
        )


def dsaa_lm_model(
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
) -> LMModel:
    """An :class:`LMModel` with a :class:`DSAATextPath` over ``text_llm``.

    ``lm_kwargs`` are Moshi's constructor keywords (``dim``, ``depformer_dim``, ``delays``, ...); their
    ``text_card``, ``existing_text_padding_id`` and ``existing_text_end_padding_id`` are replaced by the LLM's
    vocabulary and ``pad_id``/``epad_id``. ``device``/``dtype`` apply to the Moshi and DSAA modules (the LLM keeps
    its own).

    Raises:
        ValueError: the Moshi config has no depformer, asks for a demuxed text stream or ``text_card_out``, or a
            special id is outside the LLM vocabulary.
    """
    if lm_kwargs.get("demux_second_stream"):
        raise ValueError("demux_second_text_stream is not supported by DSAA (the text stream is the LLM's)")
    if lm_kwargs.get("dep_q", 8) == 0:
        raise ValueError("DSAA needs a Moshi config with a depformer (dep_q > 0)")
    path = DSAATextPath(
        text_llm, bos_id=bos_id, pad_id=pad_id, epad_id=epad_id, proj_hidden=proj_hidden, proj_dropout=proj_dropout
    )
    text_keys = ("text_card", "existing_text_padding_id", "existing_text_end_padding_id")
    moshi_kwargs = {k: v for k, v in lm_kwargs.items() if k not in text_keys}
    model = LMModel(device=device, dtype=dtype, text_path=path, **moshi_kwargs)
    path.moshi_config = {k: v for k, v in moshi_kwargs.items() if k != "text_card_out"}
    path.moshi_config.update(
        text_card=model.text_card,
        existing_text_padding_id=path.pad_id,
        existing_text_end_padding_id=path.epad_id,
    )
    return model


def is_dsaa(model: nn.Module) -> bool:
    """Whether ``model`` is an :class:`LMModel` whose text stream goes through a frozen LLM."""
    return isinstance(getattr(model, "text_path", None), DSAATextPath)


def dsaa_path(model: nn.Module) -> DSAATextPath:
    """The :class:`DSAATextPath` of a DSAA model (its widths, special ids and Moshi config)."""
    path = getattr(model, "text_path", None)
    if not isinstance(path, DSAATextPath):
        raise TypeError(f"{type(model).__name__} is not a DSAA model (its text path is {type(path).__name__})")
    return path


def dsaa_dims(model: nn.Module) -> DSAADims:
    """Every width of a DSAA model."""
    dims = dsaa_path(model).dims
    if dims is None:
        raise RuntimeError("the DSAA model was built without a depformer")
    return dims


def dsaa_states(model: LMModel, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-frame states for already-delayed ``sequence [B, K, T]``.

    Returns:
        ``(h [B, T, D_l], a [B, T, D_m])``: the LLM's final-norm state for the text row, and Moshi's
        ``out_norm(transformer(audio embeddings))``. Inside a streaming block both use their caches.
    """
    z, _ = model.frame_states(sequence)
    d_l = dsaa_dims(model).text_dim
    return z[..., :d_l], z[..., d_l:]


def dsaa_vectors(model: LMModel, codes: torch.Tensor) -> list[torch.Tensor]:
    """The ``1 + dep_q`` projector inputs for ``codes [B, K, T]``, for analysing what the projectors read.

    Returns:
        ``[z, cat(z, e_0), ..., cat(z, e_{dep_q-1})]``: ``z [B, T, D_l + D_m]`` is the text projector's input
        and ``cat(z, e_k) [B, T, D_l + D_m + D_d]`` the input of depformer projector ``j_k``, at the model's
        (delayed) time steps.
    """
    path = dsaa_path(model)
    delayed = delay_codes(codes, model.delays, model.initial_tokens(codes.device))
    z, _ = model.frame_states(delayed[:, :, :-1])
    targets = delayed[:, :, 1:]
    vectors = [z]
    for k in range(model.dep_q):
        vectors.append(torch.cat([z, path.token_input(model, k, targets[:, k]).to(z.dtype)], dim=-1))
    return vectors


# ----------------------------------------------------------------------------------------------------------------
# Parameter groups


def dsaa_param_group_prefixes(
    model: nn.Module, only_text: bool = False, frozen_modules: Sequence[str] = ()
) -> dict[str, tuple[str, ...]]:
    """Module prefixes of the parameter groups ``proj``, ``finetune`` and ``frozen``.

    ``proj`` holds the freshly initialised projectors, ``finetune`` the modules copied or kept from a pretrained
    model that train at the fine-tuning rate, ``frozen`` everything else (the LLM, Moshi's temporal side and
    ``extra_heads``). ``depformer_norms`` (only present with ``depformer_norm``) train with the depformer.

    Args:
        only_text (bool): only ``text_projector`` (proj) and ``text_head`` (finetune) train.
        frozen_modules (Sequence[str]): ``text_llm.frozen_modules``, extra prefixes to freeze; they take
            precedence over the other groups (a prefix may name a sub-module, e.g. ``depformer.layers.0``).

    Raises:
        ValueError: a ``frozen_modules`` entry names no module of this model.
    """
    dsaa_path(model)
    names = {name for name, _ in model.named_modules()}
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
    top_level = [name for name, _ in model.named_children()]
    frozen = [name for name in top_level if name not in proj + finetune]
    frozen += [p for p in frozen_modules if p not in frozen]
    return {"proj": proj, "finetune": finetune, "frozen": tuple(frozen)}


def dsaa_param_groups(
    model: nn.Module, only_text: bool = False, frozen_modules: Sequence[str] = ()
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter in exactly one group (by :func:`dsaa_param_group_prefixes`; ``frozen`` wins)."""
    prefixes = dsaa_param_group_prefixes(model, only_text, frozen_modules)

    def matches(name: str, group: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes[group])

    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"proj": [], "finetune": [], "frozen": []}
    for name, param in model.named_parameters():
        if matches(name, "frozen"):
            groups["frozen"].append((name, param))
            continue
        hits = [g for g in ("proj", "finetune") if matches(name, g)]
        if len(hits) != 1:
            raise RuntimeError(f"parameter {name} is in {len(hits)} parameter groups {hits}")
        groups[hits[0]].append((name, param))
    return groups


def set_dsaa_trainable(
    model: nn.Module, only_text: bool = False, frozen_modules: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Sets ``requires_grad`` from the groups (frozen: False, proj and finetune: True); returns the names."""
    groups = dsaa_param_groups(model, only_text, frozen_modules)
    for group, params in groups.items():
        for _, param in params:
            param.requires_grad_(group != "frozen")
    return {group: [name for name, _ in params] for group, params in groups.items()}


# ----------------------------------------------------------------------------------------------------------------
# Initialisation (setup_new_model)


def pca_projection(embeddings: torch.Tensor, out_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """PCA init of ``depformer_text_proj``: ``proj(e) = W (e - mu)``, the top principal directions of the LLM
    input embedding, so the depformer's text input starts as the most informative ``D_d`` directions.

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
    model: LMModel, seed: int, modules: Iterable[str] = DSAA_MODULES, warn: Callable[[str], None] | None = None
) -> None:
    """Replaces the named DSAA modules by freshly initialised CPU float32 ones.

    ``text_projector`` and ``depformer_projectors`` get their constructors' init from a generator seeded with
    ``seed``; ``text_head`` copies the LLM's LM head; ``depformer_text_emb`` copies the LLM input embedding;
    ``depformer_text_proj`` is the PCA projection. The LLM weights must be loaded (not ``meta``).

    Args:
        model (LMModel): the DSAA model to initialise (its other modules are untouched).
        seed (int): the ``seed`` key of the config.
        modules (Iterable[str]): subset of :data:`DSAA_MODULES` to initialise.
        warn (Callable[[str], None] | None): receives the ``D_l < D_d`` warning (default: ``warnings.warn``).
    """
    path = dsaa_path(model)
    d = dsaa_dims(model)
    wanted = list(modules)
    unknown = [m for m in wanted if m not in DSAA_MODULES]
    if unknown:
        raise ValueError(f"not DSAA modules: {unknown} (expected a subset of {list(DSAA_MODULES)})")
    llm = model.text_llm
    factory = {"device": "cpu", "dtype": torch.float32}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Always draw in the same order, so the values do not depend on which subset is initialised.
        projector = TextPreservingProjector(d.text_dim, d.dim, d.proj_hidden, path.proj_dropout, **factory)
        in_dim = d.text_dim + d.dim + d.depformer_dim
        projectors = nn.ModuleList(
            [
                ResidualDepformerProjector(
                    in_dim, d.proj_hidden, d.depformer_dim, path.proj_dropout, **factory
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


__all__ = [
    "DSAA_MODULES",
    "REMOVED_MOSHI_MODULES",
    "DSAADims",
    "DSAATextPath",
    "dsaa_dims",
    "dsaa_lm_model",
    "dsaa_param_group_prefixes",
    "dsaa_param_groups",
    "dsaa_path",
    "dsaa_states",
    "dsaa_vectors",
    "initialize_dsaa_modules",
    "is_dsaa",
    "pca_projection",
    "set_dsaa_trainable",
]
