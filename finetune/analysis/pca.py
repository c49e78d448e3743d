"""Principal components of a stream of per-frame vectors, from its pooled covariance.

For centred ``X [n, p]`` with singular values ``s_i``: eigenvalues ``λ_i = s_i² / (n - 1)`` of the covariance,
explained-variance ratios ``EVR_i = λ_i / Σ λ_j``, the number of components reaching 90 % and 95 % of the
variance, and the participation ratio ``(Σ λ)² / Σ λ²`` (an effective dimension between 1 and ``p``).
The covariance is accumulated batch by batch in float64 (:class:`CovarianceAccumulator`), so the whole stream
never sits in memory; the ``p x p`` matrix does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACC_DTYPE = torch.float64


class CovarianceAccumulator:
    """Sum, sum of outer products and count of rows, giving mean and covariance of all rows seen."""

    def __init__(self) -> None:
        self.n = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(f"expected a [frames, features] matrix, got shape {tuple(x.shape)}")
        x = x.detach().to(ACC_DTYPE)
        if self.total is None:
            self.total = x.sum(dim=0)
            self.outer = x.T @ x
        else:
            self.total += x.sum(dim=0)
            self.outer += x.T @ x
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no frames were accumulated")
        return self.total / self.n

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance ``[p, p]`` (float64)."""
        if self.outer is None or self.n < 2:
            raise ValueError(f"the covariance needs at least 2 frames, got {self.n}")
        mean = self.mean
        return (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)


@dataclass
class PCAResult:
    eigenvalues: torch.Tensor  # [p] descending, float64
    components: torch.Tensor  # [p, p], row i = direction of eigenvalues[i]
    mean: torch.Tensor  # [p]
    n: int

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        total = self.eigenvalues.sum()
        if float(total) <= 0:
            return torch.zeros_like(self.eigenvalues)
        return self.eigenvalues / total

    def components_for(self, fraction: float) -> int:
        """Fewest leading components whose ratios sum to at least ``fraction`` (0 < fraction <= 1)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        cumulative = torch.cumsum(self.explained_variance_ratio, 0)
        reached = torch.nonzero(cumulative >= fraction - 1e-12)
        return int(reached[0]) + 1 if len(reached) else len(cumulative)

    @property
    def participation_ratio(self) -> float:
        lam = self.eigenvalues
        denom = float((lam * lam).sum())
        return float(lam.sum() ** 2) / denom if denom > 0 else 0.0

    def project(self, x: torch.Tensor, dims: int = 2) -> torch.Tensor:
        """Coordinates of rows ``x`` on the leading ``dims`` components."""
        return (x.to(ACC_DTYPE) - self.mean) @ self.components[:dims].T

    def summary(self) -> dict[str, float | int]:
        return {
            "frames": self.n,
            "dim": int(self.eigenvalues.numel()),
            "components_90": self.components_for(0.90),
            "components_95": self.components_for(0.95),
            "participation_ratio": self.participation_ratio,
            "top1_ratio": float(self.explained_variance_ratio[0]),
        }


def pca_from_covariance(acc: CovarianceAccumulator) -> PCAResult:
    """Eigen-decomposition of the pooled covariance (eigenvalues clipped at 0 against rounding)."""
    eigvals, eigvecs = torch.linalg.eigh(acc.covariance())
    order = torch.argsort(eigvals, descending=True)
    return PCAResult(eigvals[order].clamp_min(0), eigvecs[:, order].T.contiguous(), acc.mean, acc.n)


def pca(x: torch.Tensor) -> PCAResult:
    """PCA of all rows of ``x [n, p]`` at once."""
    acc = CovarianceAccumulator()
    acc.update(x)
    return pca_from_covariance(acc)
