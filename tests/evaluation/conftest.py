"""Benchmark folders made in the test, a codec whose codes the test chooses, and LMs with known preferences.

`LevelEncoder` turns each 1920-sample frame of constant amplitude ``c / 40`` into code ``c`` on every
codebook, so a test writes the exact codes it wants as audio. The fake LMs return `LMOutput` like the real
one (logits at frame t score frame t, masks false on zero tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from finetune.data.audio import write_wav
from finetune.data.codes_cache import AudioCodec, CodesStore
from finetune.data.interleaver import Interleaver
from finetune.data.manifest import write_manifest
from finetune.evaluation.items import ItemCoder
from moshi.models.lm import LMOutput

SR = 24000
FRAME = 1920
LEVEL = 40.0
CARD = 32
N_Q = 4  # audio codebooks in the model input: 2 per channel
DEP_Q = 2  # predicted: Moshi's channel
TEXT_CARD = 16


class LevelEncoder:
    sample_rate = SR
    frame_size = FRAME
    frame_rate = 12.5

    def __init__(self, num_codebooks: int = N_Q // 2) -> None:
        self.num_codebooks = num_codebooks

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        B, _, L = x.shape
        level = x.view(B, L // FRAME, FRAME).mean(-1)
        codes = (level * LEVEL).round().clamp(0, CARD - 1).long()
        return codes[:, None].expand(B, self.num_codebooks, -1).contiguous()


class StubTokenizer:
    pad_id = 3
    epad_id = 0

    def encode_word(self, word: str) -> list[int]:
        return [5 + len(word) % 7]


def level_wave(codes: list[int]) -> np.ndarray:
    """Stereo audio whose left channel encodes to ``codes`` (one per frame); the right one is silence."""
    left = np.repeat(np.asarray(codes, dtype=np.float32) / LEVEL, FRAME)
    return np.stack([left, np.zeros_like(left)])


def write_set(root: Path, items: dict[int, list[int]], extra: list[dict[str, Any]],
              side_map: list[dict[str, Any]] | None = None, alignments: dict[int, list] | None = None) -> Path:
    """A benchmark folder: `data_stereo/N.wav` per item (left channel = the given codes), data.jsonl, extra.txt."""
    (root / "data_stereo").mkdir(parents=True, exist_ok=True)
    entries = []
    for n in sorted(items):
        wav = root / "data_stereo" / f"{n}.wav"
        write_wav(wav, level_wave(items[n]), SR)
        words = (alignments or {}).get(n, [])
        (root / "data_stereo" / f"{n}.json").write_text(json.dumps({"alignments": words}))
        entries.append((wav, len(items[n]) / 12.5))
    write_manifest(root / "data.jsonl", entries)
    (root / "extra.txt").write_text("".join(json.dumps(x) + "\n" for x in extra))
    if side_map:
        cols = list(side_map[0])
        lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in side_map]
        (root / "side_map.csv").write_text("\n".join(lines) + "\n")
    return root


def pair_items(n_pairs: int, pos_code: int = 5, neg_code: int = 7, frames: int = 6, positive_second: bool = True,
               vary_length: bool = True) -> tuple[dict[int, list[int]], list[dict[str, Any]]]:
    """Pairs whose positive is all ``pos_code`` and negative all ``neg_code`` (lengths differing within a pair
    when ``vary_length``); labels in extra.txt."""
    items, extra = {}, []
    for i in range(n_pairs):
        first_pos = not positive_second if i % 2 == 0 else positive_second  # alternate which one is positive
        a, b = 2 * i, 2 * i + 1
        items[a] = [pos_code if first_pos else neg_code] * frames
        items[b] = [neg_code if first_pos else pos_code] * (frames + (i % 3 if vary_length else 0))
        extra += [{"file_index": a, "number": int(first_pos)}, {"file_index": b, "number": int(not first_pos)}]
    return items, extra


def noise_set(root: Path, labels: dict[int, dict[str, Any] | None], seconds: float = 0.48) -> Path:
    """A benchmark folder of real-sounding items (noise bursts left, silence right) for a real Mimi.

    ``labels[N]`` is the `extra.txt` record of item N without its file_index (None: no line).
    """
    (root / "data_stereo").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries, extra = [], []
    for n, label in sorted(labels.items()):
        left = (0.1 * rng.standard_normal(int(SR * seconds))).astype(np.float32)
        write_wav(root / "data_stereo" / f"{n}.wav", np.stack([left, np.zeros_like(left)]), SR)
        (root / "data_stereo" / f"{n}.json").write_text('{"alignments": []}')
        entries.append((root / "data_stereo" / f"{n}.wav", seconds))
        if label is not None:
            extra.append({"file_index": n, **label})
    write_manifest(root / "data.jsonl", entries)
    (root / "extra.txt").write_text("".join(json.dumps(x) + "\n" for x in extra))
    return root


def noise_pair_set(root: Path, n_pairs: int = 3) -> Path:
    """Pairs (2i, 2i+1) of noise items, the odd one positive."""
    return noise_set(root, {n: {"number": n % 2} for n in range(2 * n_pairs)})


def noise_mmlu_set(root: Path, subjects: int = 2, questions: int = 2) -> Path:
    """Choices A-D, prefix, item 5, one shot per subject, then the questions (golds 0, 1, ...)."""
    labels: dict[int, dict[str, Any] | None] = {n: None for n in range(6)}
    for s in range(subjects):
        labels[6 + s] = {"number": s % 4, "subject_index": s}
    for q in range(questions):
        labels[6 + subjects + q] = {"number": q % 4, "subject_index": q % subjects}
    return noise_set(root, labels)


def make_coder(max_frames: int = 200) -> ItemCoder:
    store = CodesStore(AudioCodec(LevelEncoder(), device="cpu"))
    return ItemCoder(store, Interleaver(StubTokenizer()), max_frames=max_frames)


@pytest.fixture
def coder() -> ItemCoder:
    return make_coder()


class FakeLM(nn.Module):
    """`LMOutput` from a rule: ``audio_logits(codes) -> [B, dep_q, T, card]``; text logits uniform."""

    n_q = N_Q
    dep_q = DEP_Q
    context = 200

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.forwards = 0  # calls, so a test can check that every rank runs as many

    def audio_logits(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_logits(self, codes: torch.Tensor) -> torch.Tensor:
        B, _, T = codes.shape
        return torch.zeros(B, 1, T, TEXT_CARD)

    def forward(self, codes: torch.Tensor) -> LMOutput:
        self.forwards += 1
        logits = self.audio_logits(codes) + 0 * self.dummy
        mask = codes[:, 1 : 1 + DEP_Q] != -1
        return LMOutput(logits, mask, self.text_logits(codes), codes[:, :1] != -1)


class PreferenceLM(FakeLM):
    """Puts extra mass on one code everywhere (``strength`` 0: uniform, indifferent)."""

    def __init__(self, code: int, strength: float = 3.0) -> None:
        super().__init__()
        self.code, self.strength = code, strength

    def audio_logits(self, codes: torch.Tensor) -> torch.Tensor:
        B, _, T = codes.shape
        logits = torch.zeros(B, DEP_Q, T, CARD)
        logits[..., self.code] = self.strength
        return logits


class CopyLM(FakeLM):
    """Predicts that each frame repeats the previous one (a causal rule; frame 0 uniform)."""

    def audio_logits(self, codes: torch.Tensor) -> torch.Tensor:
        B, _, T = codes.shape
        logits = torch.zeros(B, DEP_Q, T, CARD)
        prev = codes[:, 1 : 1 + DEP_Q, :-1].clamp(min=0)
        logits[:, :, 1:].scatter_(-1, prev.unsqueeze(-1), 8.0)
        return logits


class OracleLM(FakeLM):
    """Knows the answer: the logits at frame t put (almost) all mass on the codes of frame t, text included."""

    def audio_logits(self, codes: torch.Tensor) -> torch.Tensor:
        B, _, T = codes.shape
        logits = torch.full((B, DEP_Q, T, CARD), -1e4)
        return logits.scatter_(-1, codes[:, 1 : 1 + DEP_Q].clamp(min=0).unsqueeze(-1), 0.0)

    def text_logits(self, codes: torch.Tensor) -> torch.Tensor:
        B, _, T = codes.shape
        logits = torch.full((B, 1, T, TEXT_CARD), -1e4)
        return logits.scatter_(-1, codes[:, :1].clamp(min=0).unsqueeze(-1), 0.0)
