"""Linear CKA: invariances, the pooled accumulator, the Gram form and the debiased estimator.

Everything accumulates in float64, so identities hold to ~1e-12; 1e-9 leaves room for the sums of a few
hundred frames.
"""

from __future__ import annotations

import math

import pytest
import torch

from finetune.analysis.cka import (
    GroupCKA,
    MinibatchCKA,
    center_gram,
    contained_block,
    gram_linear,
    linear_cka,
)

TOL = 1e-9


def _x(n: int = 120, p: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64) @ torch.randn(p, p, generator=g, dtype=torch.float64)


def _gram_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool) -> float:
    """The Gram-matrix definition, written out: <centre(K), centre(L)> / sqrt(<K, K><L, L>)."""
    k, l_ = center_gram(gram_linear(x), debiased), center_gram(gram_linear(y), debiased)
    return float((k * l_).sum() / torch.sqrt((k * k).sum() * (l_ * l_).sum()))


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_a_stream_with_itself_is_one(debiased):
    assert linear_cka(_x(), _x(), debiased) == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_maps_isotropic_scaling_and_translation(debiased):
    x = _x(seed=1)
    y = x[:, :7] @ _x(n=7, p=7, seed=2) + 3.0 * _x(p=7, seed=13)  # related, not identical
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    base = linear_cka(x, y, debiased)
    assert 0 < base < 1
    assert linear_cka(x @ q, y, debiased) == pytest.approx(base, abs=TOL)
    assert linear_cka(3.5 * x + torch.randn(10, dtype=torch.float64), y, debiased) == pytest.approx(base, abs=TOL)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=TOL)
    assert linear_cka(y, x, debiased) == pytest.approx(base, abs=TOL)  # symmetric


def test_cka_is_not_invariant_to_a_general_invertible_map():
    x = _x(seed=3)
    a = torch.diag(torch.tensor([1.0, 100.0] + [1.0] * 8, dtype=torch.float64))
    assert linear_cka(x, x @ a) < 0.99


@pytest.mark.parametrize("debiased", [False, True])
def test_feature_form_equals_gram_form(debiased):
    x, y = _x(n=60, p=8, seed=4), _x(n=60, p=5, seed=5)
    assert linear_cka(x, y, debiased) == pytest.approx(_gram_cka(x, y, debiased), abs=TOL)


@pytest.mark.parametrize("debiased", [False, True])
def test_pooled_over_batches_equals_all_frames_at_once(debiased):
    x, y, z = _x(n=203, seed=6), _x(n=203, p=4, seed=7) + 5.0, _x(n=203, p=2, seed=12)
    bounds = [0, 17, 80, 81, 150, 203]
    acc = GroupCKA([10, 4, 2])
    for a, b in zip(bounds, bounds[1:]):
        acc.update_moments([x[a:b], y[a:b], z[a:b]])
    for a, b in zip(bounds, bounds[1:]):
        acc.update_norms([x[a:b], y[a:b], z[a:b]])
    m = acc.matrix(debiased)
    assert acc.moments.n == 203
    assert float(m[0, 1]) == pytest.approx(_gram_cka(x, y, debiased), abs=TOL)
    assert float(m[2, 1]) == pytest.approx(_gram_cka(z, y, debiased), abs=TOL)
    torch.testing.assert_close(m, m.T, rtol=0, atol=0)
    torch.testing.assert_close(acc.covariance(1).covariance(), torch.cov(y.T), rtol=1e-10, atol=1e-10)


def test_debiased_cka_of_independent_gaussians_is_near_zero_while_plug_in_is_not():
    # p = n: plug-in HSIC of independent sets is dominated by its bias. The debiased estimate has mean 0 and,
    # for isotropic Gaussians, a standard deviation of about sqrt(2) / n = 0.007 at n = 200; 0.05 is 7 sigma.
    n = p = 200
    g = torch.Generator().manual_seed(8)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = torch.randn(n, p, generator=g, dtype=torch.float64)
    assert abs(linear_cka(x, y, debiased=True)) < 0.05
    assert linear_cka(x, y, debiased=False) > 0.4


def test_minibatch_cka_with_one_block_equals_cka_and_has_a_unit_diagonal():
    x, y, z = _x(n=50, seed=9), _x(n=50, p=6, seed=10), _x(n=50, p=3, seed=11)
    for debiased in (False, True):
        acc = MinibatchCKA(3, debiased=debiased)
        acc.update([x, y, z])
        m = acc.matrix()
        assert m.shape == (3, 3)
        torch.testing.assert_close(m.diagonal(), torch.ones(3, dtype=torch.float64), rtol=0, atol=TOL)
        assert float(m[0, 1]) == pytest.approx(linear_cka(x, y, debiased), abs=TOL)
        assert float(m[2, 1]) == pytest.approx(linear_cka(z, y, debiased), abs=TOL)


def test_cka_of_a_block_and_a_concatenation_holding_it_is_a_norm_ratio():
    # X and A with orthogonal, centred columns: CKA(X, [X, A]) = |XᵀX| / sqrt(|XᵀX|² + |AᵀA|²).
    n = 40
    m = torch.cat([torch.ones(n, 1, dtype=torch.float64), torch.randn(n, 7, dtype=torch.float64)], dim=1)
    q, _ = torch.linalg.qr(m)
    x = q[:, 1:4] * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    a = q[:, 4:8] * torch.tensor([5.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    fx, fa = torch.linalg.norm(x.T @ x), torch.linalg.norm(a.T @ a)
    expected = float(fx / torch.sqrt(fx**2 + fa**2))
    assert linear_cka(x, torch.cat([x, a], dim=1)) == pytest.approx(expected, abs=TOL)
    assert contained_block(x, torch.cat([a, x], dim=1)) == 4
    assert contained_block(x, torch.cat([x, a], dim=1)) == 0
    assert contained_block(a, torch.cat([x, x], dim=1)) is None


def test_constant_stream_gives_nan_and_too_few_frames_raise():
    x = _x(n=10)
    assert math.isnan(linear_cka(x, torch.ones(10, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="at least 4 frames"):
        linear_cka(x[:3], x[:3], debiased=True)
    with pytest.raises(ValueError, match="same frames"):
        GroupCKA([10, 10]).update_moments([x, x[:5]])
