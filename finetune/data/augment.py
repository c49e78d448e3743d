"""Data augmentation (`data.aug`, see `finetune.args.AugArgs` for the keys).

Decisions for a sample come from one numpy generator seeded with (seed, rank, sample
index), drawn in a fixed order, so a run and its resumed continuation augment the same
samples the same way. Wave effects run on float32 `[2, n]` audio at Mimi's rate before
encoding; code effects run on the `[1 + 2 n_q, T]` int64 sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from finetune.args import AugArgs
from finetune.data.audio import resample

_RATE_QUANTUM = 100  # speed/pitch factors are rounded so that resampling rates share a gcd >= 100


def sample_rng(seed: int, rank: int, sample_index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(rank), int(sample_index), 0xA06])


@dataclass
class WavePlan:
    """The wave effects drawn for one sample (None = effect off)."""

    channels: tuple[int, ...]
    speed: float | None = None
    pitch_semitones: float | None = None
    gain_db: float | None = None
    echo: tuple[float, float] | None = None  # (delay_sec, decay)
    noise_snr_db: float | None = None
    noise_seed: int = 0

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.speed, self.pitch_semitones, self.gain_db, self.echo,
                                           self.noise_snr_db))

    def read_factor(self) -> float:
        """The chunk reads `duration * factor` seconds so that it is `duration` long after the speed change."""
        return self.speed if self.speed is not None else 1.0


def _uniform(rng: np.random.Generator, lo_hi: list[float]) -> float:
    lo, hi = lo_hi
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def draw_wave_plan(aug: AugArgs, rng: np.random.Generator) -> WavePlan:
    """Draws every wave effect (always the same number of draws, whatever is enabled)."""
    channels = (1,) if aug.channels == "user" else (0, 1)
    u = rng.random(5)
    plan = WavePlan(channels=channels, noise_seed=int(rng.integers(1 << 31)))
    vals = [_uniform(rng, r) for r in (aug.speed_factor, aug.pitch_semitones, aug.gain_db, aug.echo_delay_sec,
                                       aug.echo_decay, aug.noise_snr_db)]
    if u[0] < aug.speed_prob:
        plan.speed = _quantize(vals[0])
    if u[1] < aug.pitch_prob:
        plan.pitch_semitones = vals[1]
    if u[2] < aug.gain_prob:
        plan.gain_db = vals[2]
    if u[3] < aug.echo_prob:
        plan.echo = (vals[3], vals[4])
    if u[4] < aug.noise_prob:
        plan.noise_snr_db = vals[5]
    return plan


def _quantize(factor: float, sample_rate: int = 24000) -> float:
    return round(sample_rate * factor / _RATE_QUANTUM) * _RATE_QUANTUM / sample_rate


def _change_rate(x: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    """Plays `x` `factor` times faster (shorter, higher): `len / factor` samples."""
    sr_in = round(sample_rate * factor / _RATE_QUANTUM) * _RATE_QUANTUM
    if sr_in == sample_rate:
        return x
    return resample(torch.from_numpy(np.ascontiguousarray(x)), sr_in, sample_rate).numpy()


def _stretch(x: np.ndarray, n_out: int, win: int = 1024, tol: int = 256) -> np.ndarray:
    """WSOLA time stretch of a 1-D signal to `n_out` samples (pitch kept).

    Each output frame takes the input frame near its nominal position that best continues
    the previous one (cross-correlation within `tol` samples), so periodic sounds keep
    their phase and no beating appears at the hop rate.
    """
    n_in = x.shape[-1]
    if n_in == n_out or n_in < win + 2 * tol or n_out < win:
        out = np.zeros(n_out, dtype=np.float32)
        out[: min(n_in, n_out)] = x[: min(n_in, n_out)]
        return out
    hs = win // 2
    ratio = (n_in - win - tol) / max(1, n_out - win)
    w = np.hanning(win).astype(np.float32)
    out = np.zeros(n_out + win, dtype=np.float32)
    norm = np.zeros(n_out + win, dtype=np.float32)
    prev = 0
    for k in range(0, n_out - win + hs, hs):
        nominal = int(round(k * ratio))
        if k == 0:
            a = 0
        else:
            template = x[prev + hs : prev + hs + win]
            lo, hi = max(0, nominal - tol), min(n_in - win, nominal + tol)
            region = x[lo : hi + win]
            a = lo + int(np.argmax(np.correlate(region, template, mode="valid"))) if len(template) == win else nominal
        a = min(max(a, 0), n_in - win)
        out[k : k + win] += x[a : a + win] * w
        norm[k : k + win] += w
        prev = a
    norm[norm < 1e-3] = 1.0
    return (out / norm)[:n_out]


def apply_wave_plan(wav: np.ndarray, plan: WavePlan, n_out: int, sample_rate: int) -> np.ndarray:
    """Applies `plan` to the planned channels of `[2, n]` audio; returns `[2, n_out]` float32.

    `wav` holds `n_out * read_factor` samples (or fewer at the end of the file); channels
    without effects are cut to `n_out` unchanged.
    """
    out = np.zeros((2, n_out), dtype=np.float32)
    for c in range(2):
        x = wav[c].astype(np.float32)
        if c in plan.channels:
            if plan.speed is not None:
                x = _change_rate(x, plan.speed, sample_rate)
            if plan.pitch_semitones is not None:
                p = 2.0 ** (plan.pitch_semitones / 12.0)
                n = x.shape[-1]
                x = _stretch(_change_rate(x, p, sample_rate), n)
            if plan.gain_db is not None:
                x = x * np.float32(10.0 ** (plan.gain_db / 20.0))
            if plan.echo is not None:
                delay = int(plan.echo[0] * sample_rate)
                if 0 < delay < x.shape[-1]:
                    y = x.copy()
                    y[delay:] += np.float32(plan.echo[1]) * x[:-delay]
                    x = y
            if plan.noise_snr_db is not None:
                power = float(np.mean(x.astype(np.float64) ** 2)) if x.size else 0.0
                if power > 0:
                    noise_power = power / (10.0 ** (plan.noise_snr_db / 10.0))
                    noise = np.random.default_rng([plan.noise_seed, c]).standard_normal(x.shape[-1])
                    x = x + (math.sqrt(noise_power) * noise).astype(np.float32)
            x = np.clip(x, -1.0, 1.0)
        m = min(n_out, x.shape[-1])
        out[c, :m] = x[:m]
    return out


def augment_codes(codes: np.ndarray, aug: AugArgs, rng: np.random.Generator, num_codebooks: int,
                  pad_id: int, epad_id: int) -> np.ndarray:
    """Code-level effects on one sample `[1 + 2 n_q, T]` (modified in place and returned).

    Rows 1 + n_q ... 1 + 2 n_q - 1 are the user's audio. The text mask picks among the
    frames that hold word tokens (not PAD, EPAD or -1).
    """
    u = rng.random(3)
    shift = int(rng.integers(-aug.shift_max_frames, aug.shift_max_frames + 1)) if aug.shift_max_frames else 0
    T = codes.shape[-1]
    user = slice(1 + num_codebooks, 1 + 2 * num_codebooks)
    if u[0] < aug.shift_prob and shift:
        rows = codes[user].copy()
        codes[user] = -1
        if shift > 0:
            codes[user, shift:] = rows[:, : T - shift]
        else:
            codes[user, : T + shift] = rows[:, -shift:]
    text_frames = np.flatnonzero((codes[0] != pad_id) & (codes[0] != epad_id) & (codes[0] != -1))
    n_text = int(round(aug.text_mask_fraction * len(text_frames)))
    pick_text = rng.permutation(len(text_frames))[:n_text]
    if u[1] < aug.text_mask_prob and n_text:
        codes[0, text_frames[pick_text]] = -1
    n_audio = int(round(aug.audio_mask_fraction * T))
    pick_audio = rng.permutation(T)[:n_audio]
    if u[2] < aug.audio_mask_prob and n_audio:
        codes[user, pick_audio] = -1
    return codes
