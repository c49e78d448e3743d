"""Streaming generation frame by frame on CPU (Mimi encode + LM step + Mimi decode): ours against Kyutai's ``moshi``.

Usage, from the repository root:
    .venv/bin/python benchmarks/stream_vs_kyutai.py --kyutai-python /tmp/kvenv/bin/python
        [--config mid] [--batch 1] [--frames 40] [--warmup 3] [--rounds 3] [--threads 2] [--seed 0]

Kyutai's package lives in a throwaway venv of its own: see ``benchmarks/kyutai_side.py`` for the recipe.

What it does:
    * Every measurement runs in a fresh worker process (this file with ``--worker``), rounds alternating which
      side goes first. Kyutai's worker builds the LM (``lm_step.CONFIGS[config]`` with Mimi's 2048-entry
      codebooks, so Mimi's codes are valid LM input) and Mimi (``mimi_vs_kyutai``'s seeded random weights) and
      saves both; ours loads those files strictly, so both sides run the same weights on the same audio.
    * Each worker streams ``--warmup + --frames`` frames of the seeded test signal through
      ``stream_frame.run_frames`` with greedy decoding (``LMGen(use_sampling=False)``) and times the last
      ``--frames``; the parent checks that both sides produced the same tokens at every frame.
    * It prints each side's median and p90 per frame (wall and CPU time) for the whole frame and each part,
      the ratio ``kyutai / ours`` (above 1: ours is faster) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules; benchmarks/ holds no `moshi`
import lm_step  # noqa: E402
import mimi_vs_kyutai  # noqa: E402
import stream_frame  # noqa: E402
from kyutai_side import SIDES, comparison_parser, emit, run_side, run_worker_or_parent  # noqa: E402

MIMI_CODEBOOK_SIZE = 2048


def lm_config(name: str) -> dict[str, Any]:
    """The LM shape ``name`` of ``lm_step.CONFIGS`` with Mimi's codebook size."""
    return {**lm_step.CONFIGS[name], "card": MIMI_CODEBOOK_SIZE}


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of ``values`` (numpy's default rule)."""
    return float(numpy.quantile(numpy.asarray(values, dtype=numpy.float64), q))


# ---- worker (runs in a fresh interpreter; imports torch and one of the two `moshi` packages) -------------------


def run_worker(args: argparse.Namespace) -> None:
    """Builds (Kyutai) or loads (ours) the seeded LM and Mimi, streams the frames, prints one result line."""
    import torch
    from safetensors.torch import load_file, save_file

    from moshi.models.lm import LMGen, LMModel

    torch.set_num_threads(args.threads)
    folder = Path(args.workdir)
    lm_weights, mimi_weights = folder / "lm.safetensors", folder / "mimi.safetensors"
    config = lm_config(args.config)
    torch.manual_seed(args.seed)
    lm = LMModel(**config, device="cpu", dtype=torch.float32)
    n_user = config["n_q"] - config["dep_q"]
    if args.worker == "kyutai":
        if not lm_weights.exists():
            save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(lm_weights))
        mimi = mimi_vs_kyutai._build_kyutai(mimi_weights, args.seed, n_user)
    else:
        lm.load_state_dict(load_file(str(lm_weights)), strict=True)
        mimi = mimi_vs_kyutai._build_ours(mimi_weights, n_user)
    lm.eval()
    mimi.eval()
    lm_gen = LMGen(lm, use_sampling=False)
    audio = mimi_vs_kyutai._audio((args.warmup + args.frames) / 12.5, args.batch, args.seed)
    run = stream_frame.run_frames(mimi, lm_gen, audio, args.warmup)
    tokens_path = folder / f"tokens_{args.worker}.npy"  # compared by the parent
    if not tokens_path.exists():
        numpy.save(tokens_path, run.tokens.numpy())
    emit({"side": args.worker, "threads": torch.get_num_threads(), "wall": run.wall, "cpu": run.cpu,
          "frames": run.frames})


# ---- parent -----------------------------------------------------------------------------------------------------


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and p90 per part over every timed frame of every round, in milliseconds."""
    out: dict[str, Any] = {}
    for clock in ("wall", "cpu"):
        for part in stream_frame.PARTS:
            values = [t for record in records for t in record[clock][part]]
            out[f"{part}_{clock}_median_ms"] = round(1000 * statistics.median(values), 3)
            out[f"{part}_{clock}_p90_ms"] = round(1000 * quantile(values, 0.9), 3)
    out["frames_timed"] = sum(record["frames"] for record in records)
    out["moshi_file"] = records[0]["moshi_file"]
    out["torch"] = records[0]["torch"]
    return out


def _compare_tokens(folder: Path) -> dict[str, Any]:
    ours, kyutai = (numpy.load(folder / f"tokens_{side}.npy") for side in ("ours", "kyutai"))
    if ours.shape != kyutai.shape:
        return {"tokens_shape_ours": list(ours.shape), "tokens_shape_kyutai": list(kyutai.shape), "identical": False}
    same = (ours == kyutai).reshape(ours.shape[0], -1).all(axis=1)
    first_diff = int(numpy.argmin(same)) if not same.all() else None
    return {"frames_compared": int(same.size), "frames_identical": int(same.sum()), "identical": bool(same.all()),
            "first_differing_frame": first_diff}


def run_parent(args: argparse.Namespace) -> None:
    """Alternates worker rounds between the sides; prints medians, p90s, the speed ratio and a JSON line."""
    options = ["--config", args.config, "--batch", str(args.batch), "--frames", str(args.frames),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed)]
    records: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="stream_vs_kyutai_") as tmp:
        for round_index in range(args.rounds):
            # Kyutai first in round 0: its worker writes the shared weights files.
            order = ("kyutai", "ours") if round_index % 2 == 0 else ("ours", "kyutai")
            for side in order:
                record = run_side(side, __file__, [*options, "--workdir", tmp], args.kyutai_python, args.threads,
                                  Path(tmp))
                records[side].append(record)
                frame = record["wall"]["frame"]
                print(f"round {round_index + 1}/{args.rounds} {side:6s}: frame median "
                      f"{1000 * statistics.median(frame):.1f} ms, p90 {1000 * quantile(frame, 0.9):.1f} ms "
                      f"over {len(frame)} frames", flush=True)
        tokens = _compare_tokens(Path(tmp))
    summary = {side: _summary(records[side]) for side in SIDES}
    ratios = {
        f"{part}_{clock}": round(summary["kyutai"][f"{part}_{clock}_median_ms"]
                                 / summary["ours"][f"{part}_{clock}_median_ms"], 3)
        for clock in ("wall", "cpu") for part in stream_frame.PARTS
    }
    for side in SIDES:
        s = summary[side]
        parts = ", ".join(f"{part} {s[f'{part}_wall_median_ms']:.1f}" for part in stream_frame.PARTS[:-1])
        print(f"{side:6s} ({s['moshi_file']}): frame median {s['frame_wall_median_ms']:.1f} ms "
              f"(p90 {s['frame_wall_p90_ms']:.1f}, cpu {s['frame_cpu_median_ms']:.1f}); {parts} ms")
    print(f"speed ratio kyutai/ours per frame ({args.config}, batch {args.batch}, {args.threads} threads): "
          f"wall {ratios['frame_wall']:.3f}x, cpu {ratios['frame_cpu']:.3f}x; greedy tokens identical on "
          f"{tokens.get('frames_identical', 0)}/{tokens.get('frames_compared', 0)} frames")
    print(json.dumps({
        "name": "stream_vs_kyutai", "config": args.config, "batch": args.batch, "frames": args.frames,
        "warmup": args.warmup, "threads": args.threads, "rounds": args.rounds, "ours": summary["ours"],
        "kyutai": summary["kyutai"], "speed_ratio": ratios, "tokens": tokens,
    }), flush=True)


def main() -> None:
    parser = comparison_parser(__doc__, "worker runs per side, alternating sides")
    parser.add_argument("--config", default="mid", choices=sorted(lm_step.CONFIGS), help="LM shape")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=40, help="timed frames per worker run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames first (at least the LM's delay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    run_worker_or_parent(parser, args, run_worker, run_parent, ["rounds", "batch", "frames"])


if __name__ == "__main__":
    main()
