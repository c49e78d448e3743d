"""Loader behaviour: sharding, seeding, eval determinism, exact resume, source mixing and stages."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from finetune.args import TrainArgs
from finetune.data.dataset import build_eval_loader, build_train_loader


@pytest.fixture
def ds(make_dataset):
    return make_dataset([5.0, 3.3, 4.1, 2.5])  # chunks of 2 s: 3 + 2 + 3 + 2 = 10


def args_for(base_config, train_data, tmp_path, **kw) -> TrainArgs:
    return TrainArgs.from_dict(base_config(str(train_data), tmp_path / "run", **kw))


def test_batch_layout(base_config, ds, tmp_path, tok, store):
    a = args_for(base_config, ds, tmp_path)
    b = next(build_train_loader(a, tok, store))
    assert b.codes.shape == (2, 17, 25) and b.codes.dtype == torch.int64
    assert b.stats.chunks == 2 and len(b.chunk) == 2


def test_two_ranks_cover_every_chunk_once_per_epoch(base_config, ds, tmp_path, tok, store):
    a = args_for(base_config, ds, tmp_path)
    seen = []
    for rank in range(2):
        loader = build_train_loader(a, tok, store, rank=rank, world_size=2)
        per_rank = loader.samplers[0]._order.size
        got = []
        while len(got) < per_rank:
            got += next(loader).chunk
        seen.append(got[:per_rank])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(10))


def test_same_seed_same_order_other_seed_other_order(base_config, ds, tmp_path, tok, store):
    def order(seed):
        loader = build_train_loader(args_for(base_config, ds, tmp_path, seed=seed), tok, store)
        return [c for _ in range(10) for c in next(loader).chunk]

    o0 = order(0)
    assert o0 == order(0) and o0 != order(1)
    assert sorted(o0[:10]) == list(range(10)) and sorted(o0[10:20]) == list(range(10))  # epochs
    assert o0[:10] != o0[10:20]  # reshuffled per epoch


def test_no_shuffle_is_file_order(base_config, ds, tmp_path, tok, store):
    a = args_for(base_config, ds, tmp_path, data={"shuffle": False})
    loader = build_train_loader(a, tok, store)
    assert [c for _ in range(5) for c in next(loader).chunk] == list(range(10))


def test_eval_batches_identical_at_every_evaluation(base_config, ds, tmp_path, tok, store):
    a = args_for(base_config, ds, tmp_path, data={"eval_data": str(ds)}, eval_duration_sec=2.0, eval_batches=3)
    loaders = [build_eval_loader(a, tok, store, rank=r, world_size=2) for r in range(2)]
    assert [len(x) for x in loaders] == [1, 1]  # eval_batches // W, equal on every rank
    first = [b.codes for b in loaders[0]]
    second = [b.codes for b in loaders[0]]
    assert len(first) == 1 and all(torch.equal(x, y) for x, y in zip(first, second))
    single = build_eval_loader(a, tok, store)
    assert len(single) == 3 and [b.chunk for b in single] == [[0, 1], [2, 3], [4, 5]]


def test_loader_resume_equals_uninterrupted(base_config, ds, tmp_path, tok, store):
    aug = {"shift_prob": 0.5, "text_mask_prob": 0.5, "audio_mask_prob": 0.5}
    a = args_for(base_config, ds, tmp_path, data={"aug": aug})
    full = build_train_loader(a, tok, store)
    ref = [next(full).codes for _ in range(12)]
    part = build_train_loader(a, tok, store)
    for _ in range(7):
        next(part)
    state = json.loads(json.dumps(part.state_dict()))  # must survive serialisation
    resumed = build_train_loader(a, tok, store)
    resumed.load_state_dict(state)
    rest = [next(resumed).codes for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(ref[7:], rest))


def test_weighted_sources_mix_per_sample_and_resume(make_dataset, base_config, tmp_path, tok, store):
    d1 = make_dataset([2.0, 2.0], name="one")
    d2 = make_dataset([2.0, 2.0], name="two", seed=5)
    a = args_for(base_config, f"{d1}:3,{d2}:1", tmp_path)
    loader = build_train_loader(a, tok, store)
    counts = Counter(s for _ in range(100) for s in next(loader).source)
    assert 130 < counts[0] < 170 and counts[0] + counts[1] == 200  # p = 0.75
    state = loader.state_dict()
    nxt = [next(loader).source for _ in range(5)]
    again = build_train_loader(a, tok, store)
    again.load_state_dict(state)
    assert [next(again).source for _ in range(5)] == nxt


def test_stages_with_merge_group(make_dataset, base_config, tmp_path, tok, store):
    d = [make_dataset([2.0, 2.0], name=f"s{i}", seed=i) for i in range(3)]
    a = args_for(base_config, ",".join(map(str, d)), tmp_path, max_steps=[2, 3, 5], num_microbatches=2,
                 full_finetuning=True, lora={"enable": False}, data={"merge_group": [str(d[1]), str(d[2])]})
    loader = build_train_loader(a, tok, store)
    assert [s.name for s in loader.stages][1] == str(d[0]) and loader.stages[0].steps == 8
    assert loader.stages[0].probs == [3 / 8, 5 / 8]
    merged = [next(loader) for _ in range(16)]
    for b in merged:
        assert len(set(b.source)) == 1 and b.source[0] in (1, 2)  # one source per batch
    assert {b.source[0] for b in merged} == {1, 2}
    assert loader.stage == 1
    assert all(next(loader).source == [0, 0] for _ in range(4))


def test_list_max_steps_needs_one_entry_per_source(make_dataset, base_config, tmp_path):
    d1 = make_dataset([2.0], name="one")
    d2 = make_dataset([2.0], name="two")
    ok = args_for(base_config, f"{d1},{d2}", tmp_path, max_steps=[4])  # one-element list: weighted mixing
    assert not ok.uses_stages and ok.total_steps == 4
    with pytest.raises(ValueError, match="max_steps lists 3 stages but data.train_data has 2 sources"):
        args_for(base_config, f"{d1},{d2}", tmp_path, max_steps=[1, 2, 3])
