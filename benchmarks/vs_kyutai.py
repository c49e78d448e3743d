"""Side-by-side speed of our Moshi LM / Mimi and Kyutai's ``moshi`` package on this machine.

Usage (from the repo root, with the project's venv):
    python benchmarks/vs_kyutai.py lm --kyutai-python /tmp/kvenv/bin/python      # mid LM training step
    python benchmarks/vs_kyutai.py mimi --kyutai-python /tmp/kvenv/bin/python    # Mimi encode + decode of 10 s

Kyutai's package is named ``moshi`` like ours, so it lives in a throwaway venv of its own, with the same torch:
    python -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0
    /tmp/kvenv/bin/pip install --no-deps moshi==0.2.13
    /tmp/kvenv/bin/pip install 'numpy<2.3' safetensors einops sentencepiece 'sphn<0.3' 'huggingface-hub<1' tqdm

Each round runs both sides once, in fresh processes started with ``python -I`` (so ``import moshi`` is the
interpreter's own package; each result names the file it imported), alternating which side goes first.
Medians over rounds of wall time and of CPU time (user + system) are printed with their ratio; CPU time is
the steadier figure on a shared machine. Random weights with fixed seeds, float32.

- ``lm``: one training step (forward + backward) of the mid config of ``benchmarks/lm_step.py``. Kyutai's side
  runs upstream's loss (forward to full logits, masked CE); ours runs our trainer's loss (``MoshiLoss``:
  the text head fused into a chunked CE) and, as a third line, upstream's loss on our model.
- ``mimi``: one-shot encode and decode of ``--seconds`` of audio, batch 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("vs_kyutai_worker.py")


def run_side(python: str, job: dict) -> dict:
    """One timed run of ``job`` in a fresh ``python -I`` process."""
    proc = subprocess.run([python, "-I", str(WORKER), json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{python} failed on {job['bench']}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["lm", "mimi"])
    parser.add_argument("--kyutai-python", required=True, help="interpreter whose `moshi` is Kyutai's package")
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="mimi: audio duration")
    args = parser.parse_args()

    base = {"bench": args.bench, "threads": args.threads, "warmup": args.warmup, "iters": args.iters}
    if args.bench == "lm":
        base.update(config="mid", batch=2, frames=250)
        sides = {
            "kyutai (upstream loss)": (args.kyutai_python, {"loss": "logits"}),
            "ours (trainer loss)": (args.ours_python, {"loss": "trainer"}),
            "ours (upstream loss)": (args.ours_python, {"loss": "logits"}),
        }
    else:
        base.update(seconds=args.seconds, batch=1, num_codebooks=8)
        sides = {"kyutai": (args.kyutai_python, {}), "ours": (args.ours_python, {})}

    results: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            python, extra = sides[name]
            res = run_side(python, {**base, **extra})
            results[name].append(res)
            print(f"round {r + 1} {name:24s} wall {res['wall_s']:.3f} s  cpu {res['cpu_s']:.3f} s  "
                  f"({res['moshi_file']})", flush=True)

    ref = next(iter(sides))
    summary = {"bench": args.bench, "threads": args.threads, "rounds": args.rounds, "sides": {}}
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_s")}
        summary["sides"][name] = med
    ref_med = summary["sides"][ref]
    for name, med in summary["sides"].items():
        detail = "  ".join(f"{k} {v:.3f}" for k, v in med.items() if k not in ("wall_s", "cpu_s"))
        print(f"{name:24s} median wall {med['wall_s']:.3f} s ({ref_med['wall_s'] / med['wall_s']:.2f}x)  "
              f"cpu {med['cpu_s']:.3f} s ({ref_med['cpu_s'] / med['cpu_s']:.2f}x)  {detail}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
