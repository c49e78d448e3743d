"""Real-time factor of Mimi encode/decode (one-shot and 80 ms streaming), on CPU and on CUDA when present.

Usage:
    python benchmarks/mimi_codec.py [--seconds 10] [--batch-sizes 1 8] [--repeats 3] [--threads 2]
        [--devices cpu cuda] [--config default|tiny]

Each case prints one human line and one JSON line. ``rtf`` = processing time / audio duration (below 1 is
faster than real time); ``x_realtime`` = its inverse, counting every item of the batch. Weights are random
(timing does not depend on them); the default config is Kyutai's full-size Mimi.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from moshi.models.compression import DEFAULT_MIMI_CONFIG, TINY_MIMI_CONFIG, MimiModel, build_mimi


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cases(mimi: MimiModel, audio: torch.Tensor, codes: torch.Tensor) -> dict[tuple[str, str], Callable[[], object]]:
    batch = audio.shape[0]
    frame = mimi.frame_size

    def stream_encode() -> torch.Tensor:
        with mimi.streaming(batch):
            return torch.cat([mimi.encode(chunk) for chunk in audio.split(frame, dim=-1)], dim=-1)

    def stream_decode() -> torch.Tensor:
        with mimi.streaming(batch):
            return torch.cat([mimi.decode(codes[..., t : t + 1]) for t in range(codes.shape[-1])], dim=-1)

    return {
        ("encode", "one-shot"): lambda: mimi.encode(audio),
        ("decode", "one-shot"): lambda: mimi.decode(codes),
        ("encode", "streaming"): stream_encode,
        ("decode", "streaming"): stream_decode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio duration per item")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--config", choices=["default", "tiny"], default="default")
    parser.add_argument("--num-codebooks", type=int, default=8)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    config = DEFAULT_MIMI_CONFIG if args.config == "default" else TINY_MIMI_CONFIG
    sha = _git_sha()
    for device_name in devices:
        device = torch.device(device_name)
        torch.manual_seed(0)
        mimi = build_mimi(config, device=device)
        mimi.set_num_codebooks(args.num_codebooks)
        samples = int(round(args.seconds * mimi.sample_rate / mimi.frame_size)) * mimi.frame_size
        duration = samples / mimi.sample_rate
        for batch in args.batch_sizes:
            with torch.inference_mode():
                t = torch.arange(samples, device=device, dtype=torch.float32) / mimi.sample_rate
                audio = (0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(batch, 1, samples, device=device))
                codes = mimi.encode(audio)
                for (op, mode), fn in _cases(mimi, audio, codes).items():
                    seconds = _time(fn, device, args.repeats)
                    rtf = seconds / duration
                    record = {
                        "name": "mimi_codec",
                        "op": op,
                        "mode": mode,
                        "device": device_name,
                        "config": args.config,
                        "batch": batch,
                        "audio_s": duration,
                        "threads": args.threads,
                        "num_codebooks": args.num_codebooks,
                        "median_s": round(seconds, 4),
                        "rtf": round(rtf, 4),
                        "x_realtime": round(batch * duration / seconds, 2),
                        "git_sha": sha,
                    }
                    print(
                        f"mimi {op:6s} {mode:9s} {device_name} batch {batch}: {seconds:.3f} s for {duration:.1f} s "
                        f"of audio per item, rtf {rtf:.4f}, {record['x_realtime']:.1f}x real time",
                        flush=True,
                    )
                    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
