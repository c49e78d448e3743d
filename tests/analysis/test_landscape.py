"""Loss landscapes: the centre is the eval loss, weights come back bit for bit, directions are filter-normalised
over the trained tensors only, interpolation ends at each checkpoint's loss, and a quadratic is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.analysis.landscape import filter_normalized_direction, interpolation, landscape, trainable_state
from finetune.eval import evaluate
from finetune.loss import LossTerms, MoshiLoss
from tests.helpers.models import fixture_codes, small_lora_lm

CPU = torch.device("cpu")


def _setup(seed: int = 0):
    model = small_lora_lm(seed).eval()
    with torch.no_grad():  # move B away from its zero init, so the centre is a trained-looking point
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    batches = [fixture_codes(batch=2, steps=6), (fixture_codes(batch=2, steps=6) + 3) % 32]
    return model, batches, MoshiLoss.for_model(model, 1.0, 0.5)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), name


@pytest.mark.parametrize("dims", [1, 2])
def test_centre_is_the_eval_loss_and_weights_are_restored_bit_for_bit(dims):
    model, batches, loss_fn = _setup()
    before = _snapshot(model)
    plain = evaluate(model, batches, loss_fn, CPU)
    g = torch.Generator().manual_seed(1)
    directions = [filter_normalized_direction(trainable_state(model), g) for _ in range(dims)]
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    rows = landscape(model, batches, loss_fn, CPU, directions, alphas, alphas if dims == 2 else None, progress=False)
    assert len(rows) == len(alphas) ** dims
    centre = [r for r in rows if r["alpha"] == 0.0 and r.get("beta", 0.0) == 0.0]
    # θ + 0·d is θ exactly, so the centre is the same computation as the plain evaluation.
    assert [r["loss"] for r in centre] == [plain.loss]
    assert len({r["loss"] for r in rows}) > 1  # the directions do move the loss
    _assert_same(model, before)


def test_weights_are_restored_when_the_sweep_fails():
    model, batches, loss_fn = _setup()
    before = _snapshot(model)
    calls = []

    def failing(m, codes):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return loss_fn(m, codes)

    d = filter_normalized_direction(trainable_state(model), torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="boom"):
        landscape(model, batches, failing, CPU, [d], [0.5, 1.0], progress=False)
    _assert_same(model, before)


def test_directions_are_filter_normalised_over_the_trained_tensors_only():
    model, _, _ = _setup()
    state = trainable_state(model)
    assert state and all("lora_" in n for n in state)  # LoRA: only the A/B factors train
    d = filter_normalized_direction(state, torch.Generator().manual_seed(5))
    assert d.keys() == state.keys()
    for name, theta in state.items():
        assert d[name].shape == theta.shape
        torch.testing.assert_close(d[name].reshape(theta.shape[0], -1).norm(dim=1),
                                   theta.reshape(theta.shape[0], -1).norm(dim=1), rtol=1e-5, atol=1e-6)
    again = filter_normalized_direction(state, torch.Generator().manual_seed(5))
    assert all(torch.equal(d[n], again[n]) for n in d)
    one_d = {"w": torch.randn(4, 3), "bias": torch.randn(4), "alpha": torch.tensor(0.3)}
    zero = filter_normalized_direction(one_d, torch.Generator().manual_seed(0))
    assert torch.equal(zero["bias"], torch.zeros(4)) and torch.equal(zero["alpha"], torch.tensor(0.0))
    copy = filter_normalized_direction(one_d, torch.Generator().manual_seed(0), one_d="copy")
    assert torch.equal(copy["bias"], one_d["bias"]) and torch.equal(copy["alpha"], one_d["alpha"])


def test_interpolation_ends_at_each_checkpoints_loss_and_is_flat_between_equal_ones():
    model, batches, loss_fn = _setup()
    state_a = trainable_state(model)
    g = torch.Generator().manual_seed(2)
    state_b = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in state_a.items()}
    with torch.no_grad():
        loss_a = evaluate(model, batches, loss_fn, CPU).loss
        for n, p in model.named_parameters():
            if n in state_b:
                p.copy_(state_b[n])
        loss_b = evaluate(model, batches, loss_fn, CPU).loss
        for n, p in model.named_parameters():
            if n in state_a:
                p.copy_(state_a[n])
    before = _snapshot(model)
    rows = interpolation(model, batches, loss_fn, CPU, state_a, state_b, [-0.5, 0.0, 0.5, 1.0, 1.5], progress=False)
    by_alpha = {r["alpha"]: r["loss"] for r in rows}
    assert by_alpha[0.0] == loss_a and by_alpha[1.0] == loss_b
    assert loss_a != loss_b
    _assert_same(model, before)
    flat = interpolation(model, batches, loss_fn, CPU, state_a, state_a, [-0.5, 0.0, 0.7, 1.5], progress=False)
    assert {r["loss"] for r in flat} == {loss_a}


class _Linear(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, dim, dtype=torch.float64))


def test_quadratic_loss_matches_its_taylor_expansion_exactly():
    """For L(w) = mean((Xwᵀ − y)²): L(w + αd) = L₀ + α gᵀd + ½ α² dᵀHd with g = 2Xᵀr/n, H = 2XᵀX/n."""
    torch.manual_seed(0)
    n, dim = 64, 5
    x, y = torch.randn(n, dim, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    model = _Linear(dim)

    def loss_fn(m, codes):
        r = x @ m.w[0] - y
        zero = torch.zeros((), dtype=torch.float64)
        return LossTerms((r * r).sum(), torch.tensor(float(n), dtype=torch.float64), zero, zero)

    w = model.w.detach()[0].clone()
    d = filter_normalized_direction({"w": model.w.detach()}, torch.Generator().manual_seed(3))
    dv = d["w"][0]
    r0 = x @ w - y
    l0, slope, curv = float(r0 @ r0 / n), float(2 * (x.t() @ r0) @ dv / n), float(2 * dv @ (x.t() @ x) @ dv / n)
    alphas = [-1.0, -0.25, 0.0, 0.5, 2.0]
    rows = landscape(model, [torch.zeros(1)], loss_fn, CPU, [d], alphas, progress=False)
    # evaluate() accumulates in float32: relative error ~1e-7 of the loss.
    for r in rows:
        a = r["alpha"]
        assert r["loss"] == pytest.approx(l0 + a * slope + 0.5 * a * a * curv, rel=1e-6)


def test_checkpoint_state_reads_the_trained_tensors_and_names_what_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    from finetune.analysis.landscape import checkpoint_state

    model, _, _ = _setup()
    state = trainable_state(model)
    save_file({n: t + 1 for n, t in state.items()}, str(tmp_path / "lora.safetensors"))
    loaded = checkpoint_state(model, tmp_path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[n], state[n] + 1) for n in state)
    name = sorted(state)[0]
    save_file({n: t for n, t in state.items() if n != name}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=f"missing.safetensors: 1 trained tensor.*{name}"):
        checkpoint_state(model, tmp_path / "missing.safetensors")
    save_file({**state, name: torch.zeros(3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=rf"{name} has shape \(3,\)"):
        checkpoint_state(model, tmp_path / "shape.safetensors")
