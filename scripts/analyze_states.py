"""Compares stored hidden states: linear CKA between streams and between two runs, PCA of each stream.

Usage:
    python scripts/analyze_states.py A_DIR [B_DIR] --out DIR [--streams a,h,...] [--minibatch M]
        [--scatter-frames 2000] [--device auto]

A_DIR (and B_DIR) are folders written by get_hidden_states.py or get_vectors.py. With one folder, every pair of
its streams is compared on the same frames; with two, the streams of both (labelled ``A:name``, ``B:name``) on
the frames both hold, matched by file and frame, so ``A:s`` against ``B:s`` is the same stream of two runs or
checkpoints. CKA is pooled over all frames, plug-in and debiased (two passes over the shards; memory grows with
the square of the summed stream widths), or with ``--minibatch M`` averaged over blocks of M frames (memory
``M²`` per stream). A stream stored as a block of another (``z`` inside ``[z, e_k]``) is reported: its CKA
with the concatenation is a ratio of block norms.

Writes ``cka.json`` (matrices, frames, warnings, PCA summaries, provenance), ``cka.csv`` (one row per pair),
``runs.csv`` (two folders: each stream against itself), ``pca.csv``, and the PNGs ``cka_plugin.png``,
``cka_debiased.png``, ``pca_variance.png`` (cumulative explained variance) and ``pca_2d.png`` (each stream's
frames on its first two components, coloured by speech, PAD and EPAD).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from finetune.analysis.cka import GroupCKA, MinibatchCKA, contained_block
from finetune.analysis.pca import CovarianceAccumulator, PCAResult, pca_from_covariance
from finetune.analysis.shards import ShardSet, iter_matched
from finetune.cli import run_main
from finetune.reporting import add_common_arguments, provenance, pyplot, save_figure, write_csv, write_json

LABEL_COLUMNS = ("pad", "epad", "speech")


def _stream_names(shards: ShardSet, wanted: Sequence[str] | None) -> list[str]:
    available = list(shards.streams) + list(shards.composites)
    if wanted is None:
        return available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise ValueError(f"--streams: {shards.folder} has no stream(s) {missing} (it has {available})")
    return list(wanted)


class Source:
    """The frames to analyse: one folder's shards, or two folders' matched frames, as lists of streams."""

    def __init__(self, a: ShardSet, b: ShardSet | None, a_names: list[str], b_names: list[str]) -> None:
        self.a, self.b, self.a_names, self.b_names = a, b, a_names, b_names
        self.labels = [f"A:{s}" for s in a_names] + [f"B:{s}" for s in b_names] if b is not None else list(a_names)
        self.unmatched = 0

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], dict[str, torch.Tensor]]]:
        extra = list(LABEL_COLUMNS)
        if self.b is None:
            for rows in self.a.iter_shards([*self.a_names, *extra]):
                yield [rows[s] for s in self.a_names], rows
            return
        self.unmatched = 0
        for rows_a, rows_b, unmatched in iter_matched(self.a, self.b, [*self.a_names, *extra], self.b_names):
            self.unmatched += unmatched
            if rows_b:
                yield [rows_a[s] for s in self.a_names] + [rows_b[s] for s in self.b_names], rows_a


def _blocks(source: Source, size: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive blocks of exactly ``size`` frames (the remainder is dropped)."""
    pending: list[list[torch.Tensor]] = []
    count = 0
    for streams, _ in source:
        pending.append(streams)
        count += streams[0].shape[0]
        while count >= size:
            joined = [torch.cat([p[i] for p in pending]) for i in range(len(streams))]
            yield [j[:size] for j in joined]
            pending = [[j[size:] for j in joined]]
            count -= size


def _containment(source: Source) -> tuple[list[int], list[str]]:
    """The streams' widths, and a warning for each stream stored as a block of another (on the first shard)."""
    first = next(iter(source), None)
    if first is None:
        raise ValueError("no frames to analyse (no shards, or no frame common to both folders)")
    streams, _ = first
    dims = [s.shape[1] for s in streams]
    warnings = []
    for i, x in enumerate(streams):
        for j, y in enumerate(streams):
            if dims[i] < dims[j]:
                offset = contained_block(x, y)
                if offset is not None:
                    warnings.append(
                        f"{source.labels[i]} is columns {offset}..{offset + dims[i] - 1} of {source.labels[j]}: "
                        "their CKA is a ratio of block norms, not a similarity of representations")
    return dims, warnings


def _heatmap(matrix: torch.Tensor, labels: list[str], title: str, path: Path) -> None:
    plt = pyplot()
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    if len(labels) <= 16:
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def _pca_plots(results: dict[str, PCAResult], scatter: dict[str, tuple[torch.Tensor, torch.Tensor]],
               out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in results.items():
        curve = torch.cumsum(r.explained_variance_ratio, 0).numpy()
        ax.plot(range(1, len(curve) + 1), curve, label=label)
    for level in (0.9, 0.95):
        ax.axhline(level, color="grey", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("components")
    ax.set_ylabel("cumulative explained variance")
    ax.legend(fontsize=7)
    save_figure(fig, out / "pca_variance.png")

    cols = min(4, len(scatter))
    rows = (len(scatter) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 3.2 * rows), squeeze=False)
    names = {0: "speech", 1: "PAD", 2: "EPAD"}
    colours = {0: "tab:blue", 1: "tab:grey", 2: "tab:orange"}
    for ax, (label, (coords, kinds)) in zip(axes.flat, scatter.items()):
        for kind in (1, 2, 0):
            sel = kinds == kind
            if bool(sel.any()):
                ax.scatter(coords[sel, 0], coords[sel, 1], s=3, alpha=0.5, c=colours[kind], label=names[kind])
        ax.set_title(label, fontsize=9)
    for ax in list(axes.flat)[len(scatter):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, markerscale=3)
    save_figure(fig, out / "pca_2d.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a_dir", type=Path, help="extraction folder (get_hidden_states.py / get_vectors.py)")
    parser.add_argument("b_dir", type=Path, nargs="?", default=None, help="a second run's folder, same data")
    parser.add_argument("--streams", default=None, help="comma-separated streams (default: all)")
    parser.add_argument("--minibatch", type=int, default=None,
                        help="average CKA over blocks of this many frames instead of pooling all frames")
    parser.add_argument("--scatter-frames", type=int, default=2000, help="frames per stream in pca_2d.png")
    add_common_arguments(parser)
    opts = parser.parse_args(argv)
    if opts.minibatch is not None and opts.minibatch < 4:
        raise ValueError(f"--minibatch must be at least 4 frames, got {opts.minibatch}")

    a = ShardSet(opts.a_dir)
    b = ShardSet(opts.b_dir) if opts.b_dir is not None else None
    wanted = opts.streams.split(",") if opts.streams else None
    a_names = _stream_names(a, wanted)
    b_names = [s for s in a_names if s in _stream_names(b, None)] if b is not None else []
    if b is not None and not b_names:
        raise ValueError(f"{opts.b_dir} shares no stream with {opts.a_dir}")
    source = Source(a, b, a_names, b_names)
    dims, warnings = _containment(source)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)

    covs = [CovarianceAccumulator() for _ in dims]
    if opts.minibatch is None:
        group = GroupCKA(dims)
        for streams, _ in tqdm(source, desc="CKA pass 1/2", unit="shard", total=len(a)):
            group.update_moments(streams)
        for streams, _ in tqdm(source, desc="CKA pass 2/2", unit="shard", total=len(a)):
            group.update_norms(streams)
        plugin, debiased = group.matrix(False), group.matrix(True)
        covs = [group.covariance(i) for i in range(len(dims))]
        frames = group.moments.n
    else:
        plain, unbiased = MinibatchCKA(len(dims), debiased=False), MinibatchCKA(len(dims), debiased=True)
        for streams, _ in tqdm(source, desc="PCA", unit="shard", total=len(a)):
            for acc, s in zip(covs, streams):
                acc.update(s)
        for block in _blocks(source, opts.minibatch):
            plain.update(block)
            unbiased.update(block)
        plugin, debiased = plain.matrix(), unbiased.matrix()
        frames = plain.blocks * opts.minibatch
    results = {label: pca_from_covariance(acc) for label, acc in zip(source.labels, covs)}

    scatter: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {label: [] for label in source.labels}
    taken = 0
    for streams, rows in source:
        if taken >= opts.scatter_frames:
            break
        n = min(streams[0].shape[0], opts.scatter_frames - taken)
        kinds = torch.zeros(n, dtype=torch.long)
        if "pad" in rows:
            kinds[rows["pad"][:n].bool()] = 1
            kinds[rows["epad"][:n].bool()] = 2
        for label, s in zip(source.labels, streams):
            scatter[label].append((results[label].project(s[:n]).float(), kinds))
        taken += n
    points = {label: (torch.cat([c for c, _ in parts]), torch.cat([k for _, k in parts]))
              for label, parts in scatter.items() if parts}

    out = opts.out
    labels = source.labels
    pair_rows = [{"a": labels[i], "b": labels[j], "cka": float(plugin[i, j]), "cka_debiased": float(debiased[i, j])}
                 for i in range(len(labels)) for j in range(i + 1, len(labels))]
    write_csv(out / "cka.csv", pair_rows)
    run_rows = []
    if b is not None:
        for s in b_names:
            i, j = labels.index(f"A:{s}"), labels.index(f"B:{s}")
            run_rows.append({"stream": s, "cka": float(plugin[i, j]), "cka_debiased": float(debiased[i, j])})
        write_csv(out / "runs.csv", run_rows)
    pca_rows = [{"stream": label, **r.summary()} for label, r in results.items()]
    write_csv(out / "pca.csv", pca_rows)
    write_json(out / "cka.json", {
        "streams": labels, "dims": dims, "frames": frames, "mode": "minibatch" if opts.minibatch else "pooled",
        "minibatch": opts.minibatch, "unmatched_frames_of_a": source.unmatched if b is not None else None,
        "cka": plugin, "cka_debiased": debiased, "runs": run_rows, "warnings": warnings,
        "pca": {label: {**r.summary(), "explained_variance_ratio": r.explained_variance_ratio[:256]}
                for label, r in results.items()},
        "provenance": provenance(extra={"a_dir": str(opts.a_dir), "b_dir": str(opts.b_dir) if b else None,
                                        "a_header": a.header, "b_header": b.header if b else None}),
    })
    _heatmap(plugin, labels, f"linear CKA (plug-in, {frames} frames)", out / "cka_plugin.png")
    _heatmap(debiased.clamp(0, 1), labels, f"linear CKA (debiased, {frames} frames)", out / "cka_debiased.png")
    _pca_plots(results, points, out)
    for row in run_rows:
        print(f"{row['stream']}: CKA A vs B {row['cka']:.4f} (debiased {row['cka_debiased']:.4f})")
    print(f"wrote {out}/cka.json, cka.csv, pca.csv and the plots ({frames} frames, {len(labels)} streams)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
