"""scripts/compare_evals.py: items paired by id, exact McNemar on the discordant items, ties, bootstrap CI."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from finetune.eval_sets.compare import ResultsError, compare_results, load_results
from finetune.eval_sets.paired_stats import bootstrap_delta_ci, compare_paired, mcnemar_exact
from tests.helpers.scripts import load_script


def binomial_two_sided(b: int, c: int) -> float:
    """Exact McNemar from the definition: twice the lower tail of Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


def results_file(path: Path, label: str, sets: dict[str, dict[str, list[float]]], digest: str = "sha256:d",
                 errors: tuple[str, ...] = (), shuffle_seed: int | None = None) -> Path:
    """A results file in the benchmark schema; ``sets`` maps set -> protocol -> per-item correctness."""
    out = {}
    for name, protocols in sets.items():
        n = len(next(iter(protocols.values())))
        items = []
        for i in range(n):
            rec = {"item_id": str(i), "error": None}
            if str(i) in errors:
                rec["error"] = "cannot decode data_stereo/3.wav"
            else:
                for proto, values in protocols.items():
                    rec[proto] = {"correct": values[i], "scores": {"positive": 0.0, "negative": 0.0}}
            items.append(rec)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(items)
        totals = {p: {"accuracy": float(np.mean(v)), "n": n, "correct": float(np.sum(v)),
                      "ties": v.count(0.5)} for p, v in protocols.items()}
        out[name] = {"kind": "pairs", "dataset_digest": digest, "n_items": n, "totals": totals,
                     "breakdown": {}, "items": items}
    path.write_text(json.dumps({"schema_version": 1, "checkpoint": {"label": label}, "provenance": {},
                                "sets": out}))
    return path


def test_mcnemar_exact_matches_the_binomial_definition() -> None:
    for b, c in [(0, 0), (1, 0), (9, 3), (3, 9), (20, 20), (0, 12), (150, 120), (700, 640)]:
        assert mcnemar_exact(b, c) == pytest.approx(binomial_two_sided(b, c), rel=1e-9, abs=1e-300)


def test_ties_count_once_as_discordant() -> None:
    a = [1, 1, 0.5, 0.5, 0, 1, 0, 0.5]
    b = [1, 0.5, 1, 0, 0.5, 0, 1, 0.5]
    c = compare_paired(a, b, resamples=100)
    # Differences b - a: 0, -.5, +.5, -.5, +.5, -1, +1, 0 -> three better, three worse.
    assert (c.better, c.worse, c.n) == (3, 3, 8)
    assert c.delta == pytest.approx(0.0) and c.p_value == 1.0
    assert c.accuracy_a == pytest.approx(4.5 / 8) and c.accuracy_b == pytest.approx(4.5 / 8)
    # A four-way tie of spoken MMLU (1/4) against a decision is one discordant item as well.
    mmlu = compare_paired([0.25, 1, 0, 1 / 3], [1, 0.25, 0, 1 / 3], resamples=100)
    assert (mmlu.better, mmlu.worse, mmlu.delta) == (1, 1, 0.0)
    with pytest.raises(ValueError, match=r"baseline: per-item correctness must be in \[0, 1\], got 1.3"):
        compare_paired([1.3], [1])


def test_bootstrap_matches_index_resampling() -> None:
    rng = np.random.default_rng(5)
    diff = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=40, p=[0.1, 0.05, 0.6, 0.05, 0.2])
    low, high = bootstrap_delta_ci(diff, 0.9, resamples=20_000, seed=1)
    naive = diff[rng.integers(0, 40, size=(20_000, 40))].mean(axis=1)
    ref_low, ref_high = np.quantile(naive, [0.05, 0.95])
    # Resample means lie on a 1/80 grid; 20k resamples put each quantile within a grid step or so.
    assert low == pytest.approx(ref_low, abs=0.02) and high == pytest.approx(ref_high, abs=0.02)
    assert low < diff.mean() < high
    assert bootstrap_delta_ci(diff, 0.9, resamples=500, seed=3) == bootstrap_delta_ci(diff, 0.9, resamples=500, seed=3)


def test_compare_script_end_to_end(tmp_path: Path) -> None:
    n = 40
    base_fork = [1.0] * 20 + [0.0] * 20
    # Against the baseline: items 0-2 lost (worse = 3), items 20-28 gained (better = 9), item 30 an error in B.
    new_fork = [0.0 if i < 3 else 1.0 if 20 <= i < 29 else base_fork[i] for i in range(n)]
    base_std = [0.5] * 4 + [1.0] * 36
    new_std = [1.0, 1.0, 0.0, 0.5] + [1.0] * 35 + [0.5]  # better 2 (0.5->1), worse 2 (0.5->0, 1->0.5)
    a = results_file(tmp_path / "a.json", "base", {"swuggy": {"fork": base_fork, "standard": base_std}})
    b = results_file(tmp_path / "b.json", "ckpt", {"swuggy": {"fork": new_fork, "standard": new_std}},
                     errors=("30",), shuffle_seed=4)
    out = tmp_path / "cmp"
    assert load_script("compare_evals").main([str(a), str(b), "--out", str(out), "--resamples", "2000"]) == 0

    with open(out / "comparison.csv", newline="") as f:
        rows = {r["protocol"]: r for r in csv.DictReader(f)}
    fork, std = rows["fork"], rows["standard"]
    assert (fork["label"], fork["baseline"], fork["n"], fork["skipped"]) == ("ckpt", "base", "39", "1")
    assert (int(fork["better"]), int(fork["worse"])) == (9, 3)
    assert float(fork["p_value"]) == pytest.approx(binomial_two_sided(9, 3))
    kept = [i for i in range(n) if i != 30]
    assert float(fork["delta"]) == pytest.approx(np.mean([new_fork[i] - base_fork[i] for i in kept]))
    assert float(fork["ci_low"]) <= float(fork["delta"]) <= float(fork["ci_high"])
    assert (int(std["better"]), int(std["worse"])) == (2, 2) and float(std["p_value"]) == 1.0

    with open(out / "discordant.csv", newline="") as f:
        disc = [r for r in csv.DictReader(f) if r["protocol"] == "fork"]
    assert sorted(int(r["item_id"]) for r in disc if r["direction"] == "worse") == [0, 1, 2]
    assert sorted(int(r["item_id"]) for r in disc if r["direction"] == "better") == list(range(20, 29))
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["baseline"] == "base" and summary["rows"][0]["better_ids"] == [str(i) for i in range(20, 29)]
    assert "| swuggy | fork | ckpt | 39 |" in (out / "comparison.md").read_text()
    for png in ("accuracy.png", "delta.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # --baseline: the second file as baseline mirrors the counts.
    mirrored = compare_results([load_results(a), load_results(b)], baseline=1, resamples=200)
    assert (mirrored[0].better, mirrored[0].worse) == (3, 9)


def test_files_of_different_sets_are_refused(tmp_path: Path) -> None:
    a = results_file(tmp_path / "a.json", "a", {"s": {"fork": [1.0, 0.0, 1.0]}})
    short = results_file(tmp_path / "b.json", "b", {"s": {"fork": [1.0, 0.0]}})
    with pytest.raises(ResultsError, match=r"item_id '2' is only in .*a.json"):
        compare_results([load_results(a), load_results(short)])
    other = results_file(tmp_path / "c.json", "c", {"s": {"fork": [1.0, 1.0, 1.0]}}, digest="sha256:e")
    with pytest.raises(ResultsError, match="different data"):
        compare_results([load_results(a), load_results(other)])
    assert compare_results([load_results(a), load_results(other)], allow_different_data=True)[0].better == 1
    (tmp_path / "bad.json").write_text('{"sets": {}}')
    with pytest.raises(ResultsError, match="bad.json: no 'sets'"):
        load_results(tmp_path / "bad.json")
