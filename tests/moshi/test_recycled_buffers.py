"""Recycled CPU buffers: memory is reused only when nothing refers to it, and the numbers are those of the
plain ops (``F.embedding``, ``F.linear``, the fused text CE)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from finetune.loss import chunked_linear_cross_entropy, train_output_loss_terms
from moshi.models.lm import LMModel
from moshi.utils import recycled_buffers
from tests.helpers.configs import small_lm_kwargs


@pytest.fixture(autouse=True)
def _recycle_everything(monkeypatch):
    """Tiny tensors are recycled too (the real threshold is 4 MiB), and every test starts from an empty cache."""
    monkeypatch.setattr(recycled_buffers, "MIN_RECYCLED_BYTES", 0)
    recycled_buffers.release()
    yield
    recycled_buffers.release()


def _no_recycling(monkeypatch) -> None:
    monkeypatch.setattr(recycled_buffers, "_storage_use_count", None)


def test_buffer_is_reused_only_once_nothing_refers_to_it():
    owner = nn.Parameter(torch.zeros(6, 4))
    first = recycled_buffers.gradient_buffer(owner).fill_(1.0)
    ptr = first.data_ptr()
    held = recycled_buffers.gradient_buffer(owner)  # `first` is alive: fresh memory
    assert held.data_ptr() != ptr
    assert torch.equal(first, torch.ones(6, 4))
    view = first[2:]
    del first
    assert recycled_buffers.gradient_buffer(owner).data_ptr() != ptr  # a view still holds the memory
    del view
    again = recycled_buffers.gradient_buffer(owner)
    assert again.data_ptr() == ptr and again.shape == (6, 4) and again.is_contiguous()


def test_shape_or_dtype_change_replaces_the_buffer_and_owners_are_separate():
    a, b = nn.Parameter(torch.zeros(8)), nn.Parameter(torch.zeros(8))
    ptr_a = recycled_buffers.recycled_empty(a, "output", (2, 4), torch.float32).data_ptr()
    assert recycled_buffers.recycled_empty(a, "output", (2, 4), torch.float32).data_ptr() == ptr_a
    ba = recycled_buffers.recycled_empty(b, "output", (2, 4), torch.float32)
    assert ba.data_ptr() != ptr_a
    other = recycled_buffers.recycled_empty(a, "output", (3, 4), torch.float32)
    assert other.shape == (3, 4)
    half = recycled_buffers.recycled_empty(a, "output", (3, 4), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.shape == (3, 4)


def test_small_tensors_are_not_cached_and_entries_die_with_their_owner(monkeypatch):
    monkeypatch.setattr(recycled_buffers, "MIN_RECYCLED_BYTES", 1024)
    small = nn.Parameter(torch.zeros(4, 4))
    recycled_buffers.gradient_buffer(small)
    assert not recycled_buffers._entries
    big = nn.Parameter(torch.zeros(64, 64))
    recycled_buffers.gradient_buffer(big)
    assert len(recycled_buffers._entries) == 1
    del big
    gc.collect()
    assert not recycled_buffers._entries


def test_embedding_gradient_equals_f_embedding_bitwise_and_is_recycled_across_steps():
    weight = nn.Parameter(torch.randn(50, 16))
    ref_weight = nn.Parameter(weight.detach().clone())
    ptrs = []
    for step in range(3):
        index = torch.randint(0, 50, (3, 40))  # many repeated rows: summation order matters
        index[0, :10] = 7
        g = torch.randn(3, 40, 16)
        (recycled_buffers.embedding(index, weight) * g).sum().backward()
        (F.embedding(index, ref_weight) * g).sum().backward()
        assert torch.equal(weight.grad, ref_weight.grad), step
        ptrs.append(weight.grad.data_ptr())
        weight.grad = None
        ref_weight.grad = None
    assert ptrs[0] == ptrs[1] == ptrs[2]


def test_embedding_gradients_accumulate_when_grad_is_kept():
    weight = nn.Parameter(torch.randn(30, 8))
    ref_weight = nn.Parameter(weight.detach().clone())
    for _ in range(3):  # micro-batches: .grad is kept, so its memory must never be handed out again
        index = torch.randint(0, 30, (2, 25))
        g = torch.randn(2, 25, 8)
        (recycled_buffers.embedding(index, weight) * g).sum().backward()
        (F.embedding(index, ref_weight) * g).sum().backward()
    assert torch.equal(weight.grad, ref_weight.grad)


def test_linear_equals_f_linear_and_keeps_held_outputs_intact():
    weight = nn.Parameter(torch.randn(40, 12))
    ref_weight = nn.Parameter(weight.detach().clone())
    x = torch.randn(2, 5, 12, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    y = recycled_buffers.linear(x, weight)
    assert torch.equal(y, F.linear(x, weight))
    g = torch.randn(2, 5, 40)
    (y * g).sum().backward()
    (F.linear(ref_x, ref_weight) * g).sum().backward()
    assert torch.equal(x.grad, ref_x.grad)
    torch.testing.assert_close(weight.grad, ref_weight.grad, rtol=1e-6, atol=1e-6)

    kept, ptr = y.detach(), y.data_ptr()
    expected = kept.clone()
    del y
    with torch.no_grad():
        y2 = recycled_buffers.linear(torch.randn(2, 5, 12), weight)  # `kept` holds the memory: fresh output
    assert y2.data_ptr() != ptr and torch.equal(kept, expected)
    del kept, y2
    with torch.no_grad():
        assert recycled_buffers.linear(torch.randn(2, 5, 12), weight).data_ptr() == ptr
        assert recycled_buffers.linear(torch.randn(1, 5, 12), weight).data_ptr() == ptr  # smaller: same memory


def test_linear_under_autocast_is_f_linear():
    weight = nn.Parameter(torch.randn(16, 8))
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = recycled_buffers.linear(x, weight)
        ref = F.linear(x, weight)
    assert y.dtype == ref.dtype == torch.bfloat16 and torch.equal(y, ref)


def test_fused_ce_head_gradient_is_recycled_and_unchanged():
    h = torch.randn(10, 8, requires_grad=True)
    w = nn.Parameter(torch.randn(30, 8))
    y = torch.randint(0, 30, (10,))
    weights = torch.rand(10)
    chunked_linear_cross_entropy(h, w, y, weights, chunk_size=4)[0].backward()
    first, ptr = w.grad.clone(), w.grad.data_ptr()
    w.grad = None
    chunked_linear_cross_entropy(h, w, y, weights, chunk_size=4)[0].backward()
    assert w.grad.data_ptr() == ptr and torch.equal(w.grad, first)
    chunked_linear_cross_entropy(h, w, y, weights, chunk_size=4)[0].backward()  # accumulates into the kept grad
    torch.testing.assert_close(w.grad, 2 * first)


def _train_steps(model: LMModel, batches: list[torch.Tensor], zero_between: bool) -> dict[str, torch.Tensor]:
    for codes in batches:
        if zero_between:
            model.zero_grad(set_to_none=True)
        out = model.forward_train(codes)
        train_output_loss_terms(out, codes).total().backward()
        model(codes).text_logits.nan_to_num().square().mean().backward()  # the recycled text-logits path too
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("zero_between", [True, False])
def test_lm_training_steps_give_the_gradients_of_the_plain_ops(monkeypatch, zero_between):
    torch.manual_seed(0)
    model = LMModel(**small_lm_kwargs(), dtype=torch.float32).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randint(0, 32, (2, 5, 7)) for _ in range(3)]
    for b in batches:
        b[:, 0] = torch.randint(0, 100, (2, 7))
    got = _train_steps(model, batches, zero_between)

    _no_recycling(monkeypatch)
    recycled_buffers.release()
    ref_model = LMModel(**small_lm_kwargs(), dtype=torch.float32).train()
    ref_model.load_state_dict(state)
    want = _train_steps(ref_model, batches, zero_between)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in ("text_emb.weight", "depformer_text_emb.weight"):
        assert torch.equal(got[k], want[k]), k


def test_text_head_forward_hooks_still_run_and_see_the_same_logits():
    model = LMModel(**small_lm_kwargs(), dtype=torch.float32).eval()
    codes = torch.randint(0, 32, (2, 5, 7))
    with torch.no_grad():
        plain = model(codes).text_logits.clone()
        seen: list[torch.Tensor] = []
        model.text_linear.register_forward_hook(lambda module, args, out: seen.append(out.clone()))
        hooked = model(codes).text_logits
    assert len(seen) == 1 and torch.equal(seen[0][:, None], hooked)
    assert torch.equal(hooked, plain)
