"""Scoring a paired set: both items of a pair padded into one batch, one forward per batch of pairs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.evaluation.items import ItemCoder, ItemError, pad_batch
from finetune.evaluation.layout import EvalSetFiles, Pair, PairSet, relative_name
from finetune.evaluation.results import pair_record
from finetune.evaluation.scoring import ScoreSpec, forward_logits, item_scores


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    pair_set: PairSet,
    coder: ItemCoder,
    spec: ScoreSpec,
    text_row: str,
    device: torch.device,
    pairs: Sequence[Pair] | None = None,
    pairs_per_batch: int = 8,
    num_batches: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Records (see `docs/evaluation.md`) of ``pairs`` (default: all of the set), in the given order.

    A pair whose file cannot be read or is too long is recorded with its error; the other pairs of its
    batch are scored as usual. With ``num_batches`` (several ranks under FSDP, where every forward is a
    collective), exactly that many forwards run, the extra ones on a one-frame placeholder.
    """
    pairs = list(pair_set.pairs if pairs is None else pairs)
    files = pair_set.files
    root = files.root
    batches = [pairs[i : i + pairs_per_batch] for i in range(0, len(pairs), pairs_per_batch)]
    if num_batches is not None:
        if num_batches < len(batches):
            raise ValueError(f"{len(batches)} batches of pairs do not fit in num_batches={num_batches}")
        batches += [[] for _ in range(num_batches - len(batches))]
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        for batch in batches:
            entries = [files.items[n] for p in batch for n in (p.positive, p.negative)]
            codes = coder.codes(entries, text_row)
            ok: list[int] = []
            for j, p in enumerate(batch):
                errors = [c for c in codes[2 * j : 2 * j + 2] if isinstance(c, ItemError)]
                if errors:
                    records.append(_record(p, files, root, None, None, "; ".join(map(str, errors))))
                else:
                    ok.append(j)
                    records.append({})  # filled below, keeping the given order
            first = len(records) - len(batch)
            items = [codes[2 * j + s] for j in ok for s in (0, 1)]
            if not items:
                if num_batches is not None:  # keep the collective forwards in step
                    K = 1 + int(model.n_q)
                    forward_logits(model, torch.full((1, K, 1), -1, dtype=torch.long, device=device), False)
                if progress:
                    progress(len(batch))
                continue
            frames = [int(c.shape[-1]) for c in items]  # type: ignore[union-attr]
            x = pad_batch(items).to(device)  # type: ignore[arg-type]
            scores = item_scores(forward_logits(model, x, spec.score_text), x, frames, spec)
            for i, j in enumerate(ok):
                pos, neg = scores.row(2 * i), scores.row(2 * i + 1)
                records[first + j] = _record(batch[j], files, root, {"positive": pos, "negative": neg},
                                             (frames[2 * i], frames[2 * i + 1]), None)
            if progress:
                progress(len(batch))
    finally:
        model.train(was_training)
    return records


def _record(p: Pair, files: EvalSetFiles, root: Path, scores: dict[str, dict[str, float]] | None,
            frames: tuple[int, int] | None, error: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "files": {"positive": relative_name(files.items[p.positive].path, root),
                  "negative": relative_name(files.items[p.negative].path, root)},
        "file_index": {"positive": p.positive, "negative": p.negative},
    }
    if frames is not None:
        info["frames"] = {"positive": frames[0], "negative": frames[1]}
    return pair_record(p.item_id, info, p.groups, scores, error)
