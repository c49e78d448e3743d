"""A Python chat client that speaks as Kyutai's clients do, and an in-process server for the tests."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import sphn
from aiohttp import web

from moshi.models.model_loading import LoadedModel
from moshi.server import protocol
from moshi.server.app import make_app
from moshi.server.cli import build_frame_loop

SAMPLE_RATE = 24000
FRAME = 1920


def split_pages(data: bytes) -> list[bytes]:
    """Cuts an Ogg byte stream into its pages (27-byte header, segment table, body)."""
    pages = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] != b"OggS":
            raise ValueError(f"no Ogg page at byte {pos}")
        n_segments = data[pos + 26]
        body = sum(data[pos + 27 : pos + 27 + n_segments])
        end = pos + 27 + n_segments + body
        pages.append(data[pos:end])
        pos = end
    return pages


def ogg_pages(pcm: np.ndarray) -> list[bytes]:
    """``pcm`` (24 kHz float32, whole frames) as the pages of one Ogg Opus stream, headers first."""
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    data = b"".join(writer.append_pcm(pcm[i : i + FRAME]) for i in range(0, len(pcm) - FRAME + 1, FRAME))
    return split_pages(data)


def speech(seconds: float) -> np.ndarray:
    """Speech from espeak-ng when installed (resampled to 24 kHz, padded to whole frames), else a chirp."""
    n = int(seconds * SAMPLE_RATE) // FRAME * FRAME
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "speech.wav"
            subprocess.run(["espeak-ng", "-w", str(path), "hello there, how are you today? tell me a story."],
                           check=True, capture_output=True)
            pcm, sr = sphn.read(str(path))
        pcm = sphn.resample(pcm[0], src_sample_rate=sr, dst_sample_rate=SAMPLE_RATE)
        pcm = np.asarray(pcm, dtype=np.float32)[:n]
        return np.pad(pcm, (0, n - len(pcm)))
    t = np.arange(n) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t / seconds) * t)).astype(np.float32)


@dataclass
class Reply:
    kinds: list[int] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)  # decoded chunks, one per audio message
    text: list[str] = field(default_factory=list)
    error: str | None = None
    closed: bool = False

    def pcm(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)


class Client:
    """One WebSocket conversation; :meth:`reader` collects everything the server sends."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.reply = Reply()
        self._decoder = sphn.OpusStreamReader(SAMPLE_RATE)
        self.got_audio = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            kind, payload = msg.data[0], msg.data[1:]
            self.reply.kinds.append(kind)
            if kind == protocol.Kind.AUDIO:
                self.reply.audio.append(np.asarray(self._decoder.append_bytes(payload), np.float32))
                self.got_audio.set()
            elif kind == protocol.Kind.TEXT:
                self.reply.text.append(payload.decode("utf-8"))
            elif kind == protocol.Kind.ERROR:
                self.reply.error = payload.decode("utf-8")
        self.reply.closed = True

    async def send_pages(self, pages: list[bytes], grouping: list[int], pace_s: float = 0.0) -> None:
        """Sends ``pages`` as audio messages of ``grouping[i % len]`` pages each, ``pace_s`` apart."""
        i = g = 0
        while i < len(pages):
            n = grouping[g % len(grouping)]
            await self.ws.send_bytes(protocol.audio(b"".join(pages[i : i + n])))
            i += n
            g += 1
            if pace_s:
                await asyncio.sleep(pace_s)

    async def finish(self, timeout: float = 10.0) -> Reply:
        await self.ws.close()
        await asyncio.wait_for(self._task, timeout)
        return self.reply

    async def wait_closed(self, timeout: float = 10.0) -> Reply:
        await asyncio.wait_for(self._task, timeout)
        return self.reply


@contextlib.asynccontextmanager
async def serve(loaded: LoadedModel, max_sessions: int = 2, max_backlog_ms: float = 2000.0,
                static_dir=None, **app_kwargs) -> AsyncIterator[tuple[str, object]]:
    """Runs the server on a free localhost port; yields ``(base_url, frame_loop)``."""
    frame_loop, defaults = build_frame_loop(loaded, max_sessions, max_backlog_ms)
    kwargs = {} if static_dir is None else {"static_dir": static_dir}
    app = make_app(frame_loop, defaults, **kwargs, **app_kwargs)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    task = asyncio.ensure_future(frame_loop.run())
    try:
        yield f"http://127.0.0.1:{port}", frame_loop
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
        frame_loop.close()


async def connect(session: aiohttp.ClientSession, base: str, query: str = "") -> Client:
    ws = await session.ws_connect(f"{base.replace('http', 'ws', 1)}/api/chat{query}")
    return Client(ws)
