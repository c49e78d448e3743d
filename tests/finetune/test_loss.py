"""The training loss, checked against an explicit per-position loop, and the fused chunked text CE."""

import math

import pytest
import torch
from torch import nn

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


def _head(v: int, d: int, bias: bool = False, dtype: torch.dtype = torch.float32, seed: int = 1) -> nn.Linear:
    head = nn.Linear(d, v, bias=bias)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g) / math.sqrt(d))
        if bias:
            head.bias.copy_(torch.randn(v, generator=g))
    return head.to(dtype)


def _grads_against_full_logits(head: nn.Module, h: torch.Tensor, y: torch.Tensor, wts: torch.Tensor, chunk):
    """(chunked sum, its gradients, reference sum, reference gradients) for `h` and every trained head tensor."""
    leaves = [h] + [p for p in head.parameters() if p.requires_grad]
    s, ws = chunked_linear_cross_entropy(h, head, y, wts, chunk_size=chunk)
    assert float(ws) == pytest.approx(float(wts.sum()))
    grads = torch.autograd.grad(2.0 * s, leaves)
    s_ref, _ = weighted_cross_entropy(head(h), y, wts)
    grads_ref = torch.autograd.grad(2.0 * s_ref, leaves)
    return s, grads, s_ref, grads_ref


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype,chunk", [(torch.float32, 3), (torch.float32, 64), (torch.float32, None),
                                         (torch.bfloat16, 4)])
def test_chunked_linear_ce_equals_cross_entropy_on_full_logits(dtype, chunk, bias):
    g = torch.Generator().manual_seed(1)
    n, d, v = 10, 8, 37
    head = _head(v, d, bias, dtype)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g)
    y[2] = -1
    wts = torch.rand(n, generator=g)
    wts[2] = 0.0
    s, grads, s_ref, grads_ref = _grads_against_full_logits(head, h, y, wts, chunk)
    # float32: the chunked and the full computation sum the same 8-term dot products and 37-term softmax rows
    # in different orders; bf16 inputs round the logits to 8 bits of mantissa either way.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s, s_ref, **tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("chunk", [3, 64, None])
def test_chunked_linear_ce_of_a_lora_head_equals_cross_entropy_on_its_output(chunk):
    from moshi.modules.lora import LoRALinear

    g = torch.Generator().manual_seed(2)
    n, d, r, v = 11, 8, 3, 29
    head = LoRALinear.wrap(_head(v, d, bias=True, seed=3), rank=r, scaling=2.0)
    with torch.no_grad():
        head.lora_B.weight.normal_(generator=g)  # non-zero, so the low-rank path changes the logits
    head.frozen_W.requires_grad_(False)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    wts = torch.rand(n, generator=g) + 0.1
    s, grads, s_ref, grads_ref = _grads_against_full_logits(head, h, y, wts, chunk)
    assert len(grads) == 3  # hidden, lora_A, lora_B
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_linear_ce_frozen_head_and_no_grad():
    head = _head(9, 4).requires_grad_(False)  # frozen head: only the hidden gradient is produced
    h = torch.randn(5, 4, requires_grad=True)
    y = torch.randint(0, 9, (5,))
    s, _ = chunked_linear_cross_entropy(h, head, y, torch.ones(5), chunk_size=2)
    s.backward()
    assert h.grad is not None and head.weight.grad is None
    with torch.no_grad():
        s2, _ = chunked_linear_cross_entropy(h, head, y, torch.ones(5), chunk_size=2)
    assert not s2.requires_grad and s2.grad_fn is None
    torch.testing.assert_close(s2, s.detach(), rtol=0, atol=0)  # same op on the same shapes
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_linear_cross_entropy(h, head, y, torch.ones(5), chunk_size=0)


def test_a_second_backward_through_the_chunked_ce_is_refused():
    head = _head(7, 6)
    h = torch.randn(10, 6, requires_grad=True)
    y, wts = torch.randint(0, 7, (10,)), torch.rand(10)
    s, _ = chunked_linear_cross_entropy(h, head, y, wts, chunk_size=4)
    s.backward(retain_graph=True)
    first = head.weight.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran twice"):
        s.backward()
    torch.testing.assert_close(head.weight.grad, first, rtol=0, atol=0)  # nothing was added


def test_chunked_linear_ce_rejects_bad_shapes_and_heads():
    head = _head(5, 3)
    y, wts = torch.zeros(4, dtype=torch.long), torch.ones(4)
    with pytest.raises(ValueError, match=r"hidden \[N, D\]"):
        chunked_linear_cross_entropy(torch.randn(4, 2), head, y, wts)
    with pytest.raises(ValueError, match="targets/weights"):
        chunked_linear_cross_entropy(torch.randn(4, 3), head, y[:3], wts[:3])
    with pytest.raises(TypeError, match="nn.Linear or LoRALinear"):
        chunked_linear_cross_entropy(torch.randn(4, 3), nn.Identity(), y, wts)


def test_default_chunk_rows_bounds_the_chunk_logits():
    assert default_chunk_rows(32_000) == 524  # 16M logits (64 MB) per chunk for Moshi's vocabulary
    assert default_chunk_rows(151_936) == 256  # never under 256 rows
    assert default_chunk_rows(1_000) == 16777


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
