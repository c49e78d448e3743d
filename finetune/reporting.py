"""What every evaluation and analysis script writes: results, tables, plots and where they came from.

A result is only worth keeping if it can be traced back to the exact weights, data and code that produced it
and if a crash never leaves half a file behind. So every writer here goes through a temporary name and a
rename, and :func:`provenance` records digests of the checkpoint and dataset files next to the code version.
Scripts share their command-line basics through :func:`add_common_arguments` so ``--device auto`` and
``--out`` mean the same thing everywhere.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moshi.utils.atomic import atomic_path, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGEST_CHUNK_BYTES = 1 << 20


def add_common_arguments(parser: argparse.ArgumentParser, out_default: str | None = None) -> None:
    """Adds ``--device``, ``--dtype``, ``--out`` and ``--seed`` with the meaning shared by all scripts.

    ``--out`` is required unless ``out_default`` is given, so results never land in an unexpected folder.
    """
    parser.add_argument(
        "--device", default="auto", help="torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1..."
    )
    parser.add_argument(
        "--dtype", default="auto", help="model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16"
    )
    parser.add_argument(
        "--out", default=out_default, required=out_default is None, type=Path, help="folder for the results"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for every random choice the script makes")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _finite(obj: Any) -> Any:
    """Replaces NaN and infinities by ``None``: strict JSON readers reject them, and a missing value is honest."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes ``obj`` as indented, strict JSON (NaN/inf become ``null``), atomically; creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Writes ``rows`` (dicts) as CSV with a header, atomically.

    Columns default to the keys in order of first appearance over all rows, so rows may differ in their keys
    (a missing value is an empty cell).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), with a clear error if it is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib: install the analysis extra (pip install -e '.[analysis]')"
        ) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Saves a matplotlib figure as PNG atomically and closes it (figures otherwise pile up in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return path


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes, read in chunks so multi-GB checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(DIGEST_CHUNK_BYTES):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def folder_digest(paths: Iterable[str | os.PathLike]) -> str:
    """One ``sha256:`` digest over files and folders (folders walked in sorted order, names included).

    Names are relative to each given root, so a dataset copied elsewhere keeps its digest, while renaming,
    adding, removing or editing a file changes it.
    """
    digest = hashlib.sha256()
    for root in sorted(Path(p) for p in paths):
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            name = f.relative_to(root).as_posix() if root.is_dir() else f.name
            digest.update(name.encode() + b"\0" + file_digest(f).encode() + b"\n")
    return f"sha256:{digest.hexdigest()}"


def code_version() -> str:
    """The git commit of this checkout (with ``-dirty`` when it has uncommitted changes), else the package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"moshi-finetune {version('moshi-finetune')}"
        except PackageNotFoundError:
            return "unknown"


def provenance(
    *,
    checkpoints: Sequence[str | os.PathLike] = (),
    datasets: Sequence[str | os.PathLike] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Where a result came from: command line, time, code version, and digests of weights and data.

    Args:
        checkpoints: weight files or checkpoint folders the result depends on (each digested on its own).
        datasets: data files or folders (digested together into one ``dataset_digest``).
        extra: anything else worth recording (protocol, config path...); must not hold secrets.
    """
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "checkpoints": {str(p): folder_digest([p]) for p in checkpoints},
        "dataset_digest": folder_digest(datasets) if datasets else None,
        **(dict(extra) if extra else {}),
    }
