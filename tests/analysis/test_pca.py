"""PCA of a pooled covariance: ratios of a known diagonal covariance, thresholds, participation ratio."""

from __future__ import annotations

import pytest
import torch

from finetune.analysis.pca import CovarianceAccumulator, pca, pca_from_covariance


def _exact_diagonal(n: int, sigmas: list[float]) -> torch.Tensor:
    """Rows whose sample covariance is exactly diag(sigmas²): orthonormal centred columns scaled by
    sigma * sqrt(n - 1), in a random rotation of the feature axes kept as the identity."""
    m = torch.cat([torch.ones(n, 1, dtype=torch.float64), torch.randn(n, len(sigmas), dtype=torch.float64)], 1)
    q, _ = torch.linalg.qr(m)
    return q[:, 1:] * torch.tensor(sigmas, dtype=torch.float64) * (n - 1) ** 0.5 + 7.0


def test_ratios_of_a_known_diagonal_covariance():
    sigmas = [4.0, 2.0, 1.0, 0.5]
    result = pca(_exact_diagonal(50, sigmas))
    var = torch.tensor(sigmas, dtype=torch.float64) ** 2
    torch.testing.assert_close(result.eigenvalues, var, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.explained_variance_ratio, var / var.sum(), rtol=1e-10, atol=1e-12)
    assert float(result.explained_variance_ratio.sum()) == pytest.approx(1.0, abs=1e-12)
    # ratios 16/21.25 = 0.753, then 0.941, 0.988: 90 % needs 2 components, 95 % needs 3
    assert result.components_for(0.90) == 2
    assert result.components_for(0.95) == 3
    assert result.participation_ratio == pytest.approx(float(var.sum() ** 2 / (var**2).sum()), rel=1e-10)
    assert result.summary()["dim"] == 4


def test_pooled_covariance_equals_all_rows_at_once():
    x = torch.randn(97, 6, dtype=torch.float64) * 3 + 2
    acc = CovarianceAccumulator()
    for part in x.split(20):
        acc.update(part)
    torch.testing.assert_close(acc.covariance(), torch.cov(x.T), rtol=1e-10, atol=1e-10)
    pooled = pca_from_covariance(acc)
    torch.testing.assert_close(pooled.eigenvalues, pca(x).eigenvalues, rtol=1e-10, atol=1e-10)


def test_projection_onto_leading_components_has_their_variances():
    x = _exact_diagonal(40, [3.0, 1.0, 0.1])
    result = pca(x)
    coords = result.project(x, dims=2)
    assert coords.shape == (40, 2)
    torch.testing.assert_close(coords.var(dim=0), torch.tensor([9.0, 1.0], dtype=torch.float64), rtol=1e-9,
                               atol=1e-9)
    with pytest.raises(ValueError, match="fraction"):
        result.components_for(1.5)
