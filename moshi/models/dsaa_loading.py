"""Building, loading and saving DSAA models (the checkpoint format and loading rules are in ``docs/dsaa.md``).

Three kinds of file reach :func:`load_dsaa_model`:

- a **DSAA checkpoint** folder (``model.safetensors`` or ``consolidated.safetensors``, ``config.json`` with a
  ``dsaa`` block, ``tokenizer/``). With embedded LLM weights it loads with no hub access at all: the LLM is
  built from the stored ``llm_config`` and every tensor comes from the file, strictly.
- a **fork checkpoint** (no ``dsaa`` block, ``text_projector.*`` tensors present): the LLM and tokenizer come
  from the YAML ``text_llm`` section, ``D_l``, ``V`` and ``H`` are read from the tensor shapes.
- a **plain Moshi checkpoint**: refused, with the ``setup_new_model`` command to run first.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.atomic import atomic_dir, atomic_save_safetensors, atomic_write_text
from .dsaa import dsaa_dims, dsaa_lm_model, dsaa_path
from .dsaa_config import TextLLMSpec
from .dsaa_tokens import SpecialTokens, resolve_special_tokens
from .lm import LMModel
from .loaders import _NON_LM_CONFIG_KEYS, _prepare_lm_kwargs, check_state_dict_keys, hf_get, read_json_object

logger = logging.getLogger(__name__)

DSAA_FORMAT = 1
WEIGHT_NAMES = ("model.safetensors", "consolidated.safetensors")
TOKENIZER_DIR = "tokenizer"
SETUP_HINT = "torchrun --nproc-per-node 1 -m setup_new_model CONFIG"


@dataclass
class DSAABlock:
    """The ``dsaa`` block of a DSAA checkpoint's ``config.json``."""

    hf_repo_id: str
    revision: str | None
    llm_weights: str  # "embedded" | "reference"
    llm_config: dict[str, Any]
    text_dim: int
    text_vocab: int
    pad_id: int
    epad_id: int
    bos_id: int
    proj_hidden: int
    proj_dropout: float
    tokenizer: str = TOKENIZER_DIR
    format: int = DSAA_FORMAT

    @classmethod
    def from_dict(cls, raw: Any, source: Path) -> DSAABlock:
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: 'dsaa' must be an object, got {type(raw).__name__}")
        if raw.get("format") != DSAA_FORMAT:
            raise ValueError(
                f"{source}: dsaa.format={raw.get('format')!r} is not supported (expected {DSAA_FORMAT})"
            )
        names = [f for f in cls.__dataclass_fields__]
        missing = [f"dsaa.{k}" for k in names if k not in raw and k not in ("tokenizer", "format")]
        unknown = [f"dsaa.{k}" for k in raw if k not in names]
        if missing or unknown:
            raise ValueError(f"{source}: missing keys {missing}, unknown keys {unknown}")
        if raw["llm_weights"] not in ("embedded", "reference"):
            raise ValueError(
                f"{source}: dsaa.llm_weights must be 'embedded' or 'reference', got {raw['llm_weights']!r}"
            )
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# The LLM


def _rebuild_non_persistent_buffers(model: nn.Module) -> None:
    """Gives a skeleton built on ``meta`` real copies of its non-persistent buffers (rotary ``inv_freq``).

    Those buffers are computed by the constructors from the config and stored in no checkpoint, so a module
    holding one is rebuilt on CPU from its own ``config`` (as ``transformers`` rotary embeddings are); its
    parameters, loaded afterwards with ``assign=True``, stay on ``meta``.

    Raises:
        ValueError: a module with such a buffer cannot be rebuilt from a ``config`` attribute.
    """
    persistent = set(model.state_dict())
    rebuilt: set[str] = set()
    for name, buffer in list(model.named_buffers()):
        owner_name = name.rpartition(".")[0]
        if name in persistent or not buffer.is_meta or owner_name in rebuilt:
            continue
        owner = model.get_submodule(owner_name)
        config = getattr(owner, "config", None)
        if config is None or next(owner.parameters(), None) is not None:
            raise ValueError(
                f"{type(model).__name__}.{name}: a buffer stored in no checkpoint, in a module that cannot be "
                "rebuilt from its config; store the LLM weights in the checkpoint's folder and load it with "
                "from_pretrained instead"
            )
        with torch.device("cpu"):
            fresh = type(owner)(config=config)
        parent_name, _, child_name = owner_name.rpartition(".")
        model.get_submodule(parent_name).add_module(child_name, fresh)
        rebuilt.add(owner_name)


def load_llm(
    spec: TextLLMSpec, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> nn.Module:
    """The LLM named by ``text_llm.hf_repo_id`` (hub id or local folder), through ``from_pretrained``.

    Raises:
        FileNotFoundError: the repo or folder cannot be loaded (the message names ``text_llm.hf_repo_id``).
    """
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.hf_repo_id,
            revision=spec.revision,
            attn_implementation=spec.attn_implementation,
            trust_remote_code=spec.trust_remote_code,
            dtype=dtype,
        )
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"text_llm.hf_repo_id={spec.hf_repo_id!r} (revision {spec.revision!r}) could not be loaded as a "
            f"causal LM: not a local folder with a model, and not reachable on the hub ({e})"
        ) from e
    return model.to(device).eval()


def load_llm_tokenizer(spec: TextLLMSpec, path: str | Path | None = None) -> Any:
    """The LLM tokenizer from ``path`` (a checkpoint's ``tokenizer/``) or from ``text_llm.hf_repo_id``."""
    from transformers import AutoTokenizer

    source = str(path) if path is not None else spec.hf_repo_id
    try:
        return AutoTokenizer.from_pretrained(
            source,
            revision=None if path is not None else spec.revision,
            trust_remote_code=spec.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        key = "tokenizer folder" if path is not None else "text_llm.hf_repo_id"
        raise FileNotFoundError(f"{key}={source!r}: the LLM tokenizer could not be loaded ({e})") from e


def llm_from_config(llm_config: Mapping[str, Any], spec: TextLLMSpec) -> nn.Module:
    """An LLM skeleton from a stored ``config.json`` dict: parameters on ``meta``, buffers real (no hub access)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(llm_config)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ValueError("dsaa.llm_config has no 'model_type'")
    config = AutoConfig.for_model(model_type, **raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=spec.attn_implementation, trust_remote_code=spec.trust_remote_code
        )
    _rebuild_non_persistent_buffers(model)
    return model.eval()


def tied_llm_keys(llm: nn.Module) -> dict[str, str]:
    """``{tied name: source name}`` of the LLM's tied weights (``lm_head.weight`` -> the input embedding)."""
    getter = getattr(llm, "get_expanded_tied_weights_keys", None)
    if getter is not None:
        return dict(getter())
    seen: dict[int, str] = {}
    tied = {}
    for name, param in llm.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied[name] = seen[id(param)]
        else:
            seen[id(param)] = name
    return tied


def _retie(llm: nn.Module) -> None:
    if tied_llm_keys(llm):
        llm.tie_weights()


# ----------------------------------------------------------------------------------------------------------------
# Building and loading


def build_dsaa_model(
    lm_kwargs: Mapping[str, Any],
    llm: nn.Module,
    special: SpecialTokens | Mapping[str, int],
    proj_hidden: int | None = None,
    proj_dropout: float = 0.1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LMModel:
    """The one DSAA builder: widths from the Moshi kwargs and the LLM; ``lm_kwargs`` as in Kyutai's config."""
    ids = special.ids() if isinstance(special, SpecialTokens) else dict(special)
    kwargs, lora, _, _ = _prepare_lm_kwargs(dict(lm_kwargs), {})
    if lora:
        raise ValueError("a DSAA model cannot be built with LoRA ('lora': true in the Moshi config)")
    return dsaa_lm_model(
        llm,
        bos_id=ids["bos_id"],
        pad_id=ids["pad_id"],
        epad_id=ids["epad_id"],
        proj_hidden=proj_hidden,
        proj_dropout=proj_dropout,
        device=device,
        dtype=dtype,
        **kwargs,
    )


def _split_config(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(Moshi LM kwargs, dsaa block or None)`` of a ``config.json``."""
    lm = copy.deepcopy(dict(raw))
    block = lm.pop("dsaa", None)
    for key in _NON_LM_CONFIG_KEYS:
        lm.pop(key, None)
    return lm, block


def find_weights(path: str | Path) -> tuple[Path, Path | None]:
    """``(weights file, config.json beside it or None)`` for a checkpoint folder or a weights file."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in WEIGHT_NAMES if (path / n).is_file()]
        if len(found) != 1:
            raise FileNotFoundError(
                f"{path}: expected exactly one of {list(WEIGHT_NAMES)} in the checkpoint folder, found "
                f"{[p.name for p in found]}"
            )
        weights = found[0]
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config = weights.parent / "config.json"
    return weights, (config if config.is_file() else None)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: DSAA weights must be a .safetensors file")
    return load_file(str(path))


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def _load_strict(model: LMModel, state: dict[str, torch.Tensor], source: Path) -> None:
    """Assigns ``state`` to ``model``; every name must match and every shape agree (tied LLM copies filled in)."""
    state = dict(state)
    for tied, src in tied_llm_keys(model.text_llm.hf_model).items():
        full_tied, full_src = f"text_llm.{tied}", f"text_llm.{src}"
        if full_tied not in state and full_src in state:
            state[full_tied] = state[full_src]
    # Not strict=True: legacy attention names are converted by the attention modules' load hooks, and the
    # remaining mismatches are reported below with the file name.
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: tensor shapes do not match the DSAA model: {e}") from None
    check_state_dict_keys(source, result.missing_keys, result.unexpected_keys, model="the DSAA model")
    _retie(model.text_llm.hf_model)
    model.text_llm.requires_grad_(False)


def load_dsaa_checkpoint(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    text_llm: Any = None,
) -> tuple[LMModel, Any]:
    """Loads a DSAA checkpoint folder (or its weights file) written by :func:`save_dsaa_checkpoint`.

    With ``llm_weights: "embedded"`` no hub access happens. With ``"reference"`` the LLM comes from
    ``dsaa.hf_repo_id``/``revision`` through ``from_pretrained`` and must have the stored widths.

    Args:
        path: the checkpoint folder or its ``*.safetensors`` file.
        device, dtype: of the returned model (``dtype=None`` keeps the file's dtypes).
        text_llm: optional ``text_llm`` section; only ``attn_implementation`` and ``trust_remote_code`` are used.

    Returns:
        ``(model in eval mode, LLM tokenizer)``.
    """
    weights, config_path = find_weights(path)
    if config_path is None:
        raise FileNotFoundError(f"{weights}: no config.json beside it; not a DSAA checkpoint")
    raw = read_json_object(config_path)
    lm_kwargs, block_raw = _split_config(raw)
    if block_raw is None:
        raise ValueError(f"{config_path} has no 'dsaa' block; not a DSAA checkpoint")
    block = DSAABlock.from_dict(block_raw, config_path)
    spec = TextLLMSpec.from_args(text_llm) if text_llm is not None else TextLLMSpec()
    spec = TextLLMSpec(**{**asdict(spec), "hf_repo_id": block.hf_repo_id, "revision": block.revision})
    state = _cast(_load_tensors(weights), dtype)
    if block.llm_weights == "embedded":
        if not any(k.startswith("text_llm.") for k in state):
            raise FileNotFoundError(
                f"{weights}: {config_path.name} says dsaa.llm_weights is 'embedded' but the file holds no "
                "text_llm.* tensors: the checkpoint is missing its LLM (copy the complete checkpoint, or set "
                f"llm_weights to 'reference' to load the LLM from {block.hf_repo_id!r})"
            )
        llm = llm_from_config(block.llm_config, spec)
    else:
        llm = load_llm(spec, dtype=dtype or torch.float32)
        llm_state = {f"text_llm.{k}": v for k, v in llm.state_dict().items()}
        state.update({k: v for k, v in llm_state.items() if k not in state})
    _check_llm_widths(llm, block.text_dim, block.text_vocab, config_path, "dsaa.text_dim / dsaa.text_vocab")
    with torch.device("meta"):
        model = build_dsaa_model(
            lm_kwargs, llm, block.to_dict(), proj_hidden=block.proj_hidden, proj_dropout=block.proj_dropout
        )
    _load_strict(model, state, weights)
    tokenizer = load_llm_tokenizer(spec, weights.parent / block.tokenizer)
    return model.to(device).eval(), tokenizer


def _check_llm_widths(llm: nn.Module, text_dim: int, text_vocab: int, source: Path, what: str) -> None:
    d_l = int(llm.get_input_embeddings().weight.shape[1])
    vocab = int(llm.get_output_embeddings().weight.shape[0])
    if (d_l, vocab) != (text_dim, text_vocab):
        raise ValueError(
            f"{source}: width mismatch between the checkpoint and the LLM: {what} = ({text_dim}, {text_vocab}) "
            f"but the LLM has hidden_size {d_l} and {vocab} output rows"
        )


def load_fork_checkpoint(
    weights: str | Path,
    text_llm: Any,
    lm_kwargs: Mapping[str, Any],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[LMModel, Any]:
    """Loads a checkpoint in the DSAA fork's format (no ``dsaa`` block, ``text_projector.*`` tensors).

    The LLM and tokenizer come from the ``text_llm`` section, the special ids are resolved by its rules, and
    ``D_l``, ``V`` and ``H`` are read from the tensor shapes and checked against the LLM.
    """
    weights = Path(weights)
    spec = TextLLMSpec.from_args(text_llm)
    state = _cast(_load_tensors(weights), dtype)
    classify_state(state, weights, require="dsaa")
    d_l = int(state["text_projector.fusion.4.weight"].shape[0])
    hidden = int(state["text_projector.fusion.1.weight"].shape[0])
    vocab = int(state["text_head.weight"].shape[0])
    llm = load_llm(spec, dtype=dtype or torch.float32)
    _check_llm_widths(
        llm, d_l, vocab, weights, "text_projector.fusion.4.weight rows / text_head.weight rows (D_l, V)"
    )
    tokenizer = load_llm_tokenizer(spec)
    special = resolve_special_tokens(tokenizer, spec.pad_token, spec.epad_token, spec.bos_token)
    if not any(k.startswith("text_llm.") for k in state):
        state.update({f"text_llm.{k}": v for k, v in llm.state_dict().items()})
    with torch.device("meta"):
        model = build_dsaa_model(lm_kwargs, llm, special, proj_hidden=hidden, proj_dropout=spec.proj_dropout)
    _load_strict(model, state, weights)
    return model.to(device).eval(), tokenizer


def classify_state(state: Mapping[str, torch.Tensor], source: Path, require: str | None = None) -> str:
    """``"dsaa"`` (has ``text_projector.*``) or ``"moshi"`` (plain Moshi); ``require="dsaa"`` refuses Moshi."""
    kind = "dsaa" if any(k.startswith("text_projector.") for k in state) else "moshi"
    if require == "dsaa" and kind != "dsaa":
        raise ValueError(
            f"{source} is a plain Moshi checkpoint (no text_projector.* tensors) but text_llm.enable is true: "
            f"run `{SETUP_HINT}` first to build a DSAA checkpoint from it"
        )
    return kind


def load_dsaa_model(
    moshi_path: str | Path,
    text_llm: Any,
    lm_kwargs: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[LMModel, Any]:
    """Loads any DSAA-capable checkpoint for a config with ``text_llm.enable: true``.

    A folder or file with a ``config.json`` holding a ``dsaa`` block is a DSAA checkpoint; otherwise the file
    must be a fork checkpoint (``lm_kwargs`` from ``moshi_paths``; default: beside it or moshiko's); a plain
    Moshi checkpoint is an error that says to run ``setup_new_model``.
    """
    weights, config_path = find_weights(
        hf_get(str(moshi_path)) if isinstance(moshi_path, str) else moshi_path
    )
    raw = read_json_object(config_path) if config_path is not None else {}
    if "dsaa" in raw:
        return load_dsaa_checkpoint(weights, device=device, dtype=dtype, text_llm=text_llm)
    if lm_kwargs is None:
        lm_kwargs = _split_config(raw)[0] if raw else None
    if lm_kwargs is None:
        from .loaders import default_lm_kwargs

        lm_kwargs = default_lm_kwargs()
    return load_fork_checkpoint(weights, text_llm, lm_kwargs, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Saving


def dsaa_state_dict(
    model: LMModel, save_weights: bool = True, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a DSAA checkpoint: tied LLM duplicates dropped; no ``text_llm.*`` when not ``save_weights``.

    ``state_dict`` replaces ``model.state_dict()`` (the trainer passes the full state gathered from FSDP shards).
    """
    tied = {f"text_llm.{k}" for k in tied_llm_keys(model.text_llm.hf_model)}
    state = {}
    source = model.state_dict() if state_dict is None else state_dict
    for key, value in source.items():
        if key in tied or (not save_weights and key.startswith("text_llm.")):
            continue
        state[key] = value
    return state


def dsaa_config(
    model: LMModel, hf_repo_id: str, revision: str | None, save_weights: bool = True
) -> dict[str, Any]:
    """``config.json`` of a DSAA checkpoint: Moshi's LM keys (``text_card = V``) plus the ``dsaa`` block."""
    d = dsaa_dims(model)
    path = dsaa_path(model)
    llm_config = model.text_llm.config.to_dict()
    block = DSAABlock(
        hf_repo_id=hf_repo_id,
        revision=revision,
        llm_weights="embedded" if save_weights else "reference",
        llm_config=llm_config,
        text_dim=d.text_dim,
        text_vocab=d.text_vocab,
        pad_id=path.pad_id,
        epad_id=path.epad_id,
        bos_id=path.bos_id,
        proj_hidden=d.proj_hidden,
        proj_dropout=path.proj_dropout,
    )
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in path.moshi_config.items()}
    config["dsaa"] = block.to_dict()
    return config


def save_dsaa_checkpoint(
    model: LMModel,
    out_dir: str | Path,
    tokenizer: Any,
    hf_repo_id: str,
    revision: str | None = None,
    save_weights: bool = True,
    weights_name: str = "model.safetensors",
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Writes a DSAA checkpoint into ``out_dir`` (created if needed): weights, ``tokenizer/``, ``config.json``.

    Each item is written atomically (temporary name, then rename) and ``config.json`` comes last, so a folder
    with a ``config.json`` is always complete. Other files in ``out_dir`` are left alone (``weights/`` may also
    hold the source checkpoint).

    Args:
        model (LMModel): the model.
        out_dir: the checkpoint folder.
        tokenizer: the LLM tokenizer (saved with ``save_pretrained`` under ``tokenizer/``).
        hf_repo_id (str), revision (str | None): where the LLM came from (recorded in the ``dsaa`` block).
        save_weights (bool): embed the LLM tensors (else ``llm_weights: "reference"``).
        weights_name (str): ``model.safetensors`` (setup) or ``consolidated.safetensors`` (training).
        overwrite (bool): replace an existing checkpoint in ``out_dir`` (else ``FileExistsError``).
        dtype (torch.dtype | None): cast floating tensors before writing.
        state_dict (Mapping | None): the full state to write instead of ``model.state_dict()`` (e.g. gathered
            from FSDP shards; ``model`` then only provides the config).

    Returns:
        The folder.
    """
    if weights_name not in WEIGHT_NAMES:
        raise ValueError(f"weights_name must be one of {list(WEIGHT_NAMES)}, got {weights_name!r}")
    out = Path(out_dir)
    existing = [out / n for n in (weights_name, "config.json", TOKENIZER_DIR) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a checkpoint ({', '.join(p.name for p in existing)}); "
            "pass --force (overwrite=True) to replace it"
        )
    state = _cast(dsaa_state_dict(model, save_weights, state_dict), dtype)
    config = dsaa_config(model, hf_repo_id, revision, save_weights)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out / weights_name, state, metadata={"format": "pt"})
    with atomic_dir(out / TOKENIZER_DIR, overwrite=True) as tmp:
        tokenizer.save_pretrained(str(tmp))
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out
