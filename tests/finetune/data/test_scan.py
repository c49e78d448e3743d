"""The up-front data scan: every bad line found before step 1, all at once, with its manifest line."""

from __future__ import annotations

import json
import logging
import wave

import numpy as np
import pytest

from finetune.args import TrainArgs
from finetune.data import scan as scan_mod
from finetune.data.alignments import AlignedWord, write_alignments
from finetune.data.audio import write_wav
from finetune.data.codes_cache import AudioCodec, CodesStore
from finetune.data.dataset import DataError, all_entries, build_train_loader, load_sources
from finetune.data.scan import ScanOptions, ScanStats, scan_entries


def _write_empty_wav(path):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(b"")


def _broken(make_dataset, synth):
    """Eight lines: 0 and 7 good; 1 mono, 2 empty, 3 unreadable, 4 bad JSON, 5 manifest too short, 6 missing."""
    m = make_dataset([2.0] * 7, manifest_durations=[2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 2.0])
    root = m.parent
    write_wav(root / "a1.wav", synth(2.0, 24000, 1, channels=1), 24000)
    _write_empty_wav(root / "a2.wav")
    (root / "a3.wav").write_bytes(b"RIFF not really a wav file" * 10)
    (root / "a4.json").write_text('{"alignments": [["a", [0.1], "SPEAKER_MAIN"]]}')
    (root / "a6.wav").unlink()
    with open(m, "a") as f:
        f.write(json.dumps({"path": "a0.wav", "duration": 2.0}) + "\n")  # line 8: a duplicate of line 1
    return m


def test_every_bad_line_is_reported_at_once_with_its_line(make_dataset, synth):
    m = _broken(make_dataset, synth)
    entries = all_entries(load_sources(str(m), "data.train_data", 2.0, scan=None))
    problems = scan_entries(entries, ScanOptions())
    by_line = {int(p.where.rsplit(":", 1)[1]): p.message for p in problems}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
    assert "1 channel(s); training needs stereo" in by_line[2]
    assert "a2.wav: empty audio file (0 samples)" in by_line[3]
    assert "cannot read audio file" in by_line[4] and "a3.wav" in by_line[4]
    assert "a4.json: alignment #0 must be [word, [start, end], speaker]" in by_line[5]
    # a manifest shorter than its file is the manifest's mismatch, not "words after the end of the audio"
    assert by_line[6].startswith("the manifest's duration 1.000s does not match") and "2.000s" in by_line[6]
    assert "audio file not found" in by_line[7] and "a6.wav" in by_line[7]


def test_training_refuses_bad_data_before_the_first_batch(make_dataset, synth, base_config, tmp_path, tok, store):
    m = _broken(make_dataset, synth)
    args = TrainArgs.from_dict(base_config(str(m), tmp_path / "run"))
    with pytest.raises(DataError) as info:
        build_train_loader(args, tok, store)
    msg = str(info.value)
    assert "6 problem(s) in 6 manifest line(s)" in msg and "data.skip_bad_files: true" in msg
    for line in (2, 3, 4, 5, 6, 7):
        assert f"{m}:{line}: " in msg
    assert f"{m}:1:" not in msg and f"{m}:8:" not in msg


def test_skip_bad_files_trains_on_the_good_ones_and_logs_the_count(make_dataset, synth, base_config, tmp_path, tok,
                                                                  store, caplog):
    m = _broken(make_dataset, synth)
    args = TrainArgs.from_dict(base_config(str(m), tmp_path / "run", data={"skip_bad_files": True}))
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(args, tok, store)
    src = loader.sources[0]
    assert [e.line for e in src.entries] == [1, 8]
    assert len(src.skipped) == 6
    assert "skipping 6 bad manifest line(s)" in caplog.text
    # duplicates are trained on as written, with a warning naming the lines
    assert f"a0.wav is listed 2 times ({m} lines 1, 8)" in caplog.text
    assert next(loader).codes.shape[0] == 2


def test_files_known_to_the_codes_cache_are_not_read_again(make_dataset, tiny_mimi, tmp_path, monkeypatch):
    m = make_dataset([2.0, 3.0, 2.5])
    cache = tmp_path / "cache"
    entries = all_entries(load_sources(str(m), "data.train_data", 2.0, scan=None))
    CodesStore(AudioCodec(tiny_mimi), cache).get_many(entries)
    scan_mod._MEMO.clear()

    def no_reading(path):
        raise AssertionError(f"the scan read the header of {path}")

    monkeypatch.setattr(scan_mod, "_audio_header", no_reading)
    stats = ScanStats()
    assert scan_entries(entries, ScanOptions(cache_dir=str(cache)), stats) == []
    assert (stats.known_from_cache, stats.audio_headers_read) == (3, 0)
    # the cache still catches a stale manifest duration without opening the audio
    short = [entries[0].__class__(entries[0].path, 1.0, entries[0].manifest, 1)]
    (problem,) = scan_entries(short, ScanOptions(cache_dir=str(cache)))
    assert "the manifest's duration 1.000s does not match" in problem.message


def test_an_edited_file_is_read_again(make_dataset, tiny_mimi, tmp_path, synth):
    m = make_dataset([2.0])
    cache = tmp_path / "cache"
    entries = all_entries(load_sources(str(m), "data.train_data", 2.0, scan=None))
    CodesStore(AudioCodec(tiny_mimi), cache).get_many(entries)
    write_wav(entries[0].path, synth(2.0, 24000, 5, channels=1), 24000)  # now mono: size/mtime change
    stats = ScanStats()
    (problem,) = scan_entries(entries, ScanOptions(cache_dir=str(cache)), stats)
    assert "1 channel(s)" in problem.message and stats.audio_headers_read == 1


def test_words_after_the_end_of_the_file_blame_the_alignment(make_dataset):
    m = make_dataset([2.0, 2.0])
    write_alignments(m.parent / "a1.json", [AlignedWord("late", 9.0, 9.5)])
    entries = all_entries(load_sources(str(m), "data.train_data", 2.0, scan=None))
    (problem,) = scan_entries(entries, ScanOptions())
    assert problem.where.endswith(":2")
    assert "a1.json: word 'late' starts at 9.00s, after the end of the audio (2.00s" in problem.message


def test_duration_tolerance_is_a_config_key(make_dataset, base_config, tmp_path, tok, store):
    m = make_dataset([2.0], manifest_durations=[2.3])
    with pytest.raises(DataError, match="does not match"):
        build_train_loader(TrainArgs.from_dict(base_config(str(m), tmp_path / "r")), tok, store)
    args = TrainArgs.from_dict(base_config(str(m), tmp_path / "r", data={"duration_tolerance_sec": 0.5}))
    assert np.asarray(next(build_train_loader(args, tok, store)).codes).shape[0] == 2
