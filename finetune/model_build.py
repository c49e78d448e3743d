"""The LM as the trainer needs it: loaded through `moshi.models.loaders`, LoRA-ised or fully trainable,
sharded when useful, with a dtype policy per device.

Dtype policy (why): on CUDA the frozen weights stay in `param_dtype` (bf16: half the memory) while the
*trained* parameters are stored in float32 — they are the master weights AdamW updates — and FSDP2's
`MixedPrecisionPolicy` all-gathers everything in bf16 for compute and reduces gradients in fp32. This
replaces upstream's manual fp32 master copies (swap before `optimizer.step()`, copy back after) with one
mechanism that also works sharded, and saves the bf16 copy of trained parameters. On CPU everything is
float32: bf16 matmuls are slow there and tests want exact numbers.

The build order follows torchtitan: weights are read on rank 0 only; every rank builds the model on
`meta`, sets trainability and dtypes, shards it, allocates its shard (`to_empty`) and receives rank 0's
tensors by broadcast (`set_model_state_dict(..., broadcast_from_rank0=True)`), so a 7B model is never
materialised once per rank in host memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune.args import TrainArgs
from finetune.distributed import apply_fsdp, get_rank, get_world_size, register_forward_train, uses_fsdp
from moshi.models.lm import LMModel
from moshi.models.loaders import CheckpointInfo, get_moshi_lm
from moshi.modules.lora import init_lora_for_training, replace_all_linear_with_lora
from moshi.modules.transformer import StreamingTransformerLayer

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class DtypePolicy:
    """Storage dtype of frozen weights, of trained weights, the compute dtype and the export dtype."""

    frozen: torch.dtype
    trained: torch.dtype
    compute: torch.dtype | None  # None: no casting (compute in the storage dtype)
    export: torch.dtype


def dtype_policy(param_dtype: str, device: torch.device) -> DtypePolicy:
    """See the module docstring. `param_dtype` is validated by `TrainArgs` (bfloat16 or float32)."""
    export = DTYPES[param_dtype]
    if device.type != "cuda":
        if export != torch.float32:
            logger.info("param_dtype %s on %s: training in float32 (exports are saved as %s)",
                        param_dtype, device.type, param_dtype)
        return DtypePolicy(torch.float32, torch.float32, None, export)
    compute = export if export != torch.float32 else None
    return DtypePolicy(export, torch.float32, compute, export)


def resolve_checkpoint_info(args: TrainArgs) -> CheckpointInfo:
    """Model files from `moshi_paths` (hub repo, local folder, or explicit paths)."""
    p = args.moshi_paths
    if p.hf_repo_id is None:
        missing = [k for k in ("moshi_path", "mimi_path", "tokenizer_path", "config_path") if getattr(p, k) is None]
        if missing:
            raise ValueError(f"moshi_paths.hf_repo_id is null, so moshi_paths.{', moshi_paths.'.join(missing)} "
                             "must be set")
    return CheckpointInfo.from_hf_repo(
        p.hf_repo_id or "", moshi_weights=p.moshi_path, mimi_weights=p.mimi_path,
        tokenizer=p.tokenizer_path, config_path=p.config_path,
    )


def is_trainable_name(name: str, args: TrainArgs) -> bool:
    """Upstream's rule: LoRA runs train names containing `lora` (+ `emb` with `lora.ft_embed`); full FT all."""
    if args.full_finetuning:
        return True
    return "lora" in name or (args.lora is not None and args.lora.ft_embed and "emb" in name)


def _set_trainable(model: nn.Module, args: TrainArgs, trained_dtype: torch.dtype) -> None:
    """Marks trained parameters and stores them in `trained_dtype` (the fp32 master weights on GPU)."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable_name(name, args))
    store_trained_in(model, trained_dtype)


def store_trained_in(model: nn.Module, trained_dtype: torch.dtype) -> None:
    """Stores every parameter with ``requires_grad`` in `trained_dtype` (frozen ones keep their dtype)."""
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and p.dtype != trained_dtype:
                module._parameters[pname] = nn.Parameter(p.detach().to(trained_dtype), requires_grad=True)


def _build_lm(
    info: CheckpointInfo, args: TrainArgs, device: torch.device | str, dtype: torch.dtype, load_weights: bool
) -> LMModel:
    """The base LM (weights from the file if `load_weights`, else on `meta`), LoRA-ised for LoRA runs."""
    overrides = {"gradient_checkpointing": args.gradient_checkpointing, "lora": False}
    model = get_moshi_lm(
        info.moshi_weights if load_weights else None,
        lm_kwargs=info.lm_config,
        device=device if load_weights else "meta",
        dtype=dtype,
        lm_kwargs_overrides=overrides,
    )
    if args.lora is not None and args.lora.enable:
        replace_all_linear_with_lora(model, args.lora.rank, args.lora.scaling)
        if load_weights:
            init_lora_for_training(model)  # A kaiming-uniform, B = 0: starts exactly at the base model
    return model


def transformer_layer_units(model: nn.Module) -> list[type]:
    """Module classes that become FSDP units (the DSAA trainer appends its LLM decoder-layer class)."""
    return [StreamingTransformerLayer]


def build_model(
    args: TrainArgs,
    info: CheckpointInfo,
    device: torch.device,
    fsdp_units: Sequence[type] | Callable[[nn.Module], bool] | None = None,
) -> nn.Module:
    """The model, ready for the optimizer: weights loaded, trainability set, sharded if applicable."""
    policy = dtype_policy(args.param_dtype, device)
    world = get_world_size()
    if not uses_fsdp(device):
        model = _build_lm(info, args, "cpu", policy.frozen, load_weights=True)
        _set_trainable(model, args, policy.trained)
        model.to(device)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full_sd: dict[str, torch.Tensor] = {}
        if get_rank() == 0:
            source = _build_lm(info, args, "cpu", policy.frozen, load_weights=True)
            full_sd = source.state_dict()
            del source
        model = _build_lm(info, args, "meta", policy.frozen, load_weights=False)
        _set_trainable(model, args, policy.trained)
        if args.compile:
            compile_layers(model)
        apply_fsdp(model, device, fsdp_units or transformer_layer_units(model), compute_dtype=policy.compute)
        register_forward_train(model)
        model.to_empty(device=device)
        set_model_state_dict(
            model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        )
        del full_sd
    if args.compile and not uses_fsdp(device):
        compile_layers(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad) * (world if uses_fsdp(device) else 1)
    n_all = sum(p.numel() for p in model.parameters()) * (world if uses_fsdp(device) else 1)
    logger.info("%s out of %s parameters are fine-tuned (%.2f%%) [%s; frozen %s, trained %s, compute %s]",
                f"{n_train:,}", f"{n_all:,}", 100 * n_train / max(n_all, 1),
                "full fine-tuning" if args.full_finetuning else "LoRA",
                policy.frozen, policy.trained, policy.compute or "storage dtype")
    return model


def compile_layers(model: nn.Module) -> None:
    """`torch.compile` each transformer layer in place (names unchanged, so checkpoints are unaffected).

    Layers rather than the whole model: the layer is the repeated unit (one compilation reused 32×), and it
    keeps FSDP2's per-layer hooks outside the compiled graphs.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, StreamingTransformerLayer):
            module.compile()
            n += 1
    logger.info("torch.compile: %d transformer layers", n)


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def default_param_groups(model: nn.Module, args: TrainArgs) -> list[dict[str, Any]]:
    """AdamW groups: upstream's single group (`optim.lr`, `optim.weight_decay`) over the trained params.

    The DSAA trainer passes its own function with the same signature (proj / finetune groups).
    """
    params = [p for _, p in trainable_named_parameters(model)]
    if not params:
        raise ValueError("no trainable parameters: check lora.enable / full_finetuning")
    return [{"params": params, "lr": args.optim.lr, "weight_decay": args.optim.weight_decay, "name": "all"}]
