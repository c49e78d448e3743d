"""Shuffles a manifest with a seed and splits it into train and eval manifests.

Usage:
    python scripts/shuffle_dataset.py data.jsonl --eval-fraction 0.05 [--seed 0] [--out-dir DIR]
    python scripts/shuffle_dataset.py data.jsonl --eval-count 20

Writes `<out-dir>/train.jsonl` and `<out-dir>/eval.jsonl` (names: --train-name,
--eval-name; out-dir defaults to the manifest's folder) atomically. The split is a
function of the seed and the input order only, so it can be re-created; paths are
rewritten relative to the new files' folder so they stay valid wherever that is;
other keys of each line are kept. The split is by audio file: lines naming the same
file (duplicates, reported with their line numbers) all go to the same side, so no
recording is both trained and evaluated on; --eval-fraction and --eval-count count files.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path
from typing import Sequence, TypeVar

from finetune.cli import run_main
from finetune.data.manifest import ManifestEntry, read_manifest, write_manifest
from finetune.data.scan import describe_duplicates, duplicate_lines

T = TypeVar("T")


def eval_size(n: int, fraction: float | None, count: int | None) -> int:
    """How many items go to eval: `count`, or `fraction` of `n` rounded half up (at least 1 when > 0)."""
    if count is not None:
        k = count
        if k < 0:
            raise ValueError(f"--eval-count must be >= 0, got {k}")
    else:
        f = 0.0 if fraction is None else fraction
        if not 0 <= f < 1:  # also refuses nan and inf
            raise ValueError(f"--eval-fraction must be in [0, 1), got {f}")
        k = max(1, math.floor(n * f + 0.5)) if f > 0 else 0  # half rounds up
    if k >= n and n > 0:
        raise ValueError(f"eval split of {k} leaves no training data ({n} audio files in the manifest)")
    return k


def shuffle_split(items: Sequence[T], n_eval: int, seed: int) -> tuple[list[T], list[T]]:
    """(train, eval): a seeded permutation of `items`; eval is its first `n_eval` items."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order[n_eval:], order[:n_eval]


def split_by_file(entries: Sequence[ManifestEntry], n_eval: int, seed: int) -> tuple[list[ManifestEntry],
                                                                                     list[ManifestEntry]]:
    """(train, eval) lines: the distinct files are shuffled and split; each file keeps all its lines."""
    groups: dict[Path, list[ManifestEntry]] = {}
    for e in entries:
        groups.setdefault(e.path, []).append(e)
    train, evals = shuffle_split(list(groups.values()), n_eval, seed)
    return [e for g in train for e in g], [e for g in evals for e in g]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--eval-fraction", type=float, default=None, help="share of items for eval (e.g. 0.05)")
    g.add_argument("--eval-count", type=int, default=None, help="number of items for eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=None, help="default: the manifest's folder")
    p.add_argument("--train-name", default="train.jsonl")
    p.add_argument("--eval-name", default="eval.jsonl")
    args = p.parse_args(argv)

    entries = read_manifest(args.manifest)
    if not entries:
        raise ValueError(f"{args.manifest}: empty manifest")
    out_dir = args.out_dir or args.manifest.resolve().parent
    train_path, eval_path = out_dir / args.train_name, out_dir / args.eval_name
    for path in (train_path, eval_path):
        if path.resolve() == args.manifest.resolve():
            raise ValueError(f"{path} is the input manifest; choose another --out-dir or name")
    if train_path.resolve() == eval_path.resolve():
        raise ValueError(f"--train-name and --eval-name both give {train_path}")
    for group in duplicate_lines(entries):
        print(f"warning: {describe_duplicates(group)}; its lines stay together", file=sys.stderr)
    n_files = len({e.path for e in entries})
    train, evals = split_by_file(entries, eval_size(n_files, args.eval_fraction, args.eval_count), args.seed)
    write_manifest(train_path, train, relative=True)
    hours = [sum(e.duration for e in part) / 3600 for part in (train, evals)]
    msg = f"shuffle_dataset: seed {args.seed}, {len(train)} train ({hours[0]:.2f} h) -> {train_path}"
    if args.eval_fraction is not None or args.eval_count is not None:  # no split asked: shuffle only
        write_manifest(eval_path, evals, relative=True)
        msg += f", {len(evals)} eval ({hours[1]:.2f} h) -> {eval_path}"
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
