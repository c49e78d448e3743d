"""``moshi.client``: a wav file in, the reply wav and transcript out, against the in-process server."""

from __future__ import annotations

import asyncio
import wave

import numpy as np
import pytest

from moshi import client

from .wire import FRAME, serve, speech


def test_client_round_trip(tiny_model):
    pcm = speech(10 * FRAME / 24000)[: 10 * FRAME - 500]  # a partial last frame is padded

    async def run():
        async with serve(tiny_model) as (base, _):
            url = base.replace("http", "ws", 1) + "/api/chat?seed=3"
            return await client.converse(url, client.pad_to_frames(pcm), realtime=False, tail_s=10.0)

    result = asyncio.run(run())
    assert result.handshake and result.error is None
    assert [len(chunk) for chunk in result.audio] == [FRAME] * 9


def test_client_reads_and_writes_files(tmp_path):
    src = tmp_path / "in.wav"
    rate = 16000
    with wave.open(str(src), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.sin(np.arange(rate) / 10) * 8000).astype("<i2").tobytes())
    pcm = client.read_input(src)
    assert len(pcm) == 13 * FRAME  # 1 s at 24 kHz is 12.5 frames: padded to 13
    out = tmp_path / "out.wav"
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="bad.wav: not a readable audio file"):
        client.read_input(tmp_path / "bad.wav")
    client.write_wav(out, np.zeros(FRAME, np.float32))
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnframes(), w.getnchannels()) == (24000, FRAME, 1)
