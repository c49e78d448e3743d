"""annotate.py: runs through the real whisper-timestamped with a tiny random Whisper on synthetic stereo audio."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from data_tools.synth import SR, make_stereo, tone, write_manifest_lines

import annotate
from finetune.data.alignments import MAIN_SPEAKER, load_alignments
from finetune.data.audio import read_audio, resample

FAST = ["--device", "cpu", "--beam_size", "1", "--best_of", "1", "--temperature", "0",
        "--max_tokens", "8", "--vad", "none", "--no-progress", "--local"]


def _dataset(root: Path) -> Path:
    """Two good stereo files, one corrupt file, one tiny file."""
    make_stereo(root / "a" / "one.wav", duration=2.0)
    make_stereo(root / "b" / "two.wav", duration=3.0, left=((1.0, 2.5),))
    (root / "a" / "corrupt.wav").write_bytes(b"\x01" * 4000)
    (root / "a" / "tiny.wav").write_bytes(b"RIFF" + b"\x00" * 60)
    return write_manifest_lines(root / "data.jsonl", [
        {"path": "a/one.wav", "duration": 2.0},
        {"path": "b/two.wav", "duration": 3.0},
        {"path": "a/corrupt.wav", "duration": 1.0},
        {"path": "a/tiny.wav", "duration": 0.1},
    ])


@pytest.mark.parametrize("n,shards", [(0, 3), (1, 4), (10, 1), (10, 3), (17, 5)])
def test_shards_split_files_without_overlap_or_loss(n, shards):
    paths = [f"f{i}.wav" for i in range(n)]
    parts = [annotate.shard_paths(paths, shards, i) for i in range(shards)]
    flat = [p for part in parts for p in part]
    assert sorted(flat) == sorted(paths)
    assert len(flat) == len(set(flat))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_shard_arguments_are_validated():
    with pytest.raises(ValueError, match="--shard-index must be in \\[0, 3\\), got 3"):
        annotate.shard_paths(["a"], 3, 3)
    with pytest.raises(ValueError, match="--shards must be >= 1"):
        annotate.shard_paths(["a"], 0, 0)


def test_widen_segments_pads_without_overlap_and_stays_inside():
    segs = [{"start": 100, "end": 200}, {"start": 260, "end": 400}, {"start": 950, "end": 990}]
    out = annotate.widen_segments(segs, 50, 1000)
    assert [(s["start"], s["end"]) for s in out] == [(50, 250), (250, 450), (900, 1000)]


def test_keep_silence_patch_widens_real_vad_segments_only_inside_the_block():
    wt = importlib.import_module("whisper_timestamped.transcribe")
    original = wt.get_vad_segments
    audio = torch.from_numpy(tone(6.0, [(1.0, 2.0), (4.0, 4.5)], sr=16000))
    kw = dict(method="auditok", output_sample=True, dilatation=0.0, min_silence_duration=0.3)
    plain = wt.get_vad_segments(audio, **kw)
    assert len(plain) == 2
    with annotate.keep_silence_around_vad_segments(0.25):
        assert wt.get_vad_segments is not original
        widened = wt.get_vad_segments(audio, **kw)
    assert wt.get_vad_segments is original
    pad = 4000  # 0.25 s at 16 kHz
    assert [(s["start"], s["end"]) for s in widened] == [
        (max(0, s["start"] - pad), min(len(audio), s["end"] + pad)) for s in plain
    ]


def test_keep_silence_patch_is_restored_after_an_error():
    wt = importlib.import_module("whisper_timestamped.transcribe")
    original = wt.get_vad_segments
    with pytest.raises(RuntimeError, match="boom"), annotate.keep_silence_around_vad_segments(1.0):
        raise RuntimeError("boom")
    assert wt.get_vad_segments is original


def test_words_from_result_clips_to_the_audio_drops_empty_and_sorts():
    result = {"segments": [
        {"text": "b", "words": [{"text": " later", "start": 2.0, "end": 31.0}, {"text": "  ", "start": 2.5, "end": 2.6}]},
        {"text": "", "words": []},
        {"text": "a", "words": [{"text": "first", "start": -0.1, "end": 0.4}]},
    ]}
    out = annotate.words_from_result(result, 3.0, "X")
    assert [(w.text, w.start, w.end, w.speaker) for w in out] == [("first", 0.0, 0.4, "X"), ("later", 2.0, 3.0, "X")]
    with pytest.raises(ValueError, match="malformed word"):
        annotate.words_from_result({"segments": [{"words": [{"text": "x", "start": 1.0}]}]}, 3.0, "X")


def test_annotate_end_to_end_writes_alignments_per_channel(tmp_path, tiny_whisper, monkeypatch):
    manifest = _dataset(tmp_path / "data")
    calls = []
    real = annotate.transcribe_channel

    def spy(model, audio16k, cfg, speaker, source=""):
        calls.append((source, speaker, audio16k.clone()))
        return real(model, audio16k, cfg, speaker, source)

    monkeypatch.setattr(annotate, "transcribe_channel", spy)
    summary_path = tmp_path / "summary.json"
    rc = annotate.main([str(manifest), "--whisper_model", str(tiny_whisper), "--both-channels",
                        "--summary-json", str(summary_path), *FAST])
    assert rc == 1  # the corrupt file failed

    root = tmp_path / "data"
    for name, duration in [("a/one", 2.0), ("b/two", 3.0)]:
        raw = json.loads((root / f"{name}.json").read_text())
        assert set(raw) == {"alignments"}
        for text, (start, end), _speaker in raw["alignments"]:
            assert isinstance(text, str) and text == text.strip() and text
            assert 0.0 <= start <= end <= duration
        words = load_alignments(root / f"{name}.json", duration=duration, allow_unsorted=False)
        assert {w.speaker for w in words} == {MAIN_SPEAKER, "SPEAKER_OTHER"}
        # Each speaker's words came from its own channel, resampled to 16 kHz.
        wav, sr = read_audio(root / f"{name}.wav")
        for ch, speaker in [(0, MAIN_SPEAKER), (1, "SPEAKER_OTHER")]:
            (call,) = [c for c in calls if c[0].startswith(str(root / name)) and c[1] == speaker]
            assert call[0].endswith(f"channel {ch}")
            torch.testing.assert_close(call[2], resample(torch.from_numpy(wav[ch]), sr, 16000))

    err = (root / "a" / "corrupt.json.err").read_text()
    assert err.startswith("AudioReadError(") and "corrupt.wav" in err and "Traceback" in err
    assert not (root / "a" / "corrupt.json").exists()
    assert not (root / "a" / "tiny.json").exists() and not (root / "a" / "tiny.json.err").exists()

    summary = json.loads(summary_path.read_text())
    assert (summary["done"], summary["failed"], summary["skipped"]) == (2, 1, {"too small": 1})
    assert summary["audio_sec"] == pytest.approx(5.0)
    assert summary["skipped_files"] == [[str(root / "a" / "tiny.wav"), "too small (64 bytes < 1000)"]]


def test_rerun_skips_done_files_and_retries_errors_on_request(tmp_path, tiny_whisper, capsys):
    manifest = _dataset(tmp_path / "data")
    root = tmp_path / "data"
    args = [str(manifest), "--whisper_model", str(tiny_whisper), *FAST]
    assert annotate.main(args) == 1
    done_mtime = (root / "a" / "one.json").stat().st_mtime_ns
    capsys.readouterr()

    # Second pass: nothing to do, nothing failed in this pass.
    assert annotate.main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("annotate: 0 done, 4 skipped (2 already done, 1 failed before, 1 too small), 0 failed")
    assert (root / "a" / "one.json").stat().st_mtime_ns == done_mtime

    # The broken file is repaired; --rerun_errors annotates it and removes the marker.
    make_stereo(root / "a" / "corrupt.wav", duration=1.5)
    assert annotate.main(args + ["--rerun_errors"]) == 0
    assert "1 done" in capsys.readouterr().out
    assert not (root / "a" / "corrupt.json.err").exists()
    words = load_alignments(root / "a" / "corrupt.json", duration=1.5)
    assert all(w.speaker == MAIN_SPEAKER for w in words)


def test_slurm_path_through_submitit_debug_cluster_covers_every_shard(tmp_path, tiny_whisper, capsys):
    root = tmp_path / "data"
    for i in range(3):
        make_stereo(root / f"c{i}.wav", duration=1.0 + 0.5 * i)
    manifest = write_manifest_lines(root / "data.jsonl", [{"path": f"c{i}.wav", "duration": 1.0} for i in range(3)])
    fast = [a for a in FAST if a != "--local"]
    rc = annotate.main([str(manifest), "--whisper_model", str(tiny_whisper), "-S", "2", "--cluster", "debug",
                        "--log_folder", str(tmp_path / "logs"), *fast])
    assert rc == 0
    assert "annotate: 3 done, 0 skipped, 0 failed" in capsys.readouterr().out
    assert all((root / f"c{i}.json").exists() for i in range(3))


def test_bad_options_fail_before_any_work(tmp_path):
    manifest = write_manifest_lines(tmp_path / "m.jsonl", [{"path": "x.wav"}])
    with pytest.raises(ValueError, match="--keep_silence_in_segments must be >= 0 seconds, got -1.0"):
        annotate.main([str(manifest), "--local", "--keep_silence_in_segments", "-1"])
    with pytest.raises(ValueError, match="--workers is for local runs"):
        annotate.main([str(manifest), "--workers", "2", "--device", "cpu"])
    with pytest.raises(ValueError, match="--device gpu0: Invalid device string"):
        annotate.main([str(manifest), "--local", "--device", "gpu0"])
    # The option is seconds, not a bool: "0" turns it off.
    args = annotate.build_parser().parse_args([str(manifest), "--keep_silence_in_segments", "0"])
    assert annotate.config_from_args(args).keep_silence_in_segments == 0.0


def test_mono_file_with_both_channels_fails_with_a_reason(tmp_path, tiny_whisper):
    from finetune.data.audio import write_wav

    write_wav(tmp_path / "mono.wav", tone(1.0, [(0.1, 0.9)])[None], SR)
    manifest = write_manifest_lines(tmp_path / "m.jsonl", [{"path": "mono.wav", "duration": 1.0}])
    assert annotate.main([str(manifest), "--whisper_model", str(tiny_whisper), "--both-channels", *FAST]) == 1
    assert "has 1 channel(s); --both-channels needs stereo" in (tmp_path / "mono.json.err").read_text()


def test_long_files_go_through_the_vad_with_the_scoped_padding(tmp_path, tiny_whisper, monkeypatch):
    wt = importlib.import_module("whisper_timestamped.transcribe")
    seen = []
    original = wt.get_vad_segments

    def counting(audio, *args, **kwargs):
        segments = original(audio, *args, **kwargs)
        seen.append([(s["start"], s["end"]) for s in segments])
        return segments

    monkeypatch.setattr(wt, "get_vad_segments", counting)
    make_stereo(tmp_path / "long.wav", duration=4.0, left=((1.0, 2.0), (3.0, 3.5)))
    manifest = write_manifest_lines(tmp_path / "m.jsonl", [{"path": "long.wav", "duration": 4.0}])
    fast = [a for a in FAST if a not in ("--vad", "none")]
    rc = annotate.main([str(manifest), "--whisper_model", str(tiny_whisper), "--vad", "auditok",
                        "--vad_min_duration", "1", "--keep_silence_in_segments", "0.25", *fast])
    assert rc == 0
    assert len(seen) == 1 and seen[0]  # the VAD ran once, on the left channel
    assert wt.get_vad_segments is counting  # the padding wrapper was removed afterwards
    assert all(0 <= w.start <= w.end <= 4.0 for w in load_alignments(tmp_path / "long.json", duration=4.0))
