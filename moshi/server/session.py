"""One conversation: its Opus streams, its queue of 80 ms input frames and its outgoing messages."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping

import numpy as np
import sphn

from . import protocol
from .engine import SamplingSettings

logger = logging.getLogger(__name__)

# The Opus reader decodes into a fixed buffer of a few seconds, so a long message is fed to it in slices
# small enough to decode well under that even at Opus's highest bitrate.
_READER_SLICE_BYTES = 4096


def settings_from_query(query: Mapping[str, str], defaults: SamplingSettings) -> SamplingSettings:
    """Sampling settings from a client's query parameters over ``defaults``.

    Accepted: ``text_temperature``, ``text_topk``, ``audio_temperature``, ``audio_topk``, and ``seed`` for both
    RNG streams or ``text_seed`` / ``audio_seed`` for one. Other parameters are ignored.

    Raises:
        ValueError: a value is not a number, a temperature is negative, a top-k or seed below its minimum.
    """

    def number(name: str, kind: type, default, minimum):
        raw = query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"query parameter {name}={raw!r} is not a {kind.__name__}") from None
        if value < minimum:
            raise ValueError(f"query parameter {name}={raw!r} must be >= {minimum}")
        return value

    seed = number("seed", int, None, 0)
    return SamplingSettings(
        temp=number("audio_temperature", float, defaults.temp, 0.0),
        top_k=number("audio_topk", int, defaults.top_k, 1),
        temp_text=number("text_temperature", float, defaults.temp_text, 0.0),
        top_k_text=number("text_topk", int, defaults.top_k_text, 1),
        audio_seed=number("audio_seed", int, defaults.audio_seed if seed is None else seed, 0),
        text_seed=number("text_seed", int, defaults.text_seed if seed is None else seed, 0),
    )


class Session:
    """State of one connected client, driven by the WebSocket handler (input) and the frame loop (output).

    Args:
        slot (int): batch item of the generator serving it.
        settings (SamplingSettings): its sampling.
        sample_rate (int), frame_size (int): 24000 and 1920 for Mimi.
        max_backlog (int): most input frames kept waiting; older ones are dropped (the latency bound).
        max_outbox (int): most messages waiting to be sent before the client counts as not reading.
    """

    def __init__(
        self,
        slot: int,
        settings: SamplingSettings,
        sample_rate: int,
        frame_size: int,
        max_backlog: int,
        max_outbox: int = 500,
        on_frame: Callable[[], None] | None = None,
    ) -> None:
        self.slot = slot
        self.settings = settings
        self.frame_size = frame_size
        self.max_backlog = max_backlog
        self.max_outbox = max_outbox
        self.on_frame = on_frame
        self.reader = sphn.OpusStreamReader(sample_rate)
        self.writer = sphn.OpusStreamWriter(sample_rate)
        self._pending = np.zeros(0, dtype=np.float32)
        self.frames: deque[np.ndarray] = deque()
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.open = True
        self.failure: str | None = None  # why the server ended it, if it did
        self.frames_in = 0
        self.frames_out = 0
        self.dropped = 0
        self.on_failure: Callable[[str], None] | None = None

    def feed(self, ogg: bytes) -> int:
        """Decodes Ogg Opus bytes (any page grouping) into queued frames; returns how many old frames it dropped.

        Raises:
            protocol.ProtocolError: the bytes are not a valid Ogg Opus stream.
        """
        decoded = []
        for start in range(0, len(ogg), _READER_SLICE_BYTES):
            try:
                pcm = self.reader.append_bytes(ogg[start : start + _READER_SLICE_BYTES])
            except Exception as exc:  # sphn reports every stream error as a plain exception
                raise protocol.ProtocolError(f"invalid Ogg Opus audio: {exc}") from exc
            if len(pcm):
                decoded.append(np.asarray(pcm, dtype=np.float32).reshape(-1))
        if not decoded:
            return 0
        pending = np.concatenate([self._pending, *decoded])
        whole = len(pending) // self.frame_size * self.frame_size
        for start in range(0, whole, self.frame_size):
            self.frames.append(pending[start : start + self.frame_size])
        self._pending = pending[whole:]
        dropped = 0
        while len(self.frames) > self.max_backlog:
            self.frames.popleft()
            dropped += 1
        if dropped:
            if self.dropped == 0:
                logger.warning(
                    "session in slot %d: input backlog above %d frames, dropping the oldest (first drop)",
                    self.slot, self.max_backlog,
                )
            self.dropped += dropped
        if whole and self.on_frame is not None:
            self.on_frame()
        return dropped

    def next_frame(self) -> np.ndarray | None:
        if not self.frames:
            return None
        self.frames_in += 1
        return self.frames.popleft()

    def emit(self, pcm: np.ndarray, piece: str | None) -> None:
        """Queues one output frame (Ogg Opus audio, then its text piece if any)."""
        if not self.open:
            return
        ogg = self.writer.append_pcm(np.ascontiguousarray(pcm, dtype=np.float32))
        self.frames_out += 1
        if ogg:
            self.send(protocol.audio(ogg))
        if piece:
            self.send(protocol.text(piece))

    def send(self, message: bytes) -> None:
        if self.outbox.qsize() >= self.max_outbox:
            self.fail(f"client is not reading: more than {self.max_outbox} messages waiting")
            return
        self.outbox.put_nowait(message)

    def fail(self, reason: str) -> None:
        """Marks the session as ended by the server (the handler closes the socket)."""
        if self.failure is None:
            self.failure = reason
            if self.on_failure is not None:
                self.on_failure(reason)

    def close(self) -> None:
        self.open = False
        self.outbox.put_nowait(None)
