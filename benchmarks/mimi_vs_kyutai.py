"""One-shot Mimi encode and decode on CPU: this repository's implementation against Kyutai's ``moshi`` package.

Usage, from the repository root:
    .venv/bin/python benchmarks/mimi_vs_kyutai.py --kyutai-python /tmp/kvenv/bin/python
        [--seconds 10] [--batch 1] [--rounds 3] [--repeats 3] [--threads 2] [--seed 0] [--num-codebooks 8]

Kyutai's package lives in a throwaway venv of its own: see ``benchmarks/kyutai_side.py`` for the recipe.

What it does:
    * Every measurement runs in a fresh worker process (this file with ``--worker``, started by
      ``kyutai_side.run_side``, which checks that each side imported its own ``moshi``).
    * Kyutai's worker builds its Mimi with random weights from ``--seed`` (codebooks filled with normal
      noise: a fresh Kyutai codebook is all zeros) and saves them; our worker loads that file, so both sides
      run the same weights on the same audio (a seeded sine plus noise), and the parent reports whether the
      codes are identical and the largest difference between the two decoded signals.
    * Rounds alternate the order of the two sides. Each worker warms up once, then times ``--repeats``
      encodes of ``--seconds`` of audio and ``--repeats`` decodes of the resulting codes.
    * It prints each side's median encode and decode times (over all rounds and repeats), the real-time
      factors, the speed ratio ``kyutai / ours`` for encode + decode (above 1: ours is faster), and one JSON
      line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kyutai_side; benchmarks/ holds no `moshi`
from kyutai_side import SIDES, comparison_parser, emit, run_side, run_worker_or_parent  # noqa: E402

# ---- worker (runs in a fresh interpreter; imports torch and one of the two `moshi` packages) -------------------


def _audio(seconds: float, batch: int, seed: int) -> Any:
    """Seeded test signal ``[batch, 1, L]``: a 220 Hz sine plus noise, ``L`` a whole number of 1920-sample frames."""
    import torch

    frames = max(1, round(seconds * 12.5))
    samples = frames * 1920
    generator = torch.Generator().manual_seed(seed + 1)
    t = torch.arange(samples, dtype=torch.float64) / 24000
    tone = (0.3 * torch.sin(2 * torch.pi * 220 * t)).float()
    return tone + 0.05 * torch.randn(batch, 1, samples, generator=generator)


def _digest(tensor: Any) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def _build_kyutai(weights: Path, seed: int, num_codebooks: int) -> Any:
    """Kyutai's Mimi with seeded random weights, saved to ``weights`` for our worker to load."""
    import torch
    from safetensors.torch import save_file

    from moshi.models import loaders

    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, device="cpu")
    state = mimi.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for key in sorted(state):
        if key.endswith("embedding_sum"):
            state[key] = torch.randn(state[key].shape, generator=generator)
        elif key.endswith("_initialized"):
            state[key] = torch.ones_like(state[key])
    mimi.load_state_dict(state)
    mimi.set_num_codebooks(num_codebooks)
    if not weights.exists():
        save_file({key: value.contiguous() for key, value in state.items()}, str(weights))
    return mimi


def _build_ours(weights: Path, num_codebooks: int) -> Any:
    from moshi.models.loaders import get_mimi

    return get_mimi(weights, num_codebooks=num_codebooks)


def _time(fn: Any, repeats: int) -> tuple[Any, list[float]]:
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def run_worker(args: argparse.Namespace) -> None:
    """Builds one side's Mimi, times one-shot encode and decode, prints one result line."""
    import torch

    torch.set_num_threads(args.threads)
    weights = Path(args.weights)
    if args.worker == "kyutai":
        mimi = _build_kyutai(weights, args.seed, args.num_codebooks)
    else:
        mimi = _build_ours(weights, args.num_codebooks)
    audio = _audio(args.seconds, args.batch, args.seed)
    with torch.inference_mode():
        codes, encode_s = _time(lambda: mimi.encode(audio), args.repeats)
        decoded, decode_s = _time(lambda: mimi.decode(codes), args.repeats)
    decoded_path = weights.parent / f"decoded_{args.worker}.npy"  # compared by the parent
    if not decoded_path.exists():
        numpy.save(decoded_path, decoded.numpy())
    record = {
        "side": args.worker,
        "threads": torch.get_num_threads(),
        "encode_s": encode_s,
        "decode_s": decode_s,
        "audio_digest": _digest(audio),
        "codes_shape": list(codes.shape),
        "codes_digest": _digest(codes),
        "decoded_abs_sum": float(decoded.double().abs().sum()),
    }
    emit(record)


# ---- parent -----------------------------------------------------------------------------------------------------


def _run_side(args: argparse.Namespace, side: str, weights: Path) -> dict[str, Any]:
    options = [
        "--weights", str(weights), "--seconds", str(args.seconds), "--batch", str(args.batch),
        "--repeats", str(args.repeats), "--threads", str(args.threads), "--seed", str(args.seed),
        "--num-codebooks", str(args.num_codebooks),
    ]
    return run_side(side, __file__, options, args.kyutai_python, args.threads, weights.parent)


def _summary(records: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    encode = statistics.median(t for r in records for t in r["encode_s"])
    decode = statistics.median(t for r in records for t in r["decode_s"])
    return {
        "encode_median_s": round(encode, 4),
        "decode_median_s": round(decode, 4),
        "total_s": round(encode + decode, 4),
        "encode_rtf": round(encode / duration, 4),
        "decode_rtf": round(decode / duration, 4),
        "moshi_file": records[0]["moshi_file"],
        "torch": records[0]["torch"],
    }


def run_parent(args: argparse.Namespace) -> None:
    """Alternates worker rounds between the two sides and prints medians, the speed ratio and a JSON line."""
    duration = max(1, round(args.seconds * 12.5)) * 1920 / 24000
    records: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="mimi_vs_kyutai_") as tmp:
        weights = Path(tmp) / "mimi_random.safetensors"
        for round_index in range(args.rounds):
            # Kyutai first in round 0: its worker writes the shared weights file.
            order = ("kyutai", "ours") if round_index % 2 == 0 else ("ours", "kyutai")
            for side in order:
                record = _run_side(args, side, weights)
                records[side].append(record)
                print(
                    f"round {round_index + 1}/{args.rounds} {side:6s}: encode "
                    + " ".join(f"{t:.3f}" for t in record["encode_s"])
                    + " s, decode "
                    + " ".join(f"{t:.3f}" for t in record["decode_s"])
                    + " s",
                    flush=True,
                )
        decoded = [numpy.load(Path(tmp) / f"decoded_{side}.npy") for side in SIDES]
    max_decoded_diff = float(numpy.abs(decoded[0] - decoded[1]).max())
    summary = {side: _summary(records[side], duration) for side in SIDES}
    ratio = summary["kyutai"]["total_s"] / summary["ours"]["total_s"]
    first = {side: records[side][0] for side in SIDES}
    same_audio = first["ours"]["audio_digest"] == first["kyutai"]["audio_digest"]
    same_codes = first["ours"]["codes_digest"] == first["kyutai"]["codes_digest"]
    for side in SIDES:
        s = summary[side]
        print(
            f"{side:6s} ({s['moshi_file']}): encode {s['encode_median_s']:.3f} s (rtf {s['encode_rtf']:.4f}), "
            f"decode {s['decode_median_s']:.3f} s (rtf {s['decode_rtf']:.4f}), total {s['total_s']:.3f} s"
        )
    print(
        f"speed ratio kyutai/ours (encode + decode of {duration:.2f} s, batch {args.batch}, {args.threads} threads): "
        f"{ratio:.3f}x; same audio: {same_audio}; identical codes: {same_codes}; "
        f"max |decoded ours - decoded kyutai| {max_decoded_diff:.2e}"
    )
    record = {
        "name": "mimi_vs_kyutai",
        "audio_s": duration,
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "num_codebooks": args.num_codebooks,
        "ours": summary["ours"],
        "kyutai": summary["kyutai"],
        "speed_ratio": round(ratio, 3),
        "encode_ratio": round(summary["kyutai"]["encode_median_s"] / summary["ours"]["encode_median_s"], 3),
        "decode_ratio": round(summary["kyutai"]["decode_median_s"] / summary["ours"]["decode_median_s"], 3),
        "same_audio": same_audio,
        "identical_codes": same_codes,
        "max_decoded_abs_diff": max_decoded_diff,
    }
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = comparison_parser(__doc__, "worker runs per side, alternating sides")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio duration (whole 80 ms frames)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed encodes and decodes per worker run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-codebooks", type=int, default=8)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    run_worker_or_parent(parser, args, run_worker, run_parent, ["rounds", "repeats", "batch"])


if __name__ == "__main__":
    main()
