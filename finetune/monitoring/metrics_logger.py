"""Metric sinks of rank 0: `metrics.{tag}.jsonl` (always), TensorBoard and wandb (optional).

File names and metric keys are moshi-finetune's, so existing dashboards keep working. The wandb
API key comes from `WANDB_API_KEY` (or the deprecated YAML key) and is handed to `wandb.login`
only: it is never logged or put in the run config (`TrainArgs.to_dict()` drops it).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

from moshi.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)


class MetricsFileError(ValueError):
    """A metrics file has a damaged line other than a torn last one; the message names `file:line`."""


def append_line(path: Path, line: str) -> None:
    """Appends `line` + newline with a single `write` on an `O_APPEND` descriptor.

    One system call per record: a kill can stop between records, not inside Python's buffering.
    """
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(fd, data)
        if written != len(data):  # a full disk can accept part of a write
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
    finally:
        os.close(fd)


class MetricsLogger:
    """Writes one record per `log` call to every enabled sink; does nothing on ranks other than 0.

    Args:
        run_dir (str | Path): the run folder.
        tag (str): `train` or `eval` (file `metrics.{tag}.jsonl`, TensorBoard suffix, wandb prefix).
        is_main (bool): whether this process is rank 0.
        tensorboard (bool): write `run_dir/tb` event files if `tensorboard` is installed.
        wandb_project (str | None): enables wandb when set.
    """

    def __init__(
        self,
        run_dir: str | Path,
        tag: str,
        is_main: bool,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        wandb_offline: bool = False,
        wandb_api_key: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.tag = tag
        self.is_main = is_main
        self.path = Path(run_dir) / f"metrics.{tag}.jsonl"
        self._tb = None
        self._wandb = None
        if not is_main:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard: true but the tensorboard package is not installed; skipping it")
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), max_queue=1000, filename_suffix=f".{tag}")
        if wandb_project:
            self._wandb = _init_wandb(run_dir, wandb_project, wandb_run_name, wandb_offline, wandb_api_key, config)

    def truncate_after(self, step: int) -> None:
        """Drops records with ``step`` > `step` (a resumed run rewrites what the killed run logged later).

        A kill or a full disk can leave a torn last line; it is dropped with a warning naming the file.
        Any other line that is not a JSON record means the file was edited by hand: an error naming it.
        """
        if not self.is_main or not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = []
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if i == len(lines):
                    logger.warning("%s:%d: dropping a partly written last record (%s)", self.path, i, e)
                    continue
                raise MetricsFileError(f"{self.path}:{i}: not a metrics record ({e}); remove or fix the line") \
                    from None
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        record = dict(metrics)
        record["step"] = step
        record["at"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_line(self.path, json.dumps(record))
        scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{self.tag}.{k}", v, global_step=step)
        if self._wandb is not None:
            self._wandb.log({f"{self.tag}/{k}": v for k, v in scalars.items()}, step=step)

    def flush(self) -> None:
        """Makes every logged record durable (called with each checkpoint, so both agree after a crash)."""
        if not self.is_main:
            return
        if self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None and self.tag == "train":
            self._wandb.finish()
        self._wandb = None


def _init_wandb(run_dir, project, run_name, offline, api_key, config):
    try:
        import wandb
    except ImportError as e:
        raise ImportError("wandb.project is set but the wandb package is not installed (pip install wandb)") from e
    if offline:
        os.environ["WANDB_MODE"] = "offline"
        logger.info("wandb offline; to sync: cd %s; wandb sync --sync-all", run_dir)
    elif api_key:
        wandb.login(key=api_key)
    if wandb.run is None:
        wandb.init(config=config or {}, dir=str(run_dir), project=project, job_type="training",
                   name=run_name or Path(run_dir).name, resume="allow")
    return wandb
