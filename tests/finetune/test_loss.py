"""The loss of reference 5.4, checked against an explicit per-position loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.loss import (
    LossTerms,
    chunked_linear_cross_entropy,
    default_chunk_rows,
    loss_weight_sums_from_codes,
    moshi_loss_terms,
    train_output_loss_terms,
    weighted_cross_entropy,
)


def _reference_part(logits, targets, mask, weight_fn):
    """Σ w·CE / Σ w with a Python loop over positions (the definition, written out)."""
    num, den = 0.0, 0.0
    b, k, t = targets.shape
    for i in range(b):
        for j in range(k):
            for s in range(t):
                if not mask[i, j, s]:
                    continue
                w = weight_fn(j, int(targets[i, j, s]))
                z = logits[i, j, s].double()
                ce = torch.logsumexp(z, 0) - z[targets[i, j, s]]
                num += w * float(ce)
                den += w
    return num, den


def _fake_output(b=2, dep_q=3, t=7, card=11, text_card=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, card, (b, 1 + 2 * dep_q, t), generator=g)
    codes[:, 0] = torch.randint(0, text_card, (b, t), generator=g)
    codes[0, 0, :3] = torch.tensor([3, 0, 3])  # PAD / EPAD targets
    codes[1, 2, 4] = -1  # a ZERO audio token
    codes[1, 0, 5] = -1  # a ZERO text token
    delays = [0] + [0] + [1] * (dep_q - 1) + [0] + [1] * (dep_q - 1)
    mask = codes[:, 1 : 1 + dep_q] != -1
    for k in range(dep_q):
        d = delays[1 + k]
        if d:
            mask[:, k, t - d :] = False
    text_mask = codes[:, :1] != -1
    logits = torch.randn(b, dep_q, t, card, generator=g)
    logits[~mask] = float("nan")  # the model's NaN fill at invalid positions
    text_logits = torch.randn(b, 1, t, text_card, generator=g)
    text_logits[~text_mask] = float("nan")
    return codes, delays, logits, mask, text_logits, text_mask


@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (0.5, 100.0), (0.0, 3.0), (1.0, 1.0)])
def test_loss_matches_per_position_definition(alpha, beta):
    codes, delays, logits, mask, text_logits, text_mask = _fake_output()
    terms = moshi_loss_terms(text_logits, text_mask, logits, mask, codes, beta, alpha)
    tn, td = _reference_part(
        text_logits, codes[:, :1], text_mask, lambda k, y: alpha if y in (3, 0) else 1.0
    )
    an, ad = _reference_part(logits, codes[:, 1:4], mask, lambda k, y: beta if k == 0 else 1.0)
    assert terms.text_sum.dtype == torch.float32
    assert float(terms.text_weight) == pytest.approx(td)
    assert float(terms.audio_weight) == pytest.approx(ad)
    assert float(terms.text_loss) == pytest.approx(tn / td, rel=1e-5)
    assert float(terms.audio_loss) == pytest.approx(an / ad, rel=1e-5)
    assert float(terms.total()) == pytest.approx(tn / td + an / ad, rel=1e-5)


def test_masked_nan_positions_give_finite_zero_gradients():
    codes, _, logits, mask, text_logits, text_mask = _fake_output()
    logits.requires_grad_(True)
    text_logits.requires_grad_(True)
    terms = moshi_loss_terms(text_logits, text_mask, logits, mask, codes, 100.0, 0.5)
    terms.total().backward()
    assert torch.isfinite(terms.total())
    assert torch.isfinite(logits.grad).all() and torch.isfinite(text_logits.grad).all()
    assert (logits.grad[~mask] == 0).all()
    assert (text_logits.grad[~text_mask] == 0).all()
    assert (logits.grad[mask].abs().sum(-1) > 0).all()


def test_weight_sums_from_codes_equal_the_model_masks():
    codes, delays, logits, mask, text_logits, text_mask = _fake_output()
    terms = moshi_loss_terms(text_logits, text_mask, logits, mask, codes, 7.0, 0.25)
    wt, wa = loss_weight_sums_from_codes(codes, delays, 3, 7.0, 0.25)
    assert float(wt) == float(terms.text_weight)
    assert float(wa) == float(terms.audio_weight)


def test_terms_add_and_normalise_by_step_totals():
    a = LossTerms(*(torch.tensor(x) for x in (2.0, 4.0, 6.0, 3.0)))
    b = LossTerms(*(torch.tensor(x) for x in (1.0, 1.0, 3.0, 3.0)))
    s = a + b
    assert s.as_tuple() == tuple(torch.tensor(x) for x in (3.0, 5.0, 9.0, 6.0))
    assert float(s.total()) == pytest.approx(3 / 5 + 9 / 6)
    # Each micro-batch divided by the step totals sums to the step's loss.
    assert float(a.total(5.0, 6.0) + b.total(5.0, 6.0)) == pytest.approx(float(s.total()))
    assert float(LossTerms.from_vector(s.as_vector()).total()) == pytest.approx(float(s.total()))
    empty = LossTerms(*(torch.tensor(0.0) for _ in range(4)))
    assert float(empty.total()) == 0.0


def test_weighted_cross_entropy_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        weighted_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))


@pytest.mark.parametrize("dtype,chunk", [(torch.float32, 3), (torch.float32, 64), (torch.bfloat16, 4)])
def test_chunked_linear_ce_equals_plain_computation(dtype, chunk):
    g = torch.Generator().manual_seed(1)
    n, d, v = 10, 8, 37
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g)
    y[2] = -1
    wts = torch.rand(n, generator=g)
    wts[2] = 0.0
    s, ws = chunked_linear_cross_entropy(h, w, y, wts, chunk_size=chunk)
    (2.0 * s).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    s_ref, ws_ref = weighted_cross_entropy(torch.nn.functional.linear(h, w), y, wts)
    (2.0 * s_ref).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s, s_ref, **tol)
    assert float(ws) == pytest.approx(float(ws_ref))
    torch.testing.assert_close(gh, h.grad, **tol)
    torch.testing.assert_close(gw, w.grad, **tol)


def test_chunked_linear_ce_frozen_head_and_no_grad():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(9, 4)  # frozen head: only the hidden gradient is produced
    y = torch.randint(0, 9, (5,))
    s, _ = chunked_linear_cross_entropy(h, w, y, torch.ones(5), chunk_size=2)
    s.backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        s2, _ = chunked_linear_cross_entropy(h, w, y, torch.ones(5), chunk_size=2)
    assert float(s2) == pytest.approx(float(s.detach()))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_linear_cross_entropy(h, w, y, torch.ones(5), chunk_size=0)


@pytest.mark.parametrize("chunk", [3, 64, None])
def test_chunked_linear_ce_with_bias_and_low_rank_terms_equals_plain_computation(chunk):
    g = torch.Generator().manual_seed(2)
    n, d, r, v = 11, 8, 3, 29
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) / math.sqrt(d)).requires_grad_(True)
    u = torch.randn(n, r, generator=g, requires_grad=True)
    b_w = torch.randn(v, r, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    wts = torch.rand(n, generator=g) + 0.1
    leaves = (h, w, u, b_w, bias)
    s, _ = chunked_linear_cross_entropy(h, w, y, wts, chunk, bias=bias, extra=[(u, b_w)])
    grads = torch.autograd.grad(3.0 * s, leaves)
    logits = torch.nn.functional.linear(h, w, bias) + u @ b_w.T
    s_ref, _ = weighted_cross_entropy(logits, y, wts)
    grads_ref = torch.autograd.grad(3.0 * s_ref, leaves)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_chunked_linear_ce_rejects_mismatched_terms():
    h, w, y, wts = torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long), torch.ones(4)
    with pytest.raises(ValueError, match="extra term"):
        chunked_linear_cross_entropy(h, w, y, wts, extra=[(torch.randn(4, 2), torch.randn(6, 2))])
    with pytest.raises(ValueError, match="bias must be"):
        chunked_linear_cross_entropy(h, w, y, wts, bias=torch.randn(4))


def test_default_chunk_rows_bounds_the_chunk_logits():
    assert default_chunk_rows(32_000) == 524  # 16M logits (64 MB) per chunk for Moshi's vocabulary
    assert default_chunk_rows(151_936) == 256  # never under 256 rows
    assert default_chunk_rows(1_000) == 16777


def test_chunked_linear_ce_gives_the_same_numbers_in_every_call():
    torch.manual_seed(0)
    h, w = torch.randn(10, 6, requires_grad=True), torch.randn(7, 6, requires_grad=True)
    y, wts = torch.randint(0, 7, (10,)), torch.rand(10)
    results = []
    for chunk in (4, 4, 3, 10):
        total, _ = chunked_linear_cross_entropy(h, w, y, wts, chunk)
        results.append((total.detach(), *torch.autograd.grad(total, (h, w))))
    ref = F.cross_entropy(h @ w.t(), y, reduction="none") @ wts
    ref_grads = torch.autograd.grad(ref, (h, w))
    for total, gh, gw in results:
        torch.testing.assert_close(total, ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh, ref_grads[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, ref_grads[1], atol=1e-5, rtol=1e-5)
    first, again = results[0], results[1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # same op, same shapes: same bits


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trainer_loss_from_forward_train_equals_the_loss_on_full_logits(lora):
    from moshi.models.lm import LMModel
    from moshi.modules.lora import replace_all_linear_with_lora
    from tests.helpers.configs import small_lm_kwargs
    from tests.helpers.models import fixture_codes

    torch.manual_seed(0)
    model = LMModel(**small_lm_kwargs())
    if lora:
        replace_all_linear_with_lora(model, rank=4, scaling=2.0)
    codes = fixture_codes(batch=2, steps=7)
    codes[0, 0, 3] = -1
    codes[1, 0, 1] = 3  # a PAD target, weighted by text_padding_weight
    params = [p for p in model.parameters() if p.requires_grad]

    out = model(codes)
    ref = moshi_loss_terms(out.text_logits, out.text_mask, out.logits, out.mask, codes, 2.0, 0.3)
    ref_grads = torch.autograd.grad(ref.total(), params)
    fused = train_output_loss_terms(model.forward_train(codes), codes, 2.0, 0.3, chunk_rows=5)
    grads = torch.autograd.grad(fused.total(), params)
    for a, b in zip(fused.as_tuple(), ref.as_tuple()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (name, _), got, want in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    only_text = train_output_loss_terms(model.forward_train(codes), codes, 2.0, 0.3, with_audio=False)
    assert float(only_text.audio_sum) == 0.0 and float(only_text.audio_weight) == 0.0
    torch.testing.assert_close(only_text.text_sum, ref.text_sum, rtol=1e-5, atol=1e-6)


def test_trainer_loss_of_a_model_without_depformer_has_no_audio_terms():
    from moshi.models.lm import LMModel
    from tests.helpers.configs import small_lm_kwargs
    from tests.helpers.models import fixture_codes

    torch.manual_seed(0)
    model = LMModel(**small_lm_kwargs(dep_q=0))
    codes = fixture_codes(batch=2, steps=5)
    out = model(codes)
    terms = train_output_loss_terms(model.forward_train(codes), codes, 2.0, 0.5)
    ref = moshi_loss_terms(out.text_logits, out.text_mask, out.logits, out.mask, codes, 2.0, 0.5)
    assert float(terms.audio_weight) == 0.0 and float(terms.audio_sum) == 0.0
    torch.testing.assert_close(terms.text_sum, ref.text_sum, rtol=1e-5, atol=1e-6)
    terms.total().backward()
    assert model.text_linear.weight.grad is not None
