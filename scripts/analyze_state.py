"""Weight norms of a checkpoint, its LoRA updates, DSAA's projector gate, and the change between two checkpoints.

Usage:
    python scripts/analyze_state.py CKPT [CKPT_B] --out DIR [--top 4] [--device auto]

CKPT (and CKPT_B) is a run's `checkpoints/checkpoint_N/`, its `consolidated/`, a DSAA checkpoint folder or a
`.safetensors` file; the weights are read straight from the file (no model is built). Written under --out:
    tensors.csv       per tensor: layer group, shape, numel, Frobenius norm, RMS (value of one-element tensors)
    layers.csv        per layer group: the norm of all its tensors together
    lora.csv          LoRA checkpoints: per adapted Linear, rank, ‖scaling·BA‖_F, spectral norm, effective rank
                      (exp of the entropy of the normalised singular values) and the top singular values
    change.csv        with CKPT_B: per tensor ‖B − A‖, ‖A‖ and ‖B − A‖ / ‖A‖ (also per layer in change_layers.csv)
    summary.json      provenance, totals, DSAA `alpha` values, the largest entries of each table
    layer_norms.png, lora_updates.png, relative_change.png
The largest rows of each table are also printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.analysis.weight_stats import (
    change_rows,
    find_checkpoint,
    layer_change_rows,
    layer_rows,
    lora_rows,
    scalar_parameters,
    tensor_rows,
)
from finetune.cli import run_main
from finetune.reporting import provenance, pyplot, save_figure, write_csv, write_json
from moshi.models.model_loading import resolve_device


def _print_table(title: str, rows: list[dict[str, Any]], key: str, columns: Sequence[str], n: int = 10) -> None:
    """The ``n`` rows with the largest ``key``, as an aligned text table."""
    ranked = sorted((r for r in rows if r.get(key) is not None), key=lambda r: -r[key])[:n]
    if not ranked:
        return
    print(f"\n{title} (top {len(ranked)} of {len(rows)} by {key})")
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in ranked]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _bar_plot(rows: list[dict[str, Any]], label: str, key: str, title: str, path: Path,
              second: str | None = None) -> None:
    plt = pyplot()
    labels = [r[label] for r in rows]
    width = min(40.0, max(6.0, 0.25 * len(rows)))
    fig, axes = plt.subplots(2 if second else 1, 1, figsize=(width, 7 if second else 4), squeeze=False, sharex=True)
    axes[0][0].bar(range(len(rows)), [r[key] if r[key] is not None else 0.0 for r in rows])
    axes[0][0].set_ylabel(key)
    axes[0][0].set_title(title)
    if second:
        axes[1][0].bar(range(len(rows)), [r[second] for r in rows], color="tab:orange")
        axes[1][0].set_ylabel(second)
    bottom = axes[-1][0]
    bottom.set_xticks(range(len(rows)))
    bottom.set_xticklabels(labels, rotation=90, fontsize=6)
    save_figure(fig, path)


def _lora_per_layer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer group: the norm of all its updates together and their mean effective rank (a 7B model has
    hundreds of adapted Linears, too many bars for one plot; lora.csv keeps each)."""
    ranks: dict[str, list[float]] = {}
    for r in rows:
        ranks.setdefault(r["layer"], []).append(r["effective_rank"])
    return [g | {"effective_rank": sum(ranks[g["layer"]]) / len(ranks[g["layer"]])}
            for g in layer_rows(rows, "update_norm")]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="the checkpoint to describe (A)")
    p.add_argument("checkpoint_b", type=Path, nargs="?", default=None, help="a second checkpoint (B) to compare")
    p.add_argument("--top", type=int, default=4, help="singular values listed per LoRA update")
    p.add_argument("--device", default="auto", help="where norms and spectra are computed: auto, cpu, cuda, cuda:1...")
    p.add_argument("--out", type=Path, required=True, help="folder for the results")
    args = p.parse_args(argv)
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    device = resolve_device(args.device)
    out: Path = args.out

    ckpt = find_checkpoint(args.checkpoint)
    tensors = tensor_rows(ckpt, device, progress=True)
    layers = layer_rows(tensors)
    write_csv(out / "tensors.csv", tensors)
    write_csv(out / "layers.csv", layers)
    _bar_plot(layers, "layer", "norm", f"{ckpt.weights.name}: norm per layer group", out / "layer_norms.png")
    _print_table("tensors", tensors, "norm", ["name", "shape", "norm", "rms"])
    summary: dict[str, Any] = {
        "checkpoint": str(ckpt.weights), "kind": "lora" if ckpt.is_lora else ("dsaa" if ckpt.is_dsaa else "full"),
        "tensors": len(tensors), "parameters": sum(r["numel"] for r in tensors),
        "total_norm": sum(r["norm"] ** 2 for r in tensors) ** 0.5, "alpha": scalar_parameters(tensors),
        "largest_tensors": sorted(tensors, key=lambda r: -r["norm"])[:10],
    }
    if summary["alpha"]:
        print("\nalpha: " + ", ".join(f"{k} = {v:.6g}" for k, v in summary["alpha"].items()))
    if ckpt.is_lora:
        lora = lora_rows(ckpt, args.top, device, progress=True)
        write_csv(out / "lora.csv", lora)
        _bar_plot(_lora_per_layer(lora), "layer", "update_norm",
                  f"LoRA updates per layer group (scaling {ckpt.lora_scaling:g}): ‖ΔW‖ over the group, "
                  "mean effective rank", out / "lora_updates.png", second="effective_rank")
        _print_table("LoRA updates", lora, "update_norm", ["module", "rank", "update_norm", "effective_rank", "sv1"])
        summary["lora"] = {"scaling": ckpt.lora_scaling, "modules": len(lora),
                           "total_update_norm": sum(r["update_norm"] ** 2 for r in lora) ** 0.5,
                           "largest_updates": sorted(lora, key=lambda r: -r["update_norm"])[:10]}
    checkpoints = [ckpt.weights]
    if args.checkpoint_b is not None:
        other = find_checkpoint(args.checkpoint_b)
        checkpoints.append(other.weights)
        change, missing = change_rows(ckpt, other, device, progress=True)
        per_layer = layer_change_rows(change)
        write_csv(out / "change.csv", change)
        write_csv(out / "change_layers.csv", per_layer)
        _bar_plot(per_layer, "layer", "relative_change", "‖B − A‖ / ‖A‖ per layer group", out / "relative_change.png")
        _print_table("relative change", change, "relative_change", ["name", "norm_a", "diff_norm", "relative_change"])
        summary["change"] = {"checkpoint_b": str(other.weights), "compared": len(change), **missing,
                             "largest": sorted((r for r in change if r["relative_change"] is not None),
                                               key=lambda r: -r["relative_change"])[:10]}
        for key, names in missing.items():
            if names:
                print(f"warning: {len(names)} tensor(s) {key.replace('_', ' ')}: {', '.join(names[:5])}"
                      + (" ..." if len(names) > 5 else ""), file=sys.stderr)
    summary["provenance"] = provenance(checkpoints=checkpoints, extra={"device": str(device)})
    write_json(out / "summary.json", summary)
    print(f"\nanalyze_state: {len(tensors)} tensors -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
