"""The spoken-LM benchmarks of a training run (`do_slm`, `do_cd`, `do_mmlu`), run at every evaluation.

The sets are read once when the run starts (so a broken set stops the run before its first step); each
evaluation then scores all of them from a fresh pass, with the run's codes store and text tokenizer, and
returns flat metrics named with the protocol (``slm/swuggy/standard_acc``, ``cd/<set>/fork_acc``,
``mmlu/standard_acc``). Rank 0 also writes the full results (per-item records) to
``run_dir/evals/step_<N>.json`` in the format of `scripts/slm_benchmark.py`, so two steps can be compared
item by item.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from finetune.args import TrainArgs
from finetune.data.codes_cache import CodesStore
from finetune.data.interleaver import Interleaver
from finetune.data.text_tokenizer import TextTokenizer
from finetune.distributed import is_main
from finetune.evaluation.benchmarks import configured_sets, run_set
from finetune.evaluation.items import ItemCoder, model_max_frames
from finetune.evaluation.results import accuracy_metrics, results_document
from finetune.evaluation.scoring import score_spec
from finetune.reporting import provenance, write_json

logger = logging.getLogger(__name__)


class TrainingBenchmarks:
    """Callable ``(model, step) -> metrics``; built once per run by the data factory."""

    def __init__(self, args: TrainArgs, store: CodesStore, tokenizer: TextTokenizer, model: nn.Module,
                 device: Any) -> None:
        self.args = args
        self.sets = configured_sets(args)
        self.device = device
        self.coder = ItemCoder(store, Interleaver(tokenizer, store.codec.frame_rate), model_max_frames(model))
        self.spec = score_spec(model, args.evaluation, args.first_codebook_weight_multiplier)
        for s in self.sets:
            logger.info("evaluation set %s (%s): %d %s", s.metric_prefix, s.path,
                        len(s.data.pairs) if s.kind == "pairs" else len(s.data.questions),  # type: ignore[union-attr]
                        "pairs" if s.kind == "pairs" else "questions")

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        results: dict[str, Any] = {}
        for s in self.sets:
            result = run_set(model, s, self.coder, self.spec, self.args.evaluation, self.device)
            results[s.name] = result
            metrics.update(accuracy_metrics(s.metric_prefix, result))
            if result["n_errors"]:
                logger.warning("evaluation set %s: %d item(s) could not be scored (see evals/step_%d.json)",
                               s.metric_prefix, result["n_errors"], step)
        if is_main():
            doc = results_document(
                "slm", {"label": f"step_{step}", "path": None, "model_kind": "training"},
                provenance(extra={"step": step}), self.spec.describe(), asdict(self.args.evaluation), results)
            write_json(Path(self.args.run_dir) / "evals" / f"step_{step}.json", doc)
        return metrics


def format_benchmark_line(step: int, metrics: dict[str, float]) -> str:
    """One console line: every accuracy, protocol in the name."""
    accs = " - ".join(f"{k}: {100 * v:.1f}%" for k, v in metrics.items() if k.endswith("_acc"))
    return f"step: {step:06d} - {accs}"
