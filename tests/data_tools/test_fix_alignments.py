"""scripts/fix_alignments.py on hand-made timings and synthetic audio (silence, then a tone)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_tools.synth import SR, make_stereo, tone, words, write_manifest_lines

from finetune.data.alignments import MAIN_SPEAKER, AlignedWord, load_alignments, write_alignments
from tests.helpers.scripts import load_script

fa = load_script("fix_alignments")
OPTS = fa.FixOptions()


def levels_for(left, right=None, duration=4.0):
    wav = np.stack([tone(duration, left, 220.0, noise=1e-4), tone(duration, right or [], 330.0, noise=1e-4, seed=1)])
    return fa.ChannelLevels.from_audio(wav, SR, OPTS)


def test_speech_onset_finds_first_loud_frame_inside_the_window():
    lv = levels_for([(1.5, 2.5)])
    assert fa.speech_onset(lv.db[0], lv.frame_sec, 0.3, 2.0, lv.threshold_db[0]) == pytest.approx(1.5, abs=0.011)
    assert fa.speech_onset(lv.db[0], lv.frame_sec, 0.3, 1.2, lv.threshold_db[0]) is None  # all silence
    assert fa.speech_onset(lv.db[0], lv.frame_sec, 1.8, 2.2, lv.threshold_db[0]) == 1.8  # already speaking


def test_early_first_word_moves_to_the_onset_and_correct_words_stay():
    # Speech on the left from 1.5 s; whisper put "hello" over the silence from 0.3 s.
    lv = levels_for([(1.5, 2.0), (2.1, 2.9)], right=[(0.2, 1.0)])
    ws = words(("hello", 0.3, 2.0), ("world", 2.1, 2.9)) + words(("hi", 0.2, 1.0), speaker="SPEAKER_OTHER")
    fixed, shifts = fa.fix_words(ws, OPTS, lv)
    by_text = {w.text: w for w in fixed}
    assert by_text["hello"].start == pytest.approx(1.5 - OPTS.pre_roll_sec, abs=0.011)
    assert by_text["hello"].end == 2.0
    assert by_text["world"] == ws[1] and by_text["hi"] == ws[2]
    assert [(s.text, s.reason) for s in shifts] == [("hello", "onset")]
    assert [w.start for w in fixed] == sorted(w.start for w in fixed)


def test_other_speaker_words_use_the_right_channel():
    # Left is loud from 0.5 s, right only from 1.5 s: the user's word must move to 1.5.
    lv = levels_for([(0.5, 3.0)], right=[(1.5, 2.0)])
    (w,), (s,) = fa.fix_words(words(("yes", 0.6, 2.0), speaker="SPEAKER_OTHER"), OPTS, lv)
    assert w.start == pytest.approx(1.5 - OPTS.pre_roll_sec, abs=0.011) and s.reason == "onset"


def test_short_leading_silence_is_left_alone():
    lv = levels_for([(1.05, 2.0)])
    (w,), shifts = fa.fix_words(words(("ok", 1.0, 1.5)), OPTS, lv)
    assert w.start == 1.0 and shifts == []


def test_duration_clamp_without_audio():
    # "hi" may last 0.5 + 0.2 * 2 = 0.9 s; 3 s is implausible, the end is kept.
    ws = words(("hi", 1.0, 4.0), ("wonderful", 4.1, 5.0))
    fixed, shifts = fa.fix_words(ws, OPTS)
    assert fixed[0] == AlignedWord("hi", pytest.approx(3.1), 4.0, MAIN_SPEAKER)
    assert fixed[1] == ws[1]
    assert [(s.index, s.reason, round(s.seconds, 6)) for s in shifts] == [(0, "duration", 2.1)]


def test_moved_words_are_resorted_and_stay_inside_their_span():
    # An overlapping long word whose start moves past the next word's start.
    ws = words(("a", 0.0, 3.0), ("b", 1.0, 1.2))
    fixed, _ = fa.fix_words(ws, OPTS)
    assert [w.text for w in fixed] == ["b", "a"]
    for old, new in [(ws[0], fixed[1]), (ws[1], fixed[0])]:
        assert old.start <= new.start <= new.end == old.end


def test_cli_in_place_keeps_backup_extra_keys_and_writes_report(tmp_path):
    wav = make_stereo(tmp_path / "d" / "c.wav", duration=3.0, left=((1.2, 2.8),), right=((0.1, 0.9),))
    original = words(("good", 0.2, 2.0), ("bye", 2.1, 2.8)) + words(("hey", 0.1, 0.9), speaker="SPEAKER_OTHER")
    write_alignments(wav.with_suffix(".json"), original, extra={"text_conditions": {"x": "y"}})
    untouched = make_stereo(tmp_path / "d" / "u.wav", duration=2.0, left=((0.5, 1.5),))
    write_alignments(untouched.with_suffix(".json"), words(("fine", 0.5, 1.0)))
    manifest = write_manifest_lines(tmp_path / "m.jsonl", [{"path": "d/c.wav", "duration": 3.0},
                                                           {"path": "d/u.wav", "duration": 2.0}])
    report = tmp_path / "report"
    assert fa.main([str(manifest), "--audio", "--report-dir", str(report), "--no-progress"]) == 0

    fixed = load_alignments(wav.with_suffix(".json"), duration=3.0, allow_unsorted=False)
    assert fixed[1].start == pytest.approx(1.2 - OPTS.pre_roll_sec, abs=0.011)  # "good" moved
    assert [w.text for w in fixed] == ["hey", "good", "bye"]
    assert json.loads(wav.with_suffix(".json").read_text())["text_conditions"] == {"x": "y"}
    assert load_alignments(wav.with_suffix(".json.bak")) == sorted(original, key=lambda w: w.start)
    assert not untouched.with_suffix(".json.bak").exists()  # unchanged files are not rewritten

    summary = json.loads((report / "fix_alignments_summary.json").read_text())
    assert (summary["files"], summary["files_changed"], summary["words"], summary["words_moved"]) == (2, 1, 4, 1)
    assert summary["moved_by"] == {"onset": 1}
    assert summary["shift_sec"]["max"] == pytest.approx(1.2 - OPTS.pre_roll_sec - 0.2, abs=0.011)
    assert (report / "fix_alignments_shifts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run finds nothing left to move and keeps the original backup.
    assert fa.main([str(manifest), "--audio", "--report-dir", str(report), "--no-progress"]) == 0
    assert json.loads((report / "fix_alignments_summary.json").read_text())["words_moved"] == 0
    assert load_alignments(wav.with_suffix(".json.bak")) == sorted(original, key=lambda w: w.start)


def test_cli_out_dir_mirrors_tree_and_leaves_inputs(tmp_path):
    src = tmp_path / "src"
    for sub in ("a", "b"):
        write_alignments(src / sub / "x.json", words(("so", 0.0, 2.0)))
    before = (src / "a" / "x.json").read_text()
    out = tmp_path / "out"
    assert fa.main([str(src), "--out", str(out), "--no-progress"]) == 0
    assert (src / "a" / "x.json").read_text() == before
    for sub in ("a", "b"):
        (w,) = load_alignments(out / sub / "x.json")
        assert (w.start, w.end) == (pytest.approx(2.0 - 0.9), 2.0)
    assert (out / "fix_alignments_summary.json").exists()


def test_cli_reports_invalid_files_with_nonzero_exit(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    write_alignments(tmp_path / "ok.json", words(("fine", 0.1, 0.4)))
    assert fa.main([str(tmp_path), "--dry-run", "--report-dir", str(tmp_path / "r"), "--no-progress"]) == 1
    summary = json.loads((tmp_path / "r" / "fix_alignments_summary.json").read_text())
    assert len(summary["errors"]) == 1 and "bad.json: not valid JSON" in summary["errors"][0]
    with pytest.raises(ValueError, match="expected a manifest"):
        fa.main([str(tmp_path / "ok.txt")])
