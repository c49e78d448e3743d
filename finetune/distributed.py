"""Process group, device choice and FSDP2 sharding: the only place that knows about ranks.

* One process without torchrun works (world size 1, no process group): tests and the CPU demo.
* Under torchrun (``WORLD_SIZE`` > 1 or ``LOCAL_RANK`` set) a process group is created: NCCL on
  GPUs, gloo on CPU. The device comes from ``LOCAL_RANK`` and ``torch.cuda.device_count()``;
  ``CUDA_VISIBLE_DEVICES`` is not required.
* FSDP2 (``fully_shard``) wraps each transformer layer, then the root. It runs on gloo too (checked),
  so CPU multi-process tests exercise the same code path as GPUs. On CUDA, even with one GPU, it
  also provides mixed precision: fp32 sharded parameters (the master weights), bf16 compute,
  fp32 gradient reduction.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

ModulePredicate = Callable[[nn.Module], bool]


def launched_with_torchrun() -> bool:
    """True when the environment asks for a process group (torchrun or a hand-set equivalent)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def select_device(prefer: str | None = None) -> torch.device:
    """``cuda:LOCAL_RANK`` (modulo the visible devices) when CUDA is available, else CPU.

    Args:
        prefer (str | None): ``cpu`` forces the CPU; ``cuda`` requires a GPU (error if absent);
            None or ``auto`` picks automatically.
    """
    if prefer not in (None, "auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto/cpu/cuda, got {prefer!r}")
    if prefer == "cpu" or (prefer in (None, "auto") and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    # One visible GPU per process (SLURM style) → index 0; otherwise the local rank.
    index = 0 if count == 1 else local_rank
    if index >= count:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> None:
    """Creates the default process group: under torchrun (env:// rendezvous), and for a single process on
    CUDA (an in-memory store, world size 1) because FSDP2 (our mixed precision) needs one. No-op otherwise."""
    if is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    if launched_with_torchrun():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    elif device.type == "cuda":
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    else:
        return
    logger.info("process group: backend %s, rank %d / %d, device %s", backend, get_rank(), get_world_size(), device)


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (identity on one process); returns ``t``."""
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t).div_(get_world_size())


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s Python object on every rank (e.g. a decision only rank 0 can make)."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on at least one rank (so every rank takes the same branch)."""
    if not is_initialized() or get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def uses_fsdp(device: torch.device) -> bool:
    """FSDP2 is applied with several processes, and on CUDA always (it carries the mixed precision)."""
    return get_world_size() > 1 or device.type == "cuda"


def layer_predicate(classes: Sequence[type] | ModulePredicate) -> ModulePredicate:
    """A predicate from module classes (or a predicate, returned unchanged)."""
    if callable(classes) and not isinstance(classes, (list, tuple)):
        return classes  # type: ignore[return-value]
    cls_tuple = tuple(classes)  # type: ignore[arg-type]
    return lambda m: isinstance(m, cls_tuple)


def apply_fsdp(
    model: nn.Module,
    device: torch.device,
    units: Sequence[type] | ModulePredicate,
    compute_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shards ``model`` with FSDP2: every module matching ``units`` is one unit, then the root.

    Args:
        model (nn.Module): parameters already in their storage dtype (fp32 for trained ones).
        device (torch.device): this rank's device (the mesh's device type).
        units: module classes (e.g. ``[StreamingTransformerLayer]``; DSAA adds the LLM's decoder layer
            class) or a predicate. Units must not nest.
        compute_dtype (torch.dtype | None): if set, parameters are all-gathered in this dtype
            (bf16 compute) and gradients reduced in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (get_world_size(),))
    kwargs: dict = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if compute_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # FSDP2 warns that the root returns views (LMOutput's fields); the trainer never edits them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    pred = layer_predicate(units)
    n = 0
    for module in model.modules():
        if module is not model and pred(module):
            fully_shard(module, **kwargs)
            n += 1
    fully_shard(model, **kwargs)
    logger.info("FSDP2: %d layer units + root, mesh %s×%d, compute dtype %s",
                n, device.type, get_world_size(), compute_dtype or "storage dtype")
    return model


def register_forward_train(model: nn.Module) -> None:
    """Makes a sharded model's ``forward_train`` behave like ``forward`` under FSDP2.

    The losses call ``forward_train`` (parameters must be all-gathered around it, as around ``forward``) and
    then multiply by the text head's weight after it returns, so the root unit, which owns the text head,
    stays unsharded until its backward (it would be re-gathered for that backward anyway).
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(model, "forward_train")
    model.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clips to a global L2 norm over all ranks' shards; returns that norm (a plain 0-dim tensor).

    ``torch.nn.utils.clip_grad_norm_`` is DTensor-aware: with FSDP2 the per-shard norms are
    reduced over the mesh before clipping, so every rank clips by the same global norm.
    """
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, error_if_nonfinite=False, foreach=None)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t
