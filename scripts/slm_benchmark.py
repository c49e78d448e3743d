"""Paired spoken-LM benchmarks (sWUGGY, sBLIMP, spoken StoryCloze, custom pair sets) for one or more checkpoints.

Usage:
    python scripts/slm_benchmark.py CONFIG [--checkpoint CKPT ...] --out DIR [--sets swuggy,cd_qa_m]
        [--set KEY=VALUE ...] [--device auto] [--dtype auto]

CONFIG is the training YAML: its model paths give the base model, its `data.swuggy_data`, `sblimp_data`,
`ssc_data` and `cd_data` the sets (whatever the `do_*` switches say), its `evaluation:` keys the scoring
(`--set text_row=pad` overrides one). Each `--checkpoint` (base Moshi, a LoRA, merged or full export, a DSAA
checkpoint; `base` = the config's model, the default) is scored on every set under both protocols.

Writes under --out: `<label>.json` per checkpoint (per-item scores and correctness, totals, breakdowns,
provenance; format in docs/evaluation.md), `summary.csv` and `accuracy.png`. Prints accuracies and items/s.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from finetune.cli import run_main
from finetune.evaluation.benchmarks import configured_sets
from finetune.evaluation.runner import (
    BASE,
    CheckpointRunner,
    add_evaluation_arguments,
    checkpoint_labels,
    load_config,
    write_outputs,
)
from finetune.reporting import add_common_arguments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_evaluation_arguments(parser)
    parser.add_argument("--sets", default=None, help="comma-separated set names to score (default: all configured)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_common_arguments(parser)
    a = parser.parse_args(argv)
    args = load_config(a.config, a.evaluation_overrides)
    sets = configured_sets(args, slm=True, cd=True, mmlu=False)
    if a.sets:
        wanted = [s.strip() for s in a.sets.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {s.name for s in sets}]
        if unknown:
            raise ValueError(f"--sets: {unknown} not among the config's sets {[s.name for s in sets]}")
        sets = [s for s in sets if s.name in wanted]
    if not sets:
        raise ValueError(f"{a.config}: no paired set: set data.swuggy_data, sblimp_data, ssc_data or cd_data")
    checkpoints = a.checkpoint or [BASE]
    runner = CheckpointRunner(args, a.config, sets, a.device, a.dtype, progress=not a.no_progress)
    docs = {label: runner.evaluate(c, label) for c, label in zip(checkpoints, checkpoint_labels(checkpoints))}
    for path in write_outputs(a.out, docs, "slm"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
