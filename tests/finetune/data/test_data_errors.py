"""Bad data gives a clear error (naming file, line or key) or a counted skip; never a hang."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.args import ConfigError, TrainArgs
from finetune.data.alignments import AlignedWord, write_alignments
from finetune.data.audio import AudioReadError
from finetune.data.dataset import DataError, build_eval_loader, build_train_loader
from finetune.data.manifest import ManifestError


@pytest.fixture
def loader_for(base_config, tmp_path, tok, store):
    def make(train_data, **kw):
        args = TrainArgs.from_dict(base_config(str(train_data), tmp_path / "run", **kw))
        return build_train_loader(args, tok, store, rank=kw.pop("_rank", 0), world_size=kw.pop("_world", 1))

    return make


def test_malformed_manifest_line_names_file_and_line(make_dataset, loader_for):
    m = make_dataset([2.0, 2.0], extra_lines=['{"path": "a0.wav", "duration": "long"}'])
    with pytest.raises(ManifestError, match=rf"{m.name}:3: 'duration' must be a number"):
        loader_for(m)


def test_missing_wav_and_missing_json_are_listed_before_training(make_dataset, loader_for):
    m = make_dataset([2.0, 2.0, 2.0])
    (m.parent / "a0.wav").unlink()
    (m.parent / "a2.json").unlink()
    with pytest.raises(DataError) as info:
        loader_for(m)
    msg = str(info.value)
    assert "2 problem(s) in 2 manifest line(s)" in msg and "a0.wav" in msg and "a2.json" in msg
    assert f"{m}:1: audio file not found" in msg and f"{m}:3: alignment file not found" in msg


def test_mono_file_is_refused_with_channel_count(make_dataset, loader_for):
    m = make_dataset([2.0, 2.0], channels=1)
    with pytest.raises(DataError, match=r"1 channel\(s\); training needs stereo \(left = model, right = user\)"):
        loader_for(m)


def test_reading_a_mono_file_names_it(make_dataset, store):
    from finetune.data.manifest import read_manifest

    m = make_dataset([2.0], channels=1)
    with pytest.raises(AudioReadError, match=r"expected stereo audio \(left = model, right = user\), got 1"):
        store.get_many(read_manifest(m))


def test_three_channels_refused(make_dataset, loader_for, synth):
    import wave

    m = make_dataset([2.0, 2.0])
    pcm = (synth(2.0, 24000, 0, channels=3).T * 32767).astype("<i2")  # sphn writes 1-2 channels only
    with wave.open(str(m.parent / "a0.wav"), "wb") as w:
        w.setnchannels(3)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm.tobytes())
    with pytest.raises(DataError, match=rf"{m.name}:1: .*a0.wav: 3 channel\(s\)"):
        loader_for(m)


def test_unreadable_audio_names_the_file(make_dataset, loader_for):
    m = make_dataset([2.0, 2.0])
    (m.parent / "a1.wav").write_bytes(b"RIFF not really a wav file" * 10)
    with pytest.raises(DataError, match=rf"{m.name}:2: cannot read audio file .*a1.wav"):
        loader_for(m)


def test_unsorted_alignments_are_sorted_and_counted(make_dataset, base_config, tmp_path, tok, store):
    m = make_dataset([2.0, 2.0])
    words = [AlignedWord("good", 1.0, 1.2), AlignedWord("hello", 0.2, 0.5)]
    write_alignments(m.parent / "a0.json", words)
    args = TrainArgs.from_dict(base_config(str(m), tmp_path / "run", data={"shuffle": False}))
    loader = build_train_loader(args, tok, store)
    batch = next(loader)
    assert loader.sources[0].unsorted_files == 1
    row = batch.codes[0, 0].tolist()
    hello, good = tok.encode_word("hello"), tok.encode_word("good")
    assert row[2 : 2 + len(hello)] == hello and row[12 : 12 + len(good)] == good


def test_alignment_after_end_of_audio_names_file_and_line(make_dataset, loader_for):
    m = make_dataset([2.0, 2.0])
    write_alignments(m.parent / "a1.json", [AlignedWord("late", 9.0, 9.5)])
    with pytest.raises(DataError, match=rf"{m.name}:2: .*a1.json: word 'late' starts at 9.00s"):
        loader_for(m, data={"shuffle": False})


def test_invalid_alignment_json(make_dataset, loader_for):
    m = make_dataset([2.0])
    (m.parent / "a0.json").write_text(json.dumps({"words": []}))
    with pytest.raises(DataError, match="expected an object with an 'alignments' list"):
        loader_for(m, batch_size=1)


def test_empty_manifest_is_an_error(tmp_path, loader_for):
    m = tmp_path / "empty.jsonl"
    m.write_text("\n")
    with pytest.raises(DataError, match="has no manifest lines"):
        loader_for(m)


def test_empty_shard_detected_up_front(make_dataset, base_config, tmp_path, tok, store):
    m = make_dataset([1.5])  # one chunk
    args = TrainArgs.from_dict(base_config(str(m), tmp_path / "run"))
    with pytest.raises(DataError, match=r"1 chunk\(s\), fewer than the 2 ranks: rank\(s\) 1..1 would get no data"):
        build_train_loader(args, tok, store, rank=0, world_size=2)


def test_eval_set_too_small(make_dataset, base_config, tmp_path, tok, store):
    m = make_dataset([1.0])
    args = TrainArgs.from_dict(base_config(str(m), tmp_path / "run", data={"eval_data": str(m)}, do_eval=True))
    with pytest.raises(DataError, match="not enough for one batch of 2"):
        build_eval_loader(args, tok, store)


def test_manifest_longer_than_audio_gives_all_zero_sample_and_is_counted(make_dataset, loader_for):
    m = make_dataset([2.0], manifest_durations=[5.0])  # accepted only with a tolerance this wide
    loader = loader_for(m, data={"shuffle": False, "duration_tolerance_sec": 5.0}, batch_size=3)
    batch = next(loader)
    assert loader.builder.skipped_empty == 2  # chunks at 2 s and 4 s of a 2 s file
    assert (batch.codes[1] == -1).all() and (batch.codes[2] == -1).all()
    assert not (batch.codes[0] == -1).any()


def test_unknown_config_key_suggests(tmp_path, make_dataset):
    m = make_dataset([2.0])
    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{train_data: '{m}', cache_dri: x}}\nrun_dir: r\nlora: {{enable: true}}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.cache_dri' \(did you mean 'data.cache_dir'\?\)"):
        TrainArgs.load(p)


def test_noise_free_loader_does_not_hang_on_tiny_source(make_dataset, loader_for):
    loader = loader_for(make_dataset([1.0]), batch_size=3)
    b = next(loader)  # one chunk, batch of 3: the epoch wraps within the batch
    assert b.chunk == [0, 0, 0] and np.array_equal(b.codes[0].numpy(), b.codes[1].numpy())
