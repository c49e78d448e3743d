"""Calls written against Kyutai's ``moshi`` 0.2.13 signatures do what they say: positional orders, renamed
parameters, ``multinomial``, ``set_attention_context``, and a clear error for each option not implemented."""

from __future__ import annotations

import pytest
import torch

from moshi.models.lm import LMModel, ScaledEmbedding
from moshi.modules.gating import ActivationGating, get_activation
from moshi.modules.rope import RotaryEmbedding, apply_rope
from moshi.modules.transformer import (
    LayerNormF32,
    RMSNorm,
    StreamingMultiheadAttention,
    StreamingTransformer,
    StreamingTransformerLayer,
    set_attention_context,
)
from moshi.utils.sampling import multinomial, multinomial_exponential
from tests.helpers.configs import small_lm_kwargs

# ---------------------------------------------------------------------------------------------------------------
# multinomial


def _probs(*shape: int) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(1)), dim=-1)


def test_multinomial_single_draw_is_the_exponential_race_over_the_last_axis():
    probs = _probs(2, 3, 7)
    got = multinomial(probs, 1, generator=torch.Generator().manual_seed(4))
    expected = multinomial_exponential(probs.reshape(6, 7), generator=torch.Generator().manual_seed(4))
    assert got.shape == (2, 3, 1) and got.dtype == torch.long
    assert torch.equal(got, expected.view(2, 3, 1))  # the same op on the same [6, 7] rows and seed


def test_multinomial_several_draws_follow_torch_multinomial_row_by_row():
    probs = _probs(2, 3, 7)
    got = multinomial(probs, 5, replacement=True, generator=torch.Generator().manual_seed(4))
    expected = torch.multinomial(probs.reshape(6, 7), 5, replacement=True, generator=torch.Generator().manual_seed(4))
    assert got.shape == (2, 3, 5)
    assert torch.equal(got, expected.view(2, 3, 5))
    without = multinomial(probs, 7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(without.sort(dim=-1).values, torch.arange(7).expand(2, 3, 7))  # each index once


def test_multinomial_never_draws_a_zero_probability_entry():
    probs = torch.zeros(4, 5)
    probs[torch.arange(4), torch.tensor([0, 2, 4, 1])] = 1.0
    for num_samples, replacement in ((1, False), (3, True)):
        got = multinomial(probs, num_samples, replacement, generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, torch.tensor([0, 2, 4, 1]).view(4, 1).expand(4, num_samples))


# ---------------------------------------------------------------------------------------------------------------
# Positional orders and parameter names


def test_lm_model_takes_text_card_out_and_demux_right_after_text_card():
    kw = small_lm_kwargs()
    positional = [kw.pop(k) for k in ("delays", "n_q", "dep_q", "card", "text_card")]
    model = LMModel(*positional, 120, False, kw.pop("dim"), **kw)
    assert model.text_linear.out_features == 120 and model.text_emb.num_embeddings == 101
    assert model.dim == 64


def test_scaled_embedding_stores_lr_without_new_weights():
    emb = ScaledEmbedding(5, 3, lr=0.01)
    assert emb.lr == 0.01 and ScaledEmbedding(5, 3).lr is None
    assert list(emb.state_dict()) == ["weight"]


def test_rotary_embedding_takes_interleave_first():
    rope = RotaryEmbedding(False, 100.0)
    assert rope.interleave is False and rope.max_period == 100.0


@pytest.mark.parametrize("interleave", [True, False])
def test_time_before_heads_rotates_the_time_axis_1(interleave):
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 1, 3, 8)  # [B, H|Hkv, T, D]
    offset = torch.tensor([0, 7])
    rq, rk = apply_rope(q, k, offset, 100.0, interleave)
    tq, tk = RotaryEmbedding(interleave, 100.0)(q.transpose(1, 2), k.transpose(1, 2), offset, time_before_heads=True)
    assert tq.shape == (2, 3, 4, 8) and tk.shape == (2, 3, 1, 8)
    # Rotations of differently laid-out tensors: one product and one sum per element in float32.
    torch.testing.assert_close(tq.transpose(1, 2), rq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tk.transpose(1, 2), rk, atol=1e-6, rtol=1e-6)


def test_rms_norm_dtype_is_the_parameter_and_computation_dtype():
    norm = RMSNorm(8, 1e-5, torch.float64)
    with torch.no_grad():
        norm.alpha.copy_(torch.linspace(0.5, 1.5, 8).view(1, 1, 8))
    assert norm.alpha.dtype == torch.float64
    x = torch.randn(2, 3, 8)
    xd = x.double()
    expected = (xd * (norm.alpha * torch.rsqrt(1e-5 + (xd * xd).mean(-1, keepdim=True)))).float()
    out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0, rtol=0)  # rounded once from float64 either way
    mixed = RMSNorm(8, dtype=torch.float32, param_dtype=torch.bfloat16)
    assert mixed.alpha.dtype == torch.bfloat16 and mixed.compute_dtype == torch.float32


def test_layer_norm_f32_forward_takes_input_by_name():
    norm = LayerNormF32(4)
    x = torch.randn(2, 4)
    assert torch.equal(norm(input=x), norm(x))


def test_gating_and_attention_take_factory_kwargs_and_kv_repeat_in_their_positions():
    gate = ActivationGating(8, 24, get_activation("silu"), False, dtype=torch.float64)
    assert gate.linear_in.weight.dtype == torch.float64
    attn = StreamingMultiheadAttention(8, 4, True, None, None, 2)
    assert attn.kv_repeat == 2 and attn.weights_per_step == 0
    layer = StreamingTransformerLayer(8, 4, 16, True, None, None, "layer_norm", None, "none", 2)
    assert layer.self_attn.kv_repeat == 2


def test_attention_called_with_query_key_value_is_self_attention():
    attn = StreamingMultiheadAttention(8, 2, causal=True)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(attn(x, x, x), attn(x))  # the same call


def test_set_attention_context_reaches_every_attention():
    model = LMModel(**small_lm_kwargs())
    attentions = [m for m in model.modules() if isinstance(m, StreamingMultiheadAttention)]
    assert len(attentions) == 4  # two temporal layers, two depformer layers
    set_attention_context(model, 3)
    assert {m.context for m in attentions} == {3}
    set_attention_context(model)
    assert {m.context for m in attentions} == {None}


# ---------------------------------------------------------------------------------------------------------------
# Options not implemented: a clear error naming the parameter


def test_int8_quantisation_is_refused_by_name():
    with pytest.raises(NotImplementedError, match="quantize=True"):
        StreamingTransformer(8, 2, 1, quantize=True)
    with pytest.raises(NotImplementedError, match="quantized=True"):
        ActivationGating(8, 24, get_activation("silu"), quantized=True)


def test_cross_attention_is_refused_by_name():
    with pytest.raises(NotImplementedError, match="cross_attention=True"):
        StreamingMultiheadAttention(8, 2, cross_attention=True)
    with pytest.raises(NotImplementedError, match="cross_attention=True"):
        StreamingTransformerLayer(8, 2, cross_attention=True)
    attn = StreamingMultiheadAttention(8, 2, causal=True)
    x, src = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    with pytest.raises(NotImplementedError, match="key must be None or the query"):
        attn(x, src, src)
    with pytest.raises(NotImplementedError, match="value must be None or the query"):
        attn(x, x, src)
    layer = StreamingTransformerLayer(8, 2, 16, causal=True)
    with pytest.raises(NotImplementedError, match="cross_attention_src must be None"):
        layer(x, cross_attention_src=src)
