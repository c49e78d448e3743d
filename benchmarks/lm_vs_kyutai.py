"""One LM training step (forward + backward) on CPU: this repository's Moshi LM against Kyutai's ``moshi``.

Usage, from the repository root:
    .venv/bin/python benchmarks/lm_vs_kyutai.py --kyutai-python /tmp/kvenv/bin/python
        [--config mid] [--rounds 3] [--iters 3] [--warmup 1] [--threads 2]

Kyutai's package lives in a throwaway venv of its own: see ``benchmarks/kyutai_side.py`` for the recipe.

What it does:
    * Three sides, each in fresh worker processes (this file with ``--worker``), rounds alternating the order:
      Kyutai's ``LMModel`` with upstream's loss (``model(codes)``, then masked CE on the full logits, as
      ``moshi-finetune`` trains), ours with our trainer's loss (``MoshiLoss``: ``forward_train`` and the text
      head fused into a chunked CE, what ``train.py`` runs), and ours with upstream's loss.
    * Kyutai's worker builds the model from ``benchmarks/lm_step.py``'s config with seeded random weights and
      saves them; ours loads that file (strict), so all sides compute the same numbers on the same codes. The
      losses of the first round are compared.
    * Each worker times ``--iters`` steps after ``--warmup`` (``lm_step.run_one``); the parent prints per-side
      medians over all rounds of wall time and of CPU time (user + system, the steadier figure on a shared
      machine), the fastest single step of each side, their ratios to Kyutai's, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lm_step, kyutai_side; benchmarks/ holds no `moshi`
import lm_step  # noqa: E402
from kyutai_side import comparison_parser, emit, run_side, run_worker_or_parent  # noqa: E402

CASES = {  # name: (interpreter side, loss of lm_step.LOSSES)
    "kyutai, upstream loss": ("kyutai", "logits"),
    "ours, trainer loss": ("ours", "trainer"),
    "ours, upstream loss": ("ours", "logits"),
}


def run_worker(args: argparse.Namespace) -> None:
    """Builds (Kyutai) or loads (ours) the seeded model, checks one loss value, times the steps."""
    import torch
    from safetensors.torch import load_file, save_file

    from moshi.models.lm import LMModel

    torch.set_num_threads(args.threads)
    weights = Path(args.weights)
    torch.manual_seed(0)
    model = LMModel(**lm_step.CONFIGS[args.config], device="cpu", dtype=torch.float32)
    if args.worker == "kyutai":
        if not weights.exists():
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    else:
        model.load_state_dict(load_file(str(weights)), strict=True)
    model.train()
    codes = lm_step.random_codes(model, args.batch, args.frames, torch.device("cpu"))
    with torch.no_grad():
        loss = float(lm_step.LOSSES[args.loss](model, codes))
    timing = lm_step.run_one(args.config, "cpu", torch.float32, args.batch, args.frames, args.warmup, args.iters,
                             args.loss, model=model)
    emit({"side": args.worker, "loss": loss, "wall_s": timing["median_s"], "cpu_s": timing["cpu_median_s"],
          "best_s": timing["min_s"]})


def run_parent(args: argparse.Namespace) -> None:
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in CASES}
    options = ["--config", args.config, "--batch", str(args.batch), "--frames", str(args.frames),
               "--warmup", str(args.warmup), "--iters", str(args.iters), "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="lm_vs_kyutai_") as tmp:
        weights = Path(tmp) / "lm_random.safetensors"
        for r in range(args.rounds):
            # Kyutai first in round 0: its worker writes the shared weights file.
            order = list(CASES) if r % 2 == 0 else list(reversed(CASES))
            for name in order:
                side, loss = CASES[name]
                record = run_side(side, __file__, [*options, "--weights", str(weights), "--loss", loss],
                                  args.kyutai_python, args.threads, Path(tmp))
                records[name].append(record)
                print(f"round {r + 1}/{args.rounds} {name:22s} wall {record['wall_s']:.3f} s  "
                      f"cpu {record['cpu_s']:.3f} s  loss {record['loss']:.6f}", flush=True)
    medians = {
        name: {k: statistics.median(rec[k] for rec in recs) for k in ("wall_s", "cpu_s")}
        for name, recs in records.items()
    }
    # The fastest step of all rounds: the least disturbed by other load on a shared machine.
    best = {name: min(rec["best_s"] for rec in recs) for name, recs in records.items()}
    ref = medians["kyutai, upstream loss"]
    ref_best = best["kyutai, upstream loss"]
    losses = {name: recs[0]["loss"] for name, recs in records.items()}
    loss_spread = max(losses.values()) - min(losses.values())
    for name, med in medians.items():
        print(f"{name:22s} median wall {med['wall_s']:.3f} s ({ref['wall_s'] / med['wall_s']:.2f}x)  "
              f"cpu {med['cpu_s']:.3f} s ({ref['cpu_s'] / med['cpu_s']:.2f}x)  "
              f"best wall {best[name]:.3f} s ({ref_best / best[name]:.2f}x)  ({records[name][0]['moshi_file']})")
    print(f"same weights and codes: losses differ by at most {loss_spread:.2e}")
    print(json.dumps({
        "name": "lm_vs_kyutai", "config": args.config, "batch": args.batch, "frames": args.frames,
        "threads": args.threads, "rounds": args.rounds, "iters": args.iters, "medians": medians,
        "speedup_wall": {n: round(ref["wall_s"] / m["wall_s"], 3) for n, m in medians.items()},
        "speedup_cpu": {n: round(ref["cpu_s"] / m["cpu_s"], 3) for n, m in medians.items()},
        "best_wall_s": best, "speedup_best_wall": {n: round(ref_best / b, 3) for n, b in best.items()},
        "losses": losses, "torch": records["ours, trainer loss"][0]["torch"],
    }), flush=True)


def main() -> None:
    parser = comparison_parser(__doc__, "worker runs per case, alternating the order")
    parser.add_argument("--config", default="mid", choices=sorted(lm_step.CONFIGS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="timed steps per worker run")
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--loss", choices=sorted(lm_step.LOSSES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    run_worker_or_parent(parser, args, run_worker, run_parent, ["rounds", "iters", "batch", "frames"])


if __name__ == "__main__":
    main()
