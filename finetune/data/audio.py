"""Audio I/O for the data pipeline and the data tools: read, resample, write.

Decoding goes through sphn (wav, flac, mp3, ogg, ...). Resampling is our own
zero-delay windowed-sinc filter rather than sphn's FFT resampler, whose output is
delayed by a few milliseconds: word alignments are in seconds from the file start,
so a resampler must not shift the audio against them.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from moshi.utils.atomic import atomic_path


class AudioReadError(ValueError):
    """An audio file is missing, unreadable or of an unexpected shape."""


def read_audio(
    path: str | os.PathLike, start_sec: float = 0.0, duration_sec: float | None = None
) -> tuple[np.ndarray, int]:
    """Reads `[channels, samples]` float32 audio at the file's own sample rate."""
    import sphn

    p = Path(path)
    if not p.exists():
        raise AudioReadError(f"audio file not found: {p}")
    try:
        data, sr = sphn.read(
            str(p), start_sec=start_sec if start_sec > 0 else None, duration_sec=duration_sec
        )
    except Exception as e:  # sphn raises ValueError with the decoder's message
        raise AudioReadError(f"cannot read audio file {p}: {e}") from e
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 1:
        data = data[None]
    return data, int(sr)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds, read from the header where the decoder can."""
    import sphn

    (d,) = sphn.durations([str(path)])
    if d is None:
        raise AudioReadError(f"cannot read audio file {path}")
    return float(d)


@lru_cache(maxsize=16)
def _polyphase_filters(up: int, down: int, zeros: int = 16, rolloff: float = 0.945) -> tuple[torch.Tensor, int]:
    """Hann-windowed sinc low-pass sampled at the `up` output phases.

    Output j sits at input time `tau = j * down / up`; its value is
    `sum_i x[i] * h(tau - i)`. Outputs j = r + q*up share the fractional part of
    tau, so each phase r is a plain strided convolution with taps `W[r]`.
    Returns `(W [up, 2K], K)`, tap k of phase r applying to input `floor(tau) + k - K + 1`.
    """
    fc = 0.5 * min(1.0, up / down) * rolloff  # cycles per input sample
    half_width = zeros / (2 * fc)  # in input samples
    K = math.ceil(half_width)
    r = torch.arange(up, dtype=torch.float64)
    frac = (r * down % up) / up  # fractional input position of phase r
    k = torch.arange(-K + 1, K + 1, dtype=torch.float64)
    tau = frac[:, None] - k[None, :]  # distance from each tap, [up, 2K]
    h = 2 * fc * torch.sinc(2 * fc * tau)
    window = torch.where(tau.abs() < half_width, torch.cos(0.5 * math.pi * tau / half_width) ** 2, 0.0)
    w = h * window
    w = w / w.sum(dim=1, keepdim=True)  # exact unit gain at DC for every phase
    return w, K


def resample(wav: torch.Tensor, sr_in: int, sr_out: int) -> torch.Tensor:
    """Resamples `[..., N]` audio from `sr_in` to `sr_out` with no delay.

    Output length is `floor(N * sr_out / sr_in)`; output sample j sits at time
    j / sr_out, exactly where input sample i sits at i / sr_in (zero padding
    beyond both ends).
    """
    if sr_in == sr_out:
        return wav
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = int(sr_out) // g, int(sr_in) // g
    w, K = _polyphase_filters(up, down)
    dtype = wav.dtype if wav.is_floating_point() else torch.float32
    w = w.to(dtype=dtype, device=wav.device)
    shape = wav.shape
    n_in = shape[-1]
    n_out = (n_in * up) // down
    x = wav.reshape(-1, 1, n_in).to(dtype)
    x = torch.nn.functional.pad(x, (K - 1, K + down))  # input index i lives at i + K - 1
    y = x.new_zeros(x.shape[0], n_out)
    for r in range(min(up, n_out)):
        n_r = (n_out - r + up - 1) // up  # outputs r, r+up, r+2up, ...
        base = (r * down) // up  # floor(tau) of output r; q steps add `down`
        seg = x[..., base : base + (n_r - 1) * down + 2 * K]
        y[:, r::up] = torch.nn.functional.conv1d(seg, w[r][None, None], stride=down)[:, 0, :n_r]
    return y.reshape(*shape[:-1], n_out)


def write_wav(path: str | os.PathLike, wav: np.ndarray | torch.Tensor, sample_rate: int) -> None:
    """Writes `[channels, samples]` (or `[samples]`) float audio as a wav file, atomically."""
    import sphn

    data = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    data = np.ascontiguousarray(data, dtype=np.float32)
    with atomic_path(path) as tmp:
        tmp_wav = tmp.with_suffix(".wav")
        sphn.write_wav(str(tmp_wav), data, sample_rate)
        os.replace(tmp_wav, tmp)


# Floor for energies in dB, so digital silence gives a finite number.
DB_FLOOR = -120.0


def frame_rms_db(wav: np.ndarray, sample_rate: int, frame_sec: float = 0.02) -> np.ndarray:
    """Per-frame RMS level in dBFS of `[channels, samples]` (or `[samples]`) audio.

    The data tools (silence trimming, onset search, dataset checks) judge speech
    vs silence by energy; they all use this one measure. Frames do not overlap;
    a trailing partial frame is kept. Returns `[channels, frames]` (or `[frames]`).
    """
    x = np.asarray(wav, dtype=np.float32)
    squeeze = x.ndim == 1
    x = x[None] if squeeze else x
    hop = max(1, int(round(frame_sec * sample_rate)))
    n_frames = -(-x.shape[-1] // hop)
    padded = np.zeros((x.shape[0], n_frames * hop), dtype=np.float64)
    padded[:, : x.shape[-1]] = x
    sq = (padded**2).reshape(x.shape[0], n_frames, hop)
    # The last frame's mean is over its real samples only.
    counts = np.full(n_frames, hop, dtype=np.float64)
    if n_frames and x.shape[-1] % hop:
        counts[-1] = x.shape[-1] % hop
    rms = np.sqrt(sq.sum(-1) / counts)
    db = 20.0 * np.log10(np.maximum(rms, 10 ** (DB_FLOOR / 20)))
    return db[0] if squeeze else db
