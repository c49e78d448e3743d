"""Benchmark folders on disk: `data.jsonl`, `data_stereo/N.{wav,json}`, `extra.txt`, optional `side_map.csv`.

Every item is identified by the integer stem N of its audio file, and `extra.txt`'s `file_index` names
that N. Pairs and MMLU roles are built from these ids only, never from the position of a line or of a
decoded file, so a missing, undecodable or extra file can never make two items of different pairs meet.
Only `DIR/data.jsonl` and `DIR/extra.txt` are read: other `.jsonl`/`.txt` files in the folder are ignored.
Every inconsistency raises :class:`EvalSetError` naming the file (and line) at fault.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.manifest import ManifestEntry, ManifestError, read_manifest

MANIFEST_NAME = "data.jsonl"
EXTRA_NAME = "extra.txt"
SIDE_MAP_NAME = "side_map.csv"

# Spoken MMLU: four choice clips (A..D) first, then the instruction prefix and an unused second prefix.
MMLU_CHOICES = 4
MMLU_PREFIX_INDEX = 4
MMLU_FIRST_SHOT = 6
CHOICE_LETTERS = ("A", "B", "C", "D")

# sWUGGY frequency bands: (label, lower bound inclusive, upper bound exclusive) of the LibriSpeech count.
FREQUENCY_BANDS = (("oov", 0.0, 1.0), ("1-5", 1.0, 5.0), ("6-20", 5.0, 20.0), ("21-100", 20.0, 100.0),
                   (">100", 100.0, math.inf))


class EvalSetError(ValueError):
    """A benchmark folder is inconsistent; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class Extra:
    """One `extra.txt` line: the item's label (`number`) and, for MMLU, its subject."""

    number: int
    subject_index: int | None
    where: str


@dataclass
class EvalSetFiles:
    """The items of a folder by id N, with their labels and side-map rows."""

    root: Path
    items: dict[int, ManifestEntry]
    extra: dict[int, Extra]
    side: dict[int, dict[str, str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name


@dataclass(frozen=True)
class Pair:
    """A positive (real, grammatical, true) and a negative item, with the stable id of the pair."""

    item_id: str
    positive: int
    negative: int
    groups: dict[str, str]


@dataclass
class PairSet:
    files: EvalSetFiles
    pairs: list[Pair]


@dataclass(frozen=True)
class MmluQuestion:
    index: int
    gold: int
    subject: int


@dataclass
class MmluSet:
    """Spoken MMLU: choice clips A..D, the instruction prefix, the shots of each subject, the questions."""

    files: EvalSetFiles
    choices: list[int]
    prefix: int
    shots: dict[int, list[int]]  # subject -> its shot items, in id order
    questions: list[MmluQuestion]


def set_root(path: str | os.PathLike) -> Path:
    """The folder of a set given as the folder or as its `data.jsonl`."""
    p = Path(path)
    if p.is_file() and p.name == MANIFEST_NAME:
        p = p.parent
    if not (p / MANIFEST_NAME).is_file():
        raise EvalSetError(f"{p}: not an evaluation set folder (no {MANIFEST_NAME}; expected {MANIFEST_NAME}, "
                           f"data_stereo/N.wav and {EXTRA_NAME})")
    return p


def relative_name(path: Path, root: Path) -> str:
    """A file's name as results record it: relative to the set folder (so results compare across machines)."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _item_number(entry: ManifestEntry) -> int:
    stem = entry.path.stem
    if not stem.isdigit():
        raise EvalSetError(f"{entry.where}: audio file {entry.path.name} must be named N.wav with an integer N "
                           "(the item id that extra.txt's file_index refers to)")
    return int(stem)


def _read_extra(path: Path) -> dict[int, Extra]:
    out: dict[int, Extra] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalSetError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict) or "file_index" not in obj or "number" not in obj:
                raise EvalSetError(f"{where}: expected {{\"file_index\": N, \"number\": label}}, got {line[:80]!r}")
            try:
                index, number = int(obj["file_index"]), int(obj["number"])
                subject = None if obj.get("subject_index") is None else int(obj["subject_index"])
            except (TypeError, ValueError):
                raise EvalSetError(f"{where}: file_index, number and subject_index must be integers") from None
            if index in out:
                raise EvalSetError(f"{where}: file_index {index} already given at {out[index].where}")
            out[index] = Extra(number, subject, where)
    return out


def _read_side_map(path: Path) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "file_index" not in reader.fieldnames:
            raise EvalSetError(f"{path}: the side map needs a file_index column")
        for lineno, row in enumerate(reader, start=2):
            try:
                index = int(row["file_index"])
            except (TypeError, ValueError):
                raise EvalSetError(f"{path}:{lineno}: file_index must be an integer, got {row['file_index']!r}") \
                    from None
            if index in out:
                raise EvalSetError(f"{path}:{lineno}: file_index {index} appears twice")
            out[index] = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
    return out


def read_set_files(path: str | os.PathLike) -> EvalSetFiles:
    """Reads the manifest, labels and side map of a set; checks that every label names an item."""
    root = set_root(path)
    try:
        entries = read_manifest(root / MANIFEST_NAME, require_duration=False)
    except ManifestError as e:
        raise EvalSetError(str(e)) from None
    items: dict[int, ManifestEntry] = {}
    for e in entries:
        n = _item_number(e)
        if n in items:
            raise EvalSetError(f"{e.where}: item {n} ({e.path.name}) already listed at {items[n].where}")
        items[n] = e
    extra = _read_extra(root / EXTRA_NAME)
    for n, x in extra.items():
        if n not in items:
            raise EvalSetError(f"{x.where}: file_index {n} has no audio file in {root / MANIFEST_NAME}")
    side = _read_side_map(root / SIDE_MAP_NAME)
    return EvalSetFiles(root, items, extra, side)


def frequency_band(frequency: float) -> str:
    for label, lo, hi in FREQUENCY_BANDS:
        if lo <= frequency < hi:
            return label
    raise ValueError(f"frequency must be >= 0, got {frequency}")


def side_groups(row: dict[str, str], where: str) -> dict[str, str]:
    """The breakdown groups of one side-map row: sWUGGY frequency band and in-vocab flag, sBLIMP type/subtype."""
    groups: dict[str, str] = {}
    if "frequency" in row:
        try:
            freq = float(row["frequency"])
        except ValueError:
            raise EvalSetError(f"{where}: frequency must be a number, got {row['frequency']!r}") from None
        groups["frequency_band"] = frequency_band(freq)
        groups["in_vocab"] = "true" if freq > 0 else "false"
    for key in ("type", "subtype"):
        if key in row:
            groups[key] = row[key]
    return groups


def _pair_key(files: EvalSetFiles, n: int) -> str:
    row = files.side.get(n)
    if row is not None and "pair_id" in row:
        return row["pair_id"]
    return str(n // 2)


def read_pair_set(path: str | os.PathLike) -> PairSet:
    """Pairs of a paired set (sWUGGY, sBLIMP, StoryCloze, `cd_*`).

    A pair is the two items sharing a pair id: the side map's `pair_id`, else N // 2 (items 2i and 2i+1,
    the fork's convention). `extra.txt`'s `number` is 1 on the positive item and 0 on the negative; one
    labelled item is enough, two must differ.
    """
    files = read_set_files(path)
    extra_path = files.root / EXTRA_NAME
    if not files.extra:
        raise EvalSetError(f"{extra_path}: missing or empty: a paired set needs the label (number) of its items")
    groups_of: dict[str, list[int]] = {}
    for n in sorted(files.items):
        groups_of.setdefault(_pair_key(files, n), []).append(n)
    pairs = []
    for key, members in groups_of.items():
        names = ", ".join(files.items[n].path.name for n in members)
        if len(members) != 2:
            problem = "has no partner" if len(members) == 1 else f"has {len(members)} items"
            raise EvalSetError(f"{files.root / MANIFEST_NAME}: pair {key} ({names}) {problem}: every pair needs "
                               "exactly two items")
        a, b = members
        la, lb = files.extra.get(a), files.extra.get(b)
        for x in (la, lb):
            if x is not None and x.number not in (0, 1):
                raise EvalSetError(f"{x.where}: number must be 1 (positive item) or 0 (negative), got {x.number}")
        if la is None and lb is None:
            raise EvalSetError(f"{extra_path}: pair {key} ({names}) has no label: give number for either item")
        if la is not None and lb is not None and la.number == lb.number:
            raise EvalSetError(f"{lb.where}: the labels of pair {key} ({names}) do not differ (both {la.number})")
        b_positive = lb.number == 1 if lb is not None else la.number == 0
        pos, neg = (b, a) if b_positive else (a, b)
        groups: dict[str, str] = {}
        for n in (pos, neg):
            if n in files.side:
                groups.update(side_groups(files.side[n], f"{files.root / SIDE_MAP_NAME} (file_index {n})"))
        pairs.append(Pair(key, pos, neg, groups))
    pairs.sort(key=lambda p: item_sort_key(p.item_id))
    return PairSet(files, pairs)


def item_sort_key(item_id: str) -> tuple[int, Any]:
    """Numeric ids in numeric order, then the others as strings."""
    return (0, int(item_id)) if item_id.isdigit() else (1, item_id)


def read_mmlu_set(path: str | os.PathLike, shots_per_subject: int = 5) -> MmluSet:
    """Spoken MMLU: items 0-3 = choice clips A-D, 4 = prefix, 5 = unused, then the shots, then the questions.

    The shots are the block starting at item 6: `shots_per_subject` per subject, their count taken from
    the subjects the questions name. A subject with another number of shots in that block, an item of
    the block or a question without a label, or a gold outside 0-3 raises, naming `extra.txt`.
    """
    files = read_set_files(path)
    extra_path = files.root / EXTRA_NAME
    for n in range(MMLU_FIRST_SHOT):
        if n not in files.items and n != MMLU_FIRST_SHOT - 1:
            raise EvalSetError(f"{files.root / MANIFEST_NAME}: spoken MMLU needs item {n} "
                               f"({'choice ' + CHOICE_LETTERS[n] if n < MMLU_CHOICES else 'the prefix'})")
    later = sorted(n for n in files.items if n >= MMLU_FIRST_SHOT)
    for n in later:
        x = files.extra.get(n)
        if x is None or x.subject_index is None:
            raise EvalSetError(f"{extra_path}: item {n} ({files.items[n].path.name}) needs number and subject_index")
        if not 0 <= x.number < MMLU_CHOICES:
            raise EvalSetError(f"{x.where}: number (the gold choice) must be 0-3, got {x.number}")
    subjects = sorted({files.extra[n].subject_index for n in later})  # type: ignore[misc]
    n_shots = shots_per_subject * len(subjects)
    expected = list(range(MMLU_FIRST_SHOT, MMLU_FIRST_SHOT + n_shots))
    if later[:n_shots] != expected:
        raise EvalSetError(f"{files.root / MANIFEST_NAME}: the shots must be items {expected[0]}..{expected[-1]} "
                           f"({shots_per_subject} per subject x {len(subjects)} subjects); some are missing")
    shots: dict[int, list[int]] = {s: [] for s in subjects}
    for n in expected:
        shots[files.extra[n].subject_index].append(n)  # type: ignore[index]
    for s, items in shots.items():
        if len(items) != shots_per_subject:
            raise EvalSetError(f"{extra_path}: subject {s} has {len(items)} shot(s) in items {expected[0]}.."
                               f"{expected[-1]}, expected {shots_per_subject} (evaluation.mmlu_shots)")
    questions = [MmluQuestion(n, files.extra[n].number, files.extra[n].subject_index)  # type: ignore[arg-type]
                 for n in later[n_shots:]]
    if not questions:
        raise EvalSetError(f"{files.root / MANIFEST_NAME}: no questions after the {n_shots} shots")
    return MmluSet(files, list(range(MMLU_CHOICES)), MMLU_PREFIX_INDEX, shots, questions)
