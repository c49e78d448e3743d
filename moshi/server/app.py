"""The aiohttp application: the chat WebSocket, health and metrics endpoints, and the static page."""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from pathlib import Path

from aiohttp import WSMsgType, web

from . import protocol
from .engine import SamplingSettings
from .frame_loop import FrameLoop
from .metrics import Metrics
from .session import Session, settings_from_query

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
FRAME_LOOP = web.AppKey("frame_loop", FrameLoop)
METRICS = web.AppKey("metrics", Metrics)


async def _send_loop(ws: web.WebSocketResponse, session: Session) -> None:
    while True:
        message = await session.outbox.get()
        if message is None:
            return
        try:
            await ws.send_bytes(message)
        except (ConnectionError, RuntimeError) as exc:
            session.fail(f"send failed: {exc}")
            return


async def _reject(ws: web.WebSocketResponse, reason: str) -> None:
    try:
        await ws.send_bytes(protocol.error(reason))
    except (ConnectionError, RuntimeError):
        pass
    await ws.close()


def make_app(
    frame_loop: FrameLoop,
    defaults: SamplingSettings,
    *,
    static_dir: Path | None = STATIC_DIR,
    max_message_bytes: int = 256 * 1024,
    model_info: dict | None = None,
) -> web.Application:
    """Builds the application around a frame loop; the caller runs ``frame_loop.run()`` alongside it.

    Args:
        frame_loop (FrameLoop): the generator's slots and clock.
        defaults (SamplingSettings): sampling for clients that set no query parameters.
        static_dir (Path | None): folder served at ``/`` (``index.html`` for ``/``); None serves no page.
        max_message_bytes (int): larger client messages end their connection.
        model_info (dict | None): what ``/api/health`` says about the model.
    """
    app = web.Application()
    app[FRAME_LOOP] = frame_loop
    app[METRICS] = frame_loop.metrics

    async def chat(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=max_message_bytes)
        await ws.prepare(request)
        peer = request.remote
        try:
            settings = settings_from_query(request.query, defaults)
        except ValueError as exc:
            logger.warning("client %s refused: %s", peer, exc)
            await _reject(ws, str(exc))
            return ws
        session = frame_loop.open_session(settings)
        if session is None:
            logger.warning("client %s refused: all %d sessions are in use", peer, frame_loop.max_sessions)
            await _reject(ws, f"the server is busy: all {frame_loop.max_sessions} sessions are in use, try later")
            return ws
        logger.info("client %s in slot %d (%s)", peer, session.slot, settings)
        session.on_failure = lambda reason: asyncio.ensure_future(ws.close())
        session.send(protocol.handshake())
        sender = asyncio.ensure_future(_send_loop(ws, session))
        try:
            async for message in ws:
                if message.type == WSMsgType.BINARY:
                    kind, payload = protocol.parse_client_message(message.data)
                    if kind == protocol.Kind.AUDIO and payload:
                        session.feed(payload)
                elif message.type == WSMsgType.TEXT:
                    raise protocol.ProtocolError("text frame: every message must be binary with its kind byte first")
                elif message.type == WSMsgType.ERROR:
                    raise protocol.ProtocolError(f"unreadable WebSocket frame: {ws.exception()}")
        except protocol.ProtocolError as exc:
            logger.warning("client %s in slot %d: %s; closing its connection", peer, session.slot, exc)
            if not ws.closed:
                try:
                    await ws.send_bytes(protocol.error(str(exc)))
                except (ConnectionError, RuntimeError):
                    pass
            session.fail(str(exc))
        finally:
            if session.failure is not None:
                frame_loop.metrics.sessions_failed += 1
            frame_loop.close_session(session)
            await sender
            await ws.close()
        return ws

    async def health(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "sessions": len(frame_loop.sessions),
                "max_sessions": frame_loop.max_sessions,
                "model": model_info or {},
            }
        )

    async def metrics(request: web.Request) -> web.Response:
        snapshot = frame_loop.metrics.snapshot(len(frame_loop.sessions), frame_loop.max_sessions)
        snapshot["frames_dropped"] += sum(s.dropped for s in frame_loop.sessions.values())
        snapshot["can_pause_slots"] = frame_loop.engine.can_pause
        return web.json_response(snapshot)

    app.router.add_get("/api/chat", chat)
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/metrics", metrics)
    if static_dir is not None:
        app.router.add_get("/{path:.*}", _static_handler(Path(static_dir)))
    return app


def _static_handler(root: Path):
    """Serves files under ``root`` only: a path that resolves outside it (``..``, links) is not found."""
    root = root.resolve()
    if not (root / "index.html").is_file():
        raise FileNotFoundError(f"static folder {root} has no index.html")

    async def handler(request: web.Request) -> web.StreamResponse:
        relative = request.match_info["path"] or "index.html"
        target = (root / relative).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise web.HTTPNotFound()
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".js":
            content_type = "text/javascript"
        return web.FileResponse(target, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})

    return handler
