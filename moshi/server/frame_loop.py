"""The frame clock: one batched generator step per 80 ms for every session that has input.

Sessions feed decoded frames into their queues as messages arrive. The loop wakes when some session has a
frame, waits for the next tick of the 80 ms clock, and runs one step for every session holding a frame, so
conversations that speak at the same time share one batched step. A session whose queue holds more than one
frame is behind; then (when the model can pause idle slots) the next step starts at once instead of on the
tick, so a burst of input is caught up at the model's speed. When the model itself is slower than real time,
queues grow until :class:`~moshi.server.session.Session` drops the oldest frames past its backlog bound.

Model work runs on one worker thread; sending runs on the event loop, one task per connection.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .engine import BatchEngine, SamplingSettings, timed_step
from .metrics import Metrics
from .session import Session

logger = logging.getLogger(__name__)


def text_piece(tokenizer: Any, text_id: int) -> str:
    """The text of one token as it is shown live: SentencePiece pieces with ``▁`` as a space, or the
    Hugging Face tokenizer's decoding of the id alone."""
    if hasattr(tokenizer, "id_to_piece"):
        return tokenizer.id_to_piece(text_id).replace("\u2581", " ")
    return tokenizer.decode([text_id])


class FrameLoop:
    """Owns the slots of a :class:`BatchEngine` and steps it on the frame clock.

    Args:
        engine (BatchEngine): the generator, warmed up.
        tokenizer: SentencePiece processor or Hugging Face tokenizer of the model's text stream.
        metrics (Metrics): counters to update.
        max_backlog (int): input frames a session may queue before the oldest are dropped.
        frame_ms (float): the clock period.
    """

    def __init__(
        self, engine: BatchEngine, tokenizer: Any, metrics: Metrics, max_backlog: int, frame_ms: float = 80.0
    ) -> None:
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1 frame, got {max_backlog}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_backlog = max_backlog
        self.frame_s = frame_ms / 1000.0
        self.sessions: dict[int, Session] = {}
        self._joins: dict[int, SamplingSettings] = {}
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moshi-generator")

    @property
    def max_sessions(self) -> int:
        return self.engine.slots

    def open_session(self, settings: SamplingSettings) -> Session | None:
        """Gives a new conversation a free slot (reset before its first frame runs), or None when all are taken."""
        free = [slot for slot in range(self.engine.slots) if slot not in self.sessions]
        if not free:
            self.metrics.sessions_rejected += 1
            return None
        slot = free[0]
        session = Session(
            slot, settings, self.engine.sample_rate, self.engine.frame_size, self.max_backlog,
            on_frame=self._wake.set,
        )
        self.sessions[slot] = session
        self._joins[slot] = settings
        self.metrics.sessions_started += 1
        return session

    def close_session(self, session: Session) -> None:
        session.close()
        if self.sessions.get(session.slot) is session:
            del self.sessions[session.slot]
            self._joins.pop(session.slot, None)
        self.metrics.frames_dropped += session.dropped
        logger.info(
            "session in slot %d ended: %d frames in, %d out, %d dropped%s",
            session.slot, session.frames_in, session.frames_out, session.dropped,
            f" ({session.failure})" if session.failure else "",
        )

    def _has_input(self) -> bool:
        return any(session.frames for session in self.sessions.values())

    def _behind(self) -> bool:
        return self.engine.can_pause and any(len(s.frames) > 1 for s in self.sessions.values())

    async def run(self) -> None:
        """Steps the generator until cancelled."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            if not self._has_input():
                self._wake.clear()
                await self._wake.wait()
                next_tick = max(next_tick, loop.time())
            delay = next_tick - loop.time()
            if delay > 0 and not self._behind():
                await asyncio.sleep(delay)
            owners = dict(self.sessions)
            frames = {}
            for slot, session in owners.items():
                frame = session.next_frame()
                if frame is not None:
                    frames[slot] = frame
            joins, self._joins = self._joins, {}
            try:
                outputs, ms = await loop.run_in_executor(
                    self._executor, timed_step, self.engine, frames, joins
                )
            except Exception:
                # The model's state for these slots is unknown: end their sessions, keep serving.
                logger.exception("generator step failed; ending the sessions in it")
                for session in owners.values():
                    session.fail("the model failed on this conversation")
                continue
            self.metrics.record_step(ms, len(frames), len(outputs))
            for slot, output in outputs.items():
                session = owners.get(slot)
                if session is None or self.sessions.get(slot) is not session:
                    continue  # idle slot fed silence, or its client left during the step
                piece = None
                if not self.engine.is_silent_text(output.text_id):
                    piece = text_piece(self.tokenizer, output.text_id)
                session.emit(output.pcm, piece)
            next_tick = max(next_tick + self.frame_s, loop.time() - self.frame_s)

    def close(self) -> None:
        """Waits for a step in flight, then ends the engine's streaming (after :meth:`run` was cancelled)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.engine.close()
