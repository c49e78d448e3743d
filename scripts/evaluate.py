"""Evaluates a model on a config's eval data: loss, perplexity, per-codebook CE/accuracy, text accuracy.

Usage:
    python scripts/evaluate.py CONFIG --out eval_out/                       # the config's base model
    python scripts/evaluate.py CONFIG --checkpoint run/checkpoints/checkpoint_000100 \
        --checkpoint run/checkpoints/checkpoint_000200 --out eval_out/      # several checkpoints, one call

    --checkpoint PATH   a run's checkpoint_N, its consolidated/, or a weights file (repeatable; 'base' = the
                        config's base model); default: the base model
    --data SPEC         eval data instead of the config's data.eval_data (else data.eval_loss_data), same syntax
    --eval-batches N    batches to evaluate (default: the config's eval_batches)
    --device auto --dtype auto --seed 0

The data are read exactly as the training's evaluation reads them (chunks of eval_duration_sec, batch_size,
no augmentation), and the eval loss is the training loss with the config's text_padding_weight and
first_codebook_weight_multiplier, so it continues the training's eval curve. Per audio codebook: CE,
perplexity and top-1 accuracy over valid positions; text: CE and accuracy over all valid positions and over
the non-PAD ones.

Writes under --out: metrics.json (all numbers per checkpoint, provenance), metrics.csv (one row per
checkpoint), codebooks.csv (one row per checkpoint and codebook) and codebooks.png.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.args import TrainArgs
from finetune.cli import run_main
from finetune.data.sources import parse_sources
from finetune.eval_metrics import evaluate_metrics
from finetune.evaluation.runner import BASE, checkpoint_labels
from finetune.model_family import model_family
from finetune.model_loading import load_from_config
from finetune.reporting import add_common_arguments, provenance, pyplot, save_figure, write_csv, write_json


def scalar_row(label: str, m: dict[str, Any]) -> dict[str, Any]:
    row = {"checkpoint": label, **{k: v for k, v in m.items() if k != "codebooks"}}
    for c in m["codebooks"]:
        row[f"cb{c['codebook']}_ce"] = c["ce"]
        row[f"cb{c['codebook']}_accuracy"] = c["accuracy"]
    return row


def plot_codebooks(per_checkpoint: dict[str, dict[str, Any]], path: Path) -> None:
    """CE and accuracy per audio codebook, one line per checkpoint."""
    plt = pyplot()
    fig, (ax_ce, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, m in per_checkpoint.items():
        ks = [c["codebook"] for c in m["codebooks"]]
        ax_ce.plot(ks, [c["ce"] for c in m["codebooks"]], marker="o", label=label)
        ax_acc.plot(ks, [c["accuracy"] for c in m["codebooks"]], marker="o", label=label)
    ax_ce.set(xlabel="audio codebook", ylabel="cross-entropy (nats)", title="per-codebook CE")
    ax_acc.set(xlabel="audio codebook", ylabel="top-1 accuracy", title="per-codebook accuracy")
    ax_acc.legend(fontsize="small")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    from finetune.data.dataset import build_codes_store, build_eval_loader

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="training config (YAML)")
    p.add_argument("--checkpoint", action="append", default=None, help="checkpoint to evaluate (repeatable)")
    p.add_argument("--data", default=None, help="eval data (default: data.eval_data, else data.eval_loss_data)")
    p.add_argument("--eval-batches", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    add_common_arguments(p)
    args = p.parse_args(argv)

    cfg = TrainArgs.load(args.config, validate=False)  # the training data need not exist where this runs
    spec = args.data or cfg.data.eval_data.strip() or cfg.data.eval_loss_data.strip()
    if not spec:
        raise ValueError(f"{args.config}: no eval data: set data.eval_data (or data.eval_loss_data) or pass --data")
    cfg.data.eval_data = spec
    if args.eval_batches is not None:
        if args.eval_batches < 1:
            raise ValueError(f"--eval-batches must be >= 1, got {args.eval_batches}")
        cfg.eval_batches = args.eval_batches
    checkpoints = args.checkpoint or [BASE]
    labels = checkpoint_labels(checkpoints)
    manifests = [m for s in parse_sources(spec, "--data" if args.data else "data.eval_data") for m in s.manifests]

    family = model_family(cfg)
    loader = None
    results: dict[str, dict[str, Any]] = {}
    for label, ckpt in zip(labels, checkpoints):
        loaded = load_from_config(cfg, None if ckpt == BASE else ckpt, device=args.device, dtype=args.dtype)
        if loader is None:  # the codes depend on Mimi and the tokenizer only: built once, reused
            store = build_codes_store(cfg, loaded.mimi, device=loaded.device)
            loader = build_eval_loader(cfg, family.text_tokenizer(loaded.lm), store)
        loss = family.loss(loaded.lm)
        results[label] = evaluate_metrics(loaded.lm, (b.codes for b in loader), loss, loaded.device,
                                          progress=not args.no_progress, total=len(loader))
        results[label]["sources"] = loaded.sources
        m = results[label]
        print(f"{label}: eval_loss {m['eval_loss']:.4f} (text {m['text_loss']:.4f}, audio {m['audio_loss']:.4f}), "
              f"perplexity {m['perplexity']:.3g}, text accuracy {m['text_accuracy']} "
              f"({m['text_accuracy_no_pad']} without PAD)")
        del loaded

    out = args.out
    write_json(out / "metrics.json", {
        "config": str(args.config), "data": spec, "eval_batches": cfg.eval_batches,
        "eval_duration_sec": cfg.eval_duration_sec, "batch_size": cfg.batch_size,
        "text_padding_weight": cfg.text_padding_weight,
        "first_codebook_weight_multiplier": cfg.first_codebook_weight_multiplier,
        "checkpoints": dict(zip(labels, checkpoints)), "metrics": results,
        "provenance": provenance(checkpoints=[c for c in checkpoints if c != BASE], datasets=manifests,
                                 extra={"config": str(args.config)}),
    })
    write_csv(out / "metrics.csv", [scalar_row(label, {k: v for k, v in m.items() if k != "sources"})
                                    for label, m in results.items()])
    write_csv(out / "codebooks.csv", [{"checkpoint": label, **c} for label, m in results.items()
                                      for c in m["codebooks"]])
    plot_codebooks(results, out / "codebooks.png")
    print(f"evaluate: {len(results)} checkpoint(s) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
