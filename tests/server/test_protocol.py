"""The chat WebSocket spoken as Kyutai's clients speak it, against the tiny demo model served in-process."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from moshi.server import protocol
from moshi.server.engine import SamplingSettings
from moshi.server.session import settings_from_query

from .wire import FRAME, connect, ogg_pages, serve, speech


async def _wait_for(predicate, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out waiting for the server")


def test_speech_round_trip_in_80ms_frames(tiny_model):
    frames = 12
    pages = ogg_pages(speech(frames * FRAME / 24000))
    # headers (2 pages) + 2 pages per 80 ms frame, as sphn's writer pages them
    assert len(pages) == 2 + 2 * frames

    async def run():
        async with serve(tiny_model) as (base, _), aiohttp.ClientSession() as http:
            client = await connect(http, base, "?seed=1&text_temperature=0.7")
            await _wait_for(lambda: client.reply.kinds)
            assert client.reply.kinds[0] == protocol.Kind.HANDSHAKE
            await client.send_pages(pages[:4], [4])  # the headers and the first frame
            await asyncio.sleep(0.5)
            assert not client.got_audio.is_set(), "a reply came before the second input frame"
            await client.send_pages(pages[4:6], [1])  # the second frame, one page per message
            await asyncio.wait_for(client.got_audio.wait(), 10)
            await client.send_pages(pages[6:], [3, 1, 5, 2])  # other groupings, not on frame boundaries
            await _wait_for(lambda: len(client.reply.audio) == frames - 1)
            await asyncio.sleep(0.3)
            return await client.finish()

    reply = asyncio.run(run())
    assert reply.error is None
    assert len(reply.audio) == frames - 1  # one reply per input frame after the first
    assert all(chunk.shape == (FRAME,) for chunk in reply.audio)
    assert np.isfinite(reply.pcm()).all() and np.abs(reply.pcm()).max() > 0
    assert reply.text, "no text piece arrived"
    # a text piece follows the audio of its frame
    kinds = reply.kinds[1:]
    assert kinds[0] == protocol.Kind.AUDIO
    assert all(b == protocol.Kind.AUDIO for a, b in zip(kinds, kinds[1:]) if a == protocol.Kind.TEXT)


def test_two_sessions_a_third_refused_and_a_freed_slot_reused(tiny_model):
    frames = 8
    pages = ogg_pages(speech(frames * FRAME / 24000))

    async def run():
        async with serve(tiny_model, max_sessions=2) as (base, loop), aiohttp.ClientSession() as http:
            a = await connect(http, base, "?seed=1")
            b = await connect(http, base, "?seed=2&audio_temperature=1.0")
            await _wait_for(lambda: a.reply.kinds and b.reply.kinds)
            c = await connect(http, base)
            third = await c.wait_closed()
            await asyncio.gather(a.send_pages(pages, [2]), b.send_pages(pages, [3]))
            await _wait_for(lambda: len(a.reply.audio) == len(b.reply.audio) == frames - 1)
            assert len(loop.sessions) == 2
            first = await a.finish()
            await _wait_for(lambda: len(loop.sessions) == 1)
            d = await connect(http, base, "?seed=1")
            await d.send_pages(pages, [2])
            await _wait_for(lambda: len(d.reply.audio) == frames - 1)
            return first, await b.finish(), third, await d.finish()

    a, b, third, d = asyncio.run(run())
    assert third.kinds == [protocol.Kind.ERROR] and "busy" in third.error and third.closed
    for reply in (a, b, d):
        assert reply.kinds[0] == protocol.Kind.HANDSHAKE and reply.error is None
        assert len(reply.audio) == 7 and all(chunk.shape == (FRAME,) for chunk in reply.audio)
    # different seeds and settings: the two conversations are not copies of each other
    assert not np.array_equal(a.pcm(), b.pcm())


MALFORMED = [
    ("text frame", "text", "text frame"),
    ("unknown kind", bytes([9]) + b"x", "kind 9"),
    ("server kind", protocol.text("hi"), "kind 2"),
    ("empty", b"", "empty message"),
    ("corrupt Ogg", protocol.audio(b"definitely not an Ogg stream " * 8), "invalid Ogg Opus"),
    ("oversized", protocol.audio(b"\0" * 5000), None),  # over the size cap: closed by the WebSocket layer
]


def test_each_malformed_message_ends_only_its_connection(tiny_model):
    frames = 2 + 2 * len(MALFORMED)
    pages = ogg_pages(speech(frames * FRAME / 24000))

    async def run():
        async with serve(tiny_model, max_message_bytes=4096) as (base, loop), aiohttp.ClientSession() as http:
            good = await connect(http, base, "?seed=1")
            await good.send_pages(pages[:6], [2])
            await _wait_for(lambda: len(good.reply.audio) == 1)
            replies = []
            for i, (_, bad, _) in enumerate(MALFORMED):
                bad_client = await connect(http, base)
                await _wait_for(lambda c=bad_client: c.reply.kinds)
                if isinstance(bad, str):
                    await bad_client.ws.send_str(bad)
                else:
                    await bad_client.ws.send_bytes(bad)
                replies.append(await bad_client.wait_closed())
                # the other session keeps being served
                await good.send_pages(pages[6 + 4 * i : 10 + 4 * i], [2])
                await _wait_for(lambda n=i: len(good.reply.audio) == 3 + 2 * n)
            async with http.get(f"{base}/api/health") as resp:
                health = await resp.json()
            async with http.get(f"{base}/api/metrics") as resp:
                metrics = await resp.json()
            return replies, await good.finish(), health, metrics

    replies, good_reply, health, metrics = asyncio.run(run())
    for (name, _, reason), reply in zip(MALFORMED, replies):
        assert reply.closed, name
        if reason is not None:
            assert reply.kinds[-1] == protocol.Kind.ERROR and reason in reply.error, name
    assert good_reply.error is None and len(good_reply.audio) == frames - 1
    assert health["status"] == "ok" and health["sessions"] == 1
    assert metrics["sessions_failed"] == len(MALFORMED) and metrics["sessions_started"] == 1 + len(MALFORMED)


def test_backlog_beyond_the_bound_is_dropped_and_counted(tiny_model):
    frames = 30
    pages = ogg_pages(speech(frames * FRAME / 24000))

    async def run():
        # a 160 ms bound: a burst of 30 frames in one message keeps only the last 2
        async with serve(tiny_model, max_backlog_ms=160) as (base, loop), aiohttp.ClientSession() as http:
            client = await connect(http, base, "?seed=1")
            await client.send_pages(pages, [len(pages)])
            await _wait_for(lambda: len(client.reply.audio) == 1)
            await asyncio.sleep(0.5)
            async with http.get(f"{base}/api/metrics") as resp:
                metrics = await resp.json()
            return await client.finish(), metrics

    reply, metrics = asyncio.run(run())
    assert len(reply.audio) == 1
    assert metrics["frames_dropped"] == frames - 2 and metrics["frames_in"] == 2
    assert metrics["ms_per_frame_p50"] > 0 and metrics["ms_per_frame_p99"] >= metrics["ms_per_frame_p50"]


def test_query_settings():
    defaults = SamplingSettings(temp=0.8, top_k=250, temp_text=0.7, top_k_text=25)
    s = settings_from_query(
        {"text_temperature": "0.5", "text_topk": "10", "audio_temperature": "0", "audio_topk": "5", "seed": "7",
         "pad_mult": "1"}, defaults)
    assert s == SamplingSettings(temp=0.0, top_k=5, temp_text=0.5, top_k_text=10, audio_seed=7, text_seed=7)
    assert settings_from_query({"text_seed": "3"}, defaults).text_seed == 3
    assert settings_from_query({}, defaults) == defaults
    with pytest.raises(ValueError, match="text_topk='abc' is not a int"):
        settings_from_query({"text_topk": "abc"}, defaults)
    with pytest.raises(ValueError, match="audio_temperature='-1' must be >= 0.0"):
        settings_from_query({"audio_temperature": "-1"}, defaults)


def test_bad_query_refused_with_the_error_kind(tiny_model):
    async def run():
        async with serve(tiny_model) as (base, _), aiohttp.ClientSession() as http:
            client = await connect(http, base, "?text_topk=0")
            return await client.wait_closed()

    reply = asyncio.run(run())
    assert reply.kinds == [protocol.Kind.ERROR] and "text_topk" in reply.error
