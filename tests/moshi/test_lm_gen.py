"""LMGen: teacher-forced stepping equals the forward pass (Moshi, LoRA, DSAA), reproducible sampling streams per
batch item, per-slot resets, the DSAA start token, and the settings it refuses."""

from __future__ import annotations

import pytest
import torch

from moshi.models.lm_gen import LMGen
from moshi.modules.lora import replace_all_linear_with_lora, replace_lora_with_linear
from moshi.utils.cuda_graph import CUDAGraphed, cuda_graphs_enabled
from tests.dsaa.tiny_llm import random_codes, tiny_dsaa
from tests.helpers.forced_gen import check_stepping_matches_forward
from tests.helpers.models import filled_small_lm, fixture_codes


def _lora_lm(fuse: bool):
    model = filled_small_lm()
    replace_all_linear_with_lora(model, 4, 2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    if fuse:
        replace_lora_with_linear(model)
    return model.eval()


@pytest.mark.parametrize("kind", ["moshi", "lora_unfused", "lora_fused"])
def test_teacher_forced_stepping_equals_the_forward_pass(kind):
    model = {"moshi": filled_small_lm, "lora_unfused": lambda: _lora_lm(False),
             "lora_fused": lambda: _lora_lm(True)}[kind]()
    check_stepping_matches_forward(model, fixture_codes(batch=2, steps=6))


def test_teacher_forced_stepping_equals_the_forward_pass_dsaa_within_the_llm_window():
    model = tiny_dsaa(context=8)
    assert model.text_llm.window == 8
    check_stepping_matches_forward(model, random_codes(model, steps=7), rounds=1)


def _user(step: int, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + step)
    return torch.randint(0, 32, (batch, 2, 1), generator=g)


def _run(gen: LMGen, batch: int, steps: int = 6, user_seed: int = 0) -> torch.Tensor:
    with gen.streaming(batch):
        frames = [gen.step(_user(s, batch, user_seed)) for s in range(steps)]
    return torch.cat(frames[1:], dim=2)


def test_greedy_is_deterministic_and_seeded_sampling_reproduces():
    model = filled_small_lm()
    greedy = [_run(LMGen(model, use_sampling=False), 2) for _ in range(2)]
    assert torch.equal(*greedy)
    sampled = [_run(LMGen(model, seed=7, temp=2.0, temp_text=2.0), 2) for _ in range(2)]
    assert torch.equal(*sampled)
    assert not torch.equal(sampled[0], _run(LMGen(model, seed=8, temp=2.0, temp_text=2.0), 2))
    assert (sampled[0] >= 0).all() and (sampled[0][:, 0] < 100).all() and (sampled[0][:, 1:] < 32).all()


@pytest.mark.parametrize("dsaa", [False, True], ids=["moshi", "dsaa"])
def test_batch_item_equals_the_item_alone_with_its_seed(dsaa):
    model = tiny_dsaa() if dsaa else filled_small_lm()
    user = torch.stack([_user(s, 3) for s in range(6)])  # [steps, B, 2, 1], different per item
    gen = LMGen(model, seed=10, temp=1.5, temp_text=1.5)
    with gen.streaming(3):
        batched = torch.cat([f for f in (gen.step(u) for u in user) if f is not None], dim=2)
    for i in range(3):
        alone = LMGen(model, seed=10 + i, temp=1.5, temp_text=1.5)
        with alone.streaming(1):
            single = torch.cat([f for f in (alone.step(u[i : i + 1]) for u in user) if f is not None], dim=2)
        # Tokens, not logits: a batch and a single item compute the same float32 logits up to rounding (~1e-6),
        # and a token only changes if two candidates of the race are that close.
        assert torch.equal(batched[i : i + 1], single)
    assert not torch.equal(batched[0], batched[1])


@pytest.mark.parametrize("dsaa", [False, True], ids=["moshi", "dsaa"])
def test_resetting_one_slot_restarts_it_and_leaves_the_others(dsaa):
    model = tiny_dsaa() if dsaa else filled_small_lm()
    gen = LMGen(model, seed=3)
    with gen.streaming(2):
        for s in range(4):
            gen.step(_user(s, 2))
        gen.reset_streaming(torch.tensor([True, False]))
        after = [gen.step(_user(10 + s, 2)) for s in range(4)]
    fresh = LMGen(model, seed=3)
    with fresh.streaming(2):
        restarted = [fresh.step(_user(10 + s, 2)) for s in range(4)]
    assert after[0][0, 0, 0] == -2 and (after[0][1] >= 0).all()  # the reset slot warms up again, alone
    # slot 0 after its reset is a fresh conversation with its seed; slot 1 went on (it differs from a fresh one)
    assert torch.equal(torch.cat(after[1:], dim=2)[0], torch.cat(restarted[1:], dim=2)[0])
    assert not torch.equal(torch.cat(after[1:], dim=2)[1], torch.cat(restarted[1:], dim=2)[1])


def test_dsaa_starts_the_llm_on_its_start_token():
    model = tiny_dsaa()
    seen = []
    model.text_llm.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["ids"].clone()),
                                             with_kwargs=True)
    gen = LMGen(model, use_sampling=False)
    with gen.streaming(2):
        gen.step(_user(0, 2))
        gen.step(_user(1, 2))
    assert model.text_initial_token_id == 1  # tiny_dsaa's bos_id, not Moshi's text_card
    assert seen[0].tolist() == [[1], [1]] and seen[1].tolist() != [[1], [1]]


def test_cfg_is_refused_and_cuda_graphs_are_off_on_cpu(monkeypatch):
    model = filled_small_lm()
    with pytest.raises(ValueError, match=r"cfg_coef=2\.0: classifier-free guidance needs a condition fuser"):
        LMGen(model, cfg_coef=2.0)
    gen = LMGen(model)
    assert not gen._temporal.enabled and not gen._depformer.enabled
    assert not cuda_graphs_enabled("cpu") and cuda_graphs_enabled("cuda")
    monkeypatch.setenv("NO_CUDA_GRAPH", "1")
    assert not cuda_graphs_enabled("cuda")
    calls = []
    graphed = CUDAGraphed(lambda x: calls.append(x) or x + 1, enabled=False)
    assert torch.equal(graphed(torch.ones(2)), torch.full((2,), 2.0)) and len(calls) == 1
    with pytest.raises(ValueError, match="seed has 1 values for a batch of 2"):
        with LMGen(model, seed=[1]).streaming(2):
            pass


def test_step_counter_gives_none_then_minus_two_for_items_not_caught_up():
    """``None`` exactly during the first ``max_delay`` steps after the start or a full reset; afterwards an item
    gets tokens exactly when it has executed more than ``max_delay`` steps since its own reset and is executed
    now (per-item offsets kept under exec masks and per-slot resets), else -2."""
    model = filled_small_lm()
    gen = LMGen(model, use_sampling=False)
    max_delay = gen.max_delay
    assert max_delay >= 1
    # (exec mask, slots reset before the step); None = full reset_streaming()
    plan = [([1, 1], []), ([0, 1], []), ([1, 1], []), ([1, 0], []), ([1, 1], [0]), ([1, 1], []), ([0, 0], []),
            ([1, 1], None), ([1, 1], []), ([1, 1], []), ([0, 1], [1]), ([1, 1], [])]
    executed = [0, 0]
    since_full_reset = 0
    with gen.streaming(2):
        for step, (mask, reset) in enumerate(plan):
            if reset is None:
                gen.reset_streaming()
                executed, since_full_reset = [0, 0], 0
            elif reset:
                gen.reset_streaming(torch.tensor([i in reset for i in range(2)]))
                executed = [0 if i in reset else executed[i] for i in range(2)]
            gen.set_exec_mask(torch.tensor(mask, dtype=torch.bool))
            out = gen.step(_user(step, 2))
            since_full_reset += 1
            executed = [n + m for n, m in zip(executed, mask)]
            if since_full_reset <= max_delay:
                assert out is None, step
                continue
            for i in range(2):
                ready = bool(mask[i]) and executed[i] > max_delay
                assert bool((out[i] >= 0).all()) == ready and bool((out[i] == -2).all()) == (not ready), (step, i)


def test_skipped_steps_leave_an_item_on_its_own_stream():
    """Item 1, skipped by the exec mask for two steps, produces the tokens of its executed steps run alone."""
    model = filled_small_lm()
    gen = LMGen(model, use_sampling=False)
    masks = [[1, 1], [1, 0], [1, 0], [1, 1], [1, 1], [1, 1], [1, 1]]
    inputs = [_user(s, 2) for s in range(len(masks))]
    with gen.streaming(2):
        outs = []
        for mask, user in zip(masks, inputs):
            gen.set_exec_mask(torch.tensor(mask, dtype=torch.bool))
            outs.append(gen.step(user))
    skipped = torch.cat([o[1:2] for o, m in zip(outs, masks) if o is not None and m[1] and (o[1] >= 0).all()], 2)
    alone = LMGen(model, use_sampling=False)
    with alone.streaming(1):
        frames = [alone.step(user[1:2]) for user, m in zip(inputs, masks) if m[1]]
    assert torch.equal(skipped, torch.cat([f for f in frames if f is not None], dim=2))


def test_rewound_depformer_state_samples_as_a_fresh_one():
    """Every frame's audio tokens equal a greedy depformer pass in a brand-new streaming context, and the
    depformer is not left streaming between frames."""
    model = filled_small_lm()
    texts, audios = [], []
    gen = LMGen(model, use_sampling=False, on_text_hook=texts.append, on_audio_hook=audios.append)
    with gen.streaming(2):
        for step in range(5):
            _, transformer_out = gen._step(_user(step, 2))
            assert not model.depformer.is_streaming
            previous = texts[-1].unsqueeze(-1)  # [B, 1, 1]
            expected = []
            with torch.no_grad(), model.depformer.streaming(2):
                for c in range(model.dep_q):
                    previous = model.forward_depformer(c, previous, transformer_out).argmax(-1)
                    expected.append(previous[:, 0, 0])
            assert torch.equal(audios[-1], torch.stack(expected, dim=1)), step
