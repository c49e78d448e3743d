"""What the trainer needs to train a DSAA model (``text_llm.enable: true``; contract: ``shared/design/dsaa.md``).

The trainer keeps one loop; when ``text_llm.enable`` is true it takes these pieces instead of Moshi's:

* :func:`build_dsaa_for_training`: the model from ``moshi_paths.moshi_path`` (a DSAA checkpoint written by
  ``setup_new_model`` or by training, or a fork checkpoint with the YAML ``text_llm`` section) through
  :func:`moshi.models.dsaa_loading.load_dsaa_model`; the contract's groups decide what trains (the LLM is
  frozen and never gets a ``.grad``); under FSDP2 each Moshi transformer layer and each LLM decoder layer is
  one unit.
* :func:`dsaa_param_groups`: AdamW groups ``proj`` (``proj_lr``/``proj_wd``) and ``finetune``
  (``finetune_lr``/``finetune_wd``); the trainer's OneCycleLR gives each group its own ``max_lr``.
* :class:`DSAALoss`: Moshi's weighted CE, but the 150k-vocabulary text CE is computed in row chunks from the
  text head's input (``chunked_linear_cross_entropy``), so ``[B, T, V]`` float32 logits never exist; the
  audio loss is left out on every ``audio_loss_skip_every``-th step and with ``only_text``.
* :func:`dsaa_export_writer`: each checkpoint's ``consolidated/`` folder in the contract's format
  (``consolidated.safetensors`` + ``config.json`` with the ``dsaa`` block + ``tokenizer/``), loadable by
  ``load_dsaa_model`` with no hub access.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.args import TrainArgs
from finetune.distributed import apply_fsdp, broadcast_object, get_rank, register_forward_train, uses_fsdp
from finetune.loss import LossTerms, train_output_loss_terms
from finetune.trainer import MoshiLoss
from finetune.wrapped_model import compile_layers, dtype_policy, store_trained_in
from moshi.models.dsaa import dsaa_param_groups as _dsaa_groups
from moshi.models.dsaa import set_dsaa_trainable
from moshi.models.dsaa_loading import (
    TOKENIZER_DIR,
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
from moshi.models.lm import LMModel as DSAAModel
from moshi.models.loaders import CheckpointInfo
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the model


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turns activation checkpointing of every Moshi transformer (temporal and depformer) on or off.

    A DSAA checkpoint's ``config.json`` carries no trainer setting, so ``gradient_checkpointing`` is applied
    after loading. The frozen temporal transformer saves no activations either way (nothing under it needs a
    gradient); the flag matters for the trained depformer.
    """
    for module in model.modules():
        if isinstance(module, StreamingTransformer):
            module.checkpointing = bool(enabled)


def prepare_for_training(model: DSAAModel, args: TrainArgs, trained_dtype: torch.dtype) -> dict[str, list[str]]:
    """Freezes and unfreezes by the contract's groups and stores trained tensors in ``trained_dtype``.

    Returns:
        ``{"proj": names, "finetune": names, "frozen": names}`` (``moshi.models.dsaa.set_dsaa_trainable``).
    """
    groups = set_dsaa_trainable(model, args.only_text, args.text_llm.frozen_modules)
    store_trained_in(model, trained_dtype)
    set_gradient_checkpointing(model, args.gradient_checkpointing)
    counts = {g: sum(p.numel() for n, p in model.named_parameters() if n in set(names))
              for g, names in groups.items()}
    logger.info("DSAA parameter groups%s: proj %s, finetune %s, frozen %s parameters",
                " (only_text)" if args.only_text else "", f"{counts['proj']:,}", f"{counts['finetune']:,}",
                f"{counts['frozen']:,}")
    return groups


def dsaa_fsdp_units(model: DSAAModel) -> Callable[[nn.Module], bool]:
    """FSDP2 units: every Moshi ``StreamingTransformerLayer`` and every decoder layer of the LLM.

    The LLM's layer classes are the ones ``transformers`` itself refuses to split (``_no_split_modules``,
    e.g. ``Qwen2DecoderLayer``), so any architecture works without naming it here.
    """
    names = set(getattr(model.text_llm.hf_model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(model.text_llm.hf_model).__name__} declares no decoder layer class "
                         "(_no_split_modules); it cannot be sharded layer by layer")

    def is_unit(module: nn.Module) -> bool:
        return isinstance(module, StreamingTransformerLayer) or type(module).__name__ in names

    return is_unit


def _lm_kwargs_override(args: TrainArgs, info: CheckpointInfo) -> dict[str, Any] | None:
    """Moshi kwargs for a fork checkpoint: an explicit ``moshi_paths.config_path`` wins over the file beside it."""
    return info.lm_config if args.moshi_paths.config_path else None


def _source_block(info: CheckpointInfo) -> DSAABlock | None:
    """The ``dsaa`` block of the checkpoint named by ``moshi_paths`` (None for a fork checkpoint)."""
    import json

    _, config = find_weights(info.moshi_weights)
    if config is None:
        return None
    raw = json.loads(config.read_text(encoding="utf-8"))
    return DSAABlock.from_dict(raw["dsaa"], config) if "dsaa" in raw else None


def skeleton_from_config(config: Mapping[str, Any], spec: TextLLMSpec, dtype: torch.dtype) -> DSAAModel:
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


def promote_scalar_parameters(model: nn.Module) -> list[str]:
    """Replaces every 0-dim parameter (``text_projector.alpha``) by a 1-element vector; returns their names.

    FSDP2 cannot shard 0-dim parameters. The product ``alpha * fusion(z)`` broadcasts the same either way;
    the names are kept on the model (``fsdp_promoted_scalars``) so exports write the contract's 0-dim tensor.
    """
    names = []
    for mname, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and p.dim() == 0:
                module._parameters[pname] = nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)
                names.append(f"{mname}.{pname}" if mname else pname)
    model.fsdp_promoted_scalars = names  # type: ignore[assignment]
    return names


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mname, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is not None and bname in module._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = buf.detach().clone()
    return out


def build_dsaa_for_training(args: TrainArgs, info: CheckpointInfo, device: torch.device) -> DSAAModel:
    """The DSAA model ready for the optimizer (the trainer's ``build_model_fn`` when ``text_llm.enable``).

    One process without CUDA: loaded on CPU, groups set, moved to ``device``. With FSDP2 (CUDA, or several
    processes), as Moshi's ``build_model``: rank 0 reads the checkpoint, every rank builds a ``meta``
    skeleton from rank 0's ``config.json`` dict, sets the groups and dtypes, shards (Moshi layers + LLM decoder
    layers), allocates its shard and receives rank 0's tensors by broadcast.
    """
    policy = dtype_policy(args.param_dtype, device)
    lm_kwargs = _lm_kwargs_override(args, info)
    if not uses_fsdp(device):
        model, _ = load_dsaa_model(info.moshi_weights, args.text_llm, lm_kwargs, device="cpu", dtype=policy.frozen)
        prepare_for_training(model, args, policy.trained)
        model.to(device)
        if args.compile:
            compile_layers(model)
        return model

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full_sd: dict[str, torch.Tensor] = {}
    config: dict[str, Any] | None = None
    if get_rank() == 0:
        source, _ = load_dsaa_model(info.moshi_weights, args.text_llm, lm_kwargs, device="cpu",
                                    dtype=policy.frozen)
        full_sd = source.state_dict()
        config = dsaa_config(source, args.text_llm.hf_repo_id, args.text_llm.revision)
        del source
    config = broadcast_object(config)  # type: ignore[assignment]
    assert config is not None
    model = skeleton_from_config(config, TextLLMSpec.from_args(args.text_llm), policy.frozen)
    prepare_for_training(model, args, policy.trained)
    materialize(model, args, device)
    for name in model.fsdp_promoted_scalars:
        if name in full_sd:
            full_sd[name] = full_sd[name].reshape(1)
    set_model_state_dict(
        model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )
    del full_sd
    return model


def materialize(model: DSAAModel, args: TrainArgs, device: torch.device) -> DSAAModel:
    """Shards a ``meta`` skeleton (groups already set) when FSDP2 applies and allocates it on ``device``.

    Parameters are left uninitialised (the caller loads or fills them); non-persistent buffers, which
    ``to_empty`` would also wipe, keep their values. Under FSDP, 0-dim parameters become 1-element vectors
    (:func:`promote_scalar_parameters`) and ``forward_train`` is registered as a forward method, so the
    parameters are unsharded around it as around ``forward`` (the loss calls it).
    """
    policy = dtype_policy(args.param_dtype, device)
    buffers = _non_persistent_buffers(model)
    if args.compile:
        compile_layers(model)
    if uses_fsdp(device):
        promote_scalar_parameters(model)
        apply_fsdp(model, device, dsaa_fsdp_units(model), compute_dtype=policy.compute)
        register_forward_train(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    return model


# ----------------------------------------------------------------------------- optimizer groups


def dsaa_param_groups(model: nn.Module, args: TrainArgs) -> list[dict[str, Any]]:
    """AdamW groups of the contract: ``proj`` at ``optim.proj_lr``/``proj_wd``, ``finetune`` at
    ``optim.finetune_lr``/``finetune_wd``. Frozen tensors (LLM, Moshi's temporal part, ``frozen_modules``)
    are in no group. The trainer's OneCycleLR uses each group's ``lr`` as its ``max_lr``."""
    groups = _dsaa_groups(model, args.only_text, args.text_llm.frozen_modules)
    o = args.optim
    settings = {"proj": (o.proj_lr, o.proj_wd), "finetune": (o.finetune_lr, o.finetune_wd)}
    out = []
    for name, (lr, wd) in settings.items():
        params = [p for _, p in groups[name] if p.requires_grad]
        if params:
            out.append({"params": params, "lr": lr, "weight_decay": wd, "name": name})
    if not out:
        raise ValueError("no trainable DSAA parameters: text_llm.frozen_modules freezes every trained module")
    return out


# ----------------------------------------------------------------------------- loss


class DSAALoss(MoshiLoss):
    """Moshi's loss terms for a DSAA model, with the text CE computed in chunks.

    Text: ``Σ w · CE(text_head(text_hidden))`` with PAD and EPAD (the model's ids) weighted by
    ``text_padding_weight``. Audio: as Moshi's (codebook 0 times ``first_codebook_weight_multiplier``).
    In training (``model.training``) the audio terms are 0 when ``only_text`` is set, and on steps where
    ``step % audio_loss_skip_every == 0`` (1-based step, announced by :meth:`begin_step`); evaluation always
    reports both.
    """

    def __init__(self, delays: list[int], dep_q: int, first_codebook_weight_multiplier: float,
                 text_padding_weight: float, text_padding_ids: tuple[int, ...], only_text: bool = False,
                 audio_loss_skip_every: int = 0, chunk_rows: int | None = None) -> None:
        super().__init__(delays, dep_q, first_codebook_weight_multiplier, text_padding_weight, text_padding_ids)
        self.only_text = only_text
        self.skip_every = audio_loss_skip_every
        self.chunk_rows = chunk_rows
        self.audio_off = only_text

    @classmethod
    def for_model(cls, model: nn.Module, args: TrainArgs) -> DSAALoss:
        return cls(list(model.delays), model.dep_q, args.first_codebook_weight_multiplier,
                   args.text_padding_weight, (model.text_padding_token_id, model.end_of_text_padding_id), only_text=args.only_text,
                   audio_loss_skip_every=args.audio_loss_skip_every)

    def skips_audio(self, step: int) -> bool:
        """Whether training step ``step`` (1-based) leaves the audio loss out."""
        return self.only_text or (self.skip_every > 0 and step % self.skip_every == 0)

    def begin_step(self, step: int) -> None:
        """Called by the trainer before each optimizer step's first forward."""
        self.audio_off = self.skips_audio(step)

    def weight_sums(self, codes: torch.Tensor) -> torch.Tensor:
        sums = super().weight_sums(codes)
        return sums * sums.new_tensor([1.0, 0.0]) if self.audio_off else sums

    def __call__(self, model: nn.Module, codes: torch.Tensor) -> LossTerms:
        out = model.forward_train(codes)  # type: ignore[operator]
        with_audio = not (self.audio_off and model.training)
        return train_output_loss_terms(out, codes, self.beta, self.alpha, self.pad_ids, self.chunk_rows, with_audio)


# ----------------------------------------------------------------------------- tokenizer and export


def dsaa_tokenizer_dir(info: CheckpointInfo) -> Path | None:
    """The ``tokenizer/`` folder of the DSAA checkpoint named by ``moshi_paths``, if it has one."""
    block = _source_block(info)
    if block is None:
        return None
    folder = find_weights(info.moshi_weights)[0].parent / block.tokenizer
    return folder if folder.is_dir() else None


def dsaa_text_tokenizer(args: TrainArgs, info: CheckpointInfo, model: nn.Module) -> Any:
    """The data pipeline's tokenizer: the checkpoint's ``tokenizer/`` (else ``text_llm.hf_repo_id``), with
    its PAD/EPAD/initial ids checked against the model's (they were fixed when the checkpoint was set up).

    Raises:
        ValueError: an id differs; the message names the ``text_llm`` key that changed it.
    """
    from finetune.data.text_tokenizer import load_text_tokenizer

    folder = dsaa_tokenizer_dir(info)
    tok = load_text_tokenizer(args, hf_path=str(folder) if folder is not None else None)
    pairs = (("pad_token", tok.pad_id, model.text_padding_token_id),
             ("epad_token", tok.epad_id, model.end_of_text_padding_id),
             ("bos_token", tok.bos_id, model.text_initial_token_id))
    bad = [f"text_llm.{key}: id {got} from the tokenizer, {want} in the model checkpoint"
           for key, got, want in pairs if int(got) != int(want)]
    if bad:
        raise ValueError(f"{info.moshi_weights}: special text ids differ from the checkpoint's ("
                         + "; ".join(bad) + "); remove these keys or set them as when setup_new_model ran")
    return tok


ExportWriter = Callable[[Path, dict[str, torch.Tensor], torch.dtype], None]


def dsaa_export_writer(args: TrainArgs, info: CheckpointInfo, model: nn.Module) -> ExportWriter:
    """``write(folder, full_state, dtype)`` for the checkpointer: the contract's checkpoint format.

    ``full_state`` is the gathered (unsharded) state dict; the config's ``dsaa`` block records where the LLM
    came from (the source checkpoint's ``hf_repo_id``/``revision``, else the YAML's).
    """
    spec = TextLLMSpec.from_args(args.text_llm)
    block = _source_block(info)
    repo, revision = (block.hf_repo_id, block.revision) if block is not None else (spec.hf_repo_id, spec.revision)
    tokenizer = load_llm_tokenizer(spec, dsaa_tokenizer_dir(info))

    def write(folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        for name in getattr(model, "fsdp_promoted_scalars", ()):
            state[name] = state[name].reshape(())
        save_dsaa_checkpoint(model, folder, tokenizer, hf_repo_id=repo, revision=revision,  # type: ignore[arg-type]
                             save_weights=spec.save_weights, weights_name="consolidated.safetensors",
                             overwrite=True, dtype=dtype, state_dict=state)

    return write


__all__ = [
    "TOKENIZER_DIR", "DSAALoss", "build_dsaa_for_training", "dsaa_export_writer",
    "dsaa_fsdp_units", "dsaa_param_groups", "materialize", "promote_scalar_parameters", "dsaa_text_tokenizer", "dsaa_tokenizer_dir", "prepare_for_training",
    "set_gradient_checkpointing", "skeleton_from_config",
]
