"""The one sharded build every model family goes through, and the dtype policy it applies.

Dtype policy (why): on CUDA the frozen weights stay in `param_dtype` (bf16: half the memory) while the
*trained* parameters are stored in float32 — they are the master weights AdamW updates — and FSDP2's
`MixedPrecisionPolicy` all-gathers everything in bf16 for compute and reduces gradients in fp32, one
mechanism that also works sharded. On CPU everything is float32: bf16 matmuls are slow there and tests want
exact numbers.

Build order: weights are read on rank 0 only; every rank builds the model on `meta`, sets trainability and
dtypes, shards it, allocates its shard (`to_empty`) and receives rank 0's tensors by broadcast
(`set_model_state_dict(..., broadcast_from_rank0=True)`), so a 7B model is never materialised once per rank
in host memory. One process without FSDP loads the model directly and moves it to its device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from finetune.args import TrainArgs
from finetune.distributed import (
    apply_fsdp,
    broadcast_object,
    get_rank,
    get_world_size,
    register_forward_train,
    uses_fsdp,
)
from moshi.models.loaders import CheckpointInfo
from moshi.modules.transformer import StreamingTransformerLayer
from moshi.utils.dtypes import DTYPES

logger = logging.getLogger(__name__)

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


def store_trained_in(model: nn.Module, trained_dtype: torch.dtype) -> None:
    """Stores every parameter with ``requires_grad`` in `trained_dtype` (frozen ones keep their dtype)."""
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and p.dtype != trained_dtype:
                module._parameters[pname] = nn.Parameter(p.detach().to(trained_dtype), requires_grad=True)


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


def promote_scalar_parameters(model: nn.Module) -> list[str]:
    """Replaces every 0-dim parameter by a 1-element vector; returns their names.

    FSDP2 cannot shard 0-dim parameters; a product such as ``alpha * x`` broadcasts the same either way. The
    names are kept on the model (``fsdp_promoted_scalars``) so exports can write the 0-dim tensors back.
    """
    names = []
    for mname, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and p.dim() == 0:
                module._parameters[pname] = nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)
                names.append(f"{mname}.{pname}" if mname else pname)
    model.fsdp_promoted_scalars = names  # type: ignore[assignment]
    return names


def allocate(model: nn.Module, device: torch.device) -> nn.Module:
    """``to_empty(device)`` that keeps the values of real non-persistent buffers (no file holds them, e.g. an
    LLM's rotary frequencies); parameters are left uninitialised for the caller to load or fill."""
    buffers = {}
    for mname, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is not None and bname in module._non_persistent_buffers_set and not buf.is_meta:
                buffers[f"{mname}.{bname}" if mname else bname] = buf.detach().clone()
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    return model


class BuildSpec(Protocol):
    """What a model family tells the build: how the source and the skeleton are made, what trains, the units.

    ``source`` runs on rank 0 only (or in the single process) and returns the model with its weights on CPU,
    plus a picklable description every rank turns into a ``meta`` skeleton with ``skeleton``.
    """

    promotes_scalars: bool  # 0-dim parameters become 1-element vectors under FSDP2

    def source(self, dtype: torch.dtype) -> tuple[nn.Module, Any]: ...

    def skeleton(self, description: Any, dtype: torch.dtype) -> nn.Module: ...

    def prepare(self, model: nn.Module, trained_dtype: torch.dtype) -> None: ...  # trainability + dtypes

    def fsdp_unit(self, model: nn.Module) -> Callable[[nn.Module], bool]: ...


def build_model(spec: BuildSpec, args: TrainArgs, device: torch.device) -> nn.Module:
    """The model of ``spec`` ready for the optimizer: weights loaded, trainability set, sharded if applicable.

    Under FSDP2 (CUDA, or several processes) every rank shards a ``meta`` skeleton and receives rank 0's
    weights by broadcast; ``forward_train`` is registered as a forward method, so parameters are gathered
    around it as around ``forward`` (the loss calls it).
    """
    policy = dtype_policy(args.param_dtype, device)
    if not uses_fsdp(device):
        model, _ = spec.source(policy.frozen)
        spec.prepare(model, policy.trained)
        model.to(device)
        if args.compile:
            compile_layers(model)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full_sd: dict[str, torch.Tensor] = {}
        description: Any = None
        if get_rank() == 0:
            source, description = spec.source(policy.frozen)
            full_sd = source.state_dict()
            del source
        description = broadcast_object(description)
        model = spec.skeleton(description, policy.frozen)
        spec.prepare(model, policy.trained)
        if args.compile:
            compile_layers(model)
        promoted = promote_scalar_parameters(model) if spec.promotes_scalars else []
        apply_fsdp(model, device, spec.fsdp_unit(model), compute_dtype=policy.compute)
        register_forward_train(model)
        allocate(model, device)
        for name in promoted:
            if name in full_sd:
                full_sd[name] = full_sd[name].reshape(1)
        set_model_state_dict(
            model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        )
        del full_sd
    _log_parameter_counts(model, device, policy)
    return model


def _log_parameter_counts(model: nn.Module, device: torch.device, policy: DtypePolicy) -> None:
    scale = get_world_size() if uses_fsdp(device) else 1  # sharded: each rank holds about 1/world of each tensor
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad) * scale
    n_all = sum(p.numel() for p in model.parameters()) * scale
    logger.info("%s out of %s parameters are fine-tuned (%.2f%%) [frozen %s, trained %s, compute %s]",
                f"{n_train:,}", f"{n_all:,}", 100 * n_train / max(n_all, 1), policy.frozen, policy.trained,
                policy.compute or "storage dtype")
