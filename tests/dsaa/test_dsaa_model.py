"""The DSAA model on tiny Moshi + tiny HF LLM models: text-blind temporal transformer, the LLM branch, the
projectors, teacher forcing against streaming, parameter groups."""

from __future__ import annotations

import pytest
import torch

from moshi.models.dsaa import (
    dsaa_dims,
    dsaa_param_group_prefixes,
    dsaa_param_groups,
    dsaa_states,
    dsaa_vectors,
    pca_projection,
    set_dsaa_trainable,
)
from moshi.models.lm import delay_codes
from moshi.models.lm_gen import LMGen
from tests.dsaa.tiny_llm import random_codes, tiny_dsaa
from tests.helpers.forced_gen import check_stepping_matches_forward


@pytest.mark.parametrize(
    "hidden, proj_hidden, overrides, num_projectors",
    [
        pytest.param(32, None, {}, 2, id="D_l=D_d,H=D_m,P=dep_q"),
        pytest.param(16, 24, {}, 2, id="D_l<D_d"),
        pytest.param(48, 40, {"depformer_multi_linear": False}, 1, id="D_l>D_d,P=1"),
        pytest.param(32, 20, {"depformer_weights_per_step_schedule": [0, 0]}, 1, id="schedule,P=1"),
        pytest.param(32, 20, {"dep_q": 3, "delays": [0, 1, 0, 2, 1]}, 3, id="dep_q=3"),
    ],
)
def test_shapes_follow_the_moshi_and_llm_configs(hidden, proj_hidden, overrides, num_projectors):
    model = tiny_dsaa(hidden=hidden, proj_hidden=proj_hidden, **overrides)
    d = dsaa_dims(model)
    H = proj_hidden or 64
    assert (d.dim, d.depformer_dim, d.text_dim, d.text_vocab, d.proj_hidden) == (64, 32, hidden, 320, H)
    assert d.num_projectors == num_projectors == len(model.depformer_projectors)
    sd = model.state_dict()
    assert sd["text_projector.fusion.0.weight"].shape == (hidden + 64,)
    assert sd["text_projector.fusion.1.weight"].shape == (H, hidden + 64)
    assert sd["text_projector.fusion.4.weight"].shape == (hidden, H)
    assert sd["text_head.weight"].shape == (320, hidden)
    assert sd["depformer_projectors.0.fc1.weight"].shape == (H, hidden + 64 + 32)
    assert sd["depformer_projectors.0.fc2.weight"].shape == (32, H)
    assert sd["depformer_projectors.0.skip.weight"].shape == (32, hidden + 64 + 32)
    assert sd["depformer_text_emb.emb.weight"].shape == (320, hidden)
    assert sd["depformer_text_proj.weight"].shape == (32, hidden)
    for removed in ("text_emb.", "text_linear.", "depformer_in.", "depformer_text_emb.weight"):
        assert not any(k.startswith(removed) for k in sd), removed
    codes = random_codes(model, batch=2, steps=5)
    out = model(codes)
    dep_q = model.dep_q
    assert out.logits.shape == (2, dep_q, 5, 32) and out.mask.shape == (2, dep_q, 5)
    assert out.text_logits.shape == (2, 1, 5, 320) and out.text_mask.shape == (2, 1, 5)
    # NaN exactly where the delay leaves no prediction, as in Moshi.
    for c in range(dep_q):
        delay = model.delays[1 + c]
        assert (
            torch.isnan(out.logits[:, c, 5 - delay :]).all()
            and not torch.isnan(out.logits[:, c, : 5 - delay]).any()
        )
        assert not out.mask[:, c, 5 - delay :].any()


def test_moshi_branch_is_text_blind_and_llm_is_audio_blind():
    model = tiny_dsaa()
    codes = random_codes(model, steps=6)
    seq = delay_codes(codes, model.delays, model.initial_tokens())[:, :, :-1]
    h, a = dsaa_states(model, seq)
    other_text = seq.clone()
    other_text[:, 0] = (seq[:, 0] + 7) % 320
    h2, a2 = dsaa_states(model, other_text)
    assert torch.equal(a2, a) and not torch.allclose(h2, h)
    other_audio = seq.clone()
    other_audio[:, 1:] = (seq[:, 1:] + 5) % 32
    h3, a3 = dsaa_states(model, other_audio)
    assert torch.equal(h3, h) and not torch.allclose(a3, a)


def test_alpha_zero_text_logits_equal_the_llm_logits():
    model = tiny_dsaa()
    with torch.no_grad():
        model.text_projector.alpha.zero_()
    codes = random_codes(model, steps=7)
    out = model(codes)
    llm_input = torch.cat([torch.full((2, 1), model.text_initial_token_id), codes[:, 0, :-1]], dim=1)
    with torch.no_grad():
        llm_logits = model.text_llm.hf_model(input_ids=llm_input).logits
    assert torch.equal(out.text_logits[:, 0], llm_logits)


def test_fresh_model_differs_from_the_llm_only_by_the_small_fusion_term():
    model = tiny_dsaa()
    codes = random_codes(model, steps=5)
    seq = delay_codes(codes, model.delays, model.initial_tokens())[:, :, :-1]
    h, a = dsaa_states(model, seq)
    fusion = model.text_projector.fusion(torch.cat([h, a], -1))
    expected = model.text_llm.lm_logits(h) + model.text_head(0.1 * fusion)
    torch.testing.assert_close(model(codes).text_logits[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_minus_one_is_a_zero_vector_for_the_llm_and_the_depformer_text_embedding():
    model = tiny_dsaa()
    codes = random_codes(model, steps=5)
    codes[0, 0, 1] = -1
    seq = delay_codes(codes, model.delays, model.initial_tokens())[:, :, :-1]
    h, _ = dsaa_states(model, seq)
    embeds = model.text_llm.input_embedding()(seq[:, 0].clamp(min=0)).detach().clone()
    embeds[0, 2] = 0.0  # codes[:, :, 1] is read at model position 2
    assert torch.equal(h, model.text_llm(inputs_embeds=embeds))
    assert torch.equal(model.depformer_text_emb(torch.tensor([[-1, 3]]))[0, 0], torch.zeros(32))
    out = model(codes)
    assert not out.text_mask[0, 0, 1] and out.text_mask[1, 0, 1]


def test_pca_rows_are_orthonormal_centred_and_sorted_by_variance():
    model = tiny_dsaa(hidden=48)
    w, b = model.depformer_text_proj.weight, model.depformer_text_proj.bias
    torch.testing.assert_close(w @ w.T, torch.eye(32), rtol=0, atol=1e-5)
    emb = model.text_llm.input_embedding().weight
    projected = model.depformer_text_proj(emb)
    assert projected.mean(0).abs().max() < 1e-5
    var = projected.var(0)
    assert (var[1:] <= var[:-1] + 1e-6).all()
    assert (w.gather(1, w.abs().argmax(1, keepdim=True)) > 0).all()
    torch.testing.assert_close(b, -(w @ emb.mean(0)))


def test_pca_with_narrow_llm_pads_zero_rows_and_warns():
    emb = torch.randn(50, 8)
    weight, bias, rank = pca_projection(emb, 12)
    assert rank == 8 and torch.equal(weight[8:], torch.zeros(4, 8)) and torch.equal(bias[8:], torch.zeros(4))
    torch.testing.assert_close(weight[:8] @ weight[:8].T, torch.eye(8), rtol=0, atol=1e-5)
    from moshi.models.dsaa import initialize_dsaa_modules

    model = tiny_dsaa(hidden=16)
    messages = []
    initialize_dsaa_modules(model, 0, ["depformer_text_proj"], warn=messages.append)
    assert len(messages) == 1 and "D_l=16" in messages[0] and "D_d=32" in messages[0]


def test_streaming_generation_reproduces_teacher_forcing_and_again_after_reset():
    model = tiny_dsaa()
    check_stepping_matches_forward(model, random_codes(model, steps=6))


def test_sampled_generation_is_reproducible_with_a_generator():
    model = tiny_dsaa()
    runs = []
    for _ in range(2):
        gen = LMGen(model, generator=torch.Generator().manual_seed(5))
        with gen.streaming(1):
            runs.append([gen.step(torch.full((1, 2, 1), 3)) for _ in range(5)][1:])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    tokens = torch.cat(runs[0], dim=2)
    assert (tokens[:, 0] < 320).all() and (tokens[:, 1:] < 32).all() and (tokens >= 0).all()


def test_generation_past_max_position_embeddings_keeps_a_bounded_llm_cache():
    model = tiny_dsaa(max_pos=3)
    gen = LMGen(model, use_sampling=False)
    with gen.streaming(1):
        for _ in range(8):
            gen.step(torch.zeros(1, 2, 1, dtype=torch.long))
            assert model.text_llm._streaming_state.cache.get_seq_length() <= 2  # window 3: itself + 2 before


def test_forward_train_gives_the_text_logits_in_factored_form():
    model = tiny_dsaa()
    codes = random_codes(model, steps=5)
    codes[1, 0, 2] = -1
    out = model(codes)
    train = model.forward_train(codes)
    assert train.text_hidden.shape == (2, 1, 5, 32) and train.text_head is model.text_head
    torch.testing.assert_close(train.text_hidden @ train.text_head.weight.T, out.text_logits, equal_nan=True)
    torch.testing.assert_close(train.logits, out.logits, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(train.mask, out.mask) and torch.equal(train.text_mask, out.text_mask)


def test_dsaa_vectors_are_the_projector_inputs():
    model = tiny_dsaa()
    codes = random_codes(model, steps=4)
    vectors = dsaa_vectors(model, codes)
    assert [tuple(v.shape) for v in vectors] == [(2, 4, 96)] + [(2, 4, 128)] * model.dep_q
    seq = delay_codes(codes, model.delays, model.initial_tokens())
    h, a = dsaa_states(model, seq[:, :, :-1])
    assert torch.equal(vectors[0], torch.cat([h, a], -1))
    for k in range(model.dep_q):
        assert torch.equal(vectors[1 + k][..., :96], vectors[0])
        u = model.depformer_projectors[k](vectors[1 + k])
        torch.testing.assert_close(u, model.text_path.depformer_step_input(model, k, vectors[0], seq[:, k, 1:]))


def test_parameter_groups_cover_every_parameter_once():
    model = tiny_dsaa()
    prefixes = dsaa_param_group_prefixes(model)
    assert prefixes["proj"] == ("text_projector", "depformer_projectors")
    assert {"text_llm", "emb", "transformer", "out_norm"} <= set(prefixes["frozen"])
    groups = set_dsaa_trainable(model)
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(n.startswith(("text_projector.", "depformer_projectors.")) for n in groups["proj"])
    assert (
        "depformer.layers.0.norm1.alpha" in groups["finetune"]
        and "depformer_emb.0.weight" in groups["finetune"]
    )
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("text_llm."))

    only_text = set_dsaa_trainable(model, only_text=True)
    assert {n.split(".")[0] for n in only_text["proj"]} == {"text_projector"}
    assert only_text["finetune"] == ["text_head.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == only_text["proj"] + only_text[
        "finetune"
    ]

    fork_like = dsaa_param_groups(model, frozen_modules=["depformer", "depformer_text_proj"])
    frozen = {n for n, _ in fork_like["frozen"]}
    assert "depformer_text_proj.weight" in frozen and "depformer.layers.1.norm2.alpha" in frozen
    assert "depformer_emb.0.weight" not in frozen
    with pytest.raises(ValueError, match="text_llm.frozen_modules: 'depformr'"):
        dsaa_param_group_prefixes(model, frozen_modules=["depformr"])
