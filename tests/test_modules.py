"""Properties of the DSAA building blocks in ``modules.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config

from modules import (
    MaskedEmbedding,
    ResidualDepformerProjector,
    StreamingLLM,
    TextPreservingProjector,
    TopKSparseAutoencoder,
)


def _tiny_hf_llm(tie: bool = True, max_positions: int = 16) -> nn.Module:
    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def test_text_preserving_projector_names_and_formula():
    proj = TextPreservingProjector(text_dim=6, audio_dim=10, hidden_dim=12, dropout=0.0).eval()
    assert sorted(proj.state_dict()) == [
        "alpha",
        "fusion.0.bias",
        "fusion.0.weight",
        "fusion.1.bias",
        "fusion.1.weight",
        "fusion.4.bias",
        "fusion.4.weight",
    ]
    assert proj.fusion[1].weight.shape == (12, 16) and proj.fusion[4].weight.shape == (6, 12)
    assert proj.alpha.item() == pytest.approx(0.1)
    assert torch.count_nonzero(proj.fusion[4].bias) == 0
    h, a = torch.randn(2, 3, 6), torch.randn(2, 3, 10)
    z = torch.cat([h, a], -1)
    ref = h + 0.1 * proj.fusion[4](nn.functional.gelu(proj.fusion[1](nn.functional.layer_norm(z, (16,)))))
    torch.testing.assert_close(proj(h, a), ref)
    with torch.no_grad():
        proj.alpha.zero_()
    assert torch.equal(proj(h, a), h)


def test_residual_depformer_projector_skip_reads_unnormalised_input():
    proj = ResidualDepformerProjector(input_dim=20, hidden_dim=8, output_dim=5, dropout=0.0).eval()
    assert sorted(proj.state_dict()) == [
        "fc1.bias",
        "fc1.weight",
        "fc2.bias",
        "fc2.weight",
        "norm.bias",
        "norm.weight",
        "skip.weight",
    ]
    assert torch.count_nonzero(proj.fc1.bias) == 0 and torch.count_nonzero(proj.fc2.bias) == 0
    x = 3.0 * torch.randn(4, 20) + 1.0
    normed = nn.functional.layer_norm(x, (20,))
    ref = proj.fc2(nn.functional.gelu(proj.fc1(normed))) + x @ proj.skip.weight.t()
    torch.testing.assert_close(proj(x), ref)


def test_masked_embedding_zero_for_minus_one_and_rows_otherwise():
    table = nn.Embedding(7, 3)
    emb = MaskedEmbedding.from_embedding(table)
    assert list(emb.state_dict()) == ["emb.weight"]
    assert emb.emb.weight.data_ptr() != table.weight.data_ptr()
    ids = torch.tensor([[0, -1, 6], [-1, -1, 2]])
    out = emb(ids)
    assert out.shape == (2, 3, 3)
    assert torch.equal(out[ids == -1], torch.zeros(3, 3))
    assert torch.equal(out[0, 0], table.weight[0]) and torch.equal(out[0, 2], table.weight[6])
    with pytest.raises(IndexError):
        emb(torch.tensor([-2]))


def test_streaming_llm_keeps_save_pretrained_names_and_matches_hf_logits():
    hf = _tiny_hf_llm(tie=False)
    llm = StreamingLLM(hf)
    assert list(llm.state_dict()) == list(hf.state_dict())
    assert (llm.hidden_size, llm.input_vocab, llm.output_vocab, llm.max_positions) == (32, 50, 50, 16)
    ids = torch.randint(0, 50, (2, 9))
    hidden = llm(ids)
    assert hidden.shape == (2, 9, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert torch.equal(llm.lm_logits(hidden), ref)


def test_streaming_llm_minus_one_is_a_zero_input_vector():
    llm = StreamingLLM(_tiny_hf_llm())
    ids = torch.tensor([[4, -1, 7]])
    embeds = llm.input_embedding()(torch.tensor([[4, 0, 7]])).detach().clone()
    embeds[:, 1] = 0.0
    assert torch.equal(llm.embed(ids), embeds)
    torch.testing.assert_close(llm(ids), llm(inputs_embeds=embeds), rtol=0, atol=0)


def test_streaming_llm_step_by_step_equals_teacher_forcing_and_after_reset():
    llm = StreamingLLM(_tiny_hf_llm())
    ids = torch.randint(0, 50, (2, 8))
    full = llm(ids)
    with llm.streaming(2):
        for _ in range(2):
            steps = torch.cat([llm(ids[:, t : t + 1]) for t in range(ids.shape[1])], dim=1)
            torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
            llm.reset_streaming()
    assert not llm.is_streaming


def test_streaming_llm_refuses_to_pass_max_position_embeddings_in_one_pass():
    llm = StreamingLLM(_tiny_hf_llm(max_positions=4))
    with pytest.raises(ValueError, match="max_position_embeddings=4"):
        llm(torch.zeros(1, 5, dtype=torch.long))
    with llm.streaming(1), pytest.raises(ValueError, match="5 positions in one call exceed.*context of 4"):
        llm(torch.zeros(1, 5, dtype=torch.long))


def test_streaming_llm_keeps_a_bounded_window():
    llm = StreamingLLM(_tiny_hf_llm(max_positions=16), context=3)
    assert llm.window == 3 and StreamingLLM(_tiny_hf_llm(max_positions=16), context=40).window == 16
    ids = torch.randint(0, 50, (1, 9))
    full = llm(ids)
    with llm.streaming(1):
        steps = []
        for t in range(9):
            steps.append(llm(ids[:, t : t + 1]))
            state = llm._streaming_state
            assert state.visible.shape == (1, min(t + 1, 2)) and state.cache.get_seq_length() == min(t + 1, 2)
        assert state.positions.tolist() == [9]
    # within the window the steps are the teacher-forced pass; past it they attend to the last 3 positions only
    torch.testing.assert_close(torch.cat(steps[:3], dim=1), full[:, :3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steps[8], full[:, 8:], atol=1e-3)


def test_streaming_llm_resets_and_skips_single_items():
    llm = StreamingLLM(_tiny_hf_llm())
    ids = torch.randint(0, 50, (2, 6))
    alone = StreamingLLM(llm.hf_model)
    with llm.streaming(2):
        for t in range(3):
            llm(ids[:, t : t + 1])
        llm.reset_streaming(torch.tensor([True, False]))
        llm.set_exec_mask(torch.tensor([True, False]))
        llm(ids[:, 3:4])  # item 1 is frozen: nothing of this call reaches its later steps
        llm.set_exec_mask(torch.tensor([True, True]))
        both = torch.cat([llm(ids[:, t : t + 1]) for t in range(4, 6)], dim=1)
    # item 0 restarted at ids[3]; item 1 continued from ids[2] to ids[4], ids[5]
    torch.testing.assert_close(both[0], alone(ids[:1, 3:6])[0, 1:], rtol=1e-5, atol=1e-5)
    item1 = torch.cat([ids[1:, :3], ids[1:, 4:6]], dim=1)
    torch.testing.assert_close(both[1], alone(item1)[0, 3:], rtol=1e-5, atol=1e-5)


def test_streaming_llm_frozen_forward_builds_no_graph():
    llm = StreamingLLM(_tiny_hf_llm())
    llm.requires_grad_(False)
    assert not llm(torch.zeros(1, 3, dtype=torch.long)).requires_grad
    llm.requires_grad_(True)
    assert llm(torch.zeros(1, 3, dtype=torch.long)).requires_grad


def test_topk_sae_codes_are_sparse_top_k_of_relu():
    sae = TopKSparseAutoencoder(input_dim=8, latent_dim=16, k=3)
    torch.testing.assert_close(sae.decoder.weight, sae.encoder.weight.t())
    torch.testing.assert_close(sae.decoder.weight.norm(dim=0), torch.ones(16))
    x = torch.randn(5, 8)
    out = sae(x)
    assert out.codes.shape == (5, 16) and out.reconstruction.shape == (5, 8)
    assert (out.codes >= 0).all() and ((out.codes > 0).sum(-1) <= 3).all()
    pre = torch.relu(sae.encoder(x - sae.decoder.bias))
    kept = torch.topk(pre, 3, dim=-1)
    assert torch.equal(out.codes.gather(-1, kept.indices), kept.values)
    assert torch.equal(out.reconstruction, sae.decode(out.codes))
    with pytest.raises(ValueError, match="k must be in"):
        TopKSparseAutoencoder(input_dim=8, latent_dim=4, k=5)
