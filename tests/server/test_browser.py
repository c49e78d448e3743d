"""Our web page in headless Chromium: the microphone plays an espeak-ng wav, the page connects, shows the
transcript and plays the model's audio. Skipped when chromium or espeak-ng is not installed."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import wave

import numpy as np
import pytest

from moshi.server.app import STATIC_DIR

from .browser import Browser, chromium_binary
from .wire import serve

CHROMIUM = chromium_binary()


def _mic_wav(path) -> None:
    """espeak-ng speech led by 0.5 s of silence (the page opens the microphone before the handshake)."""
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), "hello, can you hear me? tell me about your day."], check=True,
                   capture_output=True)
    with wave.open(str(raw)) as w:
        rate, speech = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    audio = np.concatenate([np.zeros(rate // 2, np.int16), speech])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(audio.tobytes())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_page_in_headless_chromium(tiny_model, tmp_path):
    wav = tmp_path / "mic.wav"
    _mic_wav(wav)
    screenshot = tmp_path / "chat_page.png"

    async def run():
        async with serve(tiny_model, max_sessions=1, static_dir=STATIC_DIR) as (base, loop):
            async with Browser(CHROMIUM, tmp_path / "profile", wav) as browser:
                await browser.open(f"{base}/?seed=1&text_temperature=0.7")
                await browser.click("connect")
                counters = {}
                for _ in range(600):
                    counters = await browser.evaluate("window.moshiTest")
                    if counters["textPieces"] >= 3 and counters["framesPlayed"] >= 10 or counters["errors"]:
                        break
                    await asyncio.sleep(0.05)
                await browser.screenshot(screenshot)
                transcript = await browser.evaluate("document.getElementById('transcript').textContent")
                await browser.click("disconnect")
                for _ in range(100):
                    if not loop.sessions:
                        break
                    await asyncio.sleep(0.05)
                return counters, transcript, len(loop.sessions)

    counters, transcript, left = asyncio.run(run())
    print(f"screenshot of the chat page: {screenshot}")
    assert counters["errors"] == []
    assert counters["handshake"] and counters["micFrames"] > 0 and counters["messagesSent"] > 2
    assert counters["textPieces"] >= 3 and transcript
    assert counters["framesDecoded"] >= 10 and counters["framesPlayed"] >= 10
    assert left == 0  # disconnect freed the slot
    assert screenshot.stat().st_size > 0
