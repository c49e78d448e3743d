"""The model family of a run, resolved once from the config: Moshi (``text_llm.enable: false``) or DSAA.

A family says everything the trainer needs to know about its model: how the weights are read and the ``meta``
skeleton is made (for :func:`finetune.model_build.build_model`, the one sharded build), which parameters
train and in which optimizer groups, the FSDP2 units, the loss, the text tokenizer of the data pipeline and
the writer of each checkpoint's export. The trainer itself has no family-specific code.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.args import TrainArgs
from finetune.checkpointing import ExportWriter, moshi_export_writer
from finetune.loss import MoshiLoss
from finetune.model_build import build_model, resolve_checkpoint_info, store_trained_in
from finetune.monitoring.flops import flops_per_frame, llm_flops_per_token
from moshi.models.dsaa import dsaa_param_groups, set_dsaa_trainable
from moshi.models.dsaa_loading import (
    DSAABlock,
    TextLLMSpec,
    build_dsaa_model,
    dsaa_config,
    find_weights,
    llm_from_config,
    load_dsaa_model,
    load_llm_tokenizer,
    save_dsaa_checkpoint,
)
from moshi.models.lm import LMModel
from moshi.models.loaders import CheckpointInfo, default_lm_kwargs, get_moshi_lm
from moshi.modules.lora import init_lora_for_training, replace_all_linear_with_lora
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer

logger = logging.getLogger(__name__)


class ModelFamily(ABC):
    """The parts common to both families; subclasses give the model-specific ones.

    Args:
        args (TrainArgs): the validated configuration.
        info (CheckpointInfo | None): the model files (default: resolved from ``moshi_paths``).
    """

    promotes_scalars = False

    def __init__(self, args: TrainArgs, info: CheckpointInfo | None = None) -> None:
        self.args = args
        self._info = info

    @property
    def info(self) -> CheckpointInfo:
        """The model files, resolved from ``moshi_paths`` on first use (a hub repo may be downloaded then)."""
        if self._info is None:
            self._info = resolve_checkpoint_info(self.args)
        return self._info

    # -- the build (see finetune.model_build.BuildSpec) ---------------------------------------------------

    @abstractmethod
    def source(self, dtype: torch.dtype) -> tuple[nn.Module, Any]:
        """The model with its weights on CPU (frozen tensors in ``dtype``) and a picklable description from
        which every rank builds the same skeleton; runs on rank 0 only under FSDP2."""

    @abstractmethod
    def skeleton(self, description: Any, dtype: torch.dtype) -> nn.Module:
        """The model with every parameter on ``meta``, from :meth:`source`'s description."""

    @abstractmethod
    def prepare(self, model: nn.Module, trained_dtype: torch.dtype) -> Any:
        """Marks the trained parameters and stores them in ``trained_dtype`` (the fp32 master weights on GPU)."""

    def fsdp_unit(self, model: nn.Module) -> Callable[[nn.Module], bool]:
        """Which modules become FSDP2 units: every Moshi transformer layer."""
        return lambda module: isinstance(module, StreamingTransformerLayer)

    def build(self, device: torch.device) -> nn.Module:
        """The model ready for the optimizer on ``device`` (sharded under FSDP2)."""
        return build_model(self, self.args, device)

    # -- what the trainer uses ----------------------------------------------------------------------------

    @abstractmethod
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW parameter groups (``params``, ``lr``, ``weight_decay``, ``name``); each ``lr`` is the peak of
        the one-cycle schedule."""

    def loss(self, model: nn.Module) -> MoshiLoss:
        """The weighted text + audio loss of ``model`` with the config's weights."""
        a = self.args
        return MoshiLoss.for_model(model, a.first_codebook_weight_multiplier, a.text_padding_weight)

    @abstractmethod
    def text_tokenizer(self, model: nn.Module) -> Any:
        """The tokenizer the data pipeline writes the text stream with (its ids are the model's)."""

    def base_config(self) -> dict[str, Any]:
        """The base model's raw ``config.json`` (moshiko's keys when the checkpoint has none)."""
        return dict(self.info.raw_config) if self.info.raw_config is not None else default_lm_kwargs()

    @abstractmethod
    def export_writer(self, model: nn.Module) -> ExportWriter:
        """The writer of each checkpoint's ``consolidated/`` folder: ``write(folder, full state, dtype)``."""

    @abstractmethod
    def flops_per_frame(self, frames: int) -> int:
        """Training FLOPs of one frame of a ``frames``-long sequence (for the logged MFU)."""


def model_family(args: TrainArgs, info: CheckpointInfo | None = None) -> ModelFamily:
    """The family ``args`` selects: DSAA with ``text_llm.enable``, else Moshi."""
    return (DSAAFamily if args.text_llm.enable else MoshiFamily)(args, info)


# ----------------------------------------------------------------------------- Moshi


class MoshiFamily(ModelFamily):
    """Kyutai's Moshi: LoRA on every Linear (``lora.enable``) or full fine-tuning, one AdamW group."""

    def _lm(self, device: torch.device | str, dtype: torch.dtype, load_weights: bool) -> LMModel:
        a = self.args
        model = get_moshi_lm(
            self.info.moshi_weights if load_weights else None, lm_kwargs=self.info.lm_config,
            device=device if load_weights else "meta", dtype=dtype,
            lm_kwargs_overrides={"gradient_checkpointing": a.gradient_checkpointing, "lora": False},
        )
        if a.lora is not None and a.lora.enable:
            replace_all_linear_with_lora(model, a.lora.rank, a.lora.scaling)
            if load_weights:
                init_lora_for_training(model)  # A kaiming-uniform, B = 0: starts exactly at the base model
        return model

    def source(self, dtype: torch.dtype) -> tuple[nn.Module, Any]:
        return self._lm("cpu", dtype, load_weights=True), None

    def skeleton(self, description: Any, dtype: torch.dtype) -> nn.Module:
        return self._lm("meta", dtype, load_weights=False)

    def is_trained(self, name: str) -> bool:
        """LoRA runs train names containing ``lora`` (+ ``emb`` with ``lora.ft_embed``); full fine-tuning all."""
        a = self.args
        if a.full_finetuning:
            return True
        return "lora" in name or (a.lora is not None and a.lora.ft_embed and "emb" in name)

    def prepare(self, model: nn.Module, trained_dtype: torch.dtype) -> None:
        for name, p in model.named_parameters():
            p.requires_grad_(self.is_trained(name))
        store_trained_in(model, trained_dtype)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """One group over the trained parameters at ``optim.lr`` / ``optim.weight_decay``."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: check lora.enable / full_finetuning")
        o = self.args.optim
        return [{"params": params, "lr": o.lr, "weight_decay": o.weight_decay, "name": "all"}]

    def text_tokenizer(self, model: nn.Module) -> Any:
        from finetune.data.text_tokenizer import load_text_tokenizer

        return load_text_tokenizer(self.args, spm_path=self.info.tokenizer)

    def flops_per_frame(self, frames: int) -> int:
        return flops_per_frame(default_lm_kwargs() | dict(self.info.lm_config or {}), frames)

    def export_writer(self, model: nn.Module) -> ExportWriter:
        """Kyutai's format: adapters (``lora.safetensors``), merged or full weights, plus ``config.json``."""
        a = self.args
        lora = a.lora is not None and a.lora.enable and not a.full_finetuning
        return moshi_export_writer(self.base_config(), lora, a.lora.rank if a.lora else 0,
                                   a.lora.scaling if a.lora else 0.0, a.save_adapters)


# ----------------------------------------------------------------------------- DSAA


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turns activation checkpointing of every Moshi transformer (temporal and depformer) on or off.

    A DSAA checkpoint's ``config.json`` carries no trainer setting, so ``gradient_checkpointing`` is applied
    after loading. The frozen temporal transformer saves no activations either way (nothing under it needs a
    gradient); the flag matters for the trained depformer.
    """
    for module in model.modules():
        if isinstance(module, StreamingTransformer):
            module.checkpointing = bool(enabled)


def dsaa_skeleton(config: Mapping[str, Any], spec: TextLLMSpec, dtype: torch.dtype) -> nn.Module:
    """A DSAA model with every parameter on ``meta`` (in ``dtype``) from a checkpoint ``config.json`` dict.

    Non-persistent buffers (the LLM's rotary frequencies) are real: no file holds them.
    """
    lm_kwargs = {k: v for k, v in config.items() if k != "dsaa"}
    block = DSAABlock.from_dict(dict(config["dsaa"]), Path("<config broadcast from rank 0>"))
    llm = llm_from_config(block.llm_config, spec)
    with torch.device("meta"):
        model = build_dsaa_model(lm_kwargs, llm, block.to_dict(), proj_hidden=block.proj_hidden,
                                 proj_dropout=block.proj_dropout, dtype=dtype)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.dtype != dtype and p.is_floating_point():
                module._parameters[name] = nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
    return model


class DSAAFamily(ModelFamily):
    """Moshi whose text stream goes through a frozen Hugging Face LLM (``text_llm.enable: true``).

    The weights come from ``moshi_paths.moshi_path``: a DSAA checkpoint (written by ``setup_new_model`` or by
    training) or a fork checkpoint with the YAML's ``text_llm`` section. The LLM never trains; the projectors
    form the ``proj`` group and the text head and depformer the ``finetune`` group (only the text projector
    and head with ``only_text``); under FSDP2 each Moshi layer and each LLM decoder layer is one unit. Exports
    are DSAA checkpoints that load with no hub access.
    """

    promotes_scalars = True  # the text projector's 0-dim gate `alpha`

    def __init__(self, args: TrainArgs, info: CheckpointInfo | None = None) -> None:
        super().__init__(args, info)
        self.spec = TextLLMSpec.from_args(args.text_llm)

    def _source_block(self) -> DSAABlock | None:
        """The ``dsaa`` block of the checkpoint named by ``moshi_paths`` (None for a fork checkpoint)."""
        _, config = find_weights(self.info.moshi_weights)
        if config is None:
            return None
        raw = json.loads(config.read_text(encoding="utf-8"))
        return DSAABlock.from_dict(raw["dsaa"], config) if "dsaa" in raw else None

    def source(self, dtype: torch.dtype) -> tuple[nn.Module, Any]:
        # For a fork checkpoint an explicit `moshi_paths.config_path` wins over the file beside the weights.
        lm_kwargs = self.info.lm_config if self.args.moshi_paths.config_path else None
        model, _ = load_dsaa_model(self.info.moshi_weights, self.args.text_llm, lm_kwargs, device="cpu", dtype=dtype)
        return model, dsaa_config(model, self.args.text_llm.hf_repo_id, self.args.text_llm.revision)

    def skeleton(self, description: Any, dtype: torch.dtype) -> nn.Module:
        return dsaa_skeleton(description, self.spec, dtype)

    def prepare(self, model: nn.Module, trained_dtype: torch.dtype) -> dict[str, list[str]]:
        """Sets the groups' trainability (returned: ``{"proj", "finetune", "frozen"}`` parameter names), stores
        trained tensors in ``trained_dtype`` and applies ``gradient_checkpointing``."""
        a = self.args
        groups = set_dsaa_trainable(model, a.only_text, a.text_llm.frozen_modules)
        store_trained_in(model, trained_dtype)
        set_gradient_checkpointing(model, a.gradient_checkpointing)
        counts = {g: sum(p.numel() for n, p in model.named_parameters() if n in set(names))
                  for g, names in groups.items()}
        logger.info("DSAA parameter groups%s: proj %s, finetune %s, frozen %s parameters",
                    " (only_text)" if a.only_text else "", f"{counts['proj']:,}", f"{counts['finetune']:,}",
                    f"{counts['frozen']:,}")
        return groups

    def fsdp_unit(self, model: nn.Module) -> Callable[[nn.Module], bool]:
        """Every Moshi ``StreamingTransformerLayer`` and every decoder layer of the LLM.

        The LLM's layer classes are the ones ``transformers`` itself refuses to split (``_no_split_modules``,
        e.g. ``Qwen2DecoderLayer``), so any architecture works without naming it here.
        """
        hf_model = model.text_llm.hf_model  # type: ignore[union-attr]
        names = set(getattr(hf_model, "_no_split_modules", None) or ())
        if not names:
            raise ValueError(f"{type(hf_model).__name__} declares no decoder layer class "
                             "(_no_split_modules); it cannot be sharded layer by layer")
        return lambda module: isinstance(module, StreamingTransformerLayer) or type(module).__name__ in names

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """``proj`` at ``optim.proj_lr``/``proj_wd`` and ``finetune`` at ``optim.finetune_lr``/``finetune_wd``;
        frozen tensors (LLM, Moshi's temporal part, ``text_llm.frozen_modules``) are in no group."""
        a = self.args
        groups = dsaa_param_groups(model, a.only_text, a.text_llm.frozen_modules)
        o = a.optim
        out = []
        for name, (lr, wd) in {"proj": (o.proj_lr, o.proj_wd), "finetune": (o.finetune_lr, o.finetune_wd)}.items():
            params = [p for _, p in groups[name] if p.requires_grad]
            if params:
                out.append({"params": params, "lr": lr, "weight_decay": wd, "name": name})
        if not out:
            raise ValueError("no trainable DSAA parameters: text_llm.frozen_modules freezes every trained module")
        return out

    def loss(self, model: nn.Module) -> MoshiLoss:
        """Moshi's loss with the audio terms off with ``only_text`` and on every ``audio_loss_skip_every``-th step."""
        a = self.args
        return MoshiLoss.for_model(model, a.first_codebook_weight_multiplier, a.text_padding_weight,
                                   only_text=a.only_text, audio_loss_skip_every=a.audio_loss_skip_every)

    def flops_per_frame(self, frames: int) -> int:
        """Moshi's part (its text head excluded) plus the LLM's decoder layers and head, per frame."""
        _, config_path = find_weights(self.info.moshi_weights)
        raw = json.loads(config_path.read_text(encoding="utf-8")) if config_path is not None else {}
        lm = default_lm_kwargs() | dict(self.info.lm_config or {}) | {k: v for k, v in raw.items() if k != "dsaa"}
        moshi = flops_per_frame(lm | {"text_card": 0, "text_card_out": 0}, frames)
        block = self._source_block()
        return moshi + (0 if block is None else llm_flops_per_token(block.llm_config, frames))

    def tokenizer_dir(self) -> Path | None:
        """The ``tokenizer/`` folder of the DSAA checkpoint named by ``moshi_paths``, if it has one."""
        block = self._source_block()
        if block is None:
            return None
        folder = find_weights(self.info.moshi_weights)[0].parent / block.tokenizer
        return folder if folder.is_dir() else None

    def text_tokenizer(self, model: nn.Module) -> Any:
        """The checkpoint's ``tokenizer/`` (else ``text_llm.hf_repo_id``), its PAD/EPAD/initial ids checked
        against the model's (they were fixed when the checkpoint was set up).

        Raises:
            ValueError: an id differs; the message names the ``text_llm`` key that changed it.
        """
        from finetune.data.text_tokenizer import load_text_tokenizer

        folder = self.tokenizer_dir()
        tok = load_text_tokenizer(self.args, hf_path=str(folder) if folder is not None else None)
        pairs = (("pad_token", tok.pad_id, model.text_padding_token_id),
                 ("epad_token", tok.epad_id, model.end_of_text_padding_id),
                 ("bos_token", tok.bos_id, model.text_initial_token_id))
        bad = [f"text_llm.{key}: id {got} from the tokenizer, {want} in the model checkpoint"
               for key, got, want in pairs if int(got) != int(want)]
        if bad:
            raise ValueError(f"{self.info.moshi_weights}: special text ids differ from the checkpoint's ("
                             + "; ".join(bad) + "); remove these keys or set them as when setup_new_model ran")
        return tok

    def export_writer(self, model: nn.Module) -> ExportWriter:
        """Writes each export as a DSAA checkpoint (weights, ``config.json`` with the ``dsaa`` block,
        ``tokenizer/``); the block records where the LLM came from (the source checkpoint's
        ``hf_repo_id``/``revision``, else the YAML's)."""
        block = self._source_block()
        spec = self.spec
        repo, revision = (block.hf_repo_id, block.revision) if block is not None else (spec.hf_repo_id, spec.revision)
        tokenizer = load_llm_tokenizer(spec, self.tokenizer_dir())

        def write(folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
            for name in getattr(model, "fsdp_promoted_scalars", ()):
                state[name] = state[name].reshape(())
            save_dsaa_checkpoint(model, folder, tokenizer, hf_repo_id=repo, revision=revision,  # type: ignore[arg-type]
                                 save_weights=spec.save_weights, weights_name="consolidated.safetensors",
                                 overwrite=True, dtype=dtype, state_dict=state)

        return write
