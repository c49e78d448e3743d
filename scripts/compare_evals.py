"""Compares spoken-LM results files (slm_benchmark.py / mmlu_benchmark.py) item by item against a baseline.

Usage:
    python scripts/compare_evals.py base.json ckpt_100.json ckpt_200.json --out compare/
    python scripts/compare_evals.py a.json b.json --baseline b.json --labels A,B --out compare/

    --baseline FILE        the file the others are compared with (default: the first)
    --labels a,b,...       names in the table (default: each file's checkpoint label, else its stem)
    --confidence 0.95      level of the bootstrap interval of the accuracy delta
    --resamples 10000      bootstrap resamples (seeded by --seed)
    --allow-different-data compare files whose dataset digests differ

Items are paired by (set, item_id). Per set and protocol: accuracies, the delta in points, its bootstrap
percentile interval, the discordant counts (better = items the checkpoint gets more right than the
baseline, worse = the reverse) and the exact McNemar p-value on them. A tie (correct = 0.5 for a pair, 1/k
for a k-way spoken-MMLU tie) against a decision counts as one discordant item, so with ties the test is the
exact sign test on the per-item differences (McNemar's exact test when there are none).

Writes under --out: comparison.md, comparison.csv, comparison.json (rows, the better/worse item ids,
provenance), discordant.csv (one line per discordant item), accuracy.png and delta.png; the table is also
printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from finetune.cli import run_main
from finetune.eval_sets.compare import (
    ComparisonRow,
    Results,
    compare_results,
    format_markdown,
    format_plain,
    load_results,
    unique_labels,
)
from finetune.reporting import provenance, pyplot, save_figure, write_csv, write_json
from moshi.utils.atomic import atomic_write_text


def plot_accuracy(results: Sequence[Results], rows: Sequence[ComparisonRow], path: Path) -> None:
    """Grouped bars: accuracy per set, one bar per checkpoint, one panel per protocol."""
    plt = pyplot()
    protocols = list(dict.fromkeys(r.protocol for r in rows))
    labels = [r.label for r in results]
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.5 * len(protocols), 3.5), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        sub = [r for r in rows if r.protocol == protocol]
        sets = list(dict.fromkeys(r.set for r in sub))
        acc: dict[tuple[str, str], float] = {}
        for r in sub:
            acc[(r.set, r.baseline)] = r.baseline_accuracy
            acc[(r.set, r.label)] = r.accuracy
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            xs = [i + j * width for i, s in enumerate(sets) if (s, label) in acc]
            ys = [100 * acc[(s, label)] for s in sets if (s, label) in acc]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets)
        ax.set_ylim(0, 100)
        ax.axhline(50, color="grey", lw=0.8, ls=":")
        ax.set_title(protocol)
    axes[0][0].set_ylabel("accuracy %")
    axes[0][-1].legend(fontsize="small")
    save_figure(fig, path)


def plot_delta(rows: Sequence[ComparisonRow], confidence: float, path: Path) -> None:
    """Delta to the baseline per set with its bootstrap interval; ``*`` marks McNemar p < 0.05."""
    plt = pyplot()
    protocols = list(dict.fromkeys(r.protocol for r in rows))
    labels = list(dict.fromkeys(r.label for r in rows))
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.5 * len(protocols), 3.5), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        sub = [r for r in rows if r.protocol == protocol]
        sets = list(dict.fromkeys(r.set for r in sub))
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            mine = {r.set: r for r in sub if r.label == label}
            xs = [i + j * width for i, s in enumerate(sets) if s in mine]
            sel = [mine[s] for s in sets if s in mine]
            ys = [100 * r.delta for r in sel]
            err = [[100 * (r.delta - r.ci_low) for r in sel], [100 * (r.ci_high - r.delta) for r in sel]]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=label)
            for x, r in zip(xs, sel):
                if r.p_value < 0.05:
                    ax.annotate("*", (x, 100 * r.ci_high), ha="center", va="bottom")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"{protocol} (vs {rows[0].baseline}, {100 * confidence:g}% CI)")
    axes[0][0].set_ylabel("Δ accuracy, points")
    axes[0][-1].legend(fontsize="small")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="results files (JSON), one per checkpoint")
    p.add_argument("--out", type=Path, required=True, help="folder for the comparison")
    p.add_argument("--baseline", type=Path, default=None, help="baseline file (default: the first)")
    p.add_argument("--labels", default=None, help="comma-separated names, one per file")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--allow-different-data", action="store_true")
    args = p.parse_args(argv)

    files = list(args.files)
    if args.baseline is not None and args.baseline not in files:
        files.insert(0, args.baseline)
    if len(files) < 2:
        raise ValueError("need at least two results files to compare")
    labels = args.labels.split(",") if args.labels else [None] * len(files)
    if len(labels) != len(files):
        raise ValueError(f"--labels: {len(labels)} names for {len(files)} files")
    results = unique_labels([load_results(f, lab) for f, lab in zip(files, labels)])
    baseline = files.index(args.baseline) if args.baseline is not None else 0
    rows = compare_results(results, baseline, confidence=args.confidence, resamples=args.resamples,
                           seed=args.seed, allow_different_data=args.allow_different_data)
    if not rows:
        raise ValueError("the files share no set and protocol with scored items; nothing to compare")

    out = args.out
    markdown = format_markdown(rows, args.confidence)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.md", markdown)
    write_csv(out / "comparison.csv", [r.table_row() for r in rows])
    write_csv(out / "discordant.csv", [
        {"set": r.set, "protocol": r.protocol, "label": r.label, "item_id": i, "direction": d}
        for r in rows for d, ids in (("better", r.better_ids), ("worse", r.worse_ids)) for i in ids
    ], columns=["set", "protocol", "label", "item_id", "direction"])
    write_json(out / "comparison.json", {
        "baseline": results[baseline].label,
        "files": {r.label: str(r.path) for r in results},
        "confidence": args.confidence, "resamples": args.resamples, "seed": args.seed,
        "ties": "correct = 0.5 (1/k for k tied choices); a tie against a decision is one discordant item",
        "rows": [asdict(r) for r in rows],
        "provenance": provenance(datasets=files),
    })
    plot_accuracy(results, rows, out / "accuracy.png")
    plot_delta(rows, args.confidence, out / "delta.png")
    print(format_plain(rows, args.confidence), end="")
    print(f"compare_evals: {len(rows)} comparisons written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
