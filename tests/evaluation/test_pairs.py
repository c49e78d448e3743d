"""Paired sets: decisions, ties, per-item numbers against an independent computation, pairing by id."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from finetune.args import EvalArgs
from finetune.evaluation.layout import EvalSetError, read_pair_set
from finetune.evaluation.pairs import score_pairs
from finetune.evaluation.results import totals
from finetune.evaluation.scoring import PROTOCOLS, score_spec
from tests.helpers.models import filled_small_lm

from .conftest import CopyLM, PreferenceLM, pair_items, write_set

CPU = torch.device("cpu")


def run(model, path, coder, settings=None, fcw=1.0, **kw):
    settings = settings or EvalArgs()
    spec = score_spec(model, settings, fcw)
    return score_pairs(model, read_pair_set(path), coder, spec, settings.text_row, CPU, **kw)


@pytest.mark.parametrize("code, expected", [(5, 1.0), (7, 0.0), (None, 0.5)])
def test_preferring_model_scores_all_mirror_none_indifferent_half(tmp_path, coder, code, expected):
    items, extra = pair_items(5, vary_length=False)
    path = write_set(tmp_path / "set", items, extra)
    model = PreferenceLM(5 if code is None else code, strength=0.0 if code is None else 3.0)
    records = run(model, path, coder, pairs_per_batch=2)
    t = totals(records)
    for p in PROTOCOLS:
        assert t[p]["n"] == 5
        assert t[p]["accuracy"] == expected, p
        assert t[p]["ties"] == (5 if code is None else 0), p
    assert [r["item_id"] for r in records] == ["0", "1", "2", "3", "4"]
    # positives were placed on the first or the second item: the labels decide, not the order
    assert [r["file_index"]["positive"] for r in records] == [1, 2, 5, 6, 9]


def test_uniform_model_sum_prefers_the_shorter_item_mean_ties(tmp_path, coder):
    """Sum and per-frame mean disagree on a pair of unequal length: the sum penalises every extra frame."""
    items = {0: [5] * 6, 1: [7] * 8}
    path = write_set(tmp_path / "set", items, [{"file_index": 0, "number": 0}, {"file_index": 1, "number": 1}])
    (rec,) = run(PreferenceLM(5, strength=0.0), path, coder)
    assert rec["standard"]["correct"] == 0.0  # the positive (item 1) is longer
    assert rec["standard_mean"]["correct"] == 0.5
    assert rec["fork"]["correct"] == 0.5
    per_token = -math.log(32)
    # 8 frames x 2 codebooks; the model has no delays, so no position is masked
    assert rec["standard"]["scores"]["positive"] == pytest.approx(16 * per_token)
    assert rec["standard_mean"]["scores"]["positive"] == pytest.approx(2 * per_token)


def _independent_scores(model, codes: torch.Tensor, fcw: float) -> tuple[float, float]:
    """fork and standard of one item from ``model(codes)`` alone: per-token CE over Moshi's codebooks."""
    out = model(codes[None])
    fork_num = fork_den = std = 0.0
    for k in range(model.dep_q):
        for t in range(codes.shape[-1]):
            if not out.mask[0, k, t]:
                continue
            ce = F.cross_entropy(out.logits[0, k, t][None].float(), codes[1 + k, t][None]).item()
            w = fcw if k == 0 else 1.0
            fork_num += w * ce
            fork_den += w
            std -= ce
    return fork_num / fork_den, std


def test_per_item_numbers_equal_an_independent_computation_on_the_small_lm(tmp_path, coder):
    model = filled_small_lm(context=64)
    items = {0: [1, 4, 9, 16, 25, 6, 17], 1: [2, 3, 5, 7, 11, 13, 17, 19, 23], 2: [30, 0, 12, 12, 12], 3: [8] * 4}
    extra = [{"file_index": 1, "number": 1}, {"file_index": 3, "number": 0}]
    path = write_set(tmp_path / "set", items, extra)
    records = run(model, path, coder, fcw=100.0, pairs_per_batch=2)
    for rec in records:
        for side in ("positive", "negative"):
            n = rec["file_index"][side]
            codes = coder.codes([read_pair_set(path).files.items[n]], "zero")[0]
            assert codes[1:3].tolist() == [items[n], items[n]]  # the level codec gave the chosen codes
            assert (codes[0] == -1).all()  # text row fed as zero tokens
            fork, std = _independent_scores(model, codes, 100.0)
            # padded batch vs single item: same math, different shapes; float32 sums of <= 20 terms of CE ~ 3.5
            assert rec["fork"]["scores"][side] == pytest.approx(fork, rel=1e-5, abs=1e-5)
            assert rec["standard"]["scores"][side] == pytest.approx(std, rel=1e-5, abs=1e-4)
            assert rec["standard_mean"]["scores"][side] == pytest.approx(std / len(items[n]), rel=1e-5, abs=1e-5)


def test_shared_prefix_cancels_under_the_summed_log_likelihood(tmp_path, coder):
    """Items equal up to frame P: the sum's difference is the difference over frames >= P - max_delay."""
    model = filled_small_lm(context=64)
    prefix = [3, 14, 15, 9, 26, 5, 3, 5]
    a, b = prefix + [8, 9, 7, 9], prefix + [20, 21, 22, 23]
    path = write_set(tmp_path / "set", {0: a, 1: b}, [{"file_index": 1, "number": 1}])
    (rec,) = run(model, path, coder)
    files = read_pair_set(path).files
    codes = torch.stack([coder.codes([files.items[n]], "zero")[0] for n in (0, 1)])
    out = model(codes)
    ll = -F.cross_entropy(out.logits.flatten(0, 2).float(), codes[:, 1:3].flatten().clamp(min=0),
                          reduction="none").view(2, 2, -1)
    ll = torch.where(out.mask, ll, torch.zeros_like(ll))
    P = len(prefix) - model.max_delay  # acoustic logits at frame t see the semantic code of frame t + 1
    torch.testing.assert_close(ll[0, :, :P], ll[1, :, :P], rtol=0, atol=1e-5)
    suffix_diff = (ll[1, :, P:].sum() - ll[0, :, P:].sum()).item()
    got = rec["standard"]["scores"]["positive"] - rec["standard"]["scores"]["negative"]
    assert got == pytest.approx(suffix_diff, abs=1e-4)


def test_pairing_is_stable_over_repeated_runs_and_an_undecodable_file(tmp_path, coder):
    items, extra = pair_items(6)
    path = write_set(tmp_path / "set", items, extra)
    model = CopyLM()
    first = run(model, path, coder, pairs_per_batch=4)
    assert run(model, path, coder, pairs_per_batch=4) == first
    (path / "data_stereo" / "5.wav").write_bytes(b"RIFF not a wave file")
    coder.store.clear_memory()
    broken = run(model, path, coder, pairs_per_batch=4)
    assert [r["item_id"] for r in broken] == [r["item_id"] for r in first]
    assert broken[2]["error"] is not None and "5.wav" in broken[2]["error"]
    assert "fork" not in broken[2]
    for i in (0, 1, 3, 4, 5):
        assert broken[i] == first[i]
    assert totals(broken)["fork"]["n"] == 5


def test_an_item_longer_than_the_context_is_refused_by_name(tmp_path, coder):
    items, extra = pair_items(2)
    items[3] = [5] * 30
    path = write_set(tmp_path / "set", items, extra)
    coder.max_frames = 20
    records = run(CopyLM(), path, coder)
    assert records[0]["error"] is None
    assert "3.wav" in records[1]["error"] and "attention context of 20 frames" in records[1]["error"]


def test_breakdown_by_side_map_groups(tmp_path, coder):
    items, extra = pair_items(4)
    side = [{"file_index": n, "frequency": [0, 0, 3, 3, 50, 50, 200, 200][n], "voice": "v1"} for n in range(8)]
    path = write_set(tmp_path / "set", items, extra, side_map=side)
    records = run(PreferenceLM(5), path, coder)
    assert [r["groups"]["frequency_band"] for r in records] == ["oov", "1-5", "21-100", ">100"]
    from finetune.evaluation.results import breakdown

    b = breakdown(records)
    assert b["in_vocab"]["false"]["fork"]["n"] == 1 and b["in_vocab"]["true"]["fork"]["n"] == 3


def test_layout_errors_name_the_file(tmp_path):
    items, extra = pair_items(2)
    bad = [dict(x) for x in extra]
    bad[1]["number"] = bad[0]["number"]
    path = write_set(tmp_path / "same", items, bad)
    with pytest.raises(EvalSetError, match=r"extra.txt:2: the labels of pair 0 .* do not differ"):
        read_pair_set(path)
    del items[3]
    path = write_set(tmp_path / "orphan", items, extra[:3])
    with pytest.raises(EvalSetError, match=r"pair 1 \(2.wav\) has no partner"):
        read_pair_set(path)
    path = write_set(tmp_path / "dangling", {0: [1], 1: [2]}, [{"file_index": 0, "number": 1},
                                                                {"file_index": 9, "number": 0}])
    with pytest.raises(EvalSetError, match=r"extra.txt:2: file_index 9 has no audio file"):
        read_pair_set(path)


def test_stray_files_do_not_shift_pairs(tmp_path, coder):
    items, extra = pair_items(3)
    path = write_set(tmp_path / "set", items, extra)
    before = [(p.item_id, p.positive, p.negative) for p in read_pair_set(path).pairs]
    (path / "zz_other.jsonl").write_text(json.dumps({"path": "data_stereo/0.wav", "duration": 0.5}) + "\n")
    (path / "a_notes.txt").write_text("{\"file_index\": 0, \"number\": 0}\n")
    assert [(p.item_id, p.positive, p.negative) for p in read_pair_set(path).pairs] == before


@pytest.mark.slow
def test_two_ranks_score_every_pair_once_and_gather_them_in_id_order(tmp_path, coder):
    import os
    import socket
    import subprocess
    import sys

    from finetune.evaluation.benchmarks import BenchmarkSet, run_set
    from tests.helpers.tiny_run import REPO

    items, extra = pair_items(5)
    path = write_set(tmp_path / "set", items, extra)
    (path / "data_stereo" / "8.wav").write_bytes(b"not audio")  # pair 4: rank 0's second batch has nothing to score
    settings = EvalArgs(pairs_per_batch=2)
    model = CopyLM()
    bset = BenchmarkSet("swuggy", "slm", path, read_pair_set(path))
    single = run_set(model, bset, coder, score_spec(model, settings, 1.0), settings, CPU)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "two.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(port), "-m", "tests.evaluation.shard_run", str(path), str(out)], cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2
    assert got["forwards"] == 2  # rank 0: batches (0, 2) and (4); the second forward runs on a placeholder
    assert got["result"]["items"] == single["items"]
    assert got["result"]["totals"] == single["totals"]
