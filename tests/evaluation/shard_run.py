"""Run by `torch.distributed.run` in the sharding test: scores a pair set over the ranks, rank 0 writes the result.

Usage: python -m torch.distributed.run --nproc-per-node 2 -m tests.evaluation.shard_run SET_DIR OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from finetune.args import EvalArgs
from finetune.evaluation.benchmarks import BenchmarkSet, run_set
from finetune.evaluation.layout import read_pair_set
from finetune.evaluation.scoring import score_spec


def main(set_dir: str, out: str) -> None:
    from tests.evaluation.conftest import CopyLM, make_coder

    dist.init_process_group("gloo")
    model = CopyLM()
    settings = EvalArgs(pairs_per_batch=2)
    bset = BenchmarkSet("swuggy", "slm", read_pair_set(set_dir).files.root, read_pair_set(set_dir))
    result = run_set(model, bset, make_coder(), score_spec(model, settings, 1.0), settings, torch.device("cpu"))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"result": result, "world": dist.get_world_size(), "forwards": model.forwards}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
