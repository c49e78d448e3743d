"""Spoken MMLU per subject for one or more checkpoints, and text-only MMLU of a DSAA model's LLM branch.

Usage:
    python scripts/mmlu_benchmark.py CONFIG [--checkpoint CKPT ...] --out DIR [--set KEY=VALUE ...]
        [--no-text-mmlu] [--device auto] [--dtype auto]

CONFIG is the training YAML: its model paths give the base model, `data.mmlu_data` the spoken MMLU folder
(choice clips A-D, prefix, shots per subject, questions; see docs/evaluation.md), its `evaluation:` keys the
scoring (`mmlu_text_weight`/`mmlu_audio_weight` of the fork protocol, `mmlu_choice_frames`, `mmlu_shots`,
`mmlu_long_context`, `mmlu_max_questions`; `--set KEY=VALUE` overrides one). `--checkpoint base` (the default)
is the config's model. For a DSAA model the LLM branch alone also answers the same questions as text
(set `mmlu_text`, protocol `llm`) unless --no-text-mmlu.

Writes under --out: `<label>.json` per checkpoint (per-question scores of the four choices, totals, per-subject
breakdown, provenance), `summary.csv`, `subjects.csv` (accuracy per subject and protocol) and `accuracy.png`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
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
from finetune.reporting import add_common_arguments, write_csv


def subject_rows(docs: dict) -> list[dict]:
    rows = []
    for label, doc in docs.items():
        for name, result in doc["sets"].items():
            for subject, cell in result["breakdown"].get("subject", {}).items():
                for p, t in cell.items():
                    rows.append({"checkpoint": label, "set": name, "subject": subject, "protocol": p,
                                 "accuracy": t["accuracy"], "n": t["n"]})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_evaluation_arguments(parser)
    parser.add_argument("--no-text-mmlu", action="store_true", help="skip the text-only MMLU of a DSAA LLM branch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_common_arguments(parser)
    a = parser.parse_args(argv)
    args = load_config(a.config, a.evaluation_overrides)
    if not args.data.mmlu_data.strip():
        raise ValueError(f"{a.config}: data.mmlu_data is empty (the spoken MMLU folder)")
    sets = configured_sets(args, slm=False, cd=False, mmlu=True)
    checkpoints = a.checkpoint or [BASE]
    runner = CheckpointRunner(args, a.config, sets, a.device, a.dtype, progress=not a.no_progress,
                              text_mmlu=not a.no_text_mmlu)
    docs = {label: runner.evaluate(c, label, kind="mmlu")
            for c, label in zip(checkpoints, checkpoint_labels(checkpoints))}
    written = write_outputs(a.out, docs, "mmlu")
    written.append(write_csv(Path(a.out) / "subjects.csv", subject_rows(docs)))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
