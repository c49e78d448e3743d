"""Atomic writes, manifest parsing, alignment loading and the resampler."""

import json
import math

import pytest
import torch

from finetune.data.alignments import (
    AlignedWord,
    AlignmentError,
    alignment_path_for,
    load_alignments,
    write_alignments,
)
from finetune.data.audio import AudioReadError, read_audio, resample, write_wav
from finetune.data.manifest import ManifestError, read_manifest, write_manifest
from moshi.utils.atomic import atomic_dir, atomic_save_safetensors, atomic_write_json, atomic_write_text


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("moshi.utils.atomic._fsync_file", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "half")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_dir(d):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(d, overwrite=True) as tmp:
            (tmp / "x").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (d / "x").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    t = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.ones(2, dtype=torch.bfloat16)}
    atomic_save_safetensors(tmp_path / "w.safetensors", t)
    back = load_file(tmp_path / "w.safetensors")
    assert torch.equal(back["a"], t["a"]) and back["b"].dtype == torch.bfloat16


def test_manifest_resolves_relative_paths_against_its_folder(tmp_path):
    sub = tmp_path / "data"
    sub.mkdir()
    (sub / "m.jsonl").write_text('{"path": "a.wav", "duration": 1.5}\n\n{"path": "/abs/b.wav", "duration": 2}\n')
    entries = read_manifest(sub / "m.jsonl")
    assert [str(e.path) for e in entries] == [str(sub.resolve() / "a.wav"), "/abs/b.wav"]
    assert [e.line for e in entries] == [1, 3]
    assert entries[1].duration == 2.0


@pytest.mark.parametrize(
    "line,message",
    [
        pytest.param("{not json", "not valid JSON", id="bad-json"),
        pytest.param('{"duration": 1}', "missing or empty 'path'", id="no-path"),
        pytest.param('{"path": "a.wav", "duration": -1}', "'duration' must be > 0", id="negative"),
        pytest.param('{"path": "a.wav", "duration": "x"}', "'duration' must be a number", id="string"),
        pytest.param("[1, 2]", "expected a JSON object", id="list"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, line, message):
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "ok.wav", "duration": 1}\n' + line + "\n")
    with pytest.raises(ManifestError, match=rf"m\.jsonl:2: .*{message}"):
        read_manifest(m)


def test_write_manifest_round_trips(tmp_path):
    (tmp_path / "x").mkdir()
    n = write_manifest(tmp_path / "out.jsonl", [(tmp_path / "x" / "a.wav", 3.25)])
    assert n == 1
    assert json.loads((tmp_path / "out.jsonl").read_text()) == {"path": "x/a.wav", "duration": 3.25}
    assert read_manifest(tmp_path / "out.jsonl")[0].path == (tmp_path / "x" / "a.wav").resolve()


def test_alignments_sorted_on_load_and_round_trip(tmp_path):
    p = tmp_path / "a.json"
    write_alignments(p, [AlignedWord("b", 1.0, 1.5), AlignedWord("a", 0.2, 0.4, "SPEAKER_OTHER")])
    words = load_alignments(p, duration=2.0)
    assert [w.text for w in words] == ["a", "b"]
    assert words[0].speaker == "SPEAKER_OTHER"
    with pytest.raises(AlignmentError, match="not sorted"):
        load_alignments(p, allow_unsorted=False)
    assert alignment_path_for(tmp_path / "x.y.wav") == tmp_path / "x.y.json"


@pytest.mark.parametrize(
    "content,message",
    [
        pytest.param("{", "not valid JSON", id="json"),
        pytest.param('{"words": []}', "'alignments' list", id="no-key"),
        pytest.param('{"alignments": [["a", [1.0], "S"]]}', "alignment #0 must be", id="shape"),
        pytest.param('{"alignments": [["a", [2.0, 1.0], "S"]]}', "invalid times", id="end-before-start"),
        pytest.param('{"alignments": [["a", [9.0, 9.5], "S"]]}', "after the end of the audio", id="outside"),
    ],
)
def test_alignment_errors_name_the_file(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(AlignmentError, match=message) as e:
        load_alignments(p, duration=3.0)
    assert "bad.json" in str(e.value)


@pytest.mark.parametrize("sr_in,sr_out", [(48000, 24000), (16000, 24000), (44100, 24000), (24000, 16000)])
def test_resample_keeps_phase_and_length(sr_in, sr_out):
    n = sr_in  # one second
    t = torch.arange(n, dtype=torch.float64) / sr_in
    x = torch.stack([torch.sin(2 * math.pi * 440 * t), 0.5 * torch.sin(2 * math.pi * 97 * t)]).float()
    y = resample(x, sr_in, sr_out)
    assert y.shape == (2, n * sr_out // sr_in)
    t2 = torch.arange(y.shape[-1], dtype=torch.float64) / sr_out
    ref = torch.stack([torch.sin(2 * math.pi * 440 * t2), 0.5 * torch.sin(2 * math.pi * 97 * t2)])
    inner = slice(300, -300)  # away from the zero-padded ends
    assert (y[:, inner] - ref[:, inner]).abs().max() < 2e-4


def test_wav_round_trip_and_read_errors(tmp_path):
    x = (torch.rand(2, 2400) - 0.5) * 0.5
    write_wav(tmp_path / "s.wav", x, 24000)
    data, sr = read_audio(tmp_path / "s.wav")
    assert sr == 24000 and data.shape == (2, 2400)
    assert abs(data - x.numpy()).max() < 1e-3
    with pytest.raises(AudioReadError, match="not found"):
        read_audio(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"junk" * 500)
    with pytest.raises(AudioReadError, match="junk.wav"):
        read_audio(tmp_path / "junk.wav")
