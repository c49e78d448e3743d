"""The `.jsonl` manifest of stereo conversations: one `{"path", "duration"}` object a line.

Relative paths resolve against the manifest's own folder, for training and for every
data tool alike, so a dataset folder can be moved or used from any working directory.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from moshi.utils.atomic import atomic_write_text


class ManifestError(ValueError):
    """A manifest line is malformed; the message names `file:line`."""


@dataclass(frozen=True)
class ManifestEntry:
    path: Path  # absolute audio path
    duration: float  # seconds, as written in the manifest
    manifest: Path
    line: int  # 1-based line number in `manifest`
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_manifest(path: str | os.PathLike, require_duration: bool = True,
                  errors: list[str] | None = None) -> list[ManifestEntry]:
    """Parses a manifest; every problem raises `ManifestError` naming `file:line`.

    Blank lines are allowed. `duration` must be a finite number > 0 unless
    `require_duration` is false (annotate only needs the paths). With an `errors` list,
    bad lines are appended to it and left out instead, so a checker can list them all.
    """
    manifest = Path(path).resolve()
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    root = manifest.parent
    entries: list[ManifestEntry] = []
    with _open_text(manifest) as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                entries.append(_parse_line(line, manifest, lineno, root, require_duration))
            except ManifestError as e:
                if errors is None:
                    raise
                errors.append(str(e))
    return entries


def _parse_line(line: str, manifest: Path, lineno: int, root: Path, require_duration: bool) -> ManifestEntry:
    where = f"{manifest}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    audio = obj.get("path")
    if not isinstance(audio, str) or not audio:
        raise ManifestError(f"{where}: missing or empty 'path'")
    duration = obj.get("duration")
    if duration is None and not require_duration:
        duration = float("nan")
    elif isinstance(duration, bool) or not isinstance(duration, (int, float)):
        raise ManifestError(f"{where}: 'duration' must be a number of seconds, got {duration!r}")
    elif not math.isfinite(duration) or duration <= 0:
        raise ManifestError(f"{where}: 'duration' must be > 0, got {duration!r}")
    p = Path(audio)
    if not p.is_absolute():
        p = Path(os.path.normpath(root / p))  # collapse `..` written by write_manifest
    extra = {k: v for k, v in obj.items() if k not in ("path", "duration")}
    return ManifestEntry(p, float(duration), manifest, lineno, extra)


def manifest_line(path: str | os.PathLike, duration: float, relative_to: Path | None = None, **extra) -> str:
    p = Path(path)
    if relative_to is not None:
        # relpath (with `..`) keeps the dataset valid when the whole tree moves.
        p = Path(os.path.relpath(p.resolve(), relative_to.resolve()))
    return json.dumps({"path": str(p), "duration": float(duration), **extra}, ensure_ascii=False)


def write_manifest(
    path: str | os.PathLike,
    items: Iterable[tuple[str | os.PathLike, float]] | Iterable[ManifestEntry],
    relative: bool = True,
) -> int:
    """Writes a manifest atomically; paths relative to its folder when `relative`. Returns the count."""
    out = Path(path)
    root = out.resolve().parent if relative else None
    lines = []
    for item in items:
        if isinstance(item, ManifestEntry):
            lines.append(manifest_line(item.path, item.duration, root, **item.extra))
        else:
            audio, duration = item
            lines.append(manifest_line(audio, duration, root))
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return len(lines)
