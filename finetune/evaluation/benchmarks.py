"""The benchmark sets a config names, and one finite pass over a set, sharded over ranks.

Each evaluation builds its pass afresh from the set's ids, so every evaluation of a run scores the same
items; rank r of W scores items r, r+W, ... of the id-ordered list, every rank runs the same number of
forwards (a collective under FSDP), and the records are gathered and put back in id order on every rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from finetune.args import EvalArgs, TrainArgs
from finetune.distributed import get_rank, get_world_size, is_initialized
from finetune.evaluation.items import ItemCoder
from finetune.evaluation.layout import MmluSet, PairSet, item_sort_key, read_mmlu_set, read_pair_set, set_root
from finetune.evaluation.mmlu import score_mmlu
from finetune.evaluation.pairs import score_pairs
from finetune.evaluation.results import set_result
from finetune.evaluation.scoring import ScoreSpec

SLM_SETS = ("swuggy", "sblimp", "ssc")


@dataclass
class BenchmarkSet:
    """A named set: `group` is `slm`, `cd` or `mmlu` (the metric prefix), `data` its parsed layout."""

    name: str
    group: str
    path: Path
    data: PairSet | MmluSet

    @property
    def kind(self) -> str:
        return "mmlu" if isinstance(self.data, MmluSet) else "pairs"

    @property
    def metric_prefix(self) -> str:
        return "mmlu" if self.group == "mmlu" else f"{self.group}/{self.name}"


def configured_sets(args: TrainArgs, slm: bool | None = None, cd: bool | None = None, mmlu: bool | None = None
                    ) -> list[BenchmarkSet]:
    """The sets of the config's `data.*_data` keys; each group defaults to its `do_*` switch."""
    slm = args.do_slm if slm is None else slm
    cd = args.do_cd if cd is None else cd
    mmlu = args.do_mmlu if mmlu is None else mmlu
    out: list[BenchmarkSet] = []
    if slm:
        for name in SLM_SETS:
            spec = getattr(args.data, f"{name}_data").strip()
            if spec:
                out.append(BenchmarkSet(name, "slm", set_root(spec), read_pair_set(spec)))
    if cd:
        for part in filter(None, (p.strip() for p in args.data.cd_data.split(","))):
            root = set_root(part)
            out.append(BenchmarkSet(root.name, "cd", root, read_pair_set(root)))
    if mmlu and args.data.mmlu_data.strip():
        root = set_root(args.data.mmlu_data.strip())
        out.append(BenchmarkSet("mmlu", "mmlu", root, read_mmlu_set(root, args.evaluation.mmlu_shots)))
    names = [s.name for s in out]
    for n in names:
        if names.count(n) > 1 or n == "mmlu_text":
            raise ValueError(f"two evaluation sets are both named {n!r} (a data.cd_data folder takes its folder's "
                             "name, which must differ from the others and from swuggy, sblimp, ssc, mmlu, mmlu_text)")
    return out


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's records on every rank (identity on one process)."""
    if not is_initialized() or get_world_size() == 1:
        return records
    parts: list[Any] = [None] * get_world_size()
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


def run_set(
    model: nn.Module,
    bset: BenchmarkSet,
    coder: ItemCoder,
    spec: ScoreSpec,
    settings: EvalArgs,
    device: torch.device,
    dataset_digest: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Scores the set (its first `max_pairs` / `mmlu_max_questions` by id), sharded over ranks; the set's result."""
    rank, world = get_rank(), get_world_size()
    start = time.perf_counter()
    if isinstance(bset.data, PairSet):
        pairs = bset.data.pairs[: settings.max_pairs]
        mine = pairs[rank::world]
        per_batch = settings.pairs_per_batch
        largest_shard = math.ceil(len(pairs) / world)
        batches = math.ceil(largest_shard / per_batch)
        records = score_pairs(model, bset.data, coder, spec, settings.text_row, device, mine, per_batch,
                              num_batches=batches if world > 1 else None, progress=progress)
    else:
        questions = bset.data.questions[: settings.mmlu_max_questions]
        mine = questions[rank::world]
        records = score_mmlu(model, bset.data, coder, spec, settings, device, mine, coder.max_frames,
                             num_forwards=math.ceil(len(questions) / world) if world > 1 else None, progress=progress)
    records = sorted(gather_records(records), key=lambda r: item_sort_key(r["item_id"]))
    return set_result(bset.kind, str(bset.path), dataset_digest, records, time.perf_counter() - start)
