"""`data.aug`: each effect does what it says, only where it says, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.args import AugArgs, TrainArgs
from finetune.data.augment import WavePlan, apply_wave_plan, augment_codes, draw_wave_plan, sample_rng
from finetune.data.codes_cache import AudioCodec, CodesStore, read_stereo
from finetune.data.dataset import all_entries, build_train_loader, load_sources
from finetune.data.text_tokenizer import SentencePieceTextTokenizer
from tests.helpers.numerics import assert_mimi_codes

SR = 24000
NQ = 8


def tone(n: int, freq: float = 220.0) -> np.ndarray:
    t = np.arange(n) / SR
    return np.stack([0.25 * np.sin(2 * np.pi * freq * t), 0.25 * np.sin(2 * np.pi * 1.5 * freq * t)]).astype(np.float32)


def sample(T: int = 50) -> np.ndarray:
    codes = np.arange((1 + 2 * NQ) * T, dtype=np.int64).reshape(1 + 2 * NQ, T) % 50 + 10
    codes[0, ::3] = 3  # PAD frames
    return codes


def test_gain_only_on_user_channel():
    x = tone(SR)
    y = apply_wave_plan(x, WavePlan(channels=(1,), gain_db=-6.0), SR, SR)
    assert np.array_equal(y[0], x[0])
    np.testing.assert_allclose(y[1], x[1] * 10 ** (-6 / 20), rtol=1e-5)


def test_echo_adds_delayed_copy():
    x = np.zeros((2, SR), np.float32)
    x[:, 100] = 0.5
    y = apply_wave_plan(x, WavePlan(channels=(0, 1), echo=(0.01, 0.5)), SR, SR)
    assert y[0, 100] == 0.5 and y[0, 340] == pytest.approx(0.25) and y[1, 340] == pytest.approx(0.25)


def test_noise_at_requested_snr_and_seeded():
    x = tone(SR)
    plan = WavePlan(channels=(1,), noise_snr_db=10.0, noise_seed=7)
    y = apply_wave_plan(x, plan, SR, SR)
    snr = 10 * np.log10(np.mean(x[1] ** 2) / np.mean((y[1] - x[1]) ** 2))
    assert abs(snr - 10.0) < 0.5 and np.array_equal(y, apply_wave_plan(x, plan, SR, SR))


def test_speed_shortens_and_keeps_output_length():
    x = tone(2 * SR)
    y = apply_wave_plan(x, WavePlan(channels=(1,), speed=1.25), SR, SR)
    assert y.shape == (2, SR)
    # a 220*1.5 Hz tone played 1.25x faster: dominant frequency scales by 1.25
    spec = np.abs(np.fft.rfft(y[1, 2000:22000]))
    f = np.argmax(spec) * SR / 20000
    assert abs(f - 1.25 * 330) < 5


def test_pitch_shift_keeps_duration_and_moves_frequency():
    x = tone(SR)
    y = apply_wave_plan(x, WavePlan(channels=(1,), pitch_semitones=12.0), SR, SR)
    spec = np.abs(np.fft.rfft(y[1, 2000:22000]))
    f = np.argmax(spec) * SR / 20000
    assert abs(f - 660) < 10 and np.array_equal(y[0], x[0])


def test_temporal_shift_moves_user_rows_only():
    aug = AugArgs(shift_prob=1.0, shift_max_frames=3)
    c = sample()
    out = augment_codes(c.copy(), aug, sample_rng(0, 0, 1), NQ, 3, 0)
    assert np.array_equal(out[: 1 + NQ], c[: 1 + NQ])
    user = out[1 + NQ :]
    k = next(s for s in range(-3, 4) if s and (
        np.array_equal(user[:, s:], c[1 + NQ :, :-s]) if s > 0 else np.array_equal(user[:, :s], c[1 + NQ :, -s:])))
    assert (user[:, :k] == -1).all() if k > 0 else (user[:, k:] == -1).all()


def test_text_and_audio_masks():
    aug = AugArgs(text_mask_prob=1.0, text_mask_fraction=0.5, audio_mask_prob=1.0, audio_mask_fraction=0.2)
    c = sample()
    out = augment_codes(c.copy(), aug, sample_rng(0, 0, 2), NQ, 3, 0)
    word_frames = np.flatnonzero(c[0] != 3)
    masked = np.flatnonzero(out[0] == -1)
    assert set(masked) <= set(word_frames) and len(masked) == round(0.5 * len(word_frames))
    user_masked = np.flatnonzero((out[1 + NQ :] == -1).all(axis=0))
    assert len(user_masked) == 10 and np.array_equal(out[1 : 1 + NQ], c[1 : 1 + NQ])


def test_plans_reproducible_per_sample_index():
    aug = AugArgs(gain_prob=0.5, noise_prob=0.5, speed_prob=0.5, echo_prob=0.5, pitch_prob=0.5)
    a = [draw_wave_plan(aug, sample_rng(3, 1, i)) for i in range(20)]
    b = [draw_wave_plan(aug, sample_rng(3, 1, i)) for i in range(20)]
    c = [draw_wave_plan(aug, sample_rng(3, 0, i)) for i in range(20)]
    assert a == b and a != c and any(p.active for p in a) and not all(p.active for p in a)


def test_off_by_default_and_wave_aug_bypasses_cache(make_dataset, base_config, tmp_path, spm_model, tiny_mimi):
    m = make_dataset([4.0, 4.0])
    tok = SentencePieceTextTokenizer(spm_model)

    def first_batch(aug):
        cfg = TrainArgs.from_dict(base_config(str(m), tmp_path / "run", data={"shuffle": False, "aug": aug}))
        return next(build_train_loader(cfg, tok, store)).codes

    store = CodesStore(AudioCodec(tiny_mimi))
    ref = first_batch({})
    assert torch.equal(first_batch({"gain_db": [1, 2]}), ref)  # ranges alone do nothing: probabilities are 0
    calls, files = store.codec.calls, store.encoded_files
    out = first_batch({"gain_prob": 1.0, "gain_db": [-12, -12]})
    assert store.codec.calls == calls + 1 and store.encoded_files == files  # chunks encoded alone, not cached
    # chunk 0 starts the file, so encoding it alone sees the same (no) context as the whole-file codes: both
    # are Mimi's codes of the chunk's model channel (up to near ties: the two calls have other lengths)
    entry = all_entries(load_sources(str(m), "data.train_data", 2.0))[0]
    model_voice = torch.from_numpy(read_stereo(entry.path, SR, duration_sec=2.0))[:1, None]
    assert_mimi_codes(tiny_mimi, model_voice, out[0:1, 1 : 1 + 8])
    assert_mimi_codes(tiny_mimi, model_voice, ref[0:1, 1 : 1 + 8])
    assert torch.equal(out[0, 0], ref[0, 0]) and not torch.equal(out[0, 9:], ref[0, 9:])
    assert torch.equal(out[:, 0], ref[:, 0])  # text rows never depend on the audio path
