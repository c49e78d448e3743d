"""Per-frame latency of the chat server's batched generator at 1, 2, 4... conversations at once.

Usage:
    python benchmarks/server_sessions.py --out runs/server_sessions            # tiny and mid on the CPU
    python benchmarks/server_sessions.py --out OUT --configs mid --sessions 1 2 4 8 --steps 50
    python benchmarks/server_sessions.py --out OUT --device cuda --configs 7b   # moshiko's shape, bf16

One server frame is what :class:`moshi.server.engine.BatchEngine` does every 80 ms: Mimi-encode one frame per
conversation, one LM step (text + depformer, per-conversation sampling), Mimi-decode. Every slot is live, fed
speech-like noise. Models have random weights (timing only): ``tiny`` is the demo's LM and Mimi, ``mid`` is
moshiko's structure at a CPU-friendly width with the full-size Mimi, ``7b`` is moshiko itself.

Writes ``results.json`` (rows + provenance), ``results.csv`` and ``latency.png`` under ``--out``; prints a line
per run and, per config, the most conversations whose p99 stays under the 80 ms frame.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.reporting import add_common_arguments, provenance, pyplot, save_figure, write_csv, write_json  # noqa: E402
from moshi.models.compression import DEFAULT_MIMI_CONFIG, TINY_MIMI_CONFIG, build_mimi  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402
from moshi.models.loaders import default_lm_kwargs  # noqa: E402
from moshi.models.model_loading import resolve_device, resolve_dtype  # noqa: E402
from moshi.server.engine import BatchEngine, SlotLMGen, timed_step  # noqa: E402

FRAME_MS = 80.0
MOSHIKO_DELAYS = [0, 0] + [1] * 7 + [0] + [1] * 7


def _tiny_lm_config() -> dict:
    spec = importlib.util.spec_from_file_location("make_tiny_assets", REPO / "scripts" / "make_tiny_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_lm_config(text_card=48, card=TINY_MIMI_CONFIG["quantizer"]["bins"])


def configs() -> dict[str, tuple[dict, dict]]:
    """name -> (LM kwargs, Mimi config)."""
    mid = {
        **_tiny_lm_config(), "dim": 512, "num_layers": 8, "num_heads": 8, "text_card": 32000, "card": 2048,
        "n_q": 16, "dep_q": 8, "context": 3000, "depformer_dim": 256, "depformer_num_layers": 2,
        "depformer_num_heads": 4, "depformer_dim_feedforward": int(4.125 * 256), "depformer_context": 8,
        "delays": MOSHIKO_DELAYS,
    }
    return {
        "tiny": (_tiny_lm_config(), TINY_MIMI_CONFIG),
        "mid": (mid, DEFAULT_MIMI_CONFIG),
        "7b": (default_lm_kwargs(), DEFAULT_MIMI_CONFIG),
    }


def run(lm: LMModel, mimi, sessions: int, steps: int, warmup: int, seed: int) -> list[float]:
    """Step times (ms) of ``steps`` frames with ``sessions`` live conversations."""
    engine = BatchEngine(SlotLMGen(lm, sessions), mimi, sessions)
    try:
        engine.warm_up(frames=warmup)
        rng = np.random.default_rng(seed)
        times = []
        for _ in tqdm(range(steps), desc=f"{sessions} sessions", leave=False):
            frames = {s: (0.1 * rng.standard_normal(engine.frame_size)).astype(np.float32) for s in range(sessions)}
            times.append(timed_step(engine, frames, {})[1])
        return times
    finally:
        engine.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    p.add_argument("--configs", nargs="+", default=None, choices=["tiny", "mid", "7b"],
                   help="default: tiny and mid (plus 7b on CUDA)")
    p.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=40, help="timed frames per run")
    p.add_argument("--warmup", type=int, default=4, help="untimed frames per run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    dtype = resolve_dtype(None if args.dtype == "auto" else args.dtype, device)
    names = args.configs or (["tiny", "mid", "7b"] if device.type == "cuda" else ["tiny", "mid"])
    table = configs()
    rows = []
    for name in names:
        lm_kwargs, mimi_config = table[name]
        lm = LMModel(**lm_kwargs, device=device, dtype=dtype).eval()
        mimi = build_mimi(copy.deepcopy(mimi_config), device=device).eval()
        mimi.set_num_codebooks(max(lm.dep_q, lm.n_q - lm.dep_q))
        for n in args.sessions:
            times = np.asarray(run(lm, mimi, n, args.steps, args.warmup, args.seed))
            row = {
                "config": name, "sessions": n, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                "threads": torch.get_num_threads(), "steps": len(times),
                "ms_p50": round(float(np.percentile(times, 50)), 2),
                "ms_p99": round(float(np.percentile(times, 99)), 2),
                "ms_mean": round(float(times.mean()), 2),
                "real_time": bool(np.percentile(times, 99) < FRAME_MS),
            }
            rows.append(row)
            print(f"{name:5s} {n} sessions: p50 {row['ms_p50']:.1f} ms, p99 {row['ms_p99']:.1f} ms per frame "
                  f"({'under' if row['real_time'] else 'over'} {FRAME_MS:.0f} ms)", flush=True)
        del lm, mimi
    summary = {}
    for name in names:
        ok = [r["sessions"] for r in rows if r["config"] == name and r["real_time"]]
        summary[name] = max(ok) if ok else 0
        print(f"{name}: at most {summary[name]} conversations with p99 under {FRAME_MS:.0f} ms (of those tried)")
    out = args.out
    write_json(out / "results.json", {"rows": rows, "max_real_time_sessions": summary,
                                      "provenance": provenance(extra={"frame_ms": FRAME_MS, "load_average": os.getloadavg()})})
    write_csv(out / "results.csv", rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        mine = [r for r in rows if r["config"] == name]
        ax.plot([r["sessions"] for r in mine], [r["ms_p50"] for r in mine], "o-", label=f"{name} p50")
        ax.plot([r["sessions"] for r in mine], [r["ms_p99"] for r in mine], "s--", label=f"{name} p99")
    ax.axhline(FRAME_MS, color="red", lw=1, label="80 ms frame")
    ax.set_xlabel("conversations at once")
    ax.set_ylabel("ms per frame")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    save_figure(fig, out / "latency.png")


if __name__ == "__main__":
    main()
