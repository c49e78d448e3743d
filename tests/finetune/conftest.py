"""Fixtures for the fine-tuning tests: a tiny SentencePiece model, synthetic stereo datasets, tiny Mimi."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from finetune.data.alignments import AlignedWord, write_alignments
from finetune.data.audio import write_wav
from finetune.data.manifest import write_manifest

WORDS = ["hello", "world", "how", "are", "you", "today", "fine", "thanks", "good", "morning", "yes", "no",
         "maybe", "later", "speech", "model", "train", "data", "audio", "text"]


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    """A 40-piece SentencePiece model trained on a generated corpus (ids 0-2: unk/bos/eos)."""
    import sentencepiece

    d = tmp_path_factory.mktemp("spm")
    rng = np.random.default_rng(0)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, size=8)) for _ in range(400)) + "\n")
    prefix = d / "tiny"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=40, model_type="unigram",
        character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def tiny_mimi():
    """Tiny Mimi whose codebooks are drawn from its own latents of synthetic speech.

    With random centroids, the latents of a random tiny encoder all fall nearest to the same
    codeword; drawing centroids from the data makes codes vary with the audio, so tests
    comparing codes can fail.
    """
    import torch

    from moshi.models.compression import TINY_MIMI_CONFIG, build_mimi

    torch.manual_seed(0)
    mimi = build_mimi(TINY_MIMI_CONFIG)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.from_numpy(synth_stereo(4.0, 24000, s))[:, None] for s in range(4)])
    with torch.no_grad():
        latent = mimi.encode_to_latent(x, quantize=False)
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            residual = rvq.input_proj(latent).float()
            for layer in rvq.vq.layers:
                cb = layer._codebook
                vecs = residual.transpose(1, 2).reshape(-1, cb.dim)
                pick = torch.randint(len(vecs), (cb.codebook_size,), generator=g)
                noise = 0.1 * vecs.std(0) * torch.randn(cb.codebook_size, cb.dim, generator=g)
                cb.embedding_sum.copy_(vecs[pick] + noise)
                cb.cluster_usage.fill_(1.0)
                residual = residual - layer.decode(layer.encode(residual))
    return mimi


def synth_stereo(duration: float, sr: int, seed: int, channels: int = 2) -> np.ndarray:
    """Speech-like noise bursts, different on each channel."""
    rng = np.random.default_rng(seed)
    n = int(round(duration * sr))
    t = np.arange(n) / sr
    out = []
    for c in range(channels):
        env = (np.sin(2 * np.pi * (0.7 + 0.3 * c) * t + seed) > 0).astype(np.float32)
        tone = np.sin(2 * np.pi * (180 + 40 * c + 13 * seed) * t)
        out.append((0.3 * env * tone + 0.02 * rng.standard_normal(n)).astype(np.float32))
    return np.stack(out)


def words_for(duration: float, seed: int, speaker_every: int = 4) -> list[AlignedWord]:
    """A word every ~0.4 s; every `speaker_every`-th word belongs to the other speaker."""
    rng = np.random.default_rng(seed)
    out, t, i = [], 0.1, 0
    while t + 0.3 < duration:
        w = str(rng.choice(WORDS))
        speaker = "SPEAKER_OTHER" if speaker_every and i % speaker_every == speaker_every - 1 else "SPEAKER_MAIN"
        out.append(AlignedWord(w, round(t, 3), round(t + 0.3, 3), speaker))
        t += 0.4 + float(rng.uniform(0, 0.2))
        i += 1
    return out


@pytest.fixture
def make_dataset(tmp_path) -> Callable[..., Path]:
    """`make_dataset(durations, name=..., sr=..., channels=...)` -> manifest path (wav + json per file)."""

    def make(durations: list[float], name: str = "ds", sr: int = 24000, channels: int = 2, seed: int = 0,
             manifest_durations: list[float] | None = None, extra_lines: list[Any] | None = None) -> Path:
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        items = []
        for i, dur in enumerate(durations):
            wav = root / f"a{i}.wav"
            write_wav(wav, synth_stereo(dur, sr, seed + i, channels), sr)
            write_alignments(wav.with_suffix(".json"), words_for(dur, seed + i))
            items.append((wav, (manifest_durations or durations)[i]))
        manifest = root / f"{name}.jsonl"
        write_manifest(manifest, items)
        if extra_lines:
            with open(manifest, "a") as f:
                for line in extra_lines:
                    f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
        return manifest

    return make


def _base_config(train_data: str, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "data": {"train_data": train_data, "shuffle": True},
        "run_dir": str(run_dir),
        "lora": {"enable": True, "rank": 4},
        "duration_sec": 2.0,
        "batch_size": 2,
        "max_steps": 10,
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


@pytest.fixture
def base_config() -> Callable[..., dict[str, Any]]:
    """`base_config(train_data, run_dir, **overrides)`: a small LoRA config dict (2 s chunks, batch 2)."""
    return _base_config


@pytest.fixture
def synth() -> Callable[..., np.ndarray]:
    """`synth(duration, sr, seed, channels=2)`: synthetic `[C, n]` audio."""
    return synth_stereo


@pytest.fixture
def tok(spm_model):
    """The tiny SentencePiece model behind Kyutai's text-tokenizer interface."""
    from finetune.data.text_tokenizer import SentencePieceTextTokenizer

    return SentencePieceTextTokenizer(spm_model)


@pytest.fixture
def store(tiny_mimi):
    """An in-memory codes store over the tiny Mimi (no disk cache)."""
    from finetune.data.codes_cache import AudioCodec, CodesStore

    return CodesStore(AudioCodec(tiny_mimi))
