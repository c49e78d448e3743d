"""Data pipeline throughput: batches/s and CPU seconds per batch, cold cache vs warm cache vs no cache.

Usage:
    python benchmarks/data_pipeline.py [--files 6] [--file-sec 30] [--duration 10] [--batch 2] [--batches 24]
        [--threads 1] [--config tiny|default]

Cases (tiny Mimi by default, synthetic stereo files, CPU):
  cold           first pass with an empty `data.cache_dir` (whole-file encodes + cache writes)
  warm_disk      a new run on the filled cache (codes read from disk, no Mimi)
  warm_memory    steady state (codes already in memory: the cost of every later epoch)
  no_cache       `cache_dir: null`, first pass (whole-file encodes kept in memory only)
  per_chunk      each chunk read and encoded alone (the path wave augmentation takes)
Then one forward+backward step of the small test LM on a batch of the same shape, and the
ratio of each case to it (target: warm cache < 2% of a step). Each case prints one human
line and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from finetune.args import TrainArgs
from finetune.data.alignments import AlignedWord, write_alignments
from finetune.data.audio import write_wav
from finetune.data.codes_cache import AudioCodec, CodesStore
from finetune.data.dataset import build_train_loader
from finetune.data.manifest import write_manifest

ROOT = Path(__file__).resolve().parents[1]


class WordTokenizer:
    """Stand-in text tokenizer (ids from a hash): the benchmark times the pipeline, not SentencePiece."""

    pad_id, epad_id, initial_id, vocab_size = 3, 0, 1000, 1000

    def encode_word(self, word: str) -> list[int]:
        return [10 + (sum(map(ord, word)) + k) % 900 for k in range(1 + len(word) // 4)]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def make_dataset(root: Path, n_files: int, seconds: float, sr: int = 24000) -> Path:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n_files):
        n = int(seconds * sr)
        wav = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
        p = root / f"f{i}.wav"
        write_wav(p, wav, sr)
        words = [AlignedWord(f"w{j % 50}", t, t + 0.3) for j, t in enumerate(np.arange(0.1, seconds - 0.5, 0.45))]
        write_alignments(p.with_suffix(".json"), words)
        items.append((p, seconds))
    manifest = root / "data.jsonl"
    write_manifest(manifest, items)
    return manifest


def time_batches(loader, n: int) -> tuple[float, float]:
    """(wall s, CPU s) per batch over `n` batches."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(loader)
    return (time.perf_counter() - w0) / n, (time.process_time() - c0) / n


def lm_step_seconds(batch: int, frames: int, repeats: int = 3) -> float | None:
    try:
        from moshi.models.lm import LMModel

        sys.path.insert(0, str(ROOT / "tests"))
        from helpers.configs import small_lm_kwargs
    except ImportError:
        return None
    kw = small_lm_kwargs()
    model = LMModel(**kw).train()
    K = 1 + kw["n_q"]
    codes = torch.randint(0, kw["card"], (batch, K, frames))
    codes[:, 0] = torch.randint(0, kw["text_card"], (batch, frames))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = model(codes)
        loss = out.logits.float().nan_to_num().mean() + out.text_logits.float().nan_to_num().mean()
        loss.backward()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--file-sec", type=float, default=30.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=0, help="batches per case (default: one epoch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", choices=["tiny", "default"], default="tiny")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from moshi.models.compression import DEFAULT_MIMI_CONFIG, TINY_MIMI_CONFIG, build_mimi

    mimi = build_mimi(TINY_MIMI_CONFIG if a.config == "tiny" else DEFAULT_MIMI_CONFIG)
    mimi.set_num_codebooks(8)
    tok = WordTokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_dataset(root, a.files, a.file_sec)
        cache = root / "cache"

        def loader(cache_dir, aug=None):
            cfg = {"data": {"train_data": str(manifest), "shuffle": True, "cache_dir": cache_dir,
                            "aug": aug or {}},
                   "run_dir": str(root / "run"), "lora": {"enable": True}, "duration_sec": a.duration,
                   "batch_size": a.batch}
            args = TrainArgs.from_dict(cfg)
            store = CodesStore(AudioCodec(mimi), cache_dir, encoder_id="bench")
            return build_train_loader(args, tok, store, log_every=0)

        first = loader(str(cache))
        n_chunks = sum(len(s.chunks) for s in first.sources)
        n = a.batches or max(1, n_chunks // a.batch)
        cases = {}
        cases["cold"] = time_batches(first, n)
        cases["warm_disk"] = time_batches(loader(str(cache)), n)
        warm = loader(str(cache))
        time_batches(warm, max(1, n_chunks // a.batch + 1))  # load every file once
        cases["warm_memory"] = time_batches(warm, n)
        cases["no_cache"] = time_batches(loader(None), n)
        cases["per_chunk"] = time_batches(loader(None, {"gain_prob": 1.0, "gain_db": [0.0, 0.0]}), n)
        frames = first.builder.T
    step = lm_step_seconds(a.batch, frames)
    if step is not None:
        print(f"lm step (small test LM, fwd+bwd, B={a.batch}, T={frames}): {step * 1e3:.1f} ms")
    for name, (wall, cpu) in cases.items():
        ratio = f", {100 * wall / step:.2f}% of an LM step" if step else ""
        print(f"{name:12s} {1 / wall:8.1f} batches/s  {cpu * 1e3:8.2f} ms CPU/batch{ratio}")
        print(json.dumps({"name": f"data_pipeline/{name}", "device": "cpu", "config": a.config,
                          "batch_size": a.batch, "duration_sec": a.duration, "files": a.files,
                          "file_sec": a.file_sec, "batches": n, "batches_per_s": 1 / wall,
                          "wall_s_per_batch": wall, "cpu_s_per_batch": cpu, "lm_step_s": step,
                          "ratio_to_step": (wall / step) if step else None, "threads": a.threads}))


if __name__ == "__main__":
    main()
