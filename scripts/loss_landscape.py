"""The loss of a trained model over time, around a checkpoint, and between two checkpoints.

Usage:
    python scripts/loss_landscape.py CONFIG frames [--checkpoint C] [--files 3] --out DIR
    python scripts/loss_landscape.py CONFIG grid --checkpoint C [--dims 2] [--points 21] [--span 1] --out DIR
    python scripts/loss_landscape.py CONFIG line CKPT_A CKPT_B [--points 21] [--from -0.5] [--to 1.5] --out DIR
    torchrun --nproc-per-node 8 scripts/loss_landscape.py CONFIG grid ...   (grid and line: batches split over ranks)

CONFIG is the training YAML: it names the base model, the LoRA / DSAA set-up (hence which tensors are trained)
and the eval data (`data.eval_data`, `eval_duration_sec`, `eval_batches`; override the count with
--eval-batches). A checkpoint is a run's `checkpoints/checkpoint_N/`, its `consolidated/` or a weights file;
`base` is the config's model before training. The loss is the training loss with its masks and weights.

frames  per-frame loss on the eval chunks of the first --files files: text CE with each frame's kind (pad:
        PAD/EPAD target, transition: first non-padding target after padding, with the padding frames before
        it; speech: any other), audio CE per codebook (masked positions are empty, never NaN or a -1 target) ->
        frames.csv, summary.json (mean CE per kind and codebook, the weighted loss terms), frames_<file>.png
grid    filter-normalised random directions (seeded by --seed) over the trained tensors only (LoRA: the A/B
        factors), L(θ + α d1 [+ β d2]) for α, β in [-span, span] -> landscape.csv, landscape.json, landscape.png
line    L((1 - α) θ_A + α θ_B) over the trained tensors -> interpolation.csv, interpolation.json, interpolation.png
The trained tensors are restored bit for bit after each sweep; the eval batches are loaded once.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from finetune.analysis.frame_loss import (
    FrameLosses,
    category_means,
    codebook_means,
    frame_losses,
)
from finetune.analysis.landscape import (
    build_analysis_model,
    checkpoint_state,
    eval_batches,
    filter_normalized_direction,
    interpolation,
    landscape,
    load_state,
    trainable_state,
)
from finetune.args import TrainArgs
from finetune.cli import run_main
from finetune.distributed import (
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
    launched_with_torchrun,
    select_device,
)
from finetune.eval import evaluate
from finetune.reporting import add_common_arguments, provenance, pyplot, save_figure, write_csv, write_json
from moshi.models.loaders import FRAME_RATE
from moshi.models.model_loading import resolve_dtype


def _linspace(lo: float, hi: float, n: int) -> list[float]:
    """``n`` evenly spaced points from ``lo`` to ``hi``, with the ends and (when in range) 0 and 1 exact."""
    if n < 2:
        raise ValueError(f"--points must be at least 2, got {n}")
    return [lo + (hi - lo) * i / (n - 1) if 0 < i < n - 1 else (lo if i == 0 else hi) for i in range(n)]


def _state(model: torch.nn.Module, checkpoint: str) -> dict[str, torch.Tensor]:
    return trainable_state(model) if checkpoint == "base" else checkpoint_state(model, checkpoint)


def _checkpoint_paths(*names: str | None) -> list[str]:
    return [n for n in names if n is not None and n != "base"]


# ----------------------------------------------------------------------------- frames


def _plot_file(rows: list[dict[str, Any]], codebooks: int, title: str, path: Path) -> None:
    plt = pyplot()
    time = [r["time_s"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    start = None
    for i, r in enumerate(rows + [{"kind": "", "time_s": math.inf}]):  # one shaded span per run of padding
        if r["kind"] == "pad" and start is None:
            start = r["time_s"]
        elif r["kind"] != "pad" and start is not None:
            top.axvspan(start - 0.5 / FRAME_RATE, rows[i - 1]["time_s"] + 0.5 / FRAME_RATE, color="0.9", lw=0)
            start = None
    top.plot(time, [r["text_ce"] if r["text_ce"] is not None else math.nan for r in rows], lw=1, label="text CE")
    trans = [r for r in rows if r["kind"] == "transition"]
    top.plot([r["time_s"] for r in trans], [r["text_ce"] for r in trans], "v", color="tab:red", ms=4,
             label="transition (padding → text)")
    top.set_ylabel("text CE (nats)")
    top.set_title(f"{title}  (grey: PAD/EPAD targets)")
    top.legend(fontsize=7)
    for c in range(codebooks):
        values = [r[f"audio_ce_{c}"] if r[f"audio_ce_{c}"] is not None else math.nan for r in rows]
        bottom.plot(time, values, lw=1.5 if c == 0 else 0.6, alpha=1.0 if c == 0 else 0.6, label=f"codebook {c}")
    bottom.set_ylabel("audio CE (nats)")
    bottom.set_xlabel("time in file (s)")
    bottom.legend(fontsize=6, ncol=4)
    save_figure(fig, path)


def run_frames(args: argparse.Namespace, cfg: TrainArgs, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    if get_world_size() > 1:
        raise ValueError("frames runs in one process (it reads only the first files): start it without torchrun")
    if args.files < 1:
        raise ValueError(f"--files must be at least 1, got {args.files}")
    model, family = build_analysis_model(cfg, device, dtype)
    if args.checkpoint != "base":
        load_state(model, checkpoint_state(model, args.checkpoint))
    loss_fn = family.loss(model)
    batches, sources = eval_batches(cfg, family, model, device)
    rows: list[dict[str, Any]] = []
    all_losses: list[FrameLosses] = []
    seen: list[str] = []
    for batch in batches:
        files, offsets, keep = [], [], []
        for j, (s, c) in enumerate(zip(batch.source, batch.chunk)):
            chunk = sources[s].chunks[c]
            name = str(sources[s].entries[chunk.file].path)
            if name not in seen:
                if len(seen) == args.files:
                    continue
                seen.append(name)
            files.append(name)
            offsets.append(float(chunk.offset_sec))
            keep.append(j)
        if not keep:
            break
        losses = frame_losses(model, batch.codes[keep], loss_fn)
        all_losses.append(losses)
        rows += losses.rows(files, offsets, FRAME_RATE)
    codebooks = all_losses[0].audio_ce.shape[1]
    merged = FrameLosses.cat(all_losses)
    ts, tw, aus, aw = merged.weighted_sums()
    write_csv(args.out / "frames.csv", rows)
    for i, name in enumerate(seen):
        file_rows = sorted((r for r in rows if r["file"] == name), key=lambda r: r["time_s"])
        _plot_file(file_rows, codebooks, Path(name).name, args.out / f"frames_{i:03d}.png")
    return {
        "files": seen, "frames": len(rows), "text_by_kind": category_means(merged),
        "audio_by_codebook": codebook_means(merged),
        "loss_terms": {"text_sum": float(ts), "text_weight": float(tw), "audio_sum": float(aus),
                       "audio_weight": float(aw), "text_loss": float(ts / tw) if tw > 0 else None,
                       "audio_loss": float(aus / aw) if aw > 0 else None},
        "text_padding_weight": loss_fn.alpha, "first_codebook_weight_multiplier": loss_fn.beta,
    }


# ----------------------------------------------------------------------------- grid and line


def _plot_curve(rows: list[dict[str, Any]], xlabel: str, title: str, path: Path, marks: Sequence[float] = ()) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r["alpha"] for r in rows]
    for key, style in (("loss", "-"), ("text_loss", "--"), ("audio_loss", ":")):
        ax.plot(x, [r[key] for r in rows], style, label=key)
    for m in marks:
        ax.axvline(m, color="0.6", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eval loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _plot_surface(rows: list[dict[str, Any]], alphas: list[float], betas: list[float], title: str, path: Path) -> None:
    plt = pyplot()
    grid = [[next(r["loss"] for r in rows if r["alpha"] == a and r["beta"] == b) for a in alphas] for b in betas]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cs = ax.contourf(alphas, betas, grid, levels=30, cmap="viridis")
    ax.contour(alphas, betas, grid, levels=15, colors="white", linewidths=0.4)
    fig.colorbar(cs, ax=ax, label="eval loss (nats)")
    ax.plot([0], [0], "r+", ms=12)
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_title(title)
    save_figure(fig, path)


def run_grid(args: argparse.Namespace, cfg: TrainArgs, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    if args.span <= 0:
        raise ValueError(f"--span must be > 0, got {args.span}")
    model, family = build_analysis_model(cfg, device, dtype)
    if args.checkpoint != "base":
        load_state(model, checkpoint_state(model, args.checkpoint))
    batches, _ = eval_batches(cfg, family, model, device, get_rank(), get_world_size())
    codes = [b.codes for b in batches]
    loss_fn = family.loss(model)
    centre = trainable_state(model)
    generator = torch.Generator().manual_seed(args.seed)
    directions = [filter_normalized_direction(centre, generator, args.one_d) for _ in range(args.dims)]
    alphas = _linspace(-args.span, args.span, args.points)
    betas = alphas if args.dims == 2 else None
    plain = evaluate(model, codes, loss_fn, device)
    rows = landscape(model, codes, loss_fn, device, directions, alphas, betas, progress=is_main())
    if is_main():
        write_csv(args.out / "landscape.csv", rows)
        title = f"{args.checkpoint}: filter-normalised, seed {args.seed}"
        if betas is None:
            _plot_curve(rows, "α (filter-normalised direction)", title, args.out / "landscape.png", marks=[0.0])
        else:
            _plot_surface(rows, alphas, betas, title, args.out / "landscape.png")
    return {
        "checkpoint": args.checkpoint, "dims": args.dims, "points": args.points, "span": args.span, "seed": args.seed,
        "one_d": args.one_d, "trained_tensors": len(centre),
        "trained_parameters": sum(t.numel() for t in centre.values()),
        "direction_norms": [math.sqrt(sum(float(t.float().norm()) ** 2 for t in d.values())) for d in directions],
        "centre_eval_loss": plain.loss, "eval_batches": plain.batches, "grid": rows,
    }


def run_line(args: argparse.Namespace, cfg: TrainArgs, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    model, family = build_analysis_model(cfg, device, dtype)
    state_a, state_b = _state(model, args.checkpoint_a), _state(model, args.checkpoint_b)
    batches, _ = eval_batches(cfg, family, model, device, get_rank(), get_world_size())
    codes = [b.codes for b in batches]
    alphas = sorted(set(_linspace(args.start, args.stop, args.points)) | {0.0, 1.0})
    rows = interpolation(model, codes, family.loss(model), device, state_a, state_b, alphas, progress=is_main())
    distance = math.sqrt(sum(float((state_b[n].float() - state_a[n].float()).norm()) ** 2 for n in state_a))
    if is_main():
        write_csv(args.out / "interpolation.csv", rows)
        _plot_curve(rows, "α  (0: A, 1: B)", f"A = {args.checkpoint_a}\nB = {args.checkpoint_b}",
                    args.out / "interpolation.png", marks=[0.0, 1.0])
    return {"checkpoint_a": args.checkpoint_a, "checkpoint_b": args.checkpoint_b, "distance": distance,
            "trained_tensors": len(state_a), "loss_a": next(r["loss"] for r in rows if r["alpha"] == 0.0),
            "loss_b": next(r["loss"] for r in rows if r["alpha"] == 1.0), "line": rows}


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="the training YAML")
    common = argparse.ArgumentParser(add_help=False)
    add_common_arguments(common)
    common.add_argument("--eval-batches", type=int, default=None,
                        help="eval batches (default: the config's eval_batches)")
    sub = p.add_subparsers(dest="mode", required=True)
    frames = sub.add_parser("frames", parents=[common], help="per-frame loss of the first files")
    frames.add_argument("--checkpoint", default="base")
    frames.add_argument("--files", type=int, default=3)
    grid = sub.add_parser("grid", parents=[common], help="filter-normalised 1-D or 2-D landscape around a checkpoint")
    grid.add_argument("--checkpoint", default="base")
    grid.add_argument("--dims", type=int, choices=(1, 2), default=1)
    grid.add_argument("--points", type=int, default=21, help="points per axis")
    grid.add_argument("--span", type=float, default=1.0, help="coefficients from -span to span")
    grid.add_argument("--one-d", choices=("zero", "copy"), default="zero",
                      help="direction in 1-D tensors (norms, biases, alpha): zero or a copy of the weights")
    line = sub.add_parser("line", parents=[common], help="loss along the straight line between two checkpoints")
    line.add_argument("checkpoint_a")
    line.add_argument("checkpoint_b")
    line.add_argument("--points", type=int, default=21)
    line.add_argument("--from", dest="start", type=float, default=-0.5)
    line.add_argument("--to", dest="stop", type=float, default=1.5)
    args = p.parse_args(argv)

    cfg = TrainArgs.load(args.config)
    if args.eval_batches is not None:
        if args.eval_batches < 1:
            raise ValueError(f"--eval-batches must be at least 1, got {args.eval_batches}")
        cfg.eval_batches = args.eval_batches
    device = select_device(args.device)
    if launched_with_torchrun():
        init_distributed(device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    result = {"frames": run_frames, "grid": run_grid, "line": run_line}[args.mode](args, cfg, device, dtype)
    if is_main():
        checkpoints = _checkpoint_paths(getattr(args, "checkpoint", None), getattr(args, "checkpoint_a", None),
                                        getattr(args, "checkpoint_b", None))
        result["provenance"] = provenance(
            checkpoints=checkpoints,
            extra={"config": str(args.config), "eval_data": cfg.data.eval_data, "mode": args.mode, "device": str(device), "dtype": str(dtype),
                   "world_size": get_world_size()})
        name = {"frames": "summary.json", "grid": "landscape.json", "line": "interpolation.json"}[args.mode]
        write_json(args.out / name, result)
        print(f"loss_landscape {args.mode}: -> {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
