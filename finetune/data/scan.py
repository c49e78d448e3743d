"""The up-front data scan: every manifest line checked before the first training step.

For each line: the audio file exists, its header reads, it is stereo and not empty, its
duration agrees with the manifest's (within a tolerance), and its alignment file parses,
validates and has no word starting after the end of the audio. Every problem is reported
at once with its `manifest:line`, instead of one at a time when a file is first used.

Only headers are read (no decoding). A file the codes cache already knows (its content
hash, memoised per size and mtime, has an entry) is not opened at all: the entry says it
is stereo and how long it lasts. Results are kept per (file, size, mtime) in the process,
so building the same sources twice (the pre-flight check, then the data loader) scans once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from finetune.data.alignments import END_TOLERANCE_SEC, AlignmentError, alignment_path_for, parse_alignments
from finetune.data.codes_cache import cached_duration, memoised_hash
from finetune.data.manifest import ManifestEntry


@dataclass(frozen=True)
class ScanOptions:
    """How to scan: the codes cache to consult, the duration tolerance, and whether bad files are skipped."""

    cache_dir: str | None = None
    duration_tolerance: float = 0.1
    skip_bad_files: bool = False


@dataclass(frozen=True)
class LineProblem:
    """One unusable manifest line: where it is, which file, why."""

    where: str  # manifest:line
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ScanStats:
    """What the scan had to open (benchmarks and tests read it)."""

    lines: int = 0
    audio_headers_read: int = 0
    known_from_cache: int = 0
    memo_hits: int = 0


# (audio path, size, mtime_ns, alignment size, alignment mtime_ns, manifest duration, tolerance) -> problems
_MEMO: dict[tuple, tuple[str, ...]] = {}


def _stat_key(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _audio_header(path: Path) -> tuple[int, float]:
    """(channels, seconds) from the file's header; raises ValueError/OSError when it cannot be read."""
    import sphn

    reader = sphn.FileReader(str(path))
    return int(reader.channels), float(reader.duration_sec)


def _check_audio(entry: ManifestEntry, opts: ScanOptions, stats: ScanStats) -> tuple[list[str], float | None]:
    """Problems of the audio file, and its duration when known."""
    path = entry.path
    if not path.is_file():
        return [f"audio file not found: {path}"], None
    duration = None
    if opts.cache_dir is not None:
        h = memoised_hash(opts.cache_dir, path)
        duration = cached_duration(opts.cache_dir, h) if h is not None else None
    if duration is not None:
        stats.known_from_cache += 1
    else:
        stats.audio_headers_read += 1
        try:
            channels, duration = _audio_header(path)
        except Exception as e:  # noqa: BLE001 - sphn raises several types for undecodable files
            return [f"cannot read audio file {path}: {e}"], None
        if channels != 2:
            return [f"{path}: {channels} channel(s); training needs stereo (left = model, right = user)"], duration
        if duration <= 0:
            return [f"{path}: empty audio file (0 samples)"], 0.0
    if abs(duration - entry.duration) > opts.duration_tolerance:
        return [f"the manifest's duration {entry.duration:.3f}s does not match {path} ({duration:.3f}s): the "
                "manifest is stale (regenerate it with scripts/create_jsonl.py)"], duration
    return [], duration


def _check_alignment(entry: ManifestEntry, duration: float | None) -> list[str]:
    jpath = alignment_path_for(entry.path)
    if not jpath.is_file():
        return [f"alignment file not found: {jpath} (run annotate.py)"]
    try:
        with open(jpath, encoding="utf-8") as f:
            obj = json.load(f)
        words, _ = parse_alignments(obj, str(jpath))
    except json.JSONDecodeError as e:
        return [f"{jpath}: not valid JSON ({e.msg} at line {e.lineno})"]
    except (AlignmentError, UnicodeDecodeError) as e:
        return [str(e) if isinstance(e, AlignmentError) else f"{jpath}: not UTF-8 text ({e})"]
    if duration is not None:
        late = [w for w in words if w.start > duration + END_TOLERANCE_SEC]
        if late:
            return [f"{jpath}: word {late[0].text!r} starts at {late[0].start:.2f}s, after the end of the audio "
                    f"({duration:.2f}s; {len(late)} such word(s)): the alignment file belongs to another recording"]
    return []


def check_line(entry: ManifestEntry, opts: ScanOptions, stats: ScanStats | None = None) -> list[str]:
    """Every problem of one manifest line (empty when it is usable)."""
    stats = stats if stats is not None else ScanStats()
    stats.lines += 1
    key = (str(entry.path), _stat_key(entry.path), _stat_key(alignment_path_for(entry.path)), entry.duration,
           opts.duration_tolerance, opts.cache_dir)
    if key[1] is not None and key in _MEMO:
        stats.memo_hits += 1
        return list(_MEMO[key])
    problems, duration = _check_audio(entry, opts, stats)
    if not problems or duration is not None and duration > 0:
        problems += _check_alignment(entry, duration)
    if key[1] is not None:
        _MEMO[key] = tuple(problems)
    return problems


def scan_entries(entries: Sequence[ManifestEntry], opts: ScanOptions,
                 stats: ScanStats | None = None) -> list[LineProblem]:
    """Every problem of every line, in manifest order."""
    out = []
    for e in entries:
        out += [LineProblem(e.where, e.path, msg) for msg in check_line(e, opts, stats)]
    return out


def duplicate_lines(entries: Sequence[ManifestEntry]) -> list[list[ManifestEntry]]:
    """Groups of lines naming the same audio file (each group in manifest order), in order of first line."""
    groups: dict[Path, list[ManifestEntry]] = defaultdict(list)
    for e in entries:
        groups[e.path].append(e)
    return [g for g in groups.values() if len(g) > 1]


def describe_duplicates(group: Sequence[ManifestEntry]) -> str:
    """E.g. ``a.wav is listed 2 times (data.jsonl lines 1, 8)``; `file:line` each when several manifests."""
    if len({e.manifest for e in group}) == 1:
        where = f"{group[0].manifest} lines {', '.join(str(e.line) for e in group)}"
    else:
        where = ", ".join(e.where for e in group)
    return f"{group[0].path} is listed {len(group)} times ({where})"


def format_problems(problems: Sequence[LineProblem]) -> str:
    """One problem per line, indented."""
    return "\n".join(f"  - {p}" for p in problems)
