"""One streaming frame of a spoken conversation, timed part by part: Mimi encode, LM step, Mimi decode.

Only torch is imported here and the models are used through the streaming API both ``moshi`` packages share
(``mimi.streaming(B)``, ``mimi.encode``/``decode`` on one frame, ``lm_gen.streaming(B)``, ``lm_gen.step``), so
``stream_vs_kyutai.py`` times this repository's models and Kyutai's with the very same loop, and
``scripts/moshi_benchmark.py`` reports its figures per setting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

PARTS = ("encode", "lm", "decode", "frame")
# Each part as (first, last) clock reading of a frame: before encode, after encode, after step, after decode.
_SPANS = {"encode": (0, 1), "lm": (1, 2), "decode": (2, 3), "frame": (0, 3)}


@dataclass
class StreamRun:
    """What :func:`run_frames` measured.

    ``wall`` and ``cpu`` map each of :data:`PARTS` to one duration in seconds per timed frame (``cpu`` is the
    process CPU time of all threads, steadier than wall time on a shared machine). ``tokens`` is ``[F, B,
    1 + dep_q]`` int64, the LM's un-delayed output of every frame that produced one (warm-up frames included),
    for comparing two implementations.
    """

    wall: dict[str, list[float]] = field(default_factory=lambda: {part: [] for part in PARTS})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {part: [] for part in PARTS})
    tokens: torch.Tensor | None = None

    @property
    def frames(self) -> int:
        return len(self.wall["frame"])


def frame_size(mimi: Any) -> int:
    """Samples per 80 ms frame: the codec's sample rate over its frame rate."""
    return int(round(mimi.sample_rate / mimi.frame_rate))


def run_frames(
    mimi: Any,
    lm_gen: Any,
    audio: torch.Tensor,
    warmup: int,
    sync: Callable[[], None] | None = None,
    on_frame: Callable[[], Any] | None = None,
) -> StreamRun:
    """Streams ``audio [B, 1, L]`` frame by frame through encode, step and decode; times all but ``warmup`` frames.

    The first frames are not timed because they allocate caches and pick kernels. Frames whose step returns no
    tokens yet (the first ``max_delay``) have nothing to decode (their decode time is about zero), so
    ``warmup`` should cover them. ``sync`` (``torch.cuda.synchronize`` on CUDA) runs before every clock reading
    so that each part's time includes its queued kernels. ``on_frame`` is called after every frame (a progress
    bar's ``update``).
    """
    sync = sync or (lambda: None)
    size = frame_size(mimi)
    batch, _, length = audio.shape
    total = length // size
    if total <= warmup:
        raise ValueError(f"audio holds {total} frames of {size} samples; need more than warmup={warmup}")
    run = StreamRun()
    outputs = []
    with torch.no_grad(), mimi.streaming(batch), lm_gen.streaming(batch):
        for index in range(total):
            chunk = audio[:, :, index * size : (index + 1) * size]
            sync()
            marks = [(time.perf_counter(), time.process_time())]
            codes = mimi.encode(chunk)
            sync()
            marks.append((time.perf_counter(), time.process_time()))
            out = lm_gen.step(codes)
            sync()
            marks.append((time.perf_counter(), time.process_time()))
            if out is not None:
                mimi.decode(out[:, 1:])
            sync()
            marks.append((time.perf_counter(), time.process_time()))
            if out is not None:
                outputs.append(out[:, :, 0].cpu())
            if index >= warmup:
                for part, (start, end) in _SPANS.items():
                    run.wall[part].append(marks[end][0] - marks[start][0])
                    run.cpu[part].append(marks[end][1] - marks[start][1])
            if on_frame is not None:
                on_frame()
    run.tokens = torch.stack(outputs) if outputs else torch.empty(0, batch, 0, dtype=torch.long)
    return run
