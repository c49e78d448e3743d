"""Mimi codes of whole files: encoded once, in batches, kept in memory and (optionally) on disk.

Each audio file is encoded **whole**, once (both channels as a batch of two mono
signals, several files per Mimi call, long files in streaming segments), and chunks are
cut in code space (chunk at offset o starts at frame 12.5*o), so no epoch pays for Mimi
again and the training device is not stalled by one small encoder call per chunk.
Consequence, on purpose: the first frames of a chunk are encoded with Mimi's context of
the audio before it, as in streaming inference, not from silence.
The cache is transparent: training with or without `data.cache_dir` gives the same codes
(both go through `AudioCodec.encode_stereo`); without it, codes are kept in memory only.

Disk entries: `<cache_dir>/mimi-<weights hash>-q<codebooks>/<h[:2]>/<h>.safetensors`,
`h` = sha256 of the audio file's bytes. A content hash (rather than path+mtime) survives
moves/copies of the dataset and can never serve stale codes for an edited file; its cost,
reading every file once per run, is avoided by memoising the hash per (path, size,
mtime_ns) in `<cache_dir>/hashes/` (a file edited in place keeping both size and mtime
would be missed - not something tools do). Entries are written atomically, so ranks or
parallel `precompute` jobs can fill the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from finetune.data.audio import AudioReadError, read_audio, resample
from finetune.data.manifest import ManifestEntry
from moshi.utils.atomic import atomic_save_safetensors, atomic_write_json

logger = logging.getLogger(__name__)


class AudioEncoder(Protocol):
    """What the pipeline needs from Mimi (`moshi.models.compression.MimiModel`)."""

    sample_rate: int
    frame_rate: float
    frame_size: int
    num_codebooks: int

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...  # [B, 1, L] float -> [B, n, T] int


@dataclass
class FileCodes:
    codes: torch.Tensor  # [2, n_q, F] integer (int16 in memory), channel 0 = model, 1 = user
    num_samples: int  # real samples at the codec rate; F = ceil(num_samples / frame_size)

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[-1])

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size()


def read_stereo(path: str | os.PathLike, sample_rate: int, start_sec: float = 0.0,
                duration_sec: float | None = None, where: str | None = None) -> np.ndarray:
    """Reads `[2, n]` float32 audio at `sample_rate`; anything but 2 channels is an error.

    Left (0) = the model's voice, right (1) = the user. Mono recordings need one
    channel per speaker first (diarize and split); more channels are ambiguous.
    """
    wav, sr = read_audio(path, start_sec=start_sec, duration_sec=duration_sec)
    if wav.shape[0] != 2:
        raise AudioReadError(
            f"{path}{f' ({where})' if where else ''}: expected stereo audio (left = model, right = user), "
            f"got {wav.shape[0]} channel(s)"
        )
    if sr != sample_rate:
        wav = resample(torch.from_numpy(wav), sr, sample_rate).numpy()
    return wav


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes): changes with the weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _memo_file(cache_dir: Path, path: Path) -> Path:
    return cache_dir / "hashes" / f"{hashlib.sha1(str(path).encode()).hexdigest()}.json"


def memoised_hash(cache_dir: str | os.PathLike, path: Path, st: os.stat_result | None = None) -> str | None:
    """The content hash the cache recorded for `path` at its current size and mtime, else None (no reading)."""
    st = st if st is not None else path.stat()
    try:
        m = json.loads(_memo_file(Path(cache_dir), path).read_text())
        if m.get("size") == st.st_size and m.get("mtime_ns") == st.st_mtime_ns:
            return str(m["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


def cached_duration(cache_dir: str | os.PathLike, content_hash: str) -> float | None:
    """Seconds of audio behind a cache entry of any Mimi version, from its header only; None if none.

    An entry exists only for a file that was decoded as stereo and encoded, so a file whose hash
    has one need not be read again to be known good.
    """
    for entry_dir in _entry_dirs(Path(cache_dir)):
        entry = entry_dir / content_hash[:2] / f"{content_hash}.safetensors"
        try:
            meta = _safetensors_metadata(entry)
            return int(meta["num_samples"]) / int(meta["sample_rate"])
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):  # unreadable: re-encoded later; read the audio instead
            continue
    return None


def _entry_dirs(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("mimi-*-q*"))


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file: its 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 1 << 24:
            raise ValueError(f"{path}: implausible safetensors header of {n} bytes")
        return json.loads(f.read(n)).get("__metadata__") or {}


class AudioCodec:
    """Batched Mimi encoding of stereo waves, counting the Mimi calls.

    Args:
        encoder (AudioEncoder): Mimi, in eval mode, on `device`.
        device (torch.device | str | None): where to run (default: the encoder's parameters' device).
        segment_sec (float): long audio is fed in streaming segments of this length (when the
            encoder has `streaming`), bounding memory; the result does not depend on it.
        batch_sec (float): audio seconds per Mimi call (files are grouped up to this).
    """

    def __init__(self, encoder: Any, device: torch.device | str | None = None, segment_sec: float = 10.0,
                 batch_sec: float = 600.0):
        self.encoder = encoder
        if device is None:
            p = next(iter(encoder.parameters()), None) if hasattr(encoder, "parameters") else None
            device = p.device if p is not None else "cpu"
        self.device = torch.device(device)
        self.sample_rate = int(encoder.sample_rate)
        self.frame_size = int(encoder.frame_size)
        self.frame_rate = float(encoder.frame_rate)
        self.num_codebooks = int(encoder.num_codebooks)
        self.segment = max(1, round(segment_sec * self.frame_rate)) * self.frame_size
        self.batch_samples = max(self.segment, int(batch_sec * self.sample_rate))
        self.calls = 0  # Mimi `encode` invocations (tests and benchmarks read it)

    def frames_for(self, num_samples: int) -> int:
        return -(-num_samples // self.frame_size)

    @torch.no_grad()
    def _encode_batch(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 1, L]` (L a multiple of frame_size) -> `[B, n_q, L / frame_size]` int64."""
        streaming = getattr(self.encoder, "streaming", None)
        if streaming is None or x.shape[-1] <= self.segment:
            self.calls += 1
            return self.encoder.encode(x).long()
        out = []
        with streaming(x.shape[0]):
            for s in range(0, x.shape[-1], self.segment):
                self.calls += 1
                out.append(self.encoder.encode(x[..., s : s + self.segment]).long())
        return torch.cat(out, dim=-1)

    def encode_stereo(self, waves: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Encodes `[2, n_i]` waves (at the codec rate); returns `[2, n_q, ceil(n_i / frame_size)]` int16 CPU.

        Waves are grouped into Mimi calls of about `batch_sec` seconds, each padded with
        zeros to its longest item; Mimi is causal, so padding after a wave does not change
        its codes.
        """
        results: list[torch.Tensor | None] = [None] * len(waves)
        group: list[int] = []
        group_len = 0

        def flush() -> None:
            if not group:
                return
            frames = [self.frames_for(waves[i].shape[-1]) for i in group]
            L = max(frames) * self.frame_size
            x = torch.zeros(2 * len(group), 1, L, dtype=torch.float32)
            for j, i in enumerate(group):
                w = torch.from_numpy(np.ascontiguousarray(waves[i], dtype=np.float32))
                x[2 * j : 2 * j + 2, 0, : w.shape[-1]] = w
            codes = self._encode_batch(x.to(self.device)).cpu()
            for j, i in enumerate(group):
                results[i] = codes[2 * j : 2 * j + 2, :, : frames[j]].to(torch.int16).clone()
            group.clear()

        for i, w in enumerate(waves):
            if w.ndim != 2 or w.shape[0] != 2:
                raise ValueError(f"encode_stereo expects [2, n] waves, got shape {tuple(w.shape)}")
            n = self.frames_for(w.shape[-1]) * self.frame_size
            if group and (len(group) + 1) * max(group_len, n) > self.batch_samples:
                flush()
                group_len = 0
            group.append(i)
            group_len = max(group_len, n)
        flush()
        return results  # type: ignore[return-value]


class CodesStore:
    """Codes of whole files: memory (LRU), then disk cache, then Mimi (batched over the missing files).

    Args:
        codec (AudioCodec): the encoder.
        cache_dir (str | None): disk cache folder; None = memory only.
        encoder_id (str | None): identifies the Mimi weights in cache keys (default: a hash of
            the encoder's state dict).
        memory_bytes (int): budget of the in-memory LRU of file codes (int16: 400 bytes per
            second of stereo audio, so 1 GiB holds ~700 hours).
    """

    def __init__(self, codec: AudioCodec, cache_dir: str | os.PathLike | None = None,
                 encoder_id: str | None = None, memory_bytes: int = 1 << 30):
        self.codec = codec
        self.memory_bytes = memory_bytes
        self._mem: OrderedDict[str, FileCodes] = OrderedDict()
        self._mem_used = 0
        self._hash_memo: dict[str, str] = {}
        self.hits_memory = 0
        self.hits_disk = 0
        self.encoded_files = 0
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.entry_dir: Path | None = None
        if self.cache_dir is not None:
            if encoder_id is None:
                if not isinstance(codec.encoder, torch.nn.Module):
                    raise ValueError("encoder_id is required for a disk cache when the encoder is not a torch Module")
                encoder_id = module_fingerprint(codec.encoder)
            self.entry_dir = self.cache_dir / f"mimi-{encoder_id[:16]}-q{codec.num_codebooks}"

    # -- keys ----------------------------------------------------------------------

    def content_hash(self, path: Path) -> str:
        """sha256 of the file, memoised per (path, size, mtime_ns) in the process and on disk."""
        st = path.stat()
        memo_key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        h = self._hash_memo.get(memo_key)
        if h is not None:
            return h
        h = memoised_hash(self.cache_dir, path, st) if self.cache_dir is not None else None
        if h is None:
            h = sha256_file(path)
            if self.cache_dir is not None:
                atomic_write_json(_memo_file(self.cache_dir, path), {"path": str(path), "size": st.st_size,
                                                                     "mtime_ns": st.st_mtime_ns, "sha256": h})
        self._hash_memo[memo_key] = h
        return h

    def entry_path(self, path: Path) -> Path:
        if self.entry_dir is None:
            raise RuntimeError("entry_path needs a disk cache (data.cache_dir is not set)")
        h = self.content_hash(path)
        return self.entry_dir / h[:2] / f"{h}.safetensors"

    # -- lookup --------------------------------------------------------------------

    def _remember(self, key: str, fc: FileCodes) -> None:
        if key in self._mem:
            return
        self._mem[key] = fc
        self._mem_used += fc.nbytes
        while self._mem_used > self.memory_bytes and len(self._mem) > 1:
            _, old = self._mem.popitem(last=False)
            self._mem_used -= old.nbytes

    def _load_entry(self, path: Path) -> FileCodes | None:
        from safetensors import safe_open

        entry = self.entry_path(path)
        if not entry.is_file():
            return None
        try:
            with safe_open(str(entry), framework="pt") as f:
                codes = f.get_tensor("codes")
                meta = f.metadata() or {}
            num_samples = int(meta["num_samples"])
        except Exception as e:  # a corrupt entry is re-encoded, not fatal
            logger.warning("codes cache entry %s is unreadable (%s); re-encoding %s", entry, e, path)
            return None
        if codes.dim() != 3 or codes.shape[:2] != (2, self.codec.num_codebooks):
            logger.warning("codes cache entry %s has shape %s; re-encoding", entry, tuple(codes.shape))
            return None
        return FileCodes(codes, num_samples)

    def _save_entry(self, path: Path, fc: FileCodes) -> None:
        atomic_save_safetensors(
            self.entry_path(path), {"codes": fc.codes},
            metadata={"num_samples": str(fc.num_samples), "sample_rate": str(self.codec.sample_rate),
                      "source": str(path)},
        )

    def clear_memory(self) -> None:
        """Drops the in-memory codes (the disk cache stays)."""
        self._mem.clear()
        self._mem_used = 0

    def is_cached(self, entry: ManifestEntry) -> bool:
        return str(entry.path) in self._mem or (self.entry_dir is not None and self.entry_path(entry.path).is_file())

    def get_many(self, entries: Sequence[ManifestEntry]) -> list[FileCodes]:
        """Codes of each entry's file; the missing ones are encoded together."""
        out: list[FileCodes | None] = [None] * len(entries)
        missing: dict[str, list[int]] = {}
        for i, e in enumerate(entries):
            key = str(e.path)
            if key in self._mem:
                self._mem.move_to_end(key)
                out[i] = self._mem[key]
                self.hits_memory += 1
                continue
            if key in missing:
                missing[key].append(i)
                continue
            if not e.path.is_file():
                raise AudioReadError(f"audio file not found: {e.path} ({e.where})")
            fc = self._load_entry(e.path) if self.entry_dir is not None else None
            if fc is not None:
                self.hits_disk += 1
                self._remember(key, fc)
                out[i] = fc
            else:
                missing[key] = [i]
        if missing:
            firsts = [idx[0] for idx in missing.values()]
            waves = [read_stereo(entries[i].path, self.codec.sample_rate, where=entries[i].where) for i in firsts]
            codes = self.codec.encode_stereo(waves)
            for (key, idx), w, c in zip(missing.items(), waves, codes):
                fc = FileCodes(c, int(w.shape[-1]))
                self.encoded_files += 1
                if self.entry_dir is not None:
                    self._save_entry(entries[idx[0]].path, fc)
                self._remember(key, fc)
                for i in idx:
                    out[i] = fc
        return out  # type: ignore[return-value]

    def get(self, entry: ManifestEntry) -> FileCodes:
        return self.get_many([entry])[0]
