"""Transformer building blocks against explicit reference computations, and streaming == full pass."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moshi.modules.gating import ActivationGating, gating_hidden_size, get_activation
from moshi.modules.rope import apply_rope
from moshi.modules.transformer import (
    LayerNormF32,
    ProjectedTransformer,
    RMSNorm,
    StreamingMultiheadAttention,
    StreamingTransformer,
    apply_per_step_linear,
    create_norm_fn,
    create_sin_embedding,
)
from tests.helpers.numerics import assert_close_f32

MIMI_LIKE = dict(
    num_heads=4, num_layers=2, causal=True, layer_scale=0.01, context=5, gating="none", norm="layer_norm",
    positional_embedding="rope", dim_feedforward=64,
)
LM_LIKE = dict(
    num_heads=4, num_layers=2, causal=True, layer_scale=None, context=4, gating="silu", norm="rms_norm_f32",
    positional_embedding="rope", dim_feedforward=132, max_period=10000,
)


def _randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 or p.shape[:2] == (1, 1) else 0.0))


# -- norms -------------------------------------------------------------------------------------------------------


def test_rms_norm_f32_puts_eps_inside_the_root_and_uses_alpha_shape_1_1_d():
    norm = create_norm_fn("rms_norm_f32", 8, dtype=torch.bfloat16)
    assert isinstance(norm, RMSNorm) and norm.alpha.shape == (1, 1, 8) and norm.alpha.dtype == torch.bfloat16
    assert norm.eps == 1e-8
    with torch.no_grad():
        norm.alpha.copy_(torch.linspace(0.5, 1.5, 8).view(1, 1, 8))
    x = torch.randn(2, 3, 8).to(torch.bfloat16)
    xf = x.float()
    expected = xf * (norm.alpha.float() / torch.sqrt(1e-8 + xf.pow(2).mean(-1, keepdim=True)))
    y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected.to(torch.bfloat16))
    tiny = torch.full((1, 1, 8), 1e-6)
    # eps 1e-8 inside the root matters at this scale: sqrt(1e-12 + 1e-8) != 1e-6.
    assert torch.allclose(create_norm_fn("rms_norm_f32", 8)(tiny), tiny / math.sqrt(1e-12 + 1e-8))


@pytest.mark.parametrize("norm_type,dtype", [("rms_norm_f32", torch.float32), ("rms_norm_f32", torch.bfloat16),
                                            ("rms_norm", torch.float32)])
@pytest.mark.parametrize("train_alpha", [True, False])
def test_rms_norm_closed_form_backward_equals_autograd_of_the_definition(norm_type, dtype, train_alpha):
    torch.manual_seed(0)
    norm = create_norm_fn(norm_type, 16, dtype=dtype)
    with torch.no_grad():
        norm.alpha.copy_(torch.linspace(0.5, 1.5, 16).view(1, 1, 16))
    norm.alpha.requires_grad_(train_alpha)
    x = (torch.randn(3, 5, 16) * 3).to(dtype).requires_grad_()
    g = torch.randn(3, 5, 16).to(dtype)

    def definition(x, alpha):
        xc = x.float() if norm.compute_dtype is not None else x
        var = norm.eps + torch.mean(xc * xc, dim=-1, keepdim=True)
        return (xc * (alpha.to(xc.dtype) * torch.rsqrt(var))).to(dtype)

    inputs = [x, norm.alpha] if train_alpha else [x]
    y = norm(x)
    assert torch.equal(y, definition(x, norm.alpha))  # the same ops on the same shapes: bit for bit
    grads = torch.autograd.grad(y, inputs, g)
    expected = torch.autograd.grad(definition(x, norm.alpha), inputs, g)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    if not train_alpha:
        assert norm.alpha.grad is None


def test_norm_factory_types_eps_and_unknown_name():
    assert isinstance(create_norm_fn("layer_norm", 4), nn.LayerNorm) and create_norm_fn("layer_norm", 4).eps == 1e-5
    assert isinstance(create_norm_fn("layer_norm_f32", 4), LayerNormF32) and create_norm_fn("layer_norm_f32", 4).eps == 1e-8
    assert create_norm_fn("rms_norm", 4).eps == 1e-5 and create_norm_fn("rms_norm", 4).compute_dtype is None
    with pytest.raises(ValueError, match="'batch_norm'"):
        create_norm_fn("batch_norm", 4)


def test_layer_norm_f32_computes_in_float32():
    norm = create_norm_fn("layer_norm_f32", 16, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    expected = F.layer_norm(x.float(), (16,), norm.weight.float(), norm.bias.float(), 1e-8).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


# -- rope, gating, sin -------------------------------------------------------------------------------------------


def test_rope_interleaved_matches_complex_rotation():
    B, H, T, D = 2, 3, 5, 8
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    offset = torch.tensor([0, 7])
    rq, rk = apply_rope(q, k, offset, max_period=10000.0)
    freqs = 10000.0 ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    pos = offset.double().view(B, 1, 1, 1) + torch.arange(T, dtype=torch.float64).view(1, 1, T, 1)
    rot = torch.polar(torch.ones_like(pos * freqs), pos * freqs)
    expected = torch.view_as_real(torch.view_as_complex(q.double().reshape(B, H, T, D // 2, 2)) * rot).reshape(q.shape)
    torch.testing.assert_close(rq.double(), expected, atol=1e-5, rtol=1e-5)
    assert rk.shape == k.shape


def test_interleaved_rope_equals_the_real_pair_formula_on_strided_inputs():
    from moshi.modules.rope import rope_angles, rotate_time_major

    projected = torch.randn(2, 6, 3, 4, 16)  # [B, T, q|k|v, H, D]: rotate the q|k part, a strided view
    theta = rope_angles(6, torch.tensor([0, 11]), 16, 10_000.0, projected.device)
    qk = projected[:, :, :2]
    out = rotate_time_major(qk, theta)
    cos = torch.cos(theta).view(2, 6, 1, 1, 8)
    sin = torch.sin(theta).view(2, 6, 1, 1, 8)
    r, m = qk.reshape(2, 6, 2, 4, 8, 2).unbind(-1)
    expected = torch.stack([r * cos - m * sin, r * sin + m * cos], -1).reshape(qk.shape)
    # A complex-multiply kernel may fuse the two products (FMA) where the formula rounds each: two terms.
    assert_close_f32(out, expected, depth=2)
    # A misaligned input is copied to the layout of a contiguous one, then the same kernel runs: same bits.
    odd = torch.randn(1, 6, 1, 1, 17)[..., 1:]  # odd storage offset: (re, im) pairs are not complex-aligned
    theta0 = rope_angles(6, 0, 16, 10_000.0, odd.device)
    assert torch.equal(rotate_time_major(odd, theta0), rotate_time_major(odd.contiguous(), theta0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("used", ["qkv", "qv"])  # "qv": k gets no gradient
def test_rotate_packed_qkv_equals_autograd_of_slice_rotate_unbind(dtype, used):
    from moshi.modules.rope import RotaryEmbedding, rope_angles, rotate_time_major

    rope = RotaryEmbedding(max_period=10_000.0)
    packed = torch.randn(2, 5, 3, 4, 8).to(dtype).requires_grad_()
    offset = torch.tensor([3, 9])
    q, k, v = rope.rotate_packed_qkv(packed, offset)
    theta = rope_angles(5, offset, 8, 10_000.0, packed.device)
    rq, rk = rotate_time_major(packed[:, :, :2], theta).unbind(2)
    rv = packed[:, :, 2]
    assert torch.equal(q, rq) and torch.equal(k, rk) and torch.equal(v, rv)
    assert q.shape == k.shape == v.shape == (2, 5, 4, 8) and q.dtype == dtype
    gq, gk, gv = (torch.randn(2, 5, 4, 8).to(dtype) for _ in range(3))

    def loss(a, b, c):
        return (a.float() * gq.float()).sum() + (c.float() * gv.float()).sum() + (
            (b.float() * gk.float()).sum() if used == "qkv" else 0
        )

    (grad,) = torch.autograd.grad(loss(q, k, v), packed)
    (expected,) = torch.autograd.grad(loss(rq, rk, rv), packed)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad, expected, atol=tol, rtol=tol)
    if used == "qv":
        assert torch.equal(grad[:, :, 1], torch.zeros_like(grad[:, :, 1]))


def test_rope_concat_pairs_halves():
    q = torch.randn(1, 1, 3, 4)
    rq, _ = apply_rope(q, q, 2, interleave=False)
    freqs = 10000.0 ** (-2 * torch.arange(2, dtype=torch.float64) / 4)
    theta = (2 + torch.arange(3, dtype=torch.float64)).view(3, 1) * freqs
    r, m = q[0, 0, :, :2].double(), q[0, 0, :, 2:].double()
    expected = torch.cat([r * theta.cos() - m * theta.sin(), r * theta.sin() + m * theta.cos()], -1)
    torch.testing.assert_close(rq[0, 0].double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_time_major_rotation_equals_the_head_major_one_and_its_gradient_rotates_back(interleave):
    from moshi.modules.rope import RotaryEmbedding

    rope = RotaryEmbedding(interleave, max_period=10_000.0)
    x = torch.randn(2, 5, 2, 3, 8, requires_grad=True)  # [B, T, q|k, H, D]
    offset = torch.tensor([4, 9])
    out = rope.rotate(x, offset)
    rq, rk = rope(x[:, :, 0].transpose(1, 2), x[:, :, 1].transpose(1, 2), offset)
    # Time-major and head-major layouts may vectorise the complex products differently: two terms each.
    assert_close_f32(out[:, :, 0], rq.transpose(1, 2), depth=2)
    assert_close_f32(out[:, :, 1], rk.transpose(1, 2), depth=2)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    # A rotation is orthogonal: the gradient is the output gradient rotated back by the same angles.
    expected = rope.rotate(g.flip(1), -offset - 4).flip(1)  # step t at angle -(offset + t)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def test_rope_in_bf16_rotates_in_float32():
    q = torch.randn(1, 1, 2, 8)
    offset = torch.tensor([100_000])
    rq_bf16, _ = apply_rope(q.bfloat16(), q.bfloat16(), offset)
    rq_f32, _ = apply_rope(q.bfloat16().float(), q.bfloat16().float(), offset)
    assert torch.equal(rq_bf16, rq_f32.bfloat16())


@pytest.mark.parametrize("dim,ff,hidden", [(4096, 16896, 11264), (1024, 4224, 2816), (64, 256, 168), (64, 264, 176)])
def test_gating_hidden_size_rule(dim, ff, hidden):
    assert gating_hidden_size(dim, ff) == hidden


def test_gating_activates_the_first_half():
    gate = ActivationGating(4, 12, get_activation("silu"))
    x = torch.randn(3, 4)
    u = x @ gate.linear_in.weight.T
    expected = (F.silu(u[:, :8]) * u[:, 8:]) @ gate.linear_out.weight.T
    torch.testing.assert_close(gate(x), expected)
    with pytest.raises(ValueError, match="'swish'"):
        get_activation("swish")


@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_gate_and_its_gradients_equal_autograd_of_the_definition(name):
    gate = ActivationGating(8, 24, get_activation(name))
    u = torch.randn(5, 3, 2 * gate.hidden, requires_grad=True)
    g = torch.randn(5, 3, gate.hidden)
    out = gate.gate(u)
    (grad,) = torch.autograd.grad(out, u, g)
    a, b = u[..., : gate.hidden], u[..., gate.hidden :]
    expected = get_activation(name)(a) * b
    (expected_grad,) = torch.autograd.grad(expected, u, g)
    assert torch.equal(out, expected)  # the same activation kernel on the same strided half
    # The closed-form backward writes into strided halves, autograd into contiguous tensors: the activation's
    # derivative may take the vectorised or the scalar exp, a few ulps apart, then one product.
    assert_close_f32(grad, expected_grad, depth=4)


def test_sin_embedding_is_cos_then_sin():
    pos = torch.tensor([3.0]).view(1, 1, 1)
    emb = create_sin_embedding(pos, 8, max_period=100.0)
    phase = 3.0 / (100.0 ** (torch.arange(4) / 3))
    torch.testing.assert_close(emb.view(8), torch.cat([phase.cos(), phase.sin()]))


# -- attention ---------------------------------------------------------------------------------------------------


def test_attention_packing_and_sliding_context_match_a_manual_computation():
    torch.manual_seed(1)
    E, H, T, context = 8, 2, 6, 3
    attn = StreamingMultiheadAttention(E, H, causal=True, context=context)
    x = torch.randn(1, T, E)
    proj = x @ attn.in_projs[0].weight.T
    hd = E // H
    outs = []
    for h in range(H):
        q = proj[0, :, h * hd : (h + 1) * hd]
        k = proj[0, :, E + h * hd : E + (h + 1) * hd]
        v = proj[0, :, 2 * E + h * hd : 2 * E + (h + 1) * hd]
        scores = q @ k.T / math.sqrt(hd)
        delta = torch.arange(T).view(-1, 1) - torch.arange(T).view(1, -1)
        scores = scores.masked_fill(~((delta >= 0) & (delta < context)), float("-inf"))
        outs.append(scores.softmax(-1) @ v)
    expected = torch.cat(outs, -1) @ attn.out_projs[0].weight.T
    torch.testing.assert_close(attn(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_kv_repeat_shares_each_kv_head_between_consecutive_query_heads():
    torch.manual_seed(2)
    gqa = StreamingMultiheadAttention(8, 4, causal=True, kv_repeat=2)
    full = StreamingMultiheadAttention(8, 4, causal=True)
    assert gqa.in_projs[0].weight.shape == (8 + 2 * 4, 8)
    w = gqa.in_projs[0].weight.detach()
    q, k, v = w[:8], w[8:12], w[12:16]
    k_full = torch.cat([k[0:2], k[0:2], k[2:4], k[2:4]])
    v_full = torch.cat([v[0:2], v[0:2], v[2:4], v[2:4]])
    with torch.no_grad():
        full.in_projs[0].weight.copy_(torch.cat([q, k_full, v_full]))
        full.out_projs[0].weight.copy_(gqa.out_projs[0].weight)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(gqa(x), full(x))


def test_legacy_stacked_attention_keys_load_into_per_step_projections():
    attn = StreamingMultiheadAttention(8, 2, causal=True, weights_per_step=3)
    legacy = {
        "in_proj_weight": torch.randn(3 * 24, 8),
        "out_proj.weight": torch.randn(3 * 8, 8),
    }
    attn.load_state_dict(dict(legacy), strict=True)
    for s in range(3):
        assert torch.equal(attn.in_projs[s].weight, legacy["in_proj_weight"][24 * s : 24 * (s + 1)])
        assert torch.equal(attn.out_projs[s].weight, legacy["out_proj.weight"][8 * s : 8 * (s + 1)])
    assert list(attn.state_dict()) == [f"out_projs.{s}.weight" for s in range(3)] + [
        f"in_projs.{s}.weight" for s in range(3)
    ]
    with pytest.raises(ValueError, match="in_proj_weight"):
        attn.load_state_dict({"in_proj_weight": torch.randn(25, 8), "out_proj.weight": torch.randn(24, 8)})


def test_streaming_without_context_or_weights_per_step_raises():
    with pytest.raises(RuntimeError, match="context"), StreamingMultiheadAttention(8, 2, causal=True).streaming(1):
        pass


def test_per_step_linear_batched_equals_loop_with_schedule():
    mods = [nn.Linear(4, 6, bias=False) for _ in range(2)]
    schedule = [0, 1, 1, 0]
    x = torch.randn(3, 4, 4)
    expected = torch.stack([mods[schedule[t]](x[:, t]) for t in range(4)], 1)
    torch.testing.assert_close(apply_per_step_linear(mods, x, 0, schedule), expected)
    torch.testing.assert_close(apply_per_step_linear(mods, x[:, 2:3], 2, schedule), expected[:, 2:3])


@pytest.mark.parametrize("lora", [False, True], ids=["linear", "lora"])
def test_per_step_linear_gradients_equal_the_loop_and_accumulate_over_shared_sets(lora):
    from moshi.modules.lora import replace_all_linear_with_lora

    torch.manual_seed(0)
    mods = nn.ModuleList([nn.Linear(4, 6, bias=False) for _ in range(2)])
    if lora:
        replace_all_linear_with_lora(mods, rank=2, scaling=1.5)
    schedule = [0, 1, 1, 0]
    x = torch.randn(4, 3, 4).transpose(0, 1).requires_grad_(True)  # [3, 4, 4], not contiguous
    g = torch.randn(3, 4, 6)
    params = [p for p in mods.parameters() if p.requires_grad]
    out = apply_per_step_linear(list(mods), x, 0, schedule)
    grads = torch.autograd.grad(out, [x, *params], g)
    expected = torch.stack([mods[schedule[t]](x[:, t]) for t in range(4)], 1)
    expected_grads = torch.autograd.grad(expected, [x, *params], g)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        assert apply_per_step_linear(list(mods), x, 0, schedule).shape == (3, 4, 6)


# -- whole transformers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 3], ids=["chunk1", "chunk2", "chunk3"])
@pytest.mark.parametrize("config", [MIMI_LIKE, LM_LIKE], ids=["mimi_like", "lm_like"])
def test_chunked_streaming_equals_full_forward_past_context(config, chunk):
    torch.manual_seed(0)
    model = StreamingTransformer(d_model=16, **config)
    _randomize(model)
    x = torch.randn(2, 13, 16)
    full = model(x)
    with model.streaming(2):
        steps = [model(x[:, t : t + chunk]) for t in range(0, 13, chunk)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_sin_positional_embedding_streams_with_offsets():
    model = StreamingTransformer(d_model=16, **{**MIMI_LIKE, "positional_embedding": "sin"})
    x = torch.randn(1, 7, 16)
    full = model(x)
    with model.streaming(1):
        steps = [model(x[:, t : t + 1]) for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_exec_mask_off_leaves_an_item_untouched():
    torch.manual_seed(0)
    model = StreamingTransformer(d_model=16, **LM_LIKE)
    x = torch.randn(2, 6, 16)
    with model.streaming(2):
        model.set_exec_mask(torch.tensor([True, False]))
        model(torch.randn(2, 3, 16))  # item 1 must ignore this call
        model.set_exec_mask(torch.tensor([True, True]))
        out = torch.cat([model(x[:, t : t + 1]) for t in range(6)], 1)
    torch.testing.assert_close(out[1], model(x[1:])[0], atol=1e-5, rtol=1e-5)


def test_item_reset_mid_stream_equals_that_item_streamed_alone():
    # After item 0's reset the module has run more steps than item 0 has, before and after its ring wraps
    # (context 4); item 0 must still see only its own keys. Different batch sizes: compared with a tolerance.
    torch.manual_seed(0)
    model = StreamingTransformer(d_model=16, **LM_LIKE)
    _randomize(model)
    x = torch.randn(2, 9, 16)
    with model.streaming(2):
        for t in range(3):
            model(x[:, t : t + 1])
        model.reset_streaming(torch.tensor([True, False]))
        out = torch.cat([model(x[:, t : t + 1]) for t in range(3, 9)], 1)
    with model.streaming(1):
        alone = torch.cat([model(x[:1, t : t + 1]) for t in range(3, 9)], 1)
    torch.testing.assert_close(out[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(x[1:])[0, 3:], atol=1e-5, rtol=1e-5)


def test_reset_streaming_restarts_positions():
    model = StreamingTransformer(d_model=16, **LM_LIKE)
    x = torch.randn(1, 3, 16)
    with model.streaming(1):
        first = model(x)
        model.reset_streaming()
        again = model(x)
    torch.testing.assert_close(first, again)


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = StreamingTransformer(d_model=16, **LM_LIKE)
    b = StreamingTransformer(d_model=16, checkpointing=True, **LM_LIKE)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 16)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_unknown_layer_keyword_names_the_key():
    with pytest.raises(TypeError, match="foo"):
        StreamingTransformer(d_model=16, num_heads=2, num_layers=1, foo=1)
    with pytest.raises(ValueError, match="'alibi'"):
        StreamingTransformer(d_model=16, num_heads=2, num_layers=1, positional_embedding="alibi")


def test_projected_transformer_conv_layout_and_projections():
    model = ProjectedTransformer(12, [16, 6], 16, conv_layout=True, **MIMI_LIKE)
    keys = list(model.state_dict())
    assert "input_proj.weight" in keys and "output_projs.1.weight" in keys and "output_projs.0.weight" not in keys
    assert keys[:10] == [
        "transformer.layers.0." + k
        for k in [
            "self_attn.out_projs.0.weight", "self_attn.in_projs.0.weight", "norm1.weight", "norm1.bias",
            "norm2.weight", "norm2.bias", "linear1.weight", "linear2.weight", "layer_scale_1.scale",
            "layer_scale_2.scale",
        ]
    ]
    x = torch.randn(2, 12, 9)
    ys = model(x)
    assert [tuple(y.shape) for y in ys] == [(2, 16, 9), (2, 6, 9)]
    z = model.transformer(model.input_proj(x.transpose(1, 2)))
    torch.testing.assert_close(ys[0], z.transpose(1, 2))
    torch.testing.assert_close(ys[1], model.output_projs[1](z).transpose(1, 2))


def test_mimi_transformer_parameter_count():
    model = ProjectedTransformer(
        512, [512], 512, conv_layout=True, device="meta", num_heads=8, num_layers=8, causal=True,
        layer_scale=0.01, context=250, max_period=10000, gating="none", norm="layer_norm",
        positional_embedding="rope", dim_feedforward=2048,
    )
    assert sum(p.numel() for p in model.parameters()) == 25_190_400


def test_kv_repeat_with_rope_equals_repeated_kv_heads():
    from moshi.modules.rope import RotaryEmbedding

    torch.manual_seed(3)
    rope = RotaryEmbedding(max_period=10_000.0)
    gqa = StreamingMultiheadAttention(8, 4, causal=True, kv_repeat=2, rope=rope)
    full = StreamingMultiheadAttention(8, 4, causal=True, rope=rope)
    w = gqa.in_projs[0].weight.detach()
    q, k, v = w[:8], w[8:12], w[12:16]
    with torch.no_grad():
        full.in_projs[0].weight.copy_(torch.cat([q, k[[0, 1, 0, 1, 2, 3, 2, 3]], v[[0, 1, 0, 1, 2, 3, 2, 3]]]))
        full.out_projs[0].weight.copy_(gqa.out_projs[0].weight)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(gqa(x), full(x))


def test_rms_norm_without_grad_gives_the_autograd_path_bits():
    """Under ``no_grad`` the norm skips its autograd.Function but runs the same ops on the same shapes."""
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.alpha.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        fast = norm(x)
    tracked = norm(x.clone().requires_grad_())
    assert tracked.requires_grad and not fast.requires_grad
    assert torch.equal(fast, tracked.detach())


def _attention_states(model: nn.Module) -> list:
    return [m._streaming_state for m in model.modules() if isinstance(m, StreamingMultiheadAttention)]


@pytest.mark.parametrize("chunks", [[1] * 13, [2] * 7, [3, 1, 2, 7, 1, 4, 2]], ids=["steps", "pairs", "mixed"])
@pytest.mark.parametrize("config", [MIMI_LIKE, LM_LIKE], ids=["mimi_like", "lm_like"])
def test_aligned_ring_path_equals_the_per_item_path_and_the_full_pass(config, chunks):
    # The aligned path derives slots and masks from the host step counter; the per-item path from positions on
    # the device. Chunks of 1, 2, 3, 4 and 7 steps cross the ring's end (context 4 or 5) at every phase, and 7
    # exceeds the capacity. Same shapes on both paths, so only accumulation order can differ.
    torch.manual_seed(0)
    model = StreamingTransformer(d_model=16, **config)
    _randomize(model)
    x = torch.randn(2, sum(chunks), 16)
    bounds = [sum(chunks[:i]) for i in range(len(chunks) + 1)]
    outputs, caches = {}, {}
    for aligned in (True, False):
        with model.streaming(2):
            for state in _attention_states(model):
                state.aligned = aligned
            outputs[aligned] = torch.cat([model(x[:, a:b]) for a, b in zip(bounds, bounds[1:])], 1)
            states = _attention_states(model)
            assert all(state.aligned == aligned for state in states)
            caches[aligned] = [(s.kv_cache.clone(), s.offset.clone(), s.offset_cpu) for s in states]
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outputs[True], model(x), atol=1e-5, rtol=1e-5)
    for (cache, offset, steps), (cache_ref, offset_ref, steps_ref) in zip(caches[True], caches[False]):
        torch.testing.assert_close(cache, cache_ref, atol=1e-6, rtol=1e-6)
        assert offset.tolist() == offset_ref.tolist() == [steps] * 2 and steps == steps_ref == x.shape[1]


def test_aligned_flag_follows_exec_masks_and_resets():
    model = StreamingTransformer(d_model=16, **LM_LIKE)
    x = torch.randn(2, 1, 16)

    def flags() -> set[bool]:
        return {state.aligned for state in _attention_states(model)}

    with model.streaming(2):
        assert flags() == {True}
        model.set_exec_mask(torch.tensor([True, True]))
        model(x)
        assert flags() == {True}
        model.set_exec_mask(torch.tensor([True, False]))
        assert flags() == {False}
        model.set_exec_mask(torch.tensor([True, True]))  # item 1 is a step behind: still not aligned
        model(x)
        assert flags() == {False}
        model.reset_streaming()
        assert flags() == {True}
        model(x)
        model.reset_streaming(torch.tensor([False, True]))
        assert flags() == {False}
        model.reset_streaming(torch.tensor([True, True]))
        assert flags() == {True} and {s.offset_cpu for s in _attention_states(model)} == {0}
