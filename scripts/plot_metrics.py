"""Training curves of one or more runs as PNG, from their metrics files (no wandb or TensorBoard needed).

Usage:
    python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] --out DIR [--smooth 0.9]

Each RUN_DIR is a training `run_dir` holding `metrics.train.jsonl` and/or `metrics.eval.jsonl`. Runs are
overlaid in each plot, labelled by folder name. Written under --out:
    loss.png          train loss, text and audio loss (eval loss as points)
    eval_loss.png     eval loss, text and audio eval loss
    perplexity.png    eval perplexities
    lr.png, grad_norm.png, throughput.png (tokens/s per process: all positions and real ones)
    summary.json      per run and file: records, dropped torn lines, per metric first/last/min/max with steps
A torn last line (a run killed mid-write) is dropped, counted in summary.json and reported on stderr;
a panel with no data in any run is not drawn. --smooth draws an exponential moving average (weight of
the past, 0 = raw values) over the raw curve.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune.analysis.run_metrics import EVAL_PANELS, TRAIN_PANELS, Run, read_runs, summarize
from finetune.cli import run_main
from finetune.reporting import provenance, pyplot, save_figure, write_json


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average ``m_t = w·m_{t−1} + (1 − w)·x_t`` started at the first value."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else weight * out[-1] + (1 - weight) * v)
    return out


def _plot_panel(runs: list[Run], panel: str, keys: Sequence[str], which: str, smooth: float, out: Path,
                eval_points: str | None = None) -> Path | None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        metrics = run.train if which == "train" else run.eval
        for j, key in enumerate(keys):
            steps, values = metrics.series(key)
            if not steps:
                continue
            color, style = colors[i % len(colors)], styles[j % len(styles)]
            label = f"{run.label}: {key}" if len(runs) > 1 else key
            if smooth > 0:
                ax.plot(steps, values, color=color, linestyle=style, alpha=0.25)
                ax.plot(steps, ema(values, smooth), color=color, linestyle=style, label=label)
            else:
                ax.plot(steps, values, color=color, linestyle=style, label=label, marker="." if len(steps) < 30 else None)
            drawn += 1
        if eval_points:
            steps, values = run.eval.series(eval_points)
            if steps:
                ax.plot(steps, values, "o", color=colors[i % len(colors)],
                        label=f"{run.label}: {eval_points}" if len(runs) > 1 else eval_points)
                drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_title(panel)
    if panel == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out / f"{panel}.png")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="+", help="training run folders")
    p.add_argument("--out", type=Path, required=True, help="folder for the plots and summary.json")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight of the past in [0, 1) (0: raw curves)")
    args = p.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        raise ValueError(f"--smooth must be in [0, 1), got {args.smooth}")
    runs = read_runs(args.run_dirs)
    written = []
    for panel, keys in TRAIN_PANELS.items():
        path = _plot_panel(runs, panel, keys, "train", args.smooth, args.out,
                           eval_points="eval_loss" if panel == "loss" else None)
        written.append(path)
    for panel, keys in EVAL_PANELS.items():
        written.append(_plot_panel(runs, panel, keys, "eval", args.smooth, args.out))
    summary = {
        "runs": {run.label: {"folder": str(run.folder), "train": summarize(run.train), "eval": summarize(run.eval)}
                 for run in runs},
        "plots": [p.name for p in written if p is not None],
        "provenance": provenance(extra={"run_dirs": [str(r) for r in args.run_dirs]}),
    }
    write_json(args.out / "summary.json", summary)
    for run in runs:
        for m in (run.train, run.eval):
            if m.dropped_lines:
                print(f"warning: {m.path}: dropped {m.dropped_lines} partly written last line", file=sys.stderr)
    print(f"plot_metrics: {len(runs)} run(s), {len(summary['plots'])} plot(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
