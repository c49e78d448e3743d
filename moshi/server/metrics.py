"""Counters and step-time percentiles the server reports at ``/api/metrics``."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Metrics:
    """Totals since start, and the step times of the last ``window`` steps (for p50/p99)."""

    window: int = 2000
    sessions_started: int = 0
    sessions_rejected: int = 0
    sessions_failed: int = 0  # ended by a malformed message or a send error
    steps: int = 0  # batched generator steps
    frames_in: int = 0  # 80 ms input frames fed to the model, all sessions
    frames_out: int = 0  # 80 ms output frames sent, all sessions
    frames_dropped: int = 0  # input frames dropped by the backlog bound
    step_ms: deque = field(default_factory=deque)

    def record_step(self, ms: float, frames_in: int, frames_out: int) -> None:
        self.steps += 1
        self.frames_in += frames_in
        self.frames_out += frames_out
        self.step_ms.append(ms)
        while len(self.step_ms) > self.window:
            self.step_ms.popleft()

    def snapshot(self, active_sessions: int, max_sessions: int) -> dict[str, Any]:
        times = np.asarray(self.step_ms, dtype=np.float64)

        def pct(q: float) -> float | None:
            return round(float(np.percentile(times, q)), 3) if len(times) else None

        return {
            "sessions": active_sessions,
            "max_sessions": max_sessions,
            "sessions_started": self.sessions_started,
            "sessions_rejected": self.sessions_rejected,
            "sessions_failed": self.sessions_failed,
            "steps": self.steps,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "frames_dropped": self.frames_dropped,
            "ms_per_frame_p50": pct(50),
            "ms_per_frame_p99": pct(99),
            "ms_per_frame_max": round(float(times.max()), 3) if len(times) else None,
            "window": len(times),
        }
