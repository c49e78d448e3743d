"""Compares spoken-LM results files item by item: accuracy deltas against a baseline and their significance.

Results files (one per checkpoint, written by the benchmark scripts) hold per set a list of item records
with a stable ``item_id`` and, per protocol, ``correct`` in {0, 0.5, 1}. Items are joined on
``(set, item_id)``, never on position, so two runs whose items were read in a different order, or where
different items failed, still compare the same items. An item with an ``error`` in either file is left out
of that comparison (and counted); an id present in one file only means the files are not of the same set
and is an error, as are different dataset digests unless explicitly allowed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.eval_sets.paired_stats import compare_paired
from finetune.evaluation.layout import item_sort_key


class ResultsError(ValueError):
    """A results file is missing a field the comparison needs, or two files do not describe the same items."""


@dataclass(frozen=True)
class Results:
    """One results file: its label and, per set, the protocols and the item records by id."""

    path: Path
    label: str
    dataset_digests: dict[str, str | None]
    protocols: dict[str, list[str]]  # set -> protocol names, in the file's order
    items: dict[str, dict[str, dict[str, Any]]]  # set -> item_id -> record


def load_results(path: str | os.PathLike, label: str | None = None) -> Results:
    """Reads a results file, checking the fields a comparison relies on (errors name the file and set)."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: {p}") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    sets = obj.get("sets") if isinstance(obj, dict) else None
    if not isinstance(sets, dict) or not sets:
        raise ResultsError(f"{p}: no 'sets' object (expected a results file of slm_benchmark.py/mmlu_benchmark.py)")
    digests, protocols, items = {}, {}, {}
    for name, s in sets.items():
        if not isinstance(s.get("totals"), dict) or not isinstance(s.get("items"), list):
            raise ResultsError(f"{p}: set {name!r} needs 'totals' and 'items'")
        protocols[name] = list(s["totals"])
        digests[name] = s.get("dataset_digest")
        by_id: dict[str, dict[str, Any]] = {}
        for k, rec in enumerate(s["items"]):
            if not isinstance(rec, dict) or "item_id" not in rec:
                raise ResultsError(f"{p}: set {name!r}, item #{k} has no 'item_id'")
            item_id = str(rec["item_id"])
            if item_id in by_id:
                raise ResultsError(f"{p}: set {name!r} lists item_id {item_id!r} twice")
            by_id[item_id] = rec
        items[name] = by_id
    if label is None:
        label = str((obj.get("checkpoint") or {}).get("label") or p.stem)
    return Results(p, label, digests, protocols, items)


def unique_labels(results: Sequence[Results]) -> list[Results]:
    """The same results with labels made unique (``label``, ``label-2``...) so table rows stay distinct."""
    seen: dict[str, int] = {}
    out = []
    for r in results:
        n = seen.get(r.label, 0) + 1
        seen[r.label] = n
        out.append(r if n == 1 else Results(r.path, f"{r.label}-{n}", r.dataset_digests, r.protocols, r.items))
    return out


def _correct(rec: dict[str, Any], protocol: str, where: str) -> float:
    entry = rec.get(protocol)
    if not isinstance(entry, dict) or "correct" not in entry:
        raise ResultsError(f"{where}: item {rec['item_id']!r} has no {protocol!r} correctness")
    return float(entry["correct"])


def paired_correctness(base: Results, other: Results, set_name: str, protocol: str
                       ) -> tuple[list[str], list[float], list[float], int]:
    """Item ids and both files' correctness on the items scored in both; also how many were left out."""
    a, b = base.items[set_name], other.items[set_name]
    only = sorted(set(a) ^ set(b))
    if only:
        holder = base.path if only[0] in a else other.path
        raise ResultsError(f"set {set_name!r}: item_id {only[0]!r} is only in {holder} ({len(only)} ids differ "
                           f"between {base.path} and {other.path}); they are not results of the same set")
    ids, ca, cb, skipped = [], [], [], 0
    for item_id in sorted(a, key=item_sort_key):
        ra, rb = a[item_id], b[item_id]
        if ra.get("error") or rb.get("error"):
            skipped += 1
            continue
        ids.append(item_id)
        ca.append(_correct(ra, protocol, f"{base.path}, set {set_name!r}"))
        cb.append(_correct(rb, protocol, f"{other.path}, set {set_name!r}"))
    return ids, ca, cb, skipped


@dataclass(frozen=True)
class ComparisonRow:
    """One line of the comparison table: a file against the baseline on one set and protocol."""

    set: str
    protocol: str
    label: str
    baseline: str
    n: int
    skipped: int
    accuracy: float
    baseline_accuracy: float
    delta: float
    ci_low: float
    ci_high: float
    better: int
    worse: int
    p_value: float
    better_ids: list[str]
    worse_ids: list[str]

    def table_row(self) -> dict[str, Any]:
        """The row without the id lists (for the CSV and the printed tables)."""
        row = asdict(self)
        del row["better_ids"], row["worse_ids"]
        return row


def compare_results(results: Sequence[Results], baseline: int = 0, *, confidence: float = 0.95,
                    resamples: int = 10_000, seed: int = 0, allow_different_data: bool = False
                    ) -> list[ComparisonRow]:
    """Every file against ``results[baseline]`` on every set and protocol they share, in the baseline's order."""
    base = results[baseline]
    rows = []
    for set_name, protocols in base.protocols.items():
        for protocol in protocols:
            for other in results:
                if other is base or set_name not in other.items or protocol not in other.protocols[set_name]:
                    continue
                da, db = base.dataset_digests[set_name], other.dataset_digests[set_name]
                if da and db and da != db and not allow_different_data:
                    raise ResultsError(
                        f"set {set_name!r}: {base.path} and {other.path} were computed on different data "
                        f"({da} vs {db}); pass --allow-different-data to compare them anyway"
                    )
                ids, ca, cb, skipped = paired_correctness(base, other, set_name, protocol)
                if not ids:
                    continue
                c = compare_paired(ca, cb, confidence=confidence, resamples=resamples, seed=seed)
                rows.append(ComparisonRow(
                    set=set_name, protocol=protocol, label=other.label, baseline=base.label, n=c.n, skipped=skipped,
                    accuracy=c.accuracy_b, baseline_accuracy=c.accuracy_a, delta=c.delta, ci_low=c.ci_low,
                    ci_high=c.ci_high, better=c.better, worse=c.worse, p_value=c.p_value,
                    better_ids=[i for i, x, y in zip(ids, ca, cb) if y > x],
                    worse_ids=[i for i, x, y in zip(ids, ca, cb) if y < x],
                ))
    return rows


def _cells(row: ComparisonRow) -> list[str]:
    return [row.set, row.protocol, row.label, str(row.n), f"{100 * row.baseline_accuracy:.2f}",
            f"{100 * row.accuracy:.2f}", f"{100 * row.delta:+.2f}",
            f"[{100 * row.ci_low:+.2f}, {100 * row.ci_high:+.2f}]", str(row.better), str(row.worse),
            f"{row.p_value:.3g}"]


def _headers(rows: Sequence[ComparisonRow], confidence: float) -> list[str]:
    base = rows[0].baseline if rows else "baseline"
    return ["set", "protocol", "checkpoint", "n", f"{base} %", "acc %", "Δ pts", f"{100 * confidence:g}% CI",
            "better", "worse", "McNemar p"]


def format_markdown(rows: Sequence[ComparisonRow], confidence: float) -> str:
    """A Markdown table of the comparison (accuracies and deltas in percentage points)."""
    lines = [_headers(rows, confidence)] + [_cells(r) for r in rows]
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "|".join("---" for _ in lines[0]) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines[1:]]
    return "\n".join(out) + "\n"


def format_plain(rows: Sequence[ComparisonRow], confidence: float) -> str:
    """The same table with aligned columns, for the terminal."""
    lines = [_headers(rows, confidence)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines) + "\n"
