"""Data source lists: the `data.train_data` / `data.eval_data` strings.

Syntax (as in moshi-finetune): comma-separated items, each `path` or `path:weight` (weight > 0,
default 1); a path is a `.jsonl` manifest (`.jsonl.gz` too) or a folder, meaning every
manifest under it, recursively, in sorted order. Weights are normalised to sum 1.
Only names with the `.jsonl` suffix count as manifests. A `:` inside a path is not supported
(the syntax uses it for the weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


class SourceError(ValueError):
    """A source list is malformed; the message names the config key and the item."""


@dataclass(frozen=True)
class Source:
    spec: str  # the path as written in the config (merge_group refers to it)
    weight: float  # normalised
    manifests: tuple[Path, ...]


def _is_manifest(p: Path) -> bool:
    name = p.name.lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def parse_sources(spec: str, key: str = "data.train_data") -> list[Source]:
    """Parses a source list; raises `SourceError`/`FileNotFoundError` naming `key` and the item."""
    items: list[tuple[str, float, tuple[Path, ...]]] = []
    seen: set[Path] = set()
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) > 2:
            raise SourceError(f"{key}: {item!r} has more than one ':' (expected 'path' or 'path:weight')")
        path_str = parts[0].strip()
        weight = 1.0
        if len(parts) == 2:
            try:
                weight = float(parts[1])
            except ValueError:
                raise SourceError(f"{key}: weight of {item!r} is not a number: {parts[1]!r}") from None
            if not math.isfinite(weight) or weight <= 0:
                raise SourceError(f"{key}: weight of {item!r} must be > 0, got {weight}")
        path = Path(path_str).expanduser()
        if path.is_file():
            manifests: tuple[Path, ...] = (path.resolve(),)
        elif path.is_dir():
            manifests = tuple(sorted(p.resolve() for p in path.rglob("*") if p.is_file() and _is_manifest(p)))
            if not manifests:
                raise SourceError(f"{key}: folder {path_str!r} contains no .jsonl manifest")
        else:
            raise FileNotFoundError(f"{key}: {path_str!r} is neither a file nor a folder")
        resolved = path.resolve()
        if resolved in seen:
            raise SourceError(f"{key}: {path_str!r} is listed twice")
        seen.add(resolved)
        items.append((path_str, weight, manifests))
    if not items:
        raise SourceError(f"{key} is empty: give a .jsonl manifest or a folder of them")
    total = sum(w for _, w, _ in items)
    return [Source(s, w / total, m) for s, w, m in items]
