"""Readers of released paired benchmarks: each returns the pairs, positive and negative file, with their ids.

A pair is named by the ids the release gives it, never by its position in a listing, and everything the
official aggregates group by (voice, word frequency, syntactic type...) travels with it, so the converted
set can still be broken down the way the benchmark's authors report it.

Three layouts are read:

* ``slm21``: a ZeroSpeech 2021 sLM21 split folder (``lexical/dev`` or ``syntactic/dev``) with its wavs and
  ``gold.csv``. Lexical rows pair on ``(id, voice)``; syntactic rows on ``(type, subtype, id, voice)``. Each
  key must hold exactly one ``correct == 1`` and one ``correct == 0`` row.
* ``indexed``: wavs named ``<integer><sep><anything>.wav`` (spoken StoryCloze as distributed for the SC
  authors' kit), directly in the folder or one subfolder level down; sorted by the integer (then by name),
  consecutive files form a pair and the first of the two is the positive one.
* ``pairs``: a folder with ``positive/`` and ``negative/`` subfolders holding wavs at the same relative
  paths; the relative path without extension is the pair id.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.evaluation.layout import EvalSetError

AUDIO_SUFFIX = ".wav"
LEXICAL_COLUMNS = ("filename", "voice", "frequency", "word", "correct", "id")
SYNTACTIC_COLUMNS = ("filename", "voice", "type", "subtype", "transcription", "correct", "id")


@dataclass(frozen=True)
class SourcePair:
    """One pair of a released benchmark.

    ``groups`` holds what the pair shares and a breakdown may group by (sLM21: ``id``, ``voice``, the word's
    ``frequency``, ``type``, ``subtype``); ``words`` the positive's and the negative's own word, where the
    release gives one.
    """

    pair_id: str
    positive: Path
    negative: Path
    groups: dict[str, Any] = field(default_factory=dict)
    words: tuple[str, str] | None = None


def _read_gold(gold: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and ``(line number, row)`` pairs of a gold.csv (line numbers 1-based, header = line 1)."""
    if not gold.is_file():
        raise EvalSetError(f"{gold}: not found (an sLM21 split folder holds its wavs and gold.csv)")
    with open(gold, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [(i + 2, row) for i, row in enumerate(reader)]
    if not rows:
        raise EvalSetError(f"{gold}: no rows")
    return header, rows


def _parse_correct(gold: Path, line: int, value: str | None) -> int:
    if value is None or value.strip() not in ("0", "1"):
        raise EvalSetError(f"{gold}:{line}: 'correct' must be 0 or 1, got {value!r}")
    return int(value)


def read_slm21(split_dir: str | os.PathLike) -> tuple[str, list[SourcePair]]:
    """Reads an sLM21 split folder; returns the task (``lexical`` or ``syntactic``) and its pairs in gold order.

    The task is recognised from gold.csv's columns. Every listed file must exist and every wav in the
    folder must be listed, so a partial download is caught here rather than as a skewed accuracy.
    """
    root = Path(split_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    gold = root / "gold.csv"
    header, rows = _read_gold(gold)
    if all(c in header for c in LEXICAL_COLUMNS):
        task, key_columns = "lexical", ("id", "voice")
    elif all(c in header for c in SYNTACTIC_COLUMNS):
        task, key_columns = "syntactic", ("type", "subtype", "id", "voice")
    else:
        raise EvalSetError(
            f"{gold}: columns {header} are neither lexical ({', '.join(LEXICAL_COLUMNS)}) nor syntactic "
            f"({', '.join(SYNTACTIC_COLUMNS)})"
        )
    groups: dict[tuple[str, ...], dict[int, tuple[int, dict[str, str]]]] = {}
    listed: set[str] = set()
    for line, row in rows:
        correct = _parse_correct(gold, line, row.get("correct"))
        stem = (row.get("filename") or "").strip()
        if not stem:
            raise EvalSetError(f"{gold}:{line}: empty 'filename'")
        if not (root / f"{stem}{AUDIO_SUFFIX}").is_file():
            raise EvalSetError(f"{gold}:{line}: audio file {root / (stem + AUDIO_SUFFIX)} not found")
        listed.add(stem)
        key = tuple((row.get(c) or "").strip() for c in key_columns)
        slot = groups.setdefault(key, {})
        if correct in slot:
            raise EvalSetError(
                f"{gold}:{line}: a second row with correct={correct} for "
                f"{dict(zip(key_columns, key))} (first at line {slot[correct][0]}); a pair needs one of each"
            )
        slot[correct] = (line, row)
    unlisted = sorted(p.name for p in root.glob(f"*{AUDIO_SUFFIX}") if p.stem not in listed)
    if unlisted:
        raise EvalSetError(f"{gold}: {len(unlisted)} wav file(s) of {root} are not listed, e.g. {unlisted[:3]}")
    pairs = []
    for key, slot in groups.items():
        if set(slot) != {0, 1}:
            line, _ = next(iter(slot.values()))
            missing = "correct=0 (negative)" if 0 not in slot else "correct=1 (positive)"
            raise EvalSetError(f"{gold}:{line}: {dict(zip(key_columns, key))} has no {missing} partner")
        pairs.append(_slm21_pair(task, root, key_columns, key, slot[1][1], slot[0][1], gold, slot[1][0]))
    return task, pairs


def _slm21_pair(task: str, root: Path, key_columns: tuple[str, ...], key: tuple[str, ...], pos: dict[str, str],
                neg: dict[str, str], gold: Path, line: int) -> SourcePair:
    groups: dict[str, Any] = dict(zip(key_columns, key))
    words = None
    if task == "lexical":
        frequency = (pos.get("frequency") or "").strip()
        try:
            float(frequency)
        except ValueError:
            raise EvalSetError(f"{gold}:{line}: 'frequency' must be a number, got {frequency!r}") from None
        groups["frequency"] = frequency
        words = ((pos.get("word") or "").strip(), (neg.get("word") or "").strip())
    return SourcePair("/".join(key), root / f"{pos['filename'].strip()}{AUDIO_SUFFIX}",
                      root / f"{neg['filename'].strip()}{AUDIO_SUFFIX}", groups, words)


def _indexed_files(root: Path) -> Iterator[Path]:
    yield from root.glob(f"*{AUDIO_SUFFIX}")
    for sub in root.iterdir():
        if sub.is_dir():
            yield from sub.glob(f"*{AUDIO_SUFFIX}")


def read_indexed(folder: str | os.PathLike, sep: str = "_") -> list[SourcePair]:
    """Reads wavs named ``<integer><sep>...``: sorted by the integer, consecutive files = (positive, negative)."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    keyed = []
    for path in _indexed_files(root):
        head = path.name.split(sep, 1)[0] if sep in path.name else path.stem
        try:
            index = int(head)
        except ValueError:
            raise EvalSetError(
                f"{path}: the name must start with an integer followed by {sep!r} (--sep sets the separator)"
            ) from None
        keyed.append((index, path.relative_to(root).as_posix(), path))
    if not keyed:
        raise EvalSetError(f"{root}: no {AUDIO_SUFFIX} file (directly or one folder down)")
    keyed.sort()
    if len(keyed) % 2:
        raise EvalSetError(f"{root}: {len(keyed)} wav files, an odd count: {keyed[-1][2]} has no partner")
    pairs = []
    for (i_pos, _, pos), (_, _, neg) in zip(keyed[0::2], keyed[1::2]):
        pairs.append(SourcePair(str(i_pos), pos, neg))
    return pairs


def read_pair_folders(folder: str | os.PathLike) -> list[SourcePair]:
    """Reads ``positive/`` and ``negative/`` with wavs at the same relative paths, sorted by that path."""
    root = Path(folder)
    sides = {}
    for side in ("positive", "negative"):
        d = root / side
        if not d.is_dir():
            raise EvalSetError(f"{d}: not found (a pair folder holds positive/ and negative/ subfolders)")
        sides[side] = {p.relative_to(d).with_suffix("").as_posix(): p for p in d.rglob(f"*{AUDIO_SUFFIX}")}
    pos, neg = sides["positive"], sides["negative"]
    for have, lack, name in ((pos, neg, "negative"), (neg, pos, "positive")):
        orphans = sorted(set(have) - set(lack))
        if orphans:
            raise EvalSetError(f"{have[orphans[0]]}: no {name} partner {root / name / (orphans[0] + AUDIO_SUFFIX)}"
                               + (f" ({len(orphans)} files without a partner)" if len(orphans) > 1 else ""))
    if not pos:
        raise EvalSetError(f"{root}: no {AUDIO_SUFFIX} file under positive/ and negative/")
    return [SourcePair(pid, pos[pid], neg[pid]) for pid in sorted(pos)]
