"""Reading a run's ``metrics.train.jsonl`` / ``metrics.eval.jsonl`` back as curves and summaries.

The trainer appends one JSON object per logged step (``step``, ``at`` and the metric keys). A run killed
mid-write can leave a torn last line: it is dropped and counted, since the run's own resume drops it too. Any
other unreadable line means the file was damaged or edited and raises with its ``file:line``. A step logged
twice (a resume after a crash that outlived its checkpoint) keeps its last record, as the resumed run does.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.monitoring.metrics_logger import MetricsFileError

logger = logging.getLogger(__name__)

# Curves worth drawing and where they go: panel name -> metric keys (train file first, then eval file).
TRAIN_PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "text_loss", "audio_loss"),
    "lr": ("lr",),
    "grad_norm": ("grad_norm",),
    "throughput": ("wps", "real_wps"),
}
EVAL_PANELS: dict[str, tuple[str, ...]] = {
    "eval_loss": ("eval_loss", "text_eval_loss", "audio_eval_loss"),
    "perplexity": ("perplexity", "text_perplexity", "audio_perplexity"),
}


@dataclass
class MetricsFile:
    """The records of one metrics file in step order, and how many torn lines were dropped."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    dropped_lines: int = 0

    def keys(self) -> list[str]:
        """Numeric metric keys in order of first appearance (``step`` excluded)."""
        seen: dict[str, None] = {}
        for r in self.records:
            seen.update({k: None for k, v in r.items() if k != "step" and _number(v) is not None})
        return list(seen)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``key`` over the records where it is a finite number."""
        steps, values = [], []
        for r in self.records:
            v = _number(r.get(key))
            if v is not None:
                steps.append(int(r["step"]))
                values.append(v)
        return steps, values


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def read_metrics(path: str | Path) -> MetricsFile:
    """The records of ``path`` (an absent file has none).

    Raises:
        MetricsFileError: a line other than the last is not a JSON object with an integer ``step``.
    """
    path = Path(path)
    result = MetricsFile(path)
    if not path.exists():
        return result
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    by_step: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or isinstance(record.get("step"), bool) \
                    or not isinstance(record.get("step"), int):
                raise ValueError("not a JSON object with an integer 'step'")
        except ValueError as e:
            if i == len(lines):
                logger.warning("%s:%d: dropping a partly written last record (%s)", path, i, e)
                result.dropped_lines += 1
                continue
            raise MetricsFileError(f"{path}:{i}: not a metrics record ({e})") from None
        by_step[record["step"]] = record
    result.records = [by_step[s] for s in sorted(by_step)]
    return result


def summarize(metrics: MetricsFile) -> dict[str, Any]:
    """Per numeric key: count, first and last value, minimum and maximum with their steps."""
    out: dict[str, Any] = {"records": len(metrics.records), "dropped_lines": metrics.dropped_lines}
    keys = {}
    for key in metrics.keys():
        steps, values = metrics.series(key)
        lo = min(range(len(values)), key=values.__getitem__)
        hi = max(range(len(values)), key=values.__getitem__)
        keys[key] = {"n": len(values), "first": values[0], "last": values[-1], "last_step": steps[-1],
                     "min": values[lo], "min_step": steps[lo], "max": values[hi], "max_step": steps[hi]}
    out["metrics"] = keys
    return out


@dataclass
class Run:
    """One run folder's train and eval metrics under a display label."""

    label: str
    folder: Path
    train: MetricsFile
    eval: MetricsFile


def read_runs(folders: list[str | Path]) -> list[Run]:
    """The runs of ``folders``, labelled by folder name (the full path where two names clash).

    Raises:
        FileNotFoundError: a folder holds neither metrics file.
    """
    paths = [Path(f) for f in folders]
    names = [p.resolve().name for p in paths]
    runs = []
    for path, name in zip(paths, names):
        train, evals = path / "metrics.train.jsonl", path / "metrics.eval.jsonl"
        if not train.exists() and not evals.exists():
            raise FileNotFoundError(f"{path}: no metrics.train.jsonl or metrics.eval.jsonl (not a run folder?)")
        label = name if names.count(name) == 1 else str(path)
        runs.append(Run(label, path, read_metrics(train), read_metrics(evals)))
    return runs
