"""Synthetic data for the data-tool tests: stereo tone bursts, alignments, manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from finetune.data.alignments import MAIN_SPEAKER, AlignedWord
from finetune.data.audio import write_wav

REPO = Path(__file__).resolve().parents[2]
SR = 24000



def tone(duration: float, bursts: Sequence[tuple[float, float]], freq: float = 220.0, amp: float = 0.3,
         sr: int = SR, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A mono signal that is a sine of `freq` inside each (start, end) burst and silent (or `noise`) elsewhere."""
    n = int(round(duration * sr))
    t = np.arange(n) / sr
    x = np.zeros(n, dtype=np.float32)
    for start, end in bursts:
        m = (t >= start) & (t < end)
        x[m] = amp * np.sin(2 * np.pi * freq * t[m])
    if noise:
        x += noise * np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return x


def make_stereo(path: Path, duration: float = 3.0, left=((0.5, 2.0),), right=((0.2, 1.0), (2.2, 2.8)),
                sr: int = SR, left_freq: float = 220.0, right_freq: float = 330.0) -> Path:
    wav = np.stack([tone(duration, left, left_freq, sr=sr), tone(duration, right, right_freq, sr=sr)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, wav, sr)
    return path


def words(*items: tuple[str, float, float], speaker: str = MAIN_SPEAKER) -> list[AlignedWord]:
    return [AlignedWord(t, s, e, speaker) for t, s, e in items]


def write_manifest_lines(path: Path, lines: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines), encoding="utf-8")
    return path
