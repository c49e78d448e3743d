"""Checkpoints: Kyutai-compatible exports plus a resumable training state.

Layout of one checkpoint (`consolidated/` is the export that `moshi.models.loaders` and
`moshi.server` load; `resume/` is the training state a `resume: true` run reads)::

    run_dir/checkpoints/checkpoint_000500/
        consolidated/
            lora.safetensors | consolidated.safetensors   # keys sorted, in param_dtype
            config.json                                   # base config + lora, lora_rank, lora_scaling
        resume/
            .metadata, __*_*.distcp   # torch.distributed.checkpoint: trained params + AdamW state, sharded
            rank_00000.pt ...         # per rank: RNG states, data-loader position, scheduler, counters
            trainer.json              # step, world size, the config keys a resume must not change
            COMPLETE                  # written last: the checkpoint is usable

Write protocol: everything goes to `checkpoints/.checkpoint_000500.tmp/`, then rank 0 renames it to
`checkpoint_000500` in one `os.replace`. A kill or a full disk at any point leaves the previous
checkpoints untouched; a stale `.tmp` folder is ignored and removed by the next save. Retention keeps
the `num_ckpt_keep` highest step numbers (not file times, which copies and restores change).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.distributed import any_rank, barrier, get_rank, get_world_size, is_main
from moshi.modules.lora import merge_lora_state_dict
from moshi.utils.atomic import atomic_save_safetensors, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^checkpoint_(\d{6,})$")
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and what is still usable."""


def _dcp_exception_types() -> tuple[type[BaseException], ...]:
    """`torch.distributed.checkpoint` reports write failures with an exception outside `Exception`."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # a torch build without distributed support
        return (Exception,)
    return (Exception, CheckpointException)


def root_causes(error: BaseException) -> list[BaseException]:
    """The exceptions behind `error`: the per-rank failures a DCP exception wraps, else `error` itself."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, Mapping) and failures:
        out = []
        for item in failures.values():
            exc = item[0] if isinstance(item, tuple) else item
            out.extend(root_causes(exc) if isinstance(exc, BaseException) else [])
        return out or [error]
    return [error]


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` (or a failure it wraps, or its cause) is "no space left on device" or a quota."""
    seen: set[int] = set()
    todo = [error] if error is not None else []
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        todo.extend(c for c in root_causes(e) if c is not e)
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    return False


def describe_error(error: BaseException) -> str:
    """One line per underlying failure (no traceback), e.g. ``OSError: [Errno 28] No space left on device``."""
    return "; ".join(f"{type(c).__name__}: {c}" for c in root_causes(error))


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder` (0 when it does not exist)."""
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


class ResumeMismatchError(ValueError):
    """The config of a resumed run differs from the checkpoint's in keys that matter (named)."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of finished checkpoint folders, sorted by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_resumable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose `resume/COMPLETE` marker exists, else None."""
    for _, p in reversed(list_checkpoints(run_dir)):
        if (p / "resume" / COMPLETE).is_file():
            return p
    return None


# ----------------------------------------------------------------------------- exports


def export_config(base_config: Mapping[str, Any], lora: bool, lora_rank: int, lora_scaling: float) -> dict[str, Any]:
    """`config.json` of an export: the base model's raw config with `lora`, `lora_rank`, `lora_scaling` set.

    Merged and full exports say `"lora": false`: with true, `moshi` would wrap the merged weights in
    fresh, randomly initialised LoRA layers.
    """
    cfg = dict(base_config)
    cfg["lora"] = bool(lora)
    cfg["lora_rank"] = int(lora_rank)
    cfg["lora_scaling"] = float(lora_scaling)
    return cfg


ExportWriter = Callable[[Path, dict[str, torch.Tensor], torch.dtype], None]


def moshi_export_writer(base_config: Mapping[str, Any], lora: bool, lora_rank: int, lora_scaling: float,
                        save_adapters: bool) -> ExportWriter:
    """``write(folder, full state, dtype)`` of a Moshi export that Kyutai's loaders read.

    LoRA runs write the adapters (``lora.safetensors``) or, without ``save_adapters``, the weights with the
    adapters merged in; full fine-tuning writes every weight (both ``consolidated.safetensors``). Next to the
    weights goes the base model's ``config.json`` amended by :func:`export_config`.
    """
    adapters = lora and save_adapters
    name = "lora.safetensors" if adapters else "consolidated.safetensors"

    def write(folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        if lora and not save_adapters:
            state = merge_lora_state_dict(state, lora_scaling)
        tensors = {k: state[k].to(dtype) if state[k].is_floating_point() else state[k] for k in sorted(state)}
        atomic_save_safetensors(folder / name, tensors)
        cfg = export_config(base_config, adapters, lora_rank, lora_scaling)
        atomic_write_text(folder / "config.json", json.dumps(cfg, indent=4))

    return write


def gather_export_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0 (empty elsewhere); a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    sd = get_model_state_dict(model, options=opts)
    return dict(sd) if is_main() else {}


# ----------------------------------------------------------------------------- per-rank state


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU/CUDA, numpy, Python), as tensors and plain Python values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["accelerator"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "accelerator" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["accelerator"])


def _to_safe(obj: Any) -> Any:
    """Makes a state loadable with `torch.load(weights_only=True)`: numpy arrays/scalars → tensors/Python."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_safe(v) for v in obj)
    return obj


def _from_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj and set(obj) == {"__ndarray__", "dtype"}:
            return obj["__ndarray__"].numpy().astype(obj["dtype"])
        return {k: _from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_from_safe(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and restores checkpoints of one run (see the module docstring for the layout).

    Args:
        run_dir (str | Path): the run folder.
        model (nn.Module): the (possibly FSDP2-sharded) model.
        optimizer (torch.optim.Optimizer): its optimizer.
        base_config (dict): the base model's raw `config.json` (written, amended, next to the exports).
        lora (bool): LoRA run (adapters exported; only trained params in the resume state).
        lora_rank (int), lora_scaling (float): written to `config.json`; `lora_scaling` is used to merge.
        save_adapters (bool): LoRA runs: export `lora.safetensors` (else merged `consolidated.safetensors`).
        export_dtype (torch.dtype): dtype of exported tensors (`param_dtype`).
        num_ckpt_keep (int | None): newest checkpoints kept (None: all).
        fingerprint (dict): config keys a resume must not change (`TrainArgs.resume_fingerprint()`).
        export_writer (callable | None): ``(folder, full state, export dtype) -> None`` writing the export
            (the model family's `export_writer`); None: :func:`moshi_export_writer` from the LoRA settings.
        fault_hook (callable | None): called as ``hook("before_rename", step)`` once a checkpoint's files are
            written and before it becomes visible (the crash tests kill the process there).
    """

    def __init__(
        self,
        run_dir: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        base_config: Mapping[str, Any],
        lora: bool,
        lora_rank: int,
        lora_scaling: float,
        save_adapters: bool,
        export_dtype: torch.dtype,
        num_ckpt_keep: int | None,
        fingerprint: Mapping[str, Any],
        export_writer: ExportWriter | None = None,
        fault_hook: Callable[[str, int], None] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.model = model
        self.optimizer = optimizer
        self.base_config = dict(base_config)
        self.lora = lora
        self.lora_rank = lora_rank
        self.lora_scaling = lora_scaling
        self.save_adapters = save_adapters
        self.export_dtype = export_dtype
        self.num_ckpt_keep = num_ckpt_keep
        self.fingerprint = json.loads(json.dumps(dict(fingerprint)))
        self.export_writer = export_writer or moshi_export_writer(
            self.base_config, lora, lora_rank, lora_scaling, save_adapters)
        self.fault_hook = fault_hook

    # -- model / optimizer state (sharded, DCP) --------------------------------------------------------------

    def _dcp_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(ignore_frozen_params=self.lora)
        return {
            "model": get_model_state_dict(self.model, options=opts),
            "optim": get_optimizer_state_dict(self.model, self.optimizer, options=opts),
        }

    # -- save ----------------------------------------------------------------------------------------------

    @property
    def export_name(self) -> str:
        return "lora.safetensors" if self.lora and self.save_adapters else "consolidated.safetensors"

    def _warn_if_low_on_space(self, root: Path) -> None:
        """Warns when the free space under `root` is below the size of the last checkpoint (plus 10%)."""
        last = list_checkpoints(self.run_dir)
        if not last:
            return
        needed = folder_bytes(last[-1][1])
        free = shutil.disk_usage(root).free
        if free < needed * 1.1:
            logger.warning(
                "low disk space: %.2f GiB free under %s, the last checkpoint took %.2f GiB; this checkpoint may "
                "fail (free space, or lower num_ckpt_keep)", free / 2**30, root, needed / 2**30)

    def save(self, step: int, rank_state: Mapping[str, Any]) -> Path:
        """Writes checkpoint `step` (a collective: every rank calls it); returns its folder.

        Args:
            step (int): optimizer steps done.
            rank_state (dict): this rank's non-sharded state (scheduler, data position, counters...);
                RNG states are added here. Tensors, numpy arrays and plain Python values only.

        Raises:
            CheckpointError: a write failed (e.g. disk full) on some rank; nothing of this checkpoint
                remains and earlier ones are untouched.
        """
        import torch.distributed.checkpoint as dcp

        final = checkpoint_dir(self.run_dir, step)
        tmp = final.with_name(f".{final.name}.tmp")
        catchable = _dcp_exception_types()
        error: BaseException | None = None
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            for stale in final.parent.glob(".checkpoint_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            self._warn_if_low_on_space(final.parent)
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                error = e
        barrier()
        if not any_rank(error is not None):
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                    dcp.save(self._dcp_state(), checkpoint_id=str(tmp / "resume"))
                state = dict(rank_state)
                state["rng"] = rng_state()
                torch.save(_to_safe(state), tmp / "resume" / f"rank_{get_rank():05d}.pt")
            except catchable as e:  # re-raised below on every rank as CheckpointError
                error = e
        export: dict[str, torch.Tensor] = {}
        if not any_rank(error is not None):
            export = gather_export_state(self.model, trainable_only=self.lora and self.save_adapters)
        if error is None and is_main() and export:
            try:
                self._write_export(tmp / "consolidated", export)
                if self.fault_hook is not None:
                    self.fault_hook("before_rename", step)
                atomic_write_json(tmp / "resume" / "trainer.json", {
                    "step": step, "world_size": get_world_size(), "fingerprint": self.fingerprint,
                    "export": self.export_name,
                })
                atomic_write_text(tmp / "resume" / COMPLETE, f"{step}\n")
                if final.exists():  # re-saving a step (e.g. the final step after a resume): replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            except catchable as e:
                error = e
        del export
        failed = any_rank(error is not None)
        if failed:
            if is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            prev = latest_resumable(self.run_dir)
            reason = describe_error(error) if error is not None else "another rank failed"
            hint = " (disk full: free space, then resume with resume: true)" if is_disk_full(error) else ""
            raise CheckpointError(
                f"writing checkpoint {final}{hint} failed: {reason}; the temporary folder {tmp} was removed; "
                f"the latest complete checkpoint is {prev if prev else 'none'}"
            ) from error
        barrier()
        if is_main():
            self._apply_retention()
        barrier()
        logger.info("checkpoint saved: %s", final / "consolidated" / self.export_name)
        return final

    def _write_export(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.export_writer(folder, state, self.export_dtype)

    def _apply_retention(self) -> None:
        if self.num_ckpt_keep is None:
            return
        ckpts = list_checkpoints(self.run_dir)
        for _, path in ckpts[: max(0, len(ckpts) - self.num_ckpt_keep)]:
            try:
                shutil.rmtree(path)
                logger.info("removed old checkpoint %s (num_ckpt_keep=%d)", path, self.num_ckpt_keep)
            except OSError as e:
                logger.warning("could not remove old checkpoint %s: %s", path, e)

    # -- load ----------------------------------------------------------------------------------------------

    def check_compatible(self, folder: Path) -> dict[str, Any]:
        """Reads `trainer.json`; raises `ResumeMismatchError` naming every config key that changed."""
        return check_resume_compatible(folder, self.fingerprint)

    def load(self, folder: Path, apply_rng: bool = True) -> tuple[int, dict[str, Any]]:
        """Restores model and optimizer from `folder`; returns ``(step, this rank's state)``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        meta = self.check_compatible(folder)
        state = self._dcp_state()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=str(folder / "resume"))
        opts = StateDictOptions(ignore_frozen_params=self.lora, strict=not self.lora)
        set_model_state_dict(self.model, state["model"], options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"], options=opts)
        rank_file = folder / "resume" / f"rank_{get_rank():05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file} is missing: the checkpoint was written by fewer ranks")
        rank_state = _from_safe(torch.load(rank_file, map_location="cpu", weights_only=True))
        if apply_rng:
            set_rng_state(rank_state["rng"])
        logger.info("resumed from %s (step %d)", folder, meta["step"])
        return int(meta["step"]), rank_state


def check_resume_compatible(folder: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """Reads `folder`'s `trainer.json`; raises `ResumeMismatchError` naming every config key that changed.

    A key the checkpoint does not record did not exist when it was written: it ran with the default.
    """
    from finetune.args import TrainArgs

    fingerprint = json.loads(json.dumps(dict(fingerprint)))
    meta = json.loads((folder / "resume" / "trainer.json").read_text(encoding="utf-8"))
    recorded = meta.get("fingerprint", {})
    saved = {k: v for k, v in (TrainArgs.default_fingerprint() | recorded).items()
             if k in fingerprint or k in recorded}
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    problems = [f"{k}: {saved.get(k)!r} in the checkpoint, {fingerprint.get(k)!r} now" for k in changed]
    if meta.get("world_size") != get_world_size():
        problems.append(f"world size (number of processes): {meta.get('world_size')} in the checkpoint, "
                        f"{get_world_size()} now (the data position is per rank)")
    if problems:
        raise ResumeMismatchError(
            f"cannot resume from {folder}: the configuration changed in keys that matter:\n  - "
            + "\n  - ".join(problems)
            + "\nrestore them, or start a new run (another run_dir, or overwrite_run_dir: true)"
        )
    return meta


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

