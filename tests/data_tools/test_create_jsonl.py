"""scripts/create_jsonl.py: recursive, sorted, durations that match the files, unreadable files reported."""

from __future__ import annotations

import json
import shutil

import pytest
from data_tools.synth import make_stereo

from finetune.data.audio import read_audio
from finetune.data.manifest import read_manifest
from tests.helpers.scripts import load_script

cj = load_script("create_jsonl")


def _tree(root):
    make_stereo(root / "b" / "z.wav", duration=1.25)
    make_stereo(root / "a" / "deep" / "y.wav", duration=2.0, sr=16000)
    make_stereo(root / "a" / "x.WAV", duration=0.75)
    shutil.copy(root / "a" / "x.WAV", root / "c.flac")  # wav bytes under another name: decoded by content
    (root / "broken.wav").write_bytes(b"\x02" * 2000)
    (root / "notes.txt").write_text("not audio")


def test_manifest_is_sorted_relative_and_durations_match_the_files(tmp_path, capsys):
    _tree(tmp_path / "data")
    out = tmp_path / "data" / "train.jsonl"
    assert cj.main([str(tmp_path / "data"), "-o", str(out), "--no-progress"]) == 0
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in raw] == ["a/deep/y.wav", "a/x.WAV", "b/z.wav"]  # broken.wav left out
    for entry in read_manifest(out):
        wav, sr = read_audio(entry.path)
        assert entry.duration == pytest.approx(wav.shape[-1] / sr, abs=1e-6)
    assert "3 of 4 files written" in capsys.readouterr().out


def test_unreadable_files_fail_with_strict_and_extensions_select(tmp_path):
    _tree(tmp_path / "data")
    out = tmp_path / "m.jsonl"
    assert cj.main([str(tmp_path / "data"), "-o", str(out), "--strict", "--no-progress"]) == 1
    n, bad = cj.build_manifest(tmp_path / "data", out, cj.parse_extensions("flac, .WAV"), progress=False)
    assert n == 4 and [p.name for p in bad] == ["broken.wav"]
    lines = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert lines == ["data/a/deep/y.wav", "data/a/x.WAV", "data/b/z.wav", "data/c.flac"]


def test_empty_folder_and_bad_options_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no wav file under"):
        cj.main([str(tmp_path / "empty"), "-o", str(tmp_path / "m.jsonl")])
    with pytest.raises(NotADirectoryError, match="not a folder"):
        cj.main([str(tmp_path / "nope"), "-o", str(tmp_path / "m.jsonl")])
    with pytest.raises(ValueError, match="--ext: no extension"):
        cj.parse_extensions(" , ")
