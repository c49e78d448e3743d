"""Stores the inputs of a DSAA model's projectors on a subsample of frames, for ae_train.py.

Usage:
    python scripts/get_vectors.py CONFIG --out DIR [--checkpoint CKPT] [--split train|eval] [--augment]
        [--frame-fraction 0.25] [--heldout-fraction 0.1] [--max-batches N] [--batch-size N]
        [--store-dtype float16] [--shard-mb 256] [--budget-gb 50] [--device auto] [--dtype auto]
    torchrun --nproc-per-node 8 scripts/get_vectors.py CONFIG --out DIR ...

The vectors are what the projectors read, computed without gradients: ``z = [h, a]`` (the text projector's
input) and ``e.{k}``, the token embedding depformer step ``k`` adds, so depformer projector ``k`` reads
``dep_proj_in.{k} = [z, e.{k}]``. ``z`` is stored once and the concatenations are declared in the manifest
and built on read (a ``1 + dep_q``-fold saving). Each frame is kept with probability ``--frame-fraction``
(seeded by batch); every file is either training or held-out (``--heldout-fraction`` of the files, chosen
by name), marked per frame in the ``heldout`` column. Batches are the config's data in file order without
augmentation; ``--augment`` takes the training loader's first ``--max-batches`` batches with ``data.aug``.
Writes ``DIR/shard-rRRR-NNNNN.safetensors`` and ``DIR/manifest.rankR.json`` (resumable).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from finetune.analysis.hidden_states import (
    BatchInfo,
    add_data_arguments,
    config_batches,
    load_for_analysis,
    rank_and_world,
    run_extraction,
    script_device,
    shard_writer,
)
from finetune.analysis.sae_training import split_files
from finetune.cli import run_main
from finetune.reporting import add_common_arguments, provenance
from moshi.models.dsaa import dsaa_vectors, is_dsaa


def vector_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """``codes -> {"z", "e.0", ...}``: the projector inputs, ``z`` once and each step's token embedding."""
    def compute(codes: torch.Tensor) -> dict[str, torch.Tensor]:
        vectors = dsaa_vectors(model, codes)
        z = vectors[0]
        return {"z": z, **{f"e.{k}": v[..., z.shape[-1]:] for k, v in enumerate(vectors[1:])}}
    return compute


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser, split="train", store_dtype="float16")
    parser.add_argument("--augment", action="store_true", help="the training loader's augmented batches")
    parser.add_argument("--frame-fraction", type=float, default=0.25, help="probability of keeping a frame")
    parser.add_argument("--heldout-fraction", type=float, default=0.1, help="fraction of files held out")
    add_common_arguments(parser)
    opts = parser.parse_args(argv)
    if not 0 < opts.frame_fraction <= 1:
        raise ValueError(f"--frame-fraction must be in (0, 1], got {opts.frame_fraction}")

    rank, world = rank_and_world()
    device = script_device(opts.device)
    args, loaded, tokenizer = load_for_analysis(opts.config, opts.checkpoint, device, opts.dtype)
    model = loaded.lm
    if not is_dsaa(model):
        raise ValueError(f"{opts.config}: get_vectors.py reads a DSAA model's projector inputs (text_llm.enable)")
    batches, count, frame_rate = config_batches(
        args, tokenizer, loaded.mimi, split=opts.split, batch_size=opts.batch_size, max_batches=opts.max_batches,
        duration_sec=opts.duration_sec, rank=rank, world_size=world, device=device, augment=opts.augment,
    )
    data = args.data.train_data if opts.split == "train" else args.data.eval_data
    from finetune.data.dataset import all_entries, load_sources

    files = [str(e.path) for e in all_entries(load_sources(data, f"data.{opts.split}_data", 1.0, frame_rate, None))]
    heldout = split_files(files, opts.heldout_fraction, opts.seed)
    text_dim, z_dim = model.text_projector.text_dim, model.text_projector.text_dim + model.dim
    header = {
        "kind": "vectors", "config": str(opts.config), "checkpoint": opts.checkpoint, "split": opts.split,
        "augment": opts.augment, "world_size": world, "frame_rate": frame_rate, "seed": opts.seed,
        "frame_fraction": opts.frame_fraction, "heldout_files": sorted(heldout), "store_dtype": opts.store_dtype,
        "pad_id": model.text_padding_token_id, "epad_id": model.end_of_text_padding_id,
        "streams": {"z": {"dim": z_dim, "text_dim": text_dim},
                    **{f"e.{k}": {"dim": model.depformer_dim} for k in range(model.dep_q)}},
        "composites": {f"dep_proj_in.{k}": ["z", f"e.{k}"] for k in range(model.dep_q)},
        "batch_size": opts.batch_size or args.batch_size, "duration_sec": opts.duration_sec or args.eval_duration_sec,
    }

    def keep(batch: BatchInfo) -> torch.Tensor:
        g = torch.Generator().manual_seed(opts.seed * 1_000_003 + rank * 10_007 + batch.index)
        B, _, T = batch.codes.shape
        return torch.rand(B, T, generator=g) < opts.frame_fraction

    def held(batch: BatchInfo, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        flags = torch.tensor([name in heldout for name in writer.manifest["files"]] or [False], dtype=torch.uint8)
        return {"heldout": flags[rows["file"].long()]}

    writer = shard_writer(opts, header, rank)
    record = {"heldout_files": sorted(heldout),
              "provenance": provenance(extra={"config": str(opts.config), "checkpoint": opts.checkpoint})}
    run_extraction(loaded, vector_fn(model), batches, count, writer, frame_rate=frame_rate, rank=rank,
                   timed_batches=opts.timed_batches, desc="vectors", record=record, keep=keep, extra_columns=held)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
