"""One logger set-up for every entry point, and rank-aware helpers.

Only rank 0 prints INFO by default under torchrun, so N processes do not print N
copies of every line; warnings and errors come from every rank, tagged with it.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_START = time.time()


class _DeltaFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.delta = f"{int(record.created - _START)}s"
        return super().format(record)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: int = logging.INFO, all_ranks: bool = False) -> None:
    """Configures the root logger once: stdout for INFO, stderr for WARNING and up."""
    root = logging.getLogger()
    if getattr(root, "_moshi_ft_configured", False):
        return
    r = rank()
    fmt = _DeltaFormatter(
        f"%(asctime)s - %(delta)s - r{r} - %(name)s - %(levelname)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    out = logging.StreamHandler(sys.stdout)
    out.setLevel(level if (r == 0 or all_ranks) else logging.WARNING)
    out.addFilter(lambda rec: rec.levelno < logging.WARNING)
    out.setFormatter(fmt)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(fmt)
    root.handlers = [out, err]
    root.setLevel(level)
    root._moshi_ft_configured = True  # type: ignore[attr-defined]


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def log_main(logger: logging.Logger, msg: str, *args: object) -> None:
    """Logs at INFO on rank 0 only (the one place that rule lives)."""
    if rank() == 0:
        logger.info(msg, *args)
