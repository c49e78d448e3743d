"""Command line of the chat server: ``python -m moshi.server [flags]``.

Accepts every flag of Kyutai's ``moshi.server`` (same names and defaults, except ``--device`` which defaults to
``auto``), plus ``--checkpoint`` (a training export, LoRA/merged/full/DSAA), ``--dtype``, ``--max-sessions``,
``--max-backlog-ms`` and ``--max-message-bytes``. Binds ``localhost`` unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
import time
from pathlib import Path

import torch
from aiohttp import web

from ..models.lm import LMModel
from ..models.model_loading import LoadedModel, load_model, resolve_device, resolve_dtype
from .app import STATIC_DIR, make_app
from .engine import BatchEngine, SamplingSettings, SlotLMGen
from .frame_loop import FrameLoop
from .metrics import Metrics

logger = logging.getLogger("moshi.server")

FRAME_MS = 80.0
MAX_SESSIONS_CUDA = 8
MAX_SESSIONS_CPU = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moshi.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="localhost", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8998, help="0 picks a free port (printed at start)")
    p.add_argument("--static", default=None,
                   help="folder served at / (default: the page shipped with this package; 'none': no page)")
    p.add_argument("--hf-repo", default=None, help="hub id or local folder of the base model")
    p.add_argument("--moshi-weight", default=None, help="LM weights (path, hf:// or file://)")
    p.add_argument("--mimi-weight", default=None, help="Mimi weights")
    p.add_argument("--tokenizer", default=None, help="SentencePiece text tokenizer")
    p.add_argument("--config-path", default=None, help="config.json of the LM (lora, lm_gen_config, ...)")
    p.add_argument("--lora-weight", default=None, help="LoRA adapters (needs \"lora\": true in the config)")
    p.add_argument("--no_fuse_lora", "--no-fuse-lora", dest="fuse_lora", action="store_false",
                   help="keep LoRA layers unfused")
    p.add_argument("--checkpoint", default=None,
                   help="a training checkpoint: consolidated/ (LoRA, merged or full), its checkpoint_N/, or DSAA")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--half", action="store_true", help="float16 instead of bfloat16 (CUDA)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--cfg-coef", type=float, default=1.0, help="classifier-free guidance (only 1.0 is supported)")
    p.add_argument("--ssl", default=None, help="folder holding cert.pem and key.pem: serve https/wss")
    p.add_argument("--max-sessions", type=int, default=None,
                   help=f"conversations at once (default: {MAX_SESSIONS_CPU} on CPU; on CUDA what fits in half the "
                        f"free memory, at most {MAX_SESSIONS_CUDA})")
    p.add_argument("--max-backlog-ms", type=float, default=400.0,
                   help="input a session may queue before its oldest frames are dropped (bounds the latency)")
    p.add_argument("--max-message-bytes", type=int, default=256 * 1024,
                   help="larger client messages end that connection")
    return p


def session_state_bytes(lm: LMModel) -> int:
    """Bytes of the LM's streaming state for one conversation (mostly the KV caches)."""
    total = 0
    with lm.streaming(1):
        for state in lm.get_streaming_state().values():
            for value in vars(state).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total


def default_max_sessions(device: torch.device, lm: LMModel) -> int:
    """On CUDA, the sessions whose streaming state fits in half the free memory (1 to 8); on CPU, 2."""
    if device.type != "cuda":
        return MAX_SESSIONS_CPU
    free, _ = torch.cuda.mem_get_info(device)
    per_session = max(session_state_bytes(lm), 1)
    return max(1, min(MAX_SESSIONS_CUDA, int(free * 0.5 // per_session)))


def build_frame_loop(
    loaded: LoadedModel, max_sessions: int, max_backlog_ms: float = 400.0, cfg_coef: float = 1.0
) -> tuple[FrameLoop, SamplingSettings]:
    """The warmed-up generator with ``max_sessions`` slots and its frame loop; also the default sampling."""
    lm_gen = SlotLMGen(loaded.lm, max_sessions, **{**loaded.lm_gen_config, "cfg_coef": cfg_coef})
    engine = BatchEngine(lm_gen, loaded.mimi, max_sessions)
    start = time.perf_counter()
    engine.warm_up()
    logger.info("warm-up done in %.1f s (%d slots, pause idle slots: %s)",
                time.perf_counter() - start, max_sessions, engine.can_pause)
    max_backlog = max(1, round(max_backlog_ms / FRAME_MS))
    return FrameLoop(engine, loaded.text_tokenizer, Metrics(), max_backlog, FRAME_MS), lm_gen.settings[0]


def _ssl_context(folder: str) -> ssl.SSLContext:
    cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    for path in (cert, key):
        if not path.is_file():
            raise FileNotFoundError(f"--ssl {folder}: {path.name} not found")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context


async def serve(app: web.Application, frame_loop: FrameLoop, host: str, port: int,
                ssl_context: ssl.SSLContext | None = None) -> None:
    """Runs the app and the frame loop until cancelled."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    scheme = "https" if ssl_context is not None else "http"
    for address in runner.addresses:
        logger.info("serving on %s://%s:%d (page at /, chat at /api/chat)", scheme, *address[:2])
    loop_task = asyncio.ensure_future(frame_loop.run())
    try:
        await loop_task
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await runner.cleanup()
        frame_loop.close()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_sessions is not None and args.max_sessions < 1:
        raise SystemExit(f"--max-sessions must be >= 1, got {args.max_sessions}")
    if args.cfg_coef != 1.0:
        raise SystemExit(f"--cfg-coef {args.cfg_coef}: classifier-free guidance is not supported (use 1.0)")
    static = STATIC_DIR if args.static is None else (None if args.static == "none" else Path(args.static))
    ssl_context = _ssl_context(args.ssl) if args.ssl else None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("float16" if args.half else None), device)
    loaded = load_model(
        args.checkpoint, hf_repo=args.hf_repo, moshi_weight=args.moshi_weight, mimi_weight=args.mimi_weight,
        tokenizer=args.tokenizer, config=args.config_path, lora_weight=args.lora_weight,
        fuse_lora=args.fuse_lora, device=device, dtype=dtype,
    )
    logger.info("loaded %s model on %s (%s): %s", loaded.kind, device, dtype, loaded.sources)
    max_sessions = args.max_sessions or default_max_sessions(device, loaded.lm)
    frame_loop, defaults = build_frame_loop(loaded, max_sessions, args.max_backlog_ms, args.cfg_coef)
    app = make_app(frame_loop, defaults, static_dir=static, max_message_bytes=args.max_message_bytes,
                   model_info={"kind": loaded.kind, "device": str(device), "dtype": str(dtype).replace("torch.", "")})
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(app, frame_loop, args.host, args.port, ssl_context))
