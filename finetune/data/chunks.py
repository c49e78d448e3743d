"""Chunk plan: which `duration_sec` pieces each manifest line gives (the plan `sphn`'s `dataset_jsonl` reader
uses, so existing datasets give the same chunks).

From the manifest duration D and chunk length d: offsets 0, d, 2d, ... while
offset + d < D, then one last, possibly partial, chunk at the next offset if it is < D.
Offsets are rounded to float32, as `sphn` stores them: word placement depends on the exact value.
The audio of chunk k starts at frame `start_frame` of the file's codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from finetune.data.manifest import ManifestEntry


@dataclass(frozen=True)
class Chunk:
    file: int  # index into the source's entry list
    offset_sec: float  # float32-rounded, as `sphn` stores it
    start_frame: int  # first frame of the file's codes

    def where(self, entries: Sequence[ManifestEntry]) -> str:
        e = entries[self.file]
        return f"{e.path} @ {self.offset_sec:.2f}s ({e.where})"


def num_frames(duration_sec: float, frame_rate: float = 12.5) -> int:
    """Frames per sample, `ceil(duration_sec * frame_rate)` (10 s -> 125)."""
    return math.ceil(duration_sec * frame_rate - 1e-9)


def chunk_offsets(duration: float, chunk_sec: float) -> list[float]:
    """Offsets (s) of the chunks of a file of `duration` seconds."""
    offsets: list[float] = []
    k = 0
    while True:
        o = k * chunk_sec
        if o + chunk_sec < duration:
            offsets.append(o)
            k += 1
            continue
        if o < duration:
            offsets.append(o)
        return [float(np.float32(x)) for x in offsets]


def start_frame(offset_sec: float, frame_rate: float = 12.5) -> int:
    """Frame of the file's codes where a chunk at `offset_sec` begins.

    Exact when `offset * frame_rate` is whole (any `duration_sec` that is a multiple of
    80 ms); otherwise the frame containing the offset, so the audio can start up to one
    frame before the text grid (a documented approximation).
    """
    x = offset_sec * frame_rate
    r = round(x)
    return int(r) if abs(x - r) < 1e-3 else int(math.floor(x))


def plan_chunks(entries: Sequence[ManifestEntry], chunk_sec: float, frame_rate: float = 12.5) -> list[Chunk]:
    """Every chunk of every entry, file by file, in order."""
    return [
        Chunk(i, o, start_frame(o, frame_rate))
        for i, e in enumerate(entries)
        for o in chunk_offsets(e.duration, chunk_sec)
    ]
