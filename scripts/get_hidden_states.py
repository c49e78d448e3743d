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
from typing import Sequence

from finetune.analysis.hidden_states import (
    add_data_arguments,
    config_batches,
    header_streams,
    hidden_state_fn,
    load_for_analysis,
    rank_and_world,
    run_extraction,
    run_trains_moshi,
    script_device,
    shard_writer,
    stream_specs,
)
from finetune.cli import run_main
from finetune.reporting import add_common_arguments, provenance


def parse_layers(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers: expected 'all' or comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser, split="eval", store_dtype="bfloat16")
    parser.add_argument("--layers", default="all", help="temporal layers: all, or e.g. 0,8,-1")
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
    writer = shard_writer(opts, header, rank)
    record = {"provenance": provenance(extra={"config": str(opts.config), "checkpoint": opts.checkpoint})}
    run_extraction(loaded, hidden_state_fn(model, specs), batches, count, writer, frame_rate=frame_rate,
                   rank=rank, timed_batches=opts.timed_batches, desc="hidden states", record=record)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
