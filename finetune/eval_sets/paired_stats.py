"""Paired significance of two evaluations of the same items: exact McNemar (sign) test and a bootstrap CI.

Two checkpoints scored on the same items are not independent samples: most items are right (or wrong) for
both, and only the items where they disagree say anything about which is better. Per-item correctness is
in [0, 1]: 1 or 0, and 1/k when the gold answer is among k exactly tied best scores (0.5 for a pair).

* McNemar's exact test: ``b`` = items where B scores higher than A, ``c`` = items where A scores higher;
  ``p = min(1, 2 · P[Binomial(b + c, ½) ≤ min(b, c)])``. An item where one side has a tie and the other a
  decision (0.5 against 1 or 0) counts as discordant like any other difference, once; with ties this is the
  exact sign test on the per-item differences, and without ties it is McNemar's exact test.
* Bootstrap: items resampled with replacement, the accuracy delta ``mean(c_B − c_A)`` recomputed, the
  percentile interval reported. The per-item difference takes only a few distinct values (five for pairs),
  so a resample is fully described by how many items of each value it draws: a multinomial draw over those
  values, which gives the same distribution as resampling indices at a cost independent of the number of
  items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedComparison:
    """B against the baseline A on the same ``n`` items."""

    n: int
    accuracy_a: float
    accuracy_b: float
    delta: float  # accuracy_b - accuracy_a
    better: int  # b: items where B is more correct than A
    worse: int  # c: items where A is more correct than B
    p_value: float  # exact McNemar / sign test, two-sided
    ci_low: float
    ci_high: float
    confidence: float


def check_correct(values: Sequence[float], where: str) -> np.ndarray:
    """``values`` as a float array, refusing anything outside [0, 1] (naming ``where``)."""
    arr = np.asarray(values, dtype=np.float64)
    bad = ~((arr >= 0) & (arr <= 1))
    if bad.any():
        raise ValueError(f"{where}: per-item correctness must be in [0, 1], got {float(arr[bad][0])}")
    return arr


def mcnemar_exact(better: int, worse: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts (1.0 when there are none)."""
    n, k = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    # P[Bin(n, 1/2) <= k], summed in log space so large n does not overflow.
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def bootstrap_delta_ci(diff: np.ndarray, confidence: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``mean(diff)`` over item resamples (``diff`` = per-item ``c_B − c_A``)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    n = diff.shape[0]
    values, counts = np.unique(diff, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=resamples)  # [resamples, distinct values]
    means = draws @ values / n
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def compare_paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = 10_000,
                   seed: int = 0) -> PairedComparison:
    """Compares per-item correctness ``b`` against the baseline ``a`` (same items, same order)."""
    ca, cb = check_correct(a, "baseline"), check_correct(b, "compared")
    if ca.shape != cb.shape or ca.ndim != 1 or ca.size == 0:
        raise ValueError(f"need two equally long, non-empty item lists, got {ca.shape} and {cb.shape}")
    diff = cb - ca
    better, worse = int((diff > 0).sum()), int((diff < 0).sum())
    low, high = bootstrap_delta_ci(diff, confidence, resamples, seed)
    return PairedComparison(
        n=int(ca.size), accuracy_a=float(ca.mean()), accuracy_b=float(cb.mean()), delta=float(diff.mean()),
        better=better, worse=worse, p_value=mcnemar_exact(better, worse), ci_low=low, ci_high=high,
        confidence=confidence,
    )
