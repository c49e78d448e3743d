"""A terminal client for the chat server that talks from a wav file: ``python -m moshi.client --input in.wav``.

It speaks as Kyutai's terminal client does (80 ms blocks through one Opus stream, two Ogg pages per message,
sent in real time), and writes the model's reply as a wav (``--output``) and its text pieces (``--transcript``).
Kyutai's ``--host``, ``--port``, ``--https`` and ``--url`` flags keep their meaning. The input is read with
sphn and resampled to 24 kHz; its trailing partial frame is padded with silence.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import wave
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import sphn

from .server import protocol
from .utils.atomic import atomic_write_bytes, atomic_write_text

SAMPLE_RATE = 24000
FRAME = 1920


@dataclass
class Conversation:
    """What the server sent: the reply audio (one chunk per audio message), text pieces, an error if any."""

    audio: list[np.ndarray] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    error: str | None = None
    handshake: bool = False

    def pcm(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)


def read_input(path: str | Path) -> np.ndarray:
    """Channel 0 of an audio file at 24 kHz, padded to whole 80 ms frames.

    Raises:
        ValueError: the file cannot be read as audio (the message names it).
    """
    try:
        pcm, rate = sphn.read(str(path))
    except Exception as exc:  # sphn reports unreadable files as plain exceptions
        raise ValueError(f"{path}: not a readable audio file ({exc})") from exc
    mono = np.asarray(pcm[0], dtype=np.float32)
    if rate != SAMPLE_RATE:
        mono = np.asarray(sphn.resample(mono, src_sample_rate=rate, dst_sample_rate=SAMPLE_RATE), np.float32)
    return pad_to_frames(mono)


def pad_to_frames(pcm: np.ndarray) -> np.ndarray:
    """``pcm`` with silence appended up to a whole number of 80 ms frames."""
    return np.pad(np.asarray(pcm, dtype=np.float32), (0, -len(pcm) % FRAME))


async def converse(url: str, pcm: np.ndarray, realtime: bool = True, tail_s: float = 2.0) -> Conversation:
    """Sends ``pcm`` (24 kHz, whole frames) to the chat WebSocket at ``url`` and collects the reply, until
    every frame's reply came or no audio arrived for ``tail_s`` seconds."""
    result = Conversation()
    decoder = sphn.OpusStreamReader(SAMPLE_RATE)
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:

        async def receive() -> None:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY or not message.data:
                    continue
                kind, payload = message.data[0], message.data[1:]
                if kind == protocol.Kind.HANDSHAKE:
                    result.handshake = True
                elif kind == protocol.Kind.AUDIO:
                    result.audio.append(np.asarray(decoder.append_bytes(payload), np.float32))
                elif kind == protocol.Kind.TEXT:
                    result.text.append(payload.decode("utf-8", errors="replace"))
                elif kind == protocol.Kind.ERROR:
                    result.error = payload.decode("utf-8", errors="replace")

        reader = asyncio.ensure_future(receive())
        encoder = sphn.OpusStreamWriter(SAMPLE_RATE)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, offset in enumerate(range(0, len(pcm), FRAME)):
            if reader.done():
                break  # the server closed the connection
            ogg = encoder.append_pcm(pcm[offset : offset + FRAME])
            if ogg:
                await ws.send_bytes(protocol.audio(ogg))
            if realtime:
                await asyncio.sleep(max(0.0, start + (i + 1) * FRAME / SAMPLE_RATE - loop.time()))
        # The reply lags one frame: wait for it, or until the server stays quiet for tail_s.
        sent_frames = len(pcm) // FRAME
        last = (len(result.audio), loop.time())
        while not reader.done() and len(result.audio) < sent_frames - 1:
            await asyncio.sleep(0.02)
            if len(result.audio) != last[0]:
                last = (len(result.audio), loop.time())
            elif loop.time() - last[1] > tail_s:
                break
        await ws.close()
        await reader
    return result


def write_wav(path: str | Path, pcm: np.ndarray) -> None:
    """Writes 24 kHz mono float audio as a 16-bit wav, atomically."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes())
    atomic_write_bytes(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moshi.client", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--https", action="store_true", help="wss instead of ws")
    p.add_argument("--url", default=None, help="base URL of the server (overrides --host/--port/--https)")
    p.add_argument("--query", default="", help="sampling settings, e.g. 'seed=1&text_temperature=0.7'")
    p.add_argument("--input", required=True, help="audio file to say (any rate; channel 0)")
    p.add_argument("--output", default=None, help="wav file for the model's reply")
    p.add_argument("--transcript", default=None, help="text file for the model's text pieces")
    p.add_argument("--fast", action="store_true", help="send as fast as possible instead of in real time; the server keeps only its latest --max-backlog-ms of unprocessed input, so faster than real time most of a long file is dropped")
    args = p.parse_args(argv)
    base = args.url or f"{'https' if args.https else 'http'}://{args.host}:{args.port}"
    url = base.rstrip("/").replace("http", "ws", 1) + "/api/chat" + (f"?{args.query}" if args.query else "")
    try:
        pcm = read_input(args.input)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    result = asyncio.run(converse(url, pcm, realtime=not args.fast))
    if result.error:
        raise SystemExit(f"server: {result.error}")
    reply = result.pcm()
    print(f"sent {len(pcm) / SAMPLE_RATE:.2f} s, received {len(reply) / SAMPLE_RATE:.2f} s of audio and "
          f"{len(result.text)} text pieces: {''.join(result.text)!r}")
    if args.output:
        write_wav(args.output, reply)
    if args.transcript:
        atomic_write_text(args.transcript, "".join(result.text))


if __name__ == "__main__":
    main()
