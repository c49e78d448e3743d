"""Word alignments: the `.json` beside each audio file.

Format (as in moshi-finetune): `{"alignments": [[word, [start_s, end_s], speaker], ...]}`, times in
seconds from the file start; `SPEAKER_MAIN` marks the model's channel (left). Files are
validated and sorted once, when loaded, so chunking can binary-search them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from moshi.utils.atomic import atomic_write_json

MAIN_SPEAKER = "SPEAKER_MAIN"

# Whisper word ends can overshoot the audio a little; starts beyond this much past
# the end mean the JSON does not belong to this audio.
END_TOLERANCE_SEC = 0.5


class AlignmentError(ValueError):
    """An alignment file is missing, malformed or does not fit its audio."""


@dataclass(frozen=True)
class AlignedWord:
    text: str
    start: float
    end: float
    speaker: str = MAIN_SPEAKER

    def to_json(self) -> list[Any]:
        return [self.text, [self.start, self.end], self.speaker]


def alignment_path_for(audio_path: str | os.PathLike) -> Path:
    """`a/b.wav` -> `a/b.json` (the audio's extension replaced)."""
    return Path(audio_path).with_suffix(".json")


def parse_alignments(obj: Any, source: str) -> tuple[list[AlignedWord], bool]:
    """Validates a decoded alignment object. Returns (words sorted by start, was_sorted)."""
    if not isinstance(obj, dict) or "alignments" not in obj:
        raise AlignmentError(f"{source}: expected an object with an 'alignments' list")
    items = obj["alignments"]
    if not isinstance(items, list):
        raise AlignmentError(f"{source}: 'alignments' must be a list")
    words = []
    for i, item in enumerate(items):
        try:
            text, (start, end), speaker = item
            start, end = float(start), float(end)
        except (TypeError, ValueError):
            raise AlignmentError(
                f"{source}: alignment #{i} must be [word, [start, end], speaker], got {item!r}"
            ) from None
        if not isinstance(text, str) or not isinstance(speaker, str):
            raise AlignmentError(f"{source}: alignment #{i}: word and speaker must be strings, got {item!r}")
        if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < start:
            raise AlignmentError(f"{source}: alignment #{i} ({text!r}) has invalid times [{start}, {end}]")
        words.append(AlignedWord(text, start, end, speaker))
    was_sorted = all(a.start <= b.start for a, b in zip(words, words[1:]))
    if not was_sorted:
        words.sort(key=lambda w: w.start)  # stable: ties keep file order
    return words, was_sorted


def load_alignments(
    path: str | os.PathLike,
    duration: float | None = None,
    allow_unsorted: bool = True,
    report: dict[str, Any] | None = None,
) -> list[AlignedWord]:
    """Loads and validates one alignment file, sorted by start time.

    Unsorted files are sorted (or refused when `allow_unsorted` is false). With the
    audio `duration`, a word starting past its end (+0.5 s) is an error. A `report`
    dict receives `was_sorted` (so callers can count files that needed sorting).
    """
    p = Path(path)
    if not p.is_file():
        raise AlignmentError(f"alignment file not found: {p}")
    try:
        with open(p, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise AlignmentError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    words, was_sorted = parse_alignments(obj, str(p))
    if report is not None:
        report["was_sorted"] = was_sorted
    if not was_sorted and not allow_unsorted:
        raise AlignmentError(f"{p}: alignments are not sorted by start time")
    if duration is not None:
        for w in words:
            if w.start > duration + END_TOLERANCE_SEC:
                raise AlignmentError(
                    f"{p}: word {w.text!r} starts at {w.start:.2f}s, after the end of the audio ({duration:.2f}s)"
                )
    return words


def write_alignments(
    path: str | os.PathLike, words: Sequence[AlignedWord], extra: dict[str, Any] | None = None
) -> None:
    """Writes an alignment file atomically, in the format above."""
    obj: dict[str, Any] = {"alignments": [w.to_json() for w in words]}
    if extra:
        obj.update(extra)
    atomic_write_json(path, obj)
