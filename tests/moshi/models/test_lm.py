"""LMModel structure (names, shapes, counts), configuration errors, delays and streaming equivalences."""

import math

import pytest
import torch
from torch import nn

from moshi.models import loaders
from moshi.models.lm import LMModel, ScaledEmbedding, delay_codes, undelay_logits
from tests.helpers.configs import small_lm_kwargs
from tests.helpers.models import filled_small_lm, fixture_codes


def _small_expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"emb.{a}.weight": (33, 64) for a in range(4)}
    shapes["text_emb.weight"] = (101, 64)
    shapes["text_linear.weight"] = (100, 64)
    for i in range(2):
        p = f"transformer.layers.{i}."
        shapes[p + "self_attn.out_projs.0.weight"] = (64, 64)
        shapes[p + "self_attn.in_projs.0.weight"] = (192, 64)
        shapes[p + "norm1.alpha"] = (1, 1, 64)
        shapes[p + "norm2.alpha"] = (1, 1, 64)
        shapes[p + "gating.linear_in.weight"] = (352, 64)
        shapes[p + "gating.linear_out.weight"] = (64, 176)
    shapes["out_norm.alpha"] = (1, 1, 64)
    shapes.update({f"depformer_in.{c}.weight": (32, 64) for c in range(2)})
    shapes["depformer_emb.0.weight"] = (33, 32)
    shapes["depformer_text_emb.weight"] = (101, 32)
    for j in range(2):
        p = f"depformer.layers.{j}."
        shapes.update({p + f"self_attn.out_projs.{s}.weight": (32, 32) for s in range(2)})
        shapes.update({p + f"self_attn.in_projs.{s}.weight": (96, 32) for s in range(2)})
        shapes[p + "norm1.alpha"] = (1, 1, 32)
        shapes[p + "norm2.alpha"] = (1, 1, 32)
        for s in range(2):
            shapes[p + f"gating.{s}.linear_in.weight"] = (176, 32)
            shapes[p + f"gating.{s}.linear_out.weight"] = (32, 88)
    shapes.update({f"linears.{c}.weight": (32, 32) for c in range(2)})
    return shapes


def _moshiko_expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"emb.{a}.weight": (2049, 4096) for a in range(16)}
    shapes["text_emb.weight"] = (32001, 4096)
    shapes["text_linear.weight"] = (32000, 4096)
    for i in range(32):
        p = f"transformer.layers.{i}."
        shapes[p + "self_attn.out_projs.0.weight"] = (4096, 4096)
        shapes[p + "self_attn.in_projs.0.weight"] = (12288, 4096)
        shapes[p + "norm1.alpha"] = (1, 1, 4096)
        shapes[p + "norm2.alpha"] = (1, 1, 4096)
        shapes[p + "gating.linear_in.weight"] = (22528, 4096)
        shapes[p + "gating.linear_out.weight"] = (4096, 11264)
    shapes["out_norm.alpha"] = (1, 1, 4096)
    shapes.update({f"depformer_in.{c}.weight": (1024, 4096) for c in range(8)})
    shapes.update({f"depformer_emb.{c}.weight": (2049, 1024) for c in range(7)})
    shapes["depformer_text_emb.weight"] = (32001, 1024)
    for j in range(6):
        p = f"depformer.layers.{j}."
        shapes.update({p + f"self_attn.out_projs.{s}.weight": (1024, 1024) for s in range(8)})
        shapes.update({p + f"self_attn.in_projs.{s}.weight": (3072, 1024) for s in range(8)})
        shapes[p + "norm1.alpha"] = (1, 1, 1024)
        shapes[p + "norm2.alpha"] = (1, 1, 1024)
        for s in range(8):
            shapes[p + f"gating.{s}.linear_in.weight"] = (5632, 1024)
            shapes[p + f"gating.{s}.linear_out.weight"] = (1024, 2816)
    shapes.update({f"linears.{c}.weight": (2048, 1024) for c in range(8)})
    return shapes


def test_small_config_has_the_reference_keys_shapes_and_count():
    model = LMModel(**small_lm_kwargs())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _small_expected_shapes() and len(shapes) == 45
    assert sum(p.numel() for p in model.parameters()) == 182_720
    model.load_state_dict({k: torch.zeros(s) for k, s in shapes.items()}, strict=True)


def test_moshiko_on_meta_has_439_keys_and_7_687_729_152_parameters():
    model = LMModel(**loaders.DEFAULT_LM_KWARGS, device="meta", dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _moshiko_expected_shapes()
    assert len(shapes) == 439 and shapes == expected
    # registration order matters for files written by state_dict(): same grouping as Kyutai's
    order = [k.split(".")[0] for k in shapes]
    groups = list(dict.fromkeys(order))
    assert groups == ["emb", "text_emb", "text_linear", "transformer", "out_norm", "depformer_in",
                      "depformer_emb", "depformer_text_emb", "depformer", "linears"]
    assert sum(p.numel() for p in model.parameters()) == 7_687_729_152
    assert list(model.buffers()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_parameter_has_the_requested_dtype(dtype):
    model = LMModel(**small_lm_kwargs(), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        out = model.eval()(fixture_codes())
    assert out.logits.dtype == dtype and out.text_logits.dtype == dtype


@pytest.mark.parametrize("key", ["foo", "depformer_foo"])
def test_unknown_config_key_is_refused_naming_it(key):
    with pytest.raises(TypeError, match=key):
        LMModel(**small_lm_kwargs(**{key: 1}))


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="delays"):
        LMModel(**small_lm_kwargs(delays=[0, 1]))
    with pytest.raises(ValueError, match="'batch_norm'"):
        LMModel(**small_lm_kwargs(norm="batch_norm"))


def test_special_ids_and_sizes():
    model = LMModel(**loaders.DEFAULT_LM_KWARGS, device="meta")
    assert (model.zero_token_id, model.ungenerated_token_id) == (-1, -2)
    assert (model.initial_token_id, model.text_initial_token_id) == (2048, 32000)
    assert (model.text_padding_token_id, model.end_of_text_padding_id) == (3, 0)
    assert (model.audio_offset, model.num_codebooks, model.num_audio_codebooks) == (1, 17, 16)
    assert (model.dep_q, model.n_q, model.card, model.text_card) == (8, 16, 2048, 32000)
    assert model.delays == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    init = model.initial_tokens()
    assert init.shape == (1, 17, 1) and init[0, 0, 0] == 32000 and (init[0, 1:, 0] == 2048).all()


def test_delay_codes_matches_the_definition():
    codes = torch.arange(2 * 3 * 5).view(2, 3, 5)
    delays = [0, 2, 1]
    init = torch.tensor([100, 200, 300]).view(1, 3, 1)
    out = delay_codes(codes, delays, init)
    for b in range(2):
        for k in range(3):
            for t in range(6):
                src = t - 1 - delays[k]
                assert out[b, k, t] == (codes[b, k, src] if src >= 0 else init[0, k, 0])


def test_undelay_logits_shifts_back_and_marks_the_tail():
    logits = torch.randn(2, 3, 5, 4)
    valid = torch.ones(2, 3, 5, dtype=torch.bool)
    valid[1, 0, 1] = False
    out, mask = undelay_logits(logits, [0, 1, 2], valid)
    assert torch.equal(out[:, 0], logits[:, 0])
    assert torch.equal(out[:, 1, :4], logits[:, 1, 1:]) and torch.isnan(out[:, 1, 4]).all()
    assert torch.equal(out[:, 2, :3], logits[:, 2, 2:]) and torch.isnan(out[:, 2, 3:]).all()
    assert mask[0].tolist() == [[True] * 5, [True] * 4 + [False], [True] * 3 + [False] * 2]
    assert mask[1, 0].tolist() == [True, False, True, True, True]
    same, same_mask = undelay_logits(logits[:, :1], [0], valid[:, :1])
    assert same is logits[:, :1] or torch.equal(same, logits[:, :1])


def test_zero_token_embeds_to_exact_zeros_and_other_negatives_read_row_0():
    emb = ScaledEmbedding(5, 3)
    y = emb(torch.tensor([[-1, -3, 2]]))
    assert torch.equal(y[0, 0], torch.zeros(3))
    assert torch.equal(y[0, 1], emb.weight[0]) and torch.equal(y[0, 2], emb.weight[2])
    low = ScaledEmbedding(5, 6, low_rank=2, norm=True)
    assert low.weight.shape == (5, 2) and low.low_rank.weight.shape == (6, 2)
    assert torch.equal(low(torch.tensor([-1])), torch.zeros(1, 6))


def test_demux_embedding_adds_the_second_token():
    emb = ScaledEmbedding(4, 3, demux_second_stream=True)
    left, right = 1, 2
    tok = torch.tensor([left + 4 * (right + 1), left, -1])
    y = emb(tok)
    torch.testing.assert_close(y[0], emb.out1(emb.weight[left]) + emb.out2(emb.weight[right]))
    torch.testing.assert_close(y[1], emb.out1(emb.weight[left]))
    assert torch.equal(y[2], torch.zeros(3))


# 2·6 tokens per table are fewer than a table's 33 rows (per-table lookups), 2·20 are more (one embedding_bag).
@pytest.mark.parametrize("steps", [6, 20])
def test_summed_audio_embedding_equals_per_table_sum(steps):
    model = filled_small_lm()
    codes = fixture_codes(steps=steps)
    codes[0, 2, 3] = -1
    audio = codes[:, 1:]
    expected = sum(model.emb[a](audio[:, a]) for a in range(4))
    torch.testing.assert_close(model.embed_audio(audio), expected, atol=1e-6, rtol=1e-6)


def test_temporal_streaming_one_frame_at_a_time_equals_full_pass_past_context():
    model = filled_small_lm()
    T = 14  # context is 10
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 32, (2, 5, T), generator=gen)
    seq[:, 0] = torch.randint(0, 100, (2, T), generator=gen)
    with torch.no_grad():
        full_out, full_text = model.forward_text(seq)
        with model.streaming(2):
            steps = [model.forward_text(seq[:, :, t : t + 1]) for t in range(T)]
    torch.testing.assert_close(torch.cat([s[0] for s in steps], 1), full_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([s[1] for s in steps], 2), full_text, atol=1e-5, rtol=1e-5)


def test_depformer_streaming_steps_equal_the_training_pass():
    model = filled_small_lm()
    codes = fixture_codes()
    delayed = delay_codes(codes, model.delays, model.initial_tokens())
    with torch.no_grad():
        transformer_out, _ = model.forward_text(delayed[:, :, :-1])
        training = model.forward_depformer_training(delayed[:, :, 1:], transformer_out)  # [B, dep_q, T, card]
        seq = delayed[:, :, 1:]
        for t in range(codes.shape[-1]):
            with model.depformer.streaming(2):
                for c in range(model.dep_q):
                    token = seq[:, c : c + 1, t : t + 1]
                    logits = model.forward_depformer(c, token, transformer_out[:, t : t + 1])
                    torch.testing.assert_close(logits[:, 0, 0], training[:, c, t], atol=1e-5, rtol=1e-5)


def test_forward_depformer_outside_streaming_raises():
    model = filled_small_lm()
    with pytest.raises(RuntimeError, match="streaming"):
        model.forward_depformer(0, torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 64))


def test_schedule_low_rank_and_shared_depformer_in_run_and_stream_consistently():
    kwargs = small_lm_kwargs(
        depformer_weights_per_step_schedule=[0, 0], depformer_low_rank_embeddings=8, depformer_norm="rms_norm"
    )
    model = LMModel(**kwargs).eval()
    keys = model.state_dict().keys()
    assert "depformer.layers.0.self_attn.in_projs.1.weight" not in keys and "depformer_in.1.weight" not in keys
    assert "depformer_emb.0.low_rank.weight" in keys and "depformer_norms.1.alpha" in keys
    codes = fixture_codes()
    delayed = delay_codes(codes, model.delays, model.initial_tokens())
    with torch.no_grad():
        transformer_out, _ = model.forward_text(delayed[:, :, :-1])
        training = model.forward_depformer_training(delayed[:, :, 1:], transformer_out)
        with model.depformer.streaming(2):
            for c in range(2):
                logits = model.forward_depformer(c, delayed[:, c : c + 1, 1:2], transformer_out[:, :1])
                torch.testing.assert_close(logits[:, 0, 0], training[:, c, 0], atol=1e-5, rtol=1e-5)


def test_init_weights_follow_the_truncated_normal_rule():
    torch.manual_seed(0)
    model = LMModel(**small_lm_kwargs())
    for name, fan_in in [("text_emb.weight", 64), ("text_linear.weight", 64),
                         ("transformer.layers.0.gating.linear_in.weight", 64), ("linears.0.weight", 32)]:
        w = model.state_dict()[name]
        std = 1 / math.sqrt(fan_in)
        assert w.abs().max() <= 3 * std + 1e-6, name
        assert 0.7 * std < w.std() < 1.1 * std, name
    # depformer layers keep PyTorch's default (kaiming-uniform a=sqrt(5): |w| <= 1/sqrt(fan_in))
    w = model.state_dict()["depformer.layers.0.self_attn.in_projs.0.weight"]
    assert w.abs().max() <= 1 / math.sqrt(32) and w.std() < 0.7 / math.sqrt(32)
    assert torch.equal(model.out_norm.alpha, torch.ones(1, 1, 64))


def test_gradient_checkpointing_gives_the_same_gradients():
    a = filled_small_lm().train()
    b = filled_small_lm(gradient_checkpointing=True).train()
    for model in (a, b):
        out = model(fixture_codes())
        loss = out.logits[out.mask].logsumexp(-1).sum() + out.text_logits.logsumexp(-1).sum()
        loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name, atol=1e-5, rtol=1e-5)


def test_dep_q_zero_model_has_no_depformer_and_empty_audio_logits():
    model = LMModel(**small_lm_kwargs(dep_q=0)).eval()
    assert not any(k.startswith(("depformer", "linears")) for k in model.state_dict())
    with torch.no_grad():
        out = model(fixture_codes())
    assert out.logits.shape == (2, 0, 6, 32) and out.mask.shape == (2, 0, 6)


def test_extra_heads_and_biases():
    model = LMModel(**small_lm_kwargs(extra_heads_num_heads=2, bias_proj=True))
    keys = model.state_dict().keys()
    assert {"extra_heads.1.weight", "text_linear.bias", "linears.1.bias"} <= set(keys)
    assert isinstance(model.extra_heads[0], nn.Linear) and model.extra_heads[0].weight.shape == (6, 64)
    with torch.no_grad():
        model.linears[1].bias.fill_(1.0)
        out = model.eval()(fixture_codes())
        delayed = delay_codes(fixture_codes(), model.delays, model.initial_tokens())
        transformer_out, _ = model.forward_text(delayed[:, :, :-1])
        ref = model.forward_depformer_training(delayed[:, :, 1:], transformer_out)
    torch.testing.assert_close(out.logits[:, 0], ref[:, 0])


# -- forward_train: the text head left to the loss -----------------------------------------------------------


def _codes_with_zero_tokens() -> torch.Tensor:
    codes = fixture_codes(batch=2, steps=7)
    codes[0, 0, 2] = -1  # a zero text token: masked
    codes[1, 1, 4] = -1
    return codes


@pytest.mark.parametrize(
    "overrides,lora",
    [({}, False), ({"bias_proj": True}, False), ({"delays": [2, 0, 1, 0, 1]}, False), ({}, True)],
    ids=["plain", "bias", "text-delay", "lora"],
)
def test_forward_train_gives_forward_outputs_with_the_text_head_unapplied(overrides, lora):
    from moshi.modules.lora import LoRALinear, replace_all_linear_with_lora

    torch.manual_seed(0)
    model = LMModel(**small_lm_kwargs(**overrides)).eval()
    if lora:
        replace_all_linear_with_lora(model, rank=4, scaling=2.0)
        assert isinstance(model.text_linear, LoRALinear)
    if "bias_proj" in overrides:
        with torch.no_grad():
            model.text_linear.bias.normal_()
    codes = _codes_with_zero_tokens()
    with torch.no_grad():
        out = model(codes)
        train = model.forward_train(codes)
    assert train.text_hidden.shape == (2, 1, 7, 64)
    assert train.text_head is model.text_linear
    torch.testing.assert_close(train.full_text_logits(), out.text_logits, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert torch.equal(train.text_mask, out.text_mask)
    assert torch.equal(train.mask, out.mask)
    torch.testing.assert_close(train.logits, out.logits, equal_nan=True, rtol=0, atol=0)
    if overrides.get("delays", [0])[0] == 2:  # the last two frames have no text prediction
        assert not train.text_mask[:, :, -2:].any() and torch.isnan(train.text_hidden[:, :, -2:]).all()
