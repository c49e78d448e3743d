"""Cost of the up-front data scan (every manifest line checked before step 1), cold vs warm codes cache.

Usage:
    python benchmarks/data_scan.py [--lines 1000] [--file-sec 1.0]

Writes `--lines` distinct stereo files with their alignments and one manifest, then times:
  no_cache       the scan without `data.cache_dir`: each file's header is read
  warm_cache     a fresh scan with every file in the codes cache: no audio is opened (the memoised
                 content hash leads to the cache entry, whose header gives the duration)
  same_process   the same scan again in the same process (the trainer's second pass: stats only)
Each case prints one human line and one JSON line (wall seconds, CPU seconds, audio headers read).
The cache is filled with a stand-in encoder: the scan reads entries' headers, never their codes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from finetune.data import scan as scan_mod
from finetune.data.alignments import AlignedWord, write_alignments
from finetune.data.audio import write_wav
from finetune.data.codes_cache import AudioCodec, CodesStore
from finetune.data.manifest import read_manifest, write_manifest
from finetune.data.scan import ScanOptions, ScanStats, scan_entries


class StandInEncoder:
    """Mimi's interface with zero codes: filling the cache must not dominate the benchmark's run time."""

    sample_rate = 24000
    frame_rate = 12.5
    frame_size = 1920
    num_codebooks = 8

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.num_codebooks, x.shape[-1] // self.frame_size, dtype=torch.long)


def make_dataset(root: Path, lines: int, file_sec: float) -> Path:
    rng = np.random.default_rng(0)
    n = int(file_sec * 24000)
    items = []
    for i in range(lines):
        wav = root / f"{i // 100:03d}" / f"f{i:05d}.wav"
        write_wav(wav, (0.1 * rng.standard_normal((2, n))).astype(np.float32), 24000)
        write_alignments(wav.with_suffix(".json"), [AlignedWord("hello", 0.1, 0.4), AlignedWord("there", 0.5, 0.8)])
        items.append((wav, file_sec))
    manifest = root / "data.jsonl"
    write_manifest(manifest, items)
    return manifest


def timed(name: str, entries, opts: ScanOptions, clear_memo: bool) -> dict:
    if clear_memo:
        scan_mod._MEMO.clear()
    stats = ScanStats()
    t0, c0 = time.perf_counter(), _cpu()
    problems = scan_entries(entries, opts, stats)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if problems:
        raise SystemExit(f"{name}: unexpected problems: {problems[:3]}")
    row = {"case": name, "lines": len(entries), "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
           "audio_headers_read": stats.audio_headers_read, "known_from_cache": stats.known_from_cache,
           "memo_hits": stats.memo_hits}
    print(f"{name:<13} {len(entries)} lines: {wall:.3f} s wall, {cpu:.3f} s CPU, "
          f"{stats.audio_headers_read} audio headers read, {stats.known_from_cache} known from the cache")
    print(json.dumps(row))
    return row


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--file-sec", type=float, default=1.0)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_dataset(root / "data", a.lines, a.file_sec)
        entries = read_manifest(manifest)
        cache = root / "cache"
        CodesStore(AudioCodec(StandInEncoder(), device="cpu"), cache, encoder_id="standin").get_many(entries)
        timed("no_cache", entries, ScanOptions(), clear_memo=True)
        warm = timed("warm_cache", entries, ScanOptions(cache_dir=str(cache)), clear_memo=True)
        timed("same_process", entries, ScanOptions(cache_dir=str(cache)), clear_memo=False)
        if warm["audio_headers_read"]:
            print("warm cache: audio was read", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
