"""Serving LoRA and DSAA checkpoints; the static page handler; the command line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from moshi.models.model_loading import load_model
from moshi.server import protocol
from moshi.server.app import STATIC_DIR
from moshi.server.cli import build_parser
from tests.helpers import checkpoints as ck

from .wire import FRAME, connect, ogg_pages, serve, speech


async def _converse(loaded, frames: int = 6, max_sessions: int = 2):
    pages = ogg_pages(speech(frames * FRAME / 24000))
    async with serve(loaded, max_sessions=max_sessions) as (base, _), aiohttp.ClientSession() as http:
        clients = [await connect(http, base, f"?seed={i}") for i in range(max_sessions)]
        await asyncio.gather(*(c.send_pages(pages, [2]) for c in clients))
        for _ in range(1000):
            if all(len(c.reply.audio) == frames - 1 for c in clients):
                break
            await asyncio.sleep(0.02)
        return [await c.finish() for c in clients]


def test_lora_checkpoint_served(server_assets, tmp_path):
    folder = ck.write_moshi_export(tmp_path / "run", server_assets, ck.lora_lm(server_assets), "lora")
    loaded = load_model(folder, hf_repo=str(server_assets), device="cpu")
    assert loaded.kind == "lora"
    for reply in asyncio.run(_converse(loaded)):
        assert reply.kinds[0] == protocol.Kind.HANDSHAKE and len(reply.audio) == 5


def test_dsaa_checkpoint_served_two_sessions(server_assets, tmp_path):
    from tests.dsaa.tiny_llm import tiny_dsaa, train_tokenizer

    model = tiny_dsaa(card=64, n_q=8, dep_q=4, delays=[0] + [0, 1, 1, 1] * 2)
    folder = ck.write_dsaa_checkpoint(tmp_path / "consolidated", model, train_tokenizer())
    loaded = load_model(folder, hf_repo=str(server_assets), device="cpu")
    assert loaded.kind == "dsaa"
    for reply in asyncio.run(_converse(loaded)):
        assert reply.kinds[0] == protocol.Kind.HANDSHAKE and len(reply.audio) == 5
        assert all(chunk.shape == (FRAME,) for chunk in reply.audio)


def test_static_page_stays_in_its_folder(tiny_model, tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<p>ours</p>")
    (tmp_path / "secret.txt").write_text("secret")
    (static / "link.txt").symlink_to(tmp_path / "secret.txt")

    async def run():
        async with serve(tiny_model, static_dir=static) as (base, _), aiohttp.ClientSession() as http:
            results = {}
            for path in ("/", "/index.html", "/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt",
                         "/link.txt", "/missing.js"):
                async with http.get(aiohttp.client.URL(base + path, encoded=True)) as resp:
                    results[path] = (resp.status, await resp.text())
            return results

    results = asyncio.run(run())
    assert results["/"] == (200, "<p>ours</p>") and results["/index.html"] == (200, "<p>ours</p>")
    for path, (status, body) in results.items():
        if path not in ("/", "/index.html"):
            assert status == 404 and "secret" not in body, path


def test_shipped_page_is_package_data():
    for name in ("index.html", "app.js", "ogg.js", "capture-worklet.js", "playback-worklet.js", "style.css"):
        assert (STATIC_DIR / name).is_file(), name


def test_every_kyutai_flag_is_accepted():
    args = build_parser().parse_args([
        "--host", "0.0.0.0", "--port", "1", "--static", "none", "--hf-repo", "r", "--moshi-weight", "m",
        "--mimi-weight", "mi", "--tokenizer", "t", "--config-path", "c", "--lora-weight", "l", "--no_fuse_lora",
        "--device", "cpu", "--half", "--ssl", "d", "--cfg-coef", "1.0", "--checkpoint", "ck", "--dtype", "float32",
        "--max-sessions", "3",
    ])
    assert args.fuse_lora is False and args.half and args.max_sessions == 3 and args.static == "none"
    defaults = build_parser().parse_args([])
    assert defaults.host == "localhost" and defaults.port == 8998 and defaults.device == "auto"


def test_command_line_serves_health(server_assets):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moshi.server", "--hf-repo", str(server_assets), "--device", "cpu", "--port", "0",
         "--max-sessions", "1"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        url = None
        for line in proc.stderr:
            if "serving on " in line:
                url = line.split("serving on ")[1].split()[0]
                break
        assert url is not None and url.startswith("http://127.0.0.1:"), "the server did not start"

        async def health():
            async with aiohttp.ClientSession() as http, http.get(f"{url}/api/health") as resp:
                return await resp.json()

        body = asyncio.run(health())
        assert body["status"] == "ok" and body["max_sessions"] == 1 and body["model"]["kind"] == "moshi"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the server did not stop on SIGINT")


def test_ssl_folder_without_its_files(tmp_path):
    from moshi.server.cli import _ssl_context

    with pytest.raises(FileNotFoundError, match="--ssl .*: cert.pem not found"):
        _ssl_context(str(tmp_path))
