"""Trains one top-k sparse autoencoder per stream of stored vectors and measures it on held-out files.

Usage:
    python scripts/ae_train.py VECTORS_DIR --out DIR [--streams z,dep_proj_in.0] [--objective topk|compressae]
        [--latents 32768 | z=2048,dep_proj_in.0=1024] [--k 32 | z=16,...] [--lr 1e-4] [--batch-size 4096]
        [--epochs 10] [--aux-k 256] [--dead-tokens 10000000] [--eval-every 100] [--heldout-fraction 0.1]
        [--max-rows N] [--device auto] [--seed 0]

VECTORS_DIR is written by get_vectors.py (or get_hidden_states.py). Rows of held-out files (the folder's
``heldout`` column, else ``--heldout-fraction`` of the files chosen by name) are never trained on. Objectives:
``topk`` (ReLU top-k, normalised MSE + AuxK for dead latents, unit-norm decoder) or ``compressae`` (signed
top-k on unit-norm inputs, cosine loss). ``--latents`` and ``--k`` take one value or ``stream=value`` pairs.
Training runs in float32 with every training row of a stream in memory (``--max-rows`` caps them).

Writes ``DIR/sae.<stream>.safetensors`` (loads with ``modules.TopKSparseAutoencoder.load``), ``metrics.json``
and ``metrics.csv`` (held-out normalised MSE, cosine, L0, dead fraction over the held-out rows, explained
variance, per stream), ``curves.csv`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from finetune.analysis.hidden_states import script_device
from finetune.analysis.sae_training import SAEConfig, split_files, train_sae
from finetune.analysis.shards import ShardSet
from finetune.cli import run_main
from finetune.reporting import add_common_arguments, provenance, pyplot, save_figure, write_csv, write_json


def per_stream(text: str, streams: Sequence[str], option: str) -> dict[str, int]:
    """``"32"`` -> every stream 32; ``"z=16,dep_proj_in.0=8"`` -> those streams (all must be named)."""
    if "=" not in text:
        return {s: int(text) for s in streams}
    values = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in streams:
            raise ValueError(f"{option}: {name!r} is not a stream being trained ({', '.join(streams)})")
        values[name] = int(value)
    missing = [s for s in streams if s not in values]
    if missing:
        raise ValueError(f"{option}: no value for stream(s) {missing}")
    return values


def split_rows(shards: ShardSet, stream: str, heldout_fraction: float, seed: int,
               max_rows: int | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """``(train rows, held-out rows, counts)`` of one stream, split by file."""
    has_flag = "heldout_files" in shards.header  # get_vectors.py marks every row
    rows = shards.load([stream, "heldout"] if has_flag else [stream])
    if has_flag:
        held = rows["heldout"].bool()
    else:
        names = split_files(shards.files, heldout_fraction, seed)
        held = torch.tensor([shards.files[i] in names for i in rows["file"].tolist()], dtype=torch.bool)
    x = rows[stream]
    train, heldout = x[~held], x[held]
    if max_rows is not None and train.shape[0] > max_rows:
        pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        train = train[pick]
    files = rows["file"]
    counts = {"train_rows": int(train.shape[0]), "heldout_rows": int(heldout.shape[0]),
              "train_files": int(torch.unique(files[~held]).numel()),
              "heldout_files": int(torch.unique(files[held]).numel())}
    if counts["heldout_rows"] < 2:
        raise ValueError(f"{shards.folder}: stream {stream} has {counts['heldout_rows']} held-out row(s); "
                         "raise --heldout-fraction or extract more files")
    return train, heldout, counts


def plot_curves(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for stream, history in curves.items():
        steps = [h["step"] for h in history]
        axes[0].plot(steps, [h["train_loss"] for h in history], marker=".", label=stream)
        axes[1].plot(steps, [h.get("heldout_nmse", float("nan")) for h in history], marker=".", label=stream)
        axes[2].plot(steps, [h.get("heldout_dead_fraction", float("nan")) for h in history], marker=".", label=stream)
    for ax, title in zip(axes, ("training loss", "held-out normalised MSE", "held-out dead fraction")):
        ax.set_xlabel("step")
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("vectors_dir", type=Path, help="folder written by get_vectors.py")
    parser.add_argument("--streams", default=None, help="comma-separated streams (default: all)")
    parser.add_argument("--objective", default="topk", choices=["topk", "compressae"])
    parser.add_argument("--latents", default="32768", help="latent count, or stream=count pairs")
    parser.add_argument("--k", default="32", help="active latents per row, or stream=k pairs")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--adam-eps", type=float, default=6.25e-10)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--aux-k", type=int, default=256, help="dead latents AuxK reconstructs with")
    parser.add_argument("--aux-coef", type=float, default=1 / 32)
    parser.add_argument("--dead-tokens", type=int, default=10_000_000,
                        help="a latent is dead after this many training rows without an activation")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    parser.add_argument("--heldout-fraction", type=float, default=0.1,
                        help="files held out when the folder does not mark them")
    parser.add_argument("--max-rows", type=int, default=None, help="cap on training rows per stream")
    add_common_arguments(parser)
    opts = parser.parse_args(argv)

    shards = ShardSet(opts.vectors_dir)
    available = list(shards.streams) + list(shards.composites)
    streams = opts.streams.split(",") if opts.streams else available
    unknown = [s for s in streams if s not in available]
    if unknown:
        raise ValueError(f"--streams: {opts.vectors_dir} has no stream(s) {unknown} (it has {available})")
    latents = per_stream(opts.latents, streams, "--latents")
    ks = per_stream(opts.k, streams, "--k")
    device = script_device(opts.device)

    metrics, curves, rows = {}, {}, []
    for stream in streams:
        train, heldout, counts = split_rows(shards, stream, opts.heldout_fraction, opts.seed, opts.max_rows)
        cfg = SAEConfig(latents=latents[stream], k=ks[stream], objective=opts.objective, lr=opts.lr,
                        adam_eps=opts.adam_eps, batch_size=opts.batch_size, epochs=opts.epochs, aux_k=opts.aux_k,
                        aux_coef=opts.aux_coef, dead_tokens=opts.dead_tokens, eval_every=opts.eval_every,
                        seed=opts.seed)
        result = train_sae(train, heldout, cfg, device,
                           progress=lambda n, s=stream: tqdm(range(n), desc=f"SAE {s}", unit="step"))
        result.sae.save(opts.out / f"sae.{stream}.safetensors", stream=stream, objective=opts.objective,
                        vectors_dir=str(opts.vectors_dir))
        metrics[stream] = {**result.final, **counts, "config": result.config}
        curves[stream] = result.history
        rows.append({"stream": stream, "latents": cfg.latents, "k": cfg.k, **counts, **result.final})
        print(f"{stream}: held-out NMSE {result.final['nmse']:.4f}, cosine {result.final['cosine']:.4f}, "
              f"L0 {result.final['l0']:.1f}, dead {100 * result.final['dead_fraction']:.1f} % of "
              f"{cfg.latents} over {counts['heldout_rows']} rows, explained variance "
              f"{result.final['explained_variance']:.4f}")
    write_csv(opts.out / "metrics.csv", rows)
    write_csv(opts.out / "curves.csv", [{"stream": s, **h} for s, hist in curves.items() for h in hist])
    write_json(opts.out / "metrics.json", {
        "objective": opts.objective, "streams": metrics,
        "provenance": provenance(extra={"vectors_dir": str(opts.vectors_dir), "header": shards.header}),
    })
    plot_curves(curves, opts.out / "curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
