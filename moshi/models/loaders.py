"""The only code that turns a hub repo, a ``hf://`` URL or a local path into models, with Kyutai's names and
signatures (``CheckpointInfo``, ``get_moshi_lm``, ``hf_get``, ...).

Hub access goes through ``huggingface_hub.hf_hub_download`` and only happens for names that are not local paths,
so everything works offline with local files. The LM is built on the ``meta`` device and its weights are assigned
from the safetensors file, so a 7B model never exists twice in memory.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .._unsupported import unsupported_names
from ..modules.lora import (
    LoRALinear,
    init_lora_for_training,
    replace_all_linear_with_lora,
    replace_lora_with_linear,
)
from .compression import DEFAULT_MIMI_CONFIG, MimiModel, build_mimi
from .lm import LMModel

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
FRAME_RATE = 12.5

TEXT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
MOSHI_NAME = "model.safetensors"
MOSHI_Q8_NAME = "model.q8.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"

# Moshiko-7B (``configs/moshi_7b_202409.json`` without the deprecated ``depformer_causal``). Read-only: take a
# mutable copy with :func:`default_lm_kwargs`.
DEFAULT_LM_KWARGS: MappingProxyType[str, Any] = MappingProxyType(
    {
        "dim": 4096,
        "text_card": 32000,
        "existing_text_padding_id": 3,
        "n_q": 16,
        "dep_q": 8,
        "card": 2048,
        "num_heads": 32,
        "num_layers": 32,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "context": 3000,
        "max_period": 10000,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": 1024,
        "depformer_dim_feedforward": 4224,
        "depformer_num_heads": 16,
        "depformer_num_layers": 6,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_context": 8,
        "depformer_max_period": 10000,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "delays": (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1),
    }
)
# Kyutai's private name, kept for code written against their package (read-only here).
_lm_kwargs = DEFAULT_LM_KWARGS

# Keys of a repo's config.json that describe files and runtime settings rather than the LM (popped, with defaults).
_NON_LM_CONFIG_KEYS: dict[str, Any] = {
    "moshi_name": MOSHI_NAME,
    "mimi_name": MIMI_NAME,
    "mimi_config_name": None,
    "tokenizer_name": TEXT_TOKENIZER_NAME,
    "lora_name": None,
    "model_type": "moshi",
    "lm_gen_config": {},
    "tts_config": {},
    "stt_config": {},
    "model_id": {},
}


def default_lm_kwargs() -> dict[str, Any]:
    """A fresh, mutable copy of :data:`DEFAULT_LM_KWARGS` (lists instead of tuples, JSON-serialisable)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in DEFAULT_LM_KWARGS.items()}


def hf_get(
    filename: str | Path,
    hf_repo: str | None = None,
    check_local_file_exists: bool = False,
    revision: str | None = None,
) -> Path:
    """Resolves a file reference to a local path, downloading from the hub only when needed.

    - a ``Path`` is returned as is;
    - ``"hf://owner/repo/path/in/repo"`` is downloaded from that repo;
    - ``"file://..."`` is a local path;
    - a plain name with ``hf_repo`` is downloaded from ``hf_repo`` (or used locally if
      ``check_local_file_exists`` and it exists; a local directory ``hf_repo`` is read directly);
    - a plain string without ``hf_repo`` is a local path.
    """
    if isinstance(filename, Path):
        return filename
    if filename.startswith("hf://"):
        parts = filename[len("hf://") :].split("/")
        if len(parts) < 3:
            raise ValueError(f"expected hf://owner/repo/path, got {filename!r}")
        return _download("/".join(parts[:2]), "/".join(parts[2:]), revision)
    if filename.startswith("file://"):
        return Path(filename[len("file://") :])
    if hf_repo is not None:
        if check_local_file_exists and Path(filename).exists():
            return Path(filename)
        if Path(hf_repo).is_dir():
            return Path(hf_repo) / filename
        return _download(hf_repo, filename, revision)
    return Path(filename)


def _download(repo: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename, revision=revision))


def _config_file(hf_repo: str, revision: str | None) -> Path | None:
    """The repo's ``config.json``, or ``None`` when the repo has none (not when the hub is unreachable)."""
    if Path(hf_repo).is_dir():
        path = Path(hf_repo) / "config.json"
        return path if path.exists() else None
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return _download(hf_repo, "config.json", revision)
    except EntryNotFoundError:
        return None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a config); errors name the file and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass
class CheckpointInfo:
    """Where a Moshi-family checkpoint's files are, and its configs; resolved once by :meth:`from_hf_repo`.

    Attributes:
        moshi_weights (Path), mimi_weights (Path), tokenizer (Path): local files.
        lm_config (dict | None): ``LMModel`` kwargs (``None``: moshiko defaults).
        raw_config (dict | None): the repo's config.json as read.
        mimi_config (dict | None): Mimi config read from the repo, if it names one.
        model_type (str): ``"moshi"``, ``"hibiki"`` or ``"stt"``.
        lora_weights (Path | None): LoRA-only safetensors file.
        lm_gen_config, tts_config, stt_config, model_id (dict): runtime settings from config.json.
    """

    moshi_weights: Path
    mimi_weights: Path
    tokenizer: Path
    lm_config: dict[str, Any] | None = None
    raw_config: dict[str, Any] | None = None
    mimi_config: dict[str, Any] | None = None
    model_type: str = "moshi"
    lora_weights: Path | None = None
    lm_gen_config: dict[str, Any] = field(default_factory=dict)
    tts_config: dict[str, Any] = field(default_factory=dict)
    stt_config: dict[str, Any] = field(default_factory=dict)
    model_id: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_hf_repo(
        hf_repo: str,
        moshi_weights: Path | str | None = None,
        mimi_weights: Path | str | None = None,
        tokenizer: Path | str | None = None,
        config_path: Path | str | None = None,
        mimi_config_path: Path | str | None = None,
        lora_weights: Path | str | None = None,
        revision: str | None = None,
    ) -> CheckpointInfo:
        """Resolves the files of ``hf_repo`` (a hub id or a local directory).

        Explicit arguments override the repo's files and are resolved without the repo (local paths or
        ``hf://`` URLs). A repo without ``config.json`` gets the moshiko-7B config and default file names.
        """
        if config_path is None:
            resolved = _config_file(hf_repo, revision)
        else:
            resolved = hf_get(config_path)
        if resolved is None:
            logger.warning("%s has no config.json: using the moshiko-7B defaults", hf_repo)
            raw_config = None
            lm_config = None
            meta = copy.deepcopy(_NON_LM_CONFIG_KEYS)
        else:
            raw_config = read_json_object(resolved)
            lm_config = copy.deepcopy(raw_config)
            meta = {key: lm_config.pop(key, copy.deepcopy(default)) for key, default in _NON_LM_CONFIG_KEYS.items()}

        def resolve(explicit: Path | str | None, name: str | None) -> Path | None:
            if explicit is not None:
                return hf_get(explicit)
            if name is None:
                return None
            return hf_get(name, hf_repo, revision=revision)

        mimi_config = None
        if mimi_config_path is not None:
            mimi_config = read_json_object(hf_get(mimi_config_path))
        elif meta["mimi_config_name"] is not None:
            mimi_config = read_json_object(hf_get(meta["mimi_config_name"], hf_repo, revision=revision))

        def resolve_required(explicit: Path | str | None, key: str) -> Path:
            path = resolve(explicit, meta[key])
            if path is None:
                raise ValueError(f"config.json of {hf_repo}: {key!r} is null")
            return path

        return CheckpointInfo(
            moshi_weights=resolve_required(moshi_weights, "moshi_name"),
            mimi_weights=resolve_required(mimi_weights, "mimi_name"),
            tokenizer=resolve_required(tokenizer, "tokenizer_name"),
            lm_config=lm_config,
            raw_config=raw_config,
            mimi_config=mimi_config,
            model_type=meta["model_type"],
            lora_weights=resolve(lora_weights, meta["lora_name"]),
            lm_gen_config=meta["lm_gen_config"],
            tts_config=meta["tts_config"],
            stt_config=meta["stt_config"],
            model_id=meta["model_id"],
        )

    def get_moshi(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        load_weight: bool = True,
        **kwargs: Any,
    ) -> LMModel:
        """Builds the LM (``get_moshi_lm`` with this checkpoint's config and LoRA file)."""
        model = get_moshi_lm(
            self.moshi_weights if load_weight else None,
            lm_kwargs=self.lm_config,
            device=device,
            dtype=dtype,
            lora_weights=self.lora_weights,
            **kwargs,
        )
        if self.model_type == "hibiki":
            # Hibiki checkpoints expect the text embedding of id 2 to be that of id 3.
            with torch.no_grad():
                model.text_emb.weight[2] = model.text_emb.weight[3]
        return model

    def get_text_tokenizer(self) -> Any:
        """The SentencePiece text tokenizer of this checkpoint."""
        return get_text_tokenizer(self.tokenizer)

    def get_mimi(self, device: torch.device | str = "cpu") -> MimiModel:
        """Builds Mimi with this checkpoint's weights and config, keeping as many codebooks as the LM uses.

        That is :func:`mimi_codebooks_for_lm`, halved for multistream TTS.
        """
        num_codebooks = mimi_codebooks_for_lm(self.lm_config)
        if self.tts_config.get("multistream"):
            num_codebooks //= 2
        return get_mimi(self.mimi_weights, self.mimi_config, device=device, num_codebooks=num_codebooks)


def mimi_codebooks_for_lm(lm_config: Mapping[str, Any] | None) -> int:
    """How many Mimi codebooks feed an LM: ``max(dep_q, n_q - dep_q)`` of its config, 8 without one.

    The LM's ``n_q`` audio streams are the model's ``dep_q`` streams followed by the other speaker's, each a
    prefix of one Mimi encoding, so the larger of the two groups is the number of codebooks to encode.
    Missing keys take moshiko's values.
    """
    if lm_config is None:
        return 8
    defaults = default_lm_kwargs()
    n_q = int(lm_config.get("n_q", defaults["n_q"]))
    dep_q = int(lm_config.get("dep_q", defaults["dep_q"]))
    return max(dep_q, n_q - dep_q)


def get_text_tokenizer(path: str | Path) -> Any:
    """Loads a SentencePiece model (``sentencepiece.SentencePieceProcessor``)."""
    import sentencepiece

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text tokenizer not found: {path}")
    return sentencepiece.SentencePieceProcessor(str(path))  # type: ignore[call-arg]


def _prepare_lm_kwargs(
    lm_kwargs: dict[str, Any] | MappingProxyType | None, lm_kwargs_overrides: dict[str, Any]
) -> tuple[dict[str, Any], bool, int, float]:
    """Turns a checkpoint's ``config.json`` into ``LMModel`` keywords, on a copy: drops the non-model keys, renames
    ``demux_second_stream``, merges the overrides; returns ``(kwargs, lora, lora_rank, lora_scaling)``."""
    kwargs = default_lm_kwargs() if lm_kwargs is None else copy.deepcopy(dict(lm_kwargs))
    conditioners = kwargs.pop("conditioners", None)
    if conditioners:
        raise NotImplementedError("config key 'conditioners': conditioned models are not supported")
    if kwargs.pop("fuser", None) is not None:
        raise NotImplementedError("config key 'fuser': conditioned models are not supported")
    kwargs.update(copy.deepcopy(dict(lm_kwargs_overrides)))
    kwargs.pop("depformer_causal", None)
    if "demux_second_stream" in kwargs:
        kwargs["demux_second_text_stream"] = kwargs.pop("demux_second_stream")
    lora = bool(kwargs.pop("lora", False))
    lora_rank = int(kwargs.pop("lora_rank", 128))
    lora_scaling = float(kwargs.pop("lora_scaling", 2.0))
    return kwargs, lora, lora_rank, lora_scaling


def _load_file(filename: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    if not filename.exists():
        raise FileNotFoundError(f"weights file not found: {filename}")
    if filename.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(filename), device=str(device))
    package = torch.load(filename, map_location=device, weights_only=True)
    try:
        return package["fsdp_best_state"]["model"]
    except (KeyError, TypeError):
        raise ValueError(f"{filename}: not a safetensors file nor a training package with fsdp_best_state") from None


def _cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            keep_f32 = key.startswith(("condition_provider.", "fuser."))
            value = value.to(torch.float32 if keep_f32 else dtype)
        out[key] = value
    return out


def check_state_dict_keys(source: object, missing: list[str], unexpected: list[str], model: str = "the model") -> None:
    """Raises one ValueError listing (the first 20 of) each kind of key mismatch, naming the file."""
    if missing or unexpected:
        missing, unexpected = sorted(missing), sorted(unexpected)
        raise ValueError(
            f"{source} does not match {model}: {len(missing)} missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, {len(unexpected)} unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )


def _load_lora(
    model: nn.Module, lora_weights: Path, device: torch.device | str, dtype: torch.dtype, strict: bool = False
) -> None:
    """Loads a LoRA-only file into a LoRA-ised model.

    Unexpected keys and shape mismatches (another ``lora_rank``, another architecture) are fatal. Missing LoRA
    factors are fatal with ``strict``; otherwise they get the no-op fine-tuning init (B = 0) so the model stays
    equal to its base there.
    """
    if lora_weights.suffix != ".safetensors":
        raise ValueError(f"LoRA weights must be a .safetensors file, got {lora_weights}")
    state = _cast_floats(_load_file(lora_weights, device), dtype)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(
            f"{lora_weights}: LoRA tensor shapes do not match the base model with the config's lora_rank: {e}"
        ) from None
    missing = [k for k in result.missing_keys if ".lora_A." in k or ".lora_B." in k]
    if strict:
        check_state_dict_keys(lora_weights, missing, result.unexpected_keys, model="the LoRA layers of the base model")
    elif result.unexpected_keys:
        raise RuntimeError(f"{lora_weights}: unexpected keys in LoRA weights: {result.unexpected_keys}")
    untouched = 0
    for module in model.modules():
        if isinstance(module, LoRALinear) and (module.lora_A.weight.is_meta or module.lora_B.weight.is_meta):
            module.lora_A.to_empty(device=device)
            module.lora_B.to_empty(device=device)
            init_lora_for_training(module)
            untouched += 1
    if untouched:
        logger.warning("%s: %d LoRA layers had no weights and start as no-ops", lora_weights, untouched)


def get_lora_moshi(
    model: LMModel,
    lora_weights: str | Path | None,
    lora_rank: int,
    lora_scaling: float,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    fuse_lora: bool = True,
    *,
    strict: bool = False,
) -> LMModel:
    """Turns every Linear of ``model`` into a LoRA layer and, given a LoRA file, loads it.

    Without ``lora_weights`` the new factors are created on ``device`` in each Linear's dtype with PyTorch's
    default init (``lora_B`` is not zero: call :func:`~moshi.modules.lora.init_lora_for_training` before
    fine-tuning) and stay separate, so ``dtype`` and ``fuse_lora`` are unused. With a file, the factors are read
    from it (floats cast to ``dtype``), the model is moved to ``device``/``dtype`` and, with ``fuse_lora``, the
    factors are folded back into plain Linears.

    Args:
        model (LMModel): the base model; modified in place and returned.
        lora_weights (str | Path | None): LoRA-only local safetensors file.
        lora_rank (int), lora_scaling (float): rank and output scale of the LoRA factors.
        dtype, device: of the loaded model.
        fuse_lora (bool): fold the loaded factors into the base weights.
        strict (bool): a Linear without factors in the file is an error (else it starts as a no-op).

    Raises:
        ValueError: the file is not a ``.safetensors`` file, its shapes do not match, or (``strict``) keys are
            missing or unexpected (listed, with the file name).
        RuntimeError: the file has keys the model does not.
    """
    if lora_weights is None:
        replace_all_linear_with_lora(model, lora_rank, lora_scaling, device=device)
        return model
    lora_path = Path(lora_weights)
    replace_all_linear_with_lora(model, lora_rank, lora_scaling, device="meta", dtype=dtype)
    _load_lora(model, lora_path, device, dtype, strict=strict)
    model.to(device=device, dtype=dtype)
    if fuse_lora:
        replace_lora_with_linear(model)
    return model


def get_moshi_lm(
    filename: str | Path | None,
    lm_kwargs: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    lora_weights: str | Path | None = None,
    fuse_lora: bool = False,
    lm_kwargs_overrides: dict[str, Any] | None = None,
    *,
    strict_lora: bool = False,
) -> LMModel:
    """Builds the Moshi LM and loads its weights.

    Args:
        filename (str | Path | None): safetensors weights (legacy or current attention names), a training package
            (``torch.load``-able, ``["fsdp_best_state"]["model"]``), or ``None`` for fresh weights.
        lm_kwargs (dict | None): ``LMModel`` config (``None``: moshiko-7B). May contain ``lora``, ``lora_rank``,
            ``lora_scaling``, ``demux_second_stream`` and ``depformer_causal`` (dropped).
        device, dtype: of the model; floating weights are cast to ``dtype``.
        lora_weights (str | Path | None): LoRA-only safetensors file; needs ``"lora": true`` in the config.
        fuse_lora (bool): fold the LoRA factors read from ``lora_weights`` into plain Linears.
        lm_kwargs_overrides (dict | None): merged over ``lm_kwargs``.
        strict_lora (bool): every LoRA factor must be in ``lora_weights`` (see :func:`get_lora_moshi`).

    Raises:
        ValueError: the weights do not match the config (missing/unexpected keys listed), or LoRA weights were
            given while the config has no ``"lora": true``.
        RuntimeError: the LoRA file has keys the model does not.
    """
    kwargs, lora, lora_rank, lora_scaling = _prepare_lm_kwargs(lm_kwargs, lm_kwargs_overrides or {})
    if lora_weights is not None and not lora:
        raise ValueError(
            f"LoRA weights {lora_weights} were given but the config has no \"lora\": true "
            "(add it, with lora_rank and lora_scaling, to the config)"
        )
    path = None if filename is None else hf_get(filename)
    model = LMModel(device="meta" if path is not None else device, dtype=dtype, **kwargs)
    if path is not None:
        state = _cast_floats(_load_file(path, device), dtype)
        result = model.load_state_dict(state, strict=False, assign=True)
        check_state_dict_keys(path, result.missing_keys, result.unexpected_keys)
    if lora:
        lora_path = None if lora_weights is None else hf_get(lora_weights)
        model = get_lora_moshi(
            model, lora_path, lora_rank, lora_scaling, dtype=dtype, device=device, fuse_lora=fuse_lora,
            strict=strict_lora,
        )
    return model.eval()


# --- Mimi ---

# Mimi's configuration for Kyutai's published weights; ``_mimi_config`` is the name Kyutai's package exports.
MIMI_CONFIG = DEFAULT_MIMI_CONFIG
_mimi_config = DEFAULT_MIMI_CONFIG


def _load_mimi_file(filename: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    if not filename.exists():
        raise FileNotFoundError(f"Mimi weights file not found: {filename}")
    if filename.suffix in (".safetensors", ".sft", ".sfts"):
        from safetensors.torch import load_file

        return load_file(str(filename), device=str(device))
    package = torch.load(filename, map_location=device, weights_only=True)
    if not isinstance(package, dict) or "model" not in package:
        raise ValueError(f"{filename}: not a safetensors file nor a training package with a 'model' entry")
    return package["model"]


def get_mimi(
    filename: str | Path | None,
    mimi_config: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    num_codebooks: int = 8,
) -> MimiModel:
    """Builds Mimi (float32, eval mode) and loads its weights, e.g. ``tokenizer-e351c8d8-checkpoint125.safetensors``.

    Args:
        filename (str | Path | None): safetensors weights (current or legacy attention/codebook names), a
            ``torch.load``-able package with a ``"model"`` entry, or ``None`` for an untrained model.
        mimi_config (dict | None): config shaped like ``MIMI_CONFIG`` (``None``: Kyutai's Mimi).
        device (torch.device | str): where the model lives.
        num_codebooks (int): codebooks :meth:`MimiModel.encode` returns.

    Raises:
        FileNotFoundError: the weights file does not exist.
        ValueError: the file does not match the config (missing/unexpected keys listed), or the config is bad.
    """
    path = None if filename is None else hf_get(filename)
    if path is None:
        model = build_mimi(mimi_config, device=device)
    else:
        model = build_mimi(mimi_config, device="meta")
        state = _load_mimi_file(path, device)
        result = model.load_state_dict(state, strict=False, assign=True)
        check_state_dict_keys(path, result.missing_keys, result.unexpected_keys)
    model.set_num_codebooks(num_codebooks)
    return model.eval()


# Loader functions of Kyutai's package for conditioned (TTS) models, which this package does not build.
__getattr__ = unsupported_names(
    __name__,
    {
        name: "conditioner construction for TTS and conditioned generation"
        for name in ("get_conditioner", "get_conditioner_provider", "get_condition_fuser")
    },
)
