"""Stores per-frame hidden states of a Moshi or DSAA model on a training config's data, for analyze_states.py.

Usage:
    python scripts/get_hidden_states.py CONFIG --out DIR [--checkpoint CKPT] [--split eval|train]
        [--layers all|0,-1] [--batch-size N] [--max-batches N] [--duration-sec S] [--store-dtype bfloat16]
        [--shard-mb 256] [--budget-gb 50] [--timed-batches 4] [--device auto] [--dtype auto]
    torchrun --nproc-per-node 8 scripts/get_hidden_states.py CONFIG --out DIR ...   # each rank its batches

The model is the config's base model, or ``--checkpoint`` (a run's ``checkpoint_N``, its ``consolidated/``, or
a DSAA checkpoint) applied to it. Batches are the eval (or train) data through the training pipeline, in file
order, without augmentation. Streams: the chosen temporal layers, ``out_norm`` (``a`` for DSAA) and for DSAA
``h``, ``text_proj``, ``alpha_fusion`` and ``dep_proj.{k}`` (see ``docs/analysis.md``). Writes
``DIR/shard-rRRR-NNNNN.safetensors`` and ``DIR/manifest.rankR.json`` (resumable: run the same command again
after an interruption), and ``DIR/extraction.rankR.json`` with the timing of the hooked forward against a plain
forward on the same batches, which is also printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from finetune.analysis.hidden_states import (
    config_batches,
    extract,
    header_streams,
    hidden_state_fn,
    load_for_analysis,
    rank_and_world,
    run_trains_moshi,
    script_device,
    stream_specs,
)
from finetune.analysis.shards import BudgetReached, ShardWriter, storage_dtype
from finetune.cli import run_main
from finetune.reporting import add_common_arguments, provenance, write_json


def parse_layers(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers: expected 'all' or comma-separated integers, got {text!r}") from None


def add_data_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    """The data and storage options get_hidden_states.py and get_vectors.py share."""
    parser.add_argument("config", type=Path, help="training YAML (model paths and data)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint of the run (default: the base model)")
    parser.add_argument("--split", default=split, choices=["eval", "train"], help="which data of the config")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's batch_size")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="batches per rank (default: the config's eval_batches over all ranks)")
    parser.add_argument("--duration-sec", type=float, default=None, help="chunk length (default: eval_duration_sec)")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="size of one shard")
    parser.add_argument("--budget-gb", type=float, default=50.0, help="cap on the shards of one rank")
    parser.add_argument("--timed-batches", type=int, default=4,
                        help="batches also run as a plain forward, to measure the extraction's cost")


def report_timing(timing: dict[str, float], rank: int) -> None:
    if timing["timed_batches"]:
        print(f"rank {rank}: plain forward {timing['plain_forward_s']:.3f} s, extraction "
              f"{timing['extraction_s']:.3f} s over the same {timing['timed_batches']} batch(es): "
              f"{100 * timing['overhead']:+.1f} %; writing shards {timing['write_s']:.3f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser, split="eval")
    parser.add_argument("--layers", default="all", help="temporal layers: all, or e.g. 0,8,-1")
    parser.add_argument("--store-dtype", default="bfloat16", help="float32, bfloat16 or float16")
    add_common_arguments(parser)
    opts = parser.parse_args(argv)

    rank, world = rank_and_world()
    device = script_device(opts.device)
    args, loaded, tokenizer = load_for_analysis(opts.config, opts.checkpoint, device, opts.dtype)
    model = loaded.lm
    specs = stream_specs(model, parse_layers(opts.layers), only_text=args.only_text,
                         frozen_modules=args.text_llm.frozen_modules, trained=run_trains_moshi(args))
    batches, count, frame_rate = config_batches(
        args, tokenizer, loaded.mimi, split=opts.split, batch_size=opts.batch_size, max_batches=opts.max_batches,
        duration_sec=opts.duration_sec, rank=rank, world_size=world, device=device,
    )
    header = {
        "kind": "hidden_states", "model_kind": loaded.kind, "config": str(opts.config),
        "checkpoint": opts.checkpoint, "split": opts.split, "world_size": world, "frame_rate": frame_rate,
        "pad_id": model.text_padding_token_id, "epad_id": model.end_of_text_padding_id,
        "store_dtype": opts.store_dtype, "streams": header_streams(specs),
        "batch_size": opts.batch_size or args.batch_size, "duration_sec": opts.duration_sec or args.eval_duration_sec,
    }
    writer = ShardWriter(opts.out, header, rank=rank, stream_dtype=storage_dtype(opts.store_dtype),
                         shard_bytes=int(opts.shard_mb * 2**20), budget_bytes=int(opts.budget_gb * 2**30))
    done = len(writer.done_batches)
    bar = tqdm(total=count, initial=done, desc=f"hidden states (rank {rank})", unit="batch", disable=rank != 0)
    try:
        timing = extract(model, hidden_state_fn(model, specs), batches, writer, frame_rate=frame_rate,
                         pad_id=model.text_padding_token_id, epad_id=model.end_of_text_padding_id,
                         timed_batches=opts.timed_batches, on_batch=lambda _: bar.update())
    except BudgetReached as e:
        print(f"warning: {e}; stopping with what fits", file=sys.stderr)
        timing = None
    finally:
        bar.close()
    summary = timing.as_dict() if timing is not None else {}
    writer.finish(**summary)
    record = {"timing": summary, "device": str(device), "dtype": str(loaded.dtype), "sources": loaded.sources,
              "batches_stored": len(writer.done_batches), "batches_total": count,
              "provenance": provenance(extra={"config": str(opts.config), "checkpoint": opts.checkpoint})}
    write_json(opts.out / f"extraction.rank{rank}.json", record)
    if timing is not None:
        report_timing(summary, rank)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
