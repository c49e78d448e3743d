"""The Mimi codes cache: identical to encoding the audio, no Mimi work once filled, invalidation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from finetune.args import TrainArgs
from finetune.data.audio import write_wav
from finetune.data.codes_cache import AudioCodec, CodesStore, read_stereo
from finetune.data.dataset import all_entries, build_eval_loader, build_train_loader, load_sources
from finetune.data.precompute import precompute
from finetune.data.text_tokenizer import SentencePieceTextTokenizer
from tests.helpers.numerics import assert_mimi_codes


@pytest.fixture
def setup(make_dataset, tmp_path, spm_model, base_config):
    manifest = make_dataset([5.0, 3.3, 4.1])
    cfg = base_config(str(manifest), tmp_path / "run", data={"eval_data": str(manifest), "cache_dir": None})
    return TrainArgs.from_dict(cfg), SentencePieceTextTokenizer(spm_model)


def store_for(mimi, cache_dir=None, encoder_id=None):
    return CodesStore(AudioCodec(mimi), cache_dir, encoder_id=encoder_id)


def eval_batches(args, tok, store):
    return [b.codes for b in build_eval_loader(args, tok, store)]



def test_cached_batches_equal_batches_from_audio(setup, tiny_mimi, tmp_path):
    args, tok = setup
    args.eval_duration_sec = 2.0
    straight = eval_batches(args, tok, store_for(tiny_mimi))
    cached_store = store_for(tiny_mimi, tmp_path / "cache")
    first = eval_batches(args, tok, cached_store)
    again = eval_batches(args, tok, store_for(tiny_mimi, tmp_path / "cache"))  # a new run: disk only
    assert len(straight) == len(first) == len(again) > 0
    for a, b, c in zip(straight, first, again):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_chunk_codes_are_whole_file_mimi_codes_sliced(setup, tiny_mimi):
    args, tok = setup
    loader = build_eval_loader(args, tok, store_for(tiny_mimi))  # eval chunks of 30 s: one per file
    entry = loader.sources[0].entries[1]  # 3.3 s: a partial chunk
    wav = torch.from_numpy(read_stereo(entry.path, 24000))[:, None]
    F = -(-wav.shape[-1] // 1920)
    assert F == 42
    codes = next(b for b in loader if 1 in b.chunk)
    row = codes.chunk.index(1)
    sample = codes.codes[row]
    assert sample.shape == (17, 375)
    # The loader encodes the three files in one padded batch; this call encodes one file.
    assert_mimi_codes(tiny_mimi, wav, torch.stack([sample[1:9, :F], sample[9:, :F]]))
    assert (sample[:, F:] == -1).all()  # every row, text included, after the real audio


def test_second_epoch_and_second_run_make_no_mimi_calls(setup, tiny_mimi, tmp_path):
    args, tok = setup
    args.data.cache_dir = str(tmp_path / "cache")
    store = store_for(tiny_mimi, args.data.cache_dir)
    loader = build_train_loader(args, tok, store)
    n_chunks = sum(len(s.chunks) for s in loader.sources)
    per_epoch = -(-n_chunks // args.batch_size)
    for _ in range(per_epoch + 1):
        next(loader)
    calls_epoch1 = store.codec.calls
    assert calls_epoch1 > 0 and store.encoded_files == 3
    for _ in range(2 * per_epoch):
        next(loader)
    assert store.codec.calls == calls_epoch1 and loader.samplers[0].epoch >= 2
    store2 = store_for(tiny_mimi, args.data.cache_dir)
    loader2 = build_train_loader(args, tok, store2)
    for _ in range(per_epoch + 1):
        next(loader2)
    assert store2.codec.calls == 0 and store2.hits_disk == 3 and store2.encoded_files == 0


def test_files_are_batched_into_few_mimi_calls(setup, tiny_mimi):
    args, _ = setup
    sources = load_sources(args.data.train_data, "data.train_data", 2.0)
    store = store_for(tiny_mimi)
    store.get_many(all_entries(sources))
    assert store.codec.calls == 1 and store.encoded_files == 3


def test_long_files_are_encoded_in_streaming_segments_with_same_codes(setup, tiny_mimi):
    args, _ = setup
    entries = all_entries(load_sources(args.data.train_data, "data.train_data", 2.0))
    whole = store_for(tiny_mimi).get_many(entries)
    seg_codec = AudioCodec(tiny_mimi, segment_sec=1.2, batch_sec=2.0)
    segmented = CodesStore(seg_codec).get_many(entries)
    assert seg_codec.calls > 3
    for entry, a, b in zip(entries, whole, segmented):
        assert a.codes.shape == b.codes.shape and a.num_samples == b.num_samples
        # Whole-file and streamed segments run other shapes: both are Mimi's codes up to near ties.
        wav = torch.from_numpy(read_stereo(entry.path, 24000))[:, None]
        assert_mimi_codes(tiny_mimi, wav, a.codes)
        assert_mimi_codes(tiny_mimi, wav, b.codes)


def test_changing_mimi_weights_or_the_file_invalidates(setup, tiny_mimi, tmp_path, synth):
    args, _ = setup
    entries = all_entries(load_sources(args.data.train_data, "data.train_data", 2.0))
    cache = tmp_path / "cache"
    store_for(tiny_mimi, cache).get_many(entries)
    other = copy.deepcopy(tiny_mimi)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    s2 = store_for(other, cache)
    assert s2.entry_dir != store_for(tiny_mimi, cache).entry_dir
    s2.get_many(entries[:1])
    assert s2.encoded_files == 1 and s2.hits_disk == 0
    # rewrite one file with different audio: its hash changes, the others still hit
    write_wav(entries[0].path, synth(5.0, 24000, seed=99), 24000)
    s3 = store_for(tiny_mimi, cache)
    s3.get_many(entries)
    assert s3.encoded_files == 1 and s3.hits_disk == 2


def test_precompute_splits_files_over_ranks_and_fills_cache(setup, tiny_mimi, tmp_path):
    args, tok = setup
    cache = tmp_path / "cache"
    entries = all_entries(load_sources(args.data.train_data, "data.train_data", 2.0))
    r0 = precompute(entries, store_for(tiny_mimi, cache), rank=0, world_size=2, progress=False)
    r1 = precompute(entries, store_for(tiny_mimi, cache), rank=1, world_size=2, progress=False)
    assert (r0["encoded"], r1["encoded"]) == (2, 1)
    again = precompute(entries, store_for(tiny_mimi, cache), progress=False)
    assert again["encoded"] == 0 and again["cached_before"] == 3
    args.data.cache_dir = str(cache)
    store = store_for(tiny_mimi, cache)
    for _ in range(4):
        next(build_train_loader(args, tok, store))
    assert store.codec.calls == 0


def test_resampled_input_is_encoded_at_24k(make_dataset, tiny_mimi):
    manifest = make_dataset([2.0], name="sr16", sr=16000)
    entries = all_entries(load_sources(str(manifest), "data.train_data", 2.0))
    fc = store_for(tiny_mimi).get(entries[0])
    assert fc.num_samples == 48000 and fc.num_frames == 25
    assert np.isfinite(fc.codes.numpy()).all()
