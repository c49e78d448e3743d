"""Decisions, totals and breakdowns of the results files (the schema is in `docs/evaluation.md`).

An item is correct (1) when its positive or gold candidate scores strictly best under a protocol, wrong (0)
when another does, and shares the credit on an exact tie (0.5 for a pair), so a model indifferent between
the candidates scores chance rather than whatever a tie-breaking rule favours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from finetune.evaluation.scoring import FORK, PROTOCOLS

SCHEMA_VERSION = 1


def better_is_lower(protocol: str) -> bool:
    return protocol == FORK


def pair_correct(positive: float, negative: float, lower_is_better: bool) -> float:
    if positive == negative:
        return 0.5
    return 1.0 if (positive < negative) == lower_is_better else 0.0


def choice_correct(scores: Sequence[float], gold: int) -> tuple[float, int]:
    """``(credit, predicted)``: 1/k when the gold is among k tied best (highest) scores; the first best is predicted."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return (1.0 / len(tied) if gold in tied else 0.0), tied[0]


def pair_record(item_id: str, files: Mapping[str, Any], groups: Mapping[str, str],
                scores: Mapping[str, Mapping[str, float]] | None, error: str | None = None) -> dict[str, Any]:
    """One pair's record; ``scores[candidate][protocol]`` with candidates `positive` and `negative`."""
    rec: dict[str, Any] = {"item_id": item_id, **files, "groups": dict(groups)}
    if scores is not None:
        for p in PROTOCOLS:
            pos, neg = scores["positive"][p], scores["negative"][p]
            rec[p] = {"correct": pair_correct(pos, neg, better_is_lower(p)),
                      "scores": {"positive": pos, "negative": neg}}
    rec["error"] = error
    return rec


def _cell(records: Iterable[Mapping[str, Any]], protocols: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    scored = [r for r in records if r.get("error") is None]
    for p in protocols:
        credits = [float(r[p]["correct"]) for r in scored if p in r]
        ties = sum(1 for r in scored if p in r and 0.0 < float(r[p]["correct"]) < 1.0)
        n = len(credits)
        out[p] = {"accuracy": sum(credits) / n if n else None, "n": n, "correct": sum(credits), "ties": ties}
    return out


def totals(records: Sequence[Mapping[str, Any]], protocols: Sequence[str] = PROTOCOLS) -> dict[str, dict[str, Any]]:
    return _cell(records, protocols)


def breakdown(records: Sequence[Mapping[str, Any]], protocols: Sequence[str] = PROTOCOLS
              ) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Totals per group of every grouping the records carry (`groups`)."""
    by: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for r in records:
        for grouping, group in r.get("groups", {}).items():
            by.setdefault(grouping, {}).setdefault(str(group), []).append(r)
    return {g: {k: _cell(v, protocols) for k, v in sorted(groups.items())} for g, groups in sorted(by.items())}


def set_result(kind: str, path: str, dataset_digest: str | None, records: list[dict[str, Any]],
               seconds: float, protocols: Sequence[str] = PROTOCOLS) -> dict[str, Any]:
    """One entry of a results file's `sets`."""
    n_errors = sum(1 for r in records if r.get("error") is not None)
    return {
        "kind": kind, "path": path, "dataset_digest": dataset_digest, "n_items": len(records),
        "n_errors": n_errors, "items_per_s": len(records) / seconds if seconds > 0 else None,
        "totals": totals(records, protocols), "breakdown": breakdown(records, protocols), "items": records,
    }


def results_document(kind: str, checkpoint: Mapping[str, Any], provenance: Mapping[str, Any],
                     protocols: Mapping[str, Any], settings: Mapping[str, Any], sets: Mapping[str, Any]
                     ) -> dict[str, Any]:
    """A whole results file: one checkpoint, every set scored with it."""
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "checkpoint": dict(checkpoint),
            "provenance": dict(provenance), "protocols": dict(protocols), "settings": dict(settings),
            "sets": dict(sets)}


def accuracy_metrics(prefix: str, result: Mapping[str, Any]) -> dict[str, float]:
    """Flat metrics of one set (``{prefix}/{protocol}_acc``), for the training logs."""
    out: dict[str, float] = {}
    for p, t in result["totals"].items():
        if t["accuracy"] is not None:
            out[f"{prefix}/{p}_acc"] = float(t["accuracy"])
    out[f"{prefix}/n"] = float(result["n_items"] - result["n_errors"])
    if result["n_errors"]:
        out[f"{prefix}/errors"] = float(result["n_errors"])
    return out
