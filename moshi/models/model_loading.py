"""Loading any model of this package for inference: base Moshi, a LoRA export, a merged or full export, or DSAA.

One entry point, :func:`load_model`, returns the LM, Mimi, the text tokenizer and the generation settings in a
:class:`LoadedModel`, whichever kind of checkpoint it is given. Which kind a folder holds is decided by its files:

- ``lora.safetensors`` + ``config.json`` (``"lora": true``): adapters over the base model named by ``hf_repo`` /
  ``moshi_weight``, fused into plain Linears unless ``fuse_lora=False``;
- ``consolidated.safetensors`` + ``config.json``: every weight. A LoRA run exported without adapters is
  ``"merged"``, anything else ``"full"``; either way the weights are used as they are (never wrapped in fresh
  LoRA layers, even when an older export's config still says ``"lora": true``);
- a ``config.json`` with a ``dsaa`` block: a DSAA checkpoint, loaded with its own LLM and tokenizer (no hub
  access when the LLM is embedded); Mimi still comes from ``hf_repo`` / ``mimi_weight``;
- a hub-layout folder (``config.json`` naming ``model.safetensors``, Mimi and the tokenizer): a base model.

A training run's ``checkpoint_N/`` folder stands for its ``consolidated/`` export. Everything else (Mimi, the
SentencePiece tokenizer, the base weights of a LoRA export) resolves through
:class:`~moshi.models.loaders.CheckpointInfo`, the same rules Kyutai's tools follow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .compression import MimiModel
from .dsaa import is_dsaa
from .dsaa_loading import classify_state, load_dsaa_checkpoint, load_dsaa_model
from .lm import LMModel
from .lm_gen import LMGen
from .loaders import (
    DEFAULT_REPO,
    CheckpointInfo,
    get_mimi,
    get_moshi_lm,
    mimi_codebooks_for_lm,
    read_json_object,
)

logger = logging.getLogger(__name__)

KINDS = ("moshi", "lora", "merged", "full", "dsaa")
LORA_FILE = "lora.safetensors"
CONSOLIDATED_FILE = "consolidated.safetensors"
MODEL_FILE = "model.safetensors"
_WEIGHT_FILES = (LORA_FILE, CONSOLIDATED_FILE, MODEL_FILE)

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when PyTorch sees a GPU, else the CPU; other values are taken as they are.

    Raises:
        RuntimeError: a CUDA device is asked for and PyTorch sees none (the message says to use ``cpu``).
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was requested but PyTorch sees no CUDA device; use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: bfloat16 on CUDA (half the memory, the published weights' dtype), float32 elsewhere
    (bf16 matmuls are slow on CPUs); otherwise a dtype or one of its names (``float32``/``fp32``,
    ``bfloat16``/``bf16``, ``float16``/``fp16``).

    Raises:
        ValueError: an unknown name (the message lists the accepted ones).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPE_NAMES)}") from None


@dataclass
class LoadedModel:
    """A model ready to generate, with what was read to build it.

    Attributes:
        lm (LMModel): eval mode, on ``device`` in ``dtype`` (Moshi or DSAA).
        mimi (MimiModel): eval mode, float32, encoding as many codebooks as the LM reads.
        text_tokenizer: a SentencePiece processor (Moshi) or a Hugging Face tokenizer (DSAA).
        lm_gen_config (dict): the ``lm_gen_config`` of ``config.json`` (``{}`` when there is none).
        kind (str): ``"moshi"``, ``"lora"``, ``"merged"``, ``"full"`` or ``"dsaa"``.
        sources (dict): provenance, ``{"weights", "mimi", "tokenizer", "config", ["lora"], ["llm"]}`` to paths.
        device (torch.device), dtype (torch.dtype): of the LM.
    """

    lm: LMModel
    mimi: MimiModel
    text_tokenizer: Any
    lm_gen_config: dict[str, Any]
    kind: str
    sources: dict[str, str]
    device: torch.device
    dtype: torch.dtype

    @property
    def is_dsaa(self) -> bool:
        return is_dsaa(self.lm)

    def make_lm_gen(self, **overrides: Any) -> LMGen:
        """An :class:`LMGen` over :attr:`lm` with the checkpoint's ``lm_gen_config``, ``overrides`` taking
        precedence (e.g. ``temp=0.0`` or ``generator=...``)."""
        return LMGen(self.lm, **{**self.lm_gen_config, **overrides})


@dataclass
class _Files:
    """What a checkpoint path holds: its weights file, the ``config.json`` beside it (raw), its folder."""

    weights: Path
    config_path: Path | None
    config: dict[str, Any]


def checkpoint_files(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """``(weights file, config.json beside it or None)`` of a checkpoint path.

    ``checkpoint`` may be a weights file, a folder holding exactly one of ``lora.safetensors``,
    ``consolidated.safetensors`` or ``model.safetensors``, or a training ``checkpoint_N/`` folder (its
    ``consolidated/`` export is used).

    Raises:
        FileNotFoundError: the path does not exist, or the folder holds no weights (the message lists what was
            looked for).
        ValueError: the folder holds several weights files.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / "consolidated").is_dir():
            path = path / "consolidated"
        found = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path}: no weights in the checkpoint folder (expected one of {list(_WEIGHT_FILES)}; a training "
                "checkpoint is run_dir/checkpoints/checkpoint_N or its consolidated/ folder)"
            )
        if len(found) > 1:
            raise ValueError(
                f"{path}: several weights files {[p.name for p in found]}; pass the one to load as the checkpoint"
            )
        weights = found[0]
    else:
        weights = path
    config = weights.parent / "config.json"
    return weights, (config if config.is_file() else None)


def _run_trained_lora(export: Path) -> bool | None:
    """Whether the training run an export folder belongs to trained LoRA adapters (from its ``args.yaml``);
    ``None`` when the folder is not inside a run folder."""
    run_args = export.parent.parent.parent / "args.yaml"
    if export.name != "consolidated" or not run_args.is_file():
        return None
    import yaml

    try:
        args = yaml.safe_load(run_args.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{run_args}: invalid YAML ({e})") from None
    lora = args.get("lora") or {}
    return bool(lora.get("enable")) and not bool(args.get("full_finetuning"))


def _export_kind(files: _Files) -> str:
    """``"merged"`` or ``"full"`` for a ``consolidated.safetensors`` export."""
    trained_lora = _run_trained_lora(files.weights.parent)
    if trained_lora is None:
        trained_lora = bool(files.config.get("lora", False))
    return "merged" if trained_lora else "full"


def _mimi(info: CheckpointInfo, lm: LMModel, device: torch.device) -> MimiModel:
    codebooks = mimi_codebooks_for_lm({"n_q": lm.n_q, "dep_q": lm.dep_q})
    return get_mimi(info.mimi_weights, info.mimi_config, device=device, num_codebooks=codebooks)


def load_model(
    checkpoint: str | Path | None = None,
    *,
    hf_repo: str | None = None,
    moshi_weight: str | Path | None = None,
    mimi_weight: str | Path | None = None,
    tokenizer: str | Path | None = None,
    config: str | Path | None = None,
    lora_weight: str | Path | None = None,
    fuse_lora: bool = True,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    text_llm: Any = None,
    base: CheckpointInfo | None = None,
) -> LoadedModel:
    """Loads a model of any kind (see the module docstring) with Mimi and its text tokenizer.

    Args:
        checkpoint: a training ``consolidated/`` folder (``lora.safetensors`` or ``consolidated.safetensors`` +
            ``config.json``), its parent ``checkpoint_N/``, a DSAA checkpoint folder, a hub-layout folder, or one
            weights file; ``None`` loads the base model.
        hf_repo: hub id or local folder of the base model (Mimi, tokenizer, base weights); default: the folder
            ``checkpoint`` names when it is in the hub layout, else Kyutai's moshiko.
        moshi_weight, mimi_weight, tokenizer, config: explicit files overriding the repo's (``config`` also
            overrides the checkpoint's ``config.json`` for Moshi kinds).
        lora_weight: a LoRA file to apply to the base model (``config`` must say ``"lora": true``).
        fuse_lora: fold LoRA factors into the base weights (else the LoRA layers stay, e.g. for comparison).
        device, dtype: see :func:`resolve_device` and :func:`resolve_dtype`.
        text_llm: the training config's ``text_llm`` section; only needed for DSAA checkpoints in the fork's
            format (no ``dsaa`` block in their ``config.json``).
        base: the base model's files, already resolved (used instead of ``hf_repo`` and the explicit files).

    Raises:
        FileNotFoundError: a path does not exist, a folder holds no weights, or a DSAA checkpoint's LLM or
            tokenizer is missing.
        ValueError: a LoRA file does not match the base (missing/unexpected keys and the file named), weights do
            not match their config, or a config lacks ``"lora": true`` for a LoRA file.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if text_llm is not None and checkpoint is None:
        raise ValueError("text_llm is given without a checkpoint: name the DSAA or fork checkpoint to load")
    files = None
    if checkpoint is not None:
        weights, config_path = checkpoint_files(checkpoint)
        files = _Files(weights, config_path, read_json_object(config_path) if config_path is not None else {})
        if lora_weight is not None and weights.name != MODEL_FILE:
            raise ValueError(f"lora_weight={lora_weight} cannot be combined with the checkpoint {weights}")

    if files is not None and ("dsaa" in files.config or text_llm is not None):
        if tokenizer is not None:
            raise ValueError(f"tokenizer={tokenizer}: a DSAA checkpoint uses its own tokenizer folder")
        return _load_dsaa(files, text_llm, hf_repo, mimi_weight, config, base, dev, dt)

    if files is None:
        kind = "lora" if lora_weight is not None else "moshi"
    elif files.weights.name == LORA_FILE:
        kind, lora_weight = "lora", files.weights
    elif files.weights.name == CONSOLIDATED_FILE:
        kind = _export_kind(files)
    else:
        kind = "lora" if lora_weight is not None else "moshi"
        if files.weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(files.weights), framework="pt") as f:
                if classify_state(dict.fromkeys(f.keys()), files.weights) == "dsaa":
                    raise ValueError(
                        f"{files.weights} is a DSAA checkpoint in the fork's format (text_projector.* tensors, no "
                        "'dsaa' block in config.json): pass its training config's text_llm section (text_llm=...)"
                    )
        if hf_repo is None and base is None and files.config_path is not None and moshi_weight is None:
            hf_repo = str(files.weights.parent)

    own_weights = files is not None and kind != "lora"
    if base is None:
        config_path = config if config is not None else (files.config_path if files is not None else None)
        base = CheckpointInfo.from_hf_repo(
            hf_repo or DEFAULT_REPO,
            moshi_weights=files.weights if own_weights else moshi_weight,
            mimi_weights=mimi_weight,
            tokenizer=tokenizer,
            config_path=config_path,
        )
    else:
        changes: dict[str, Any] = {"moshi_weights": files.weights} if own_weights else {}
        if files is not None and files.config_path is not None:
            changes.update(raw_config=files.config, lm_config=_lm_keys(files.config))
        base = replace(base, **changes)
    lm_config = dict(base.lm_config) if base.lm_config is not None else None
    lm_overrides: dict[str, Any] = {}
    if kind in ("merged", "full", "moshi") and lm_config is not None and lm_config.get("lora"):
        # Merged weights wrapped in fresh LoRA layers would be perturbed by their random factors.
        logger.info("%s: config.json says \"lora\": true but the weights are complete; loading them as is",
                    base.moshi_weights)
        lm_overrides["lora"] = False
    lm = get_moshi_lm(
        base.moshi_weights,
        lm_kwargs=lm_config,
        device=dev,
        dtype=dt,
        lora_weights=lora_weight,
        fuse_lora=fuse_lora,
        lm_kwargs_overrides=lm_overrides,
        strict_lora=True,
    )
    if base.model_type == "hibiki":
        with torch.no_grad():
            lm.text_emb.weight[2] = lm.text_emb.weight[3]
    if config is not None or (files is not None and files.config_path is not None):
        config_source = str(config or files.config_path)  # type: ignore[union-attr]
    else:
        config_source = f"{hf_repo or DEFAULT_REPO}/config.json" if base.raw_config is not None else "defaults"
    sources = {
        "weights": str(base.moshi_weights),
        "mimi": str(base.mimi_weights),
        "tokenizer": str(base.tokenizer),
        "config": config_source,
    }
    if lora_weight is not None:
        sources["lora"] = str(lora_weight)
    gen_config = dict(base.lm_gen_config)
    if files is not None:
        gen_config.update(files.config.get("lm_gen_config") or {})
    return LoadedModel(
        lm=lm.eval(),
        mimi=_mimi(base, lm, dev),
        text_tokenizer=base.get_text_tokenizer(),
        lm_gen_config=gen_config,
        kind=kind,
        sources=sources,
        device=dev,
        dtype=dt,
    )


def _lm_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """The ``LMModel`` keys of a raw ``config.json`` (file names and runtime settings dropped)."""
    from .loaders import _NON_LM_CONFIG_KEYS

    return {k: v for k, v in raw.items() if k not in _NON_LM_CONFIG_KEYS and k != "dsaa"}


def _load_dsaa(
    files: _Files,
    text_llm: Any,
    hf_repo: str | None,
    mimi_weight: str | Path | None,
    config: str | Path | None,
    base: CheckpointInfo | None,
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedModel:
    """A DSAA checkpoint (``dsaa`` block) or a fork checkpoint (with ``text_llm``); Mimi from the base repo."""
    if "dsaa" in files.config:
        lm, text_tokenizer = load_dsaa_checkpoint(files.weights, device=device, dtype=dtype, text_llm=text_llm)
        block = files.config["dsaa"]
        llm_source = f"embedded in {files.weights}" if block.get("llm_weights") == "embedded" else str(
            block.get("hf_repo_id")
        )
        tokenizer_source = str(files.weights.parent / block.get("tokenizer", "tokenizer"))
    else:
        lm_kwargs = base.lm_config if base is not None and base.lm_config is not None else None
        lm, text_tokenizer = load_dsaa_model(files.weights, text_llm, lm_kwargs, device=device, dtype=dtype)
        llm_source = str(getattr(text_llm, "hf_repo_id", None) or text_llm["hf_repo_id"])
        tokenizer_source = llm_source
    if base is None:
        # The LM's own files are named explicitly, so only the repo's config.json and Mimi are read from it.
        base = CheckpointInfo.from_hf_repo(
            hf_repo or DEFAULT_REPO,
            moshi_weights=files.weights,
            mimi_weights=mimi_weight,
            tokenizer=files.weights,
            config_path=config,
        )
    sources = {
        "weights": str(files.weights),
        "mimi": str(base.mimi_weights),
        "tokenizer": tokenizer_source,
        "config": str(files.config_path or ""),
        "llm": llm_source,
    }
    return LoadedModel(
        lm=lm.eval(),
        mimi=_mimi(base, lm, device),
        text_tokenizer=text_tokenizer,
        lm_gen_config=dict(files.config.get("lm_gen_config") or {}),
        kind="dsaa",
        sources=sources,
        device=device,
        dtype=dtype,
    )


__all__ = ["KINDS", "LoadedModel", "checkpoint_files", "load_model", "resolve_device", "resolve_dtype"]
