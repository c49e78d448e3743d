"""scripts/cut_out_user.py (leading-silence trim, alignments shifted) and scripts/shuffle_dataset.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_tools.synth import SR, make_stereo, words, write_manifest_lines

from finetune.data.alignments import MAIN_SPEAKER, load_alignments, write_alignments
from finetune.data.audio import read_audio
from finetune.data.manifest import read_manifest
from tests.helpers.scripts import load_script

cut = load_script("cut_out_user")
shuf = load_script("shuffle_dataset")


def test_leading_cut_uses_the_earliest_channel_or_the_main_one():
    wav = np.zeros((2, SR * 3), np.float32)
    wav[1, int(1.0 * SR):] = 0.2  # user speaks from 1.0 s
    wav[0, int(2.0 * SR):] = 0.2  # model from 2.0 s
    opts = cut.CutOptions(keep_sec=0.2)
    assert cut.leading_cut(wav, SR, opts) == int(0.8 * SR)
    assert cut.leading_cut(wav, SR, cut.CutOptions(keep_sec=0.2, reference="main")) == int(1.8 * SR)
    assert cut.leading_cut(np.zeros((2, SR), np.float32), SR, opts) is None


def test_shift_words_drops_words_before_the_cut():
    ws = words(("early", 0.1, 0.5), ("edge", 0.7, 1.2), ("late", 1.5, 2.0))
    shifted, dropped = cut.shift_words(ws, 0.8)
    assert dropped == 1
    assert [(w.text, w.start, w.end) for w in shifted] == [("edge", 0.0, pytest.approx(0.4)),
                                                          ("late", pytest.approx(0.7), pytest.approx(1.2))]


def test_cut_out_user_writes_trimmed_audio_alignments_and_manifest(tmp_path):
    data = tmp_path / "data"
    a = make_stereo(data / "s" / "a.wav", duration=4.0, left=((2.0, 3.5),), right=((1.5, 2.0),))
    write_alignments(a.with_suffix(".json"), words(("hi", 1.5, 2.0), speaker="SPEAKER_OTHER")
                     + words(("hello", 2.0, 2.6), ("you", 2.7, 3.4)), extra={"text_conditions": {"k": "v"}})
    b = make_stereo(data / "s" / "b.wav", duration=2.0, left=((0.05, 1.0),), right=())
    write_alignments(b.with_suffix(".json"), words(("ok", 0.05, 1.0)))
    manifest = write_manifest_lines(data / "m.jsonl", [{"path": "s/a.wav", "duration": 4.0, "id": 7},
                                                       {"path": "s/b.wav", "duration": 2.0}])
    out = tmp_path / "trimmed"
    assert cut.main([str(manifest), "--out-dir", str(out), "--keep", "0.2", "--no-progress"]) == 0

    entries = read_manifest(out / "m.jsonl")
    assert [e.path for e in entries] == [(out / "s" / "a.wav").resolve(), b.resolve()]  # b: nothing to cut
    assert entries[0].extra == {"id": 7}
    src, _ = read_audio(a)
    new, sr = read_audio(out / "s" / "a.wav")
    n_cut = int(round(1.3 * SR))
    np.testing.assert_allclose(new, src[:, n_cut:], atol=1e-4)  # both channels cut together
    assert entries[0].duration == pytest.approx(new.shape[-1] / sr)
    shifted = load_alignments(out / "s" / "a.json", duration=entries[0].duration)
    assert [(w.text, round(w.start, 6), round(w.end, 6), w.speaker) for w in shifted] == [
        ("hi", 0.2, 0.7, "SPEAKER_OTHER"), ("hello", 0.7, 1.3, MAIN_SPEAKER), ("you", 1.4, 2.1, MAIN_SPEAKER)]
    assert json.loads((out / "s" / "a.json").read_text())["text_conditions"] == {"k": "v"}
    summary = json.loads((out / "cut_out_user_summary.json").read_text())
    assert (summary["trimmed"], summary["unchanged"], summary["seconds_removed"]) == (1, 1, pytest.approx(1.3))
    with pytest.raises(ValueError, match="would overwrite the input manifest"):
        cut.main([str(manifest), "--out-dir", str(data)])


def _manifest(root, n=10):
    return write_manifest_lines(root / "all.jsonl", [{"path": f"audio/{i}.wav", "duration": 1.0 + i, "spk": i}
                                                     for i in range(n)])


def test_shuffle_split_is_seeded_disjoint_and_complete(tmp_path):
    manifest = _manifest(tmp_path / "d")
    out = tmp_path / "elsewhere" / "split"
    assert shuf.main([str(manifest), "--eval-fraction", "0.25", "--seed", "3", "--out-dir", str(out)]) == 0
    train, evals = read_manifest(out / "train.jsonl"), read_manifest(out / "eval.jsonl")
    assert (len(train), len(evals)) == (7, 3)  # 2.5 rounds half up
    orig = {e.path: e for e in read_manifest(manifest)}
    assert sorted(e.path for e in train + evals) == sorted(orig)  # paths still point at the same files
    assert all(e.duration == orig[e.path].duration and e.extra == orig[e.path].extra for e in train + evals)
    expected_train, expected_eval = shuf.shuffle_split(list(read_manifest(manifest)), 3, 3)
    assert [e.path for e in train] == [e.path for e in expected_train]
    assert [e.path for e in evals] == [e.path for e in expected_eval]
    # Same seed, same split; another seed, another order.
    assert shuf.main([str(manifest), "--eval-count", "3", "--seed", "3", "--out-dir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "eval.jsonl").read_text().count("\n") == 3
    assert [e.path for e in read_manifest(tmp_path / "again" / "eval.jsonl")] == [e.path for e in evals]
    other, _ = shuf.shuffle_split(list(range(10)), 0, 4)
    assert other != shuf.shuffle_split(list(range(10)), 0, 3)[0]


def test_eval_size_rules():
    assert shuf.eval_size(10, 0.25, None) == 3
    assert shuf.eval_size(10, 0.24, None) == 2
    assert shuf.eval_size(10, 0.01, None) == 1  # a requested eval set is never empty
    assert shuf.eval_size(10, None, None) == 0
    assert shuf.eval_size(10, None, 4) == 4
    with pytest.raises(ValueError, match="leaves no training data"):
        shuf.eval_size(3, None, 3)
    with pytest.raises(ValueError, match=r"--eval-fraction must be in \[0, 1\), got 1.5"):
        shuf.eval_size(3, 1.5, None)
