"""Numbers for the training log: memory, throughput bookkeeping, the console line."""

from __future__ import annotations

import datetime
import resource
import sys
import time
from dataclasses import dataclass

import torch

GIB = 2**30


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / GIB  # bytes on macOS, KiB on Linux


def allocated_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GIB
    return 0.0


@dataclass
class StepTiming:
    """One training step: wall seconds (data wait included; eval and checkpoints excluded), data-wait seconds."""

    seconds: float
    data_seconds: float


class StepTimer:
    """Times one training step from its first batch request to the end of its optimizer step.

    ``start()`` before the data is requested, ``data_ready()`` once the step's batches are on the device,
    ``stop()`` right after the optimizer and scheduler steps, before any evaluation or checkpoint.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._data: float = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._data = 0.0

    def data_ready(self) -> None:
        if self._t0 is None:
            raise RuntimeError("StepTimer.data_ready() before start()")
        self._data = time.perf_counter() - self._t0

    def stop(self) -> StepTiming:
        if self._t0 is None:
            raise RuntimeError("StepTimer.stop() before start()")
        dt = max(time.perf_counter() - self._t0, 1e-9)
        self._t0 = None
        return StepTiming(dt, min(self._data, dt))


@dataclass
class ThroughputMeter:
    """Positions and wall time of the training steps, as a `Stateful` so a resumed run's averages continue.

    Positions are counted per process: all predicted positions ``(1 + dep_q) · B · T`` per micro-batch
    (padding included) and the real ones (positions with a target).
    """

    tokens: int = 0
    real_tokens: float = 0.0
    seconds: float = 0.0
    data_seconds: float = 0.0
    steps: int = 0

    def add(self, timing: StepTiming, tokens: int, real_tokens: float) -> None:
        self.tokens += tokens
        self.real_tokens += real_tokens
        self.seconds += timing.seconds
        self.data_seconds += timing.data_seconds
        self.steps += 1

    @property
    def avg_wps(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def avg_real_wps(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else 0.0

    def state_dict(self) -> dict[str, float | int]:
        return {"tokens": self.tokens, "real_tokens": self.real_tokens, "seconds": self.seconds,
                "data_seconds": self.data_seconds, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.tokens = int(state["tokens"])
        self.real_tokens = float(state.get("real_tokens", 0.0))
        self.seconds = float(state["seconds"])
        self.data_seconds = float(state.get("data_seconds", 0.0))
        self.steps = int(state["steps"])


def eta_seconds(step: int, total_steps: int, meter: ThroughputMeter) -> float:
    if meter.steps == 0:
        return 0.0
    return (total_steps - step) * meter.seconds / meter.steps


def format_train_line(m: dict) -> str:
    """One console line per logged step: losses, lr, grad norm, memory, throughput, MFU, data wait, ETA."""
    eta = datetime.datetime.now() + datetime.timedelta(seconds=m.get("eta_in_seconds", 0.0))
    mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.2f}%"
    return (
        f"step: {m['step']:06d} - done (%): {m['percent_done']:.1f} - loss: {m['loss']:.3f} "
        f"(text {m['text_loss']:.3f}, audio {m['audio_loss']:.3f}) - lr: {m['lr']:.1e} - "
        f"grad_norm: {m['grad_norm']:.3f} - real tokens: {100 * m['prob_real_tokens']:.0f}% - "
        f"peak_mem (GiB): {m['peak_allocated_mem']:.2f} - tokens/s/proc: {m['real_wps']:.1f} real, "
        f"{m['wps']:.1f} all (avg {m['avg_real_wps']:.1f}, {m['avg_wps']:.1f}) - mfu: {mfu} - "
        f"data wait: {100 * m['data_share']:.1f}% - ETA: {eta:%Y-%m-%d %H:%M:%S}"
    )


def format_eval_line(m: dict) -> str:
    return (
        f"step: {m['step']:06d} - eval_loss: {m['eval_loss']:.3f} (text {m['text_eval_loss']:.3f}, "
        f"audio {m['audio_eval_loss']:.3f}) - eval_perplexity: {m['perplexity']:.3f} - "
        f"train_loss: {m['train_loss']:.3f} - batches: {m['eval_batches']}"
    )
