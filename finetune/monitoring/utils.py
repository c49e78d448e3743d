"""Numbers for the training log: memory, throughput bookkeeping, the console line."""

from __future__ import annotations

import datetime
import resource
import sys
import time
from dataclasses import dataclass, field

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
class ThroughputMeter:
    """Tokens and wall time of the training steps, as a `Stateful` so a resumed run's averages continue.

    Tokens are counted as upstream: ``(1 + dep_q) · B · T`` per micro-batch, per process ("words").
    """

    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    _t0: float | None = field(default=None, repr=False)

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, tokens: int) -> tuple[float, float]:
        """Ends a step; returns ``(step seconds, step tokens/s)``."""
        assert self._t0 is not None, "start() not called"  # internal misuse, not user input
        dt = max(time.perf_counter() - self._t0, 1e-9)
        self._t0 = None
        self.tokens += tokens
        self.seconds += dt
        self.steps += 1
        return dt, tokens / dt

    @property
    def avg_wps(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def state_dict(self) -> dict[str, float | int]:
        return {"tokens": self.tokens, "seconds": self.seconds, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.tokens = int(state["tokens"])
        self.seconds = float(state["seconds"])
        self.steps = int(state["steps"])


def eta_seconds(step: int, total_steps: int, meter: ThroughputMeter) -> float:
    if meter.steps == 0:
        return 0.0
    return (total_steps - step) * meter.seconds / meter.steps


def format_train_line(m: dict) -> str:
    """One console line per logged step (upstream's fields plus text/audio loss and grad norm)."""
    eta = datetime.datetime.now() + datetime.timedelta(seconds=m.get("eta_in_seconds", 0.0))
    return (
        f"step: {m['step']:06d} - done (%): {m['percent_done']:.1f} - loss: {m['loss']:.3f} "
        f"(text {m['text_loss']:.3f}, audio {m['audio_loss']:.3f}) - lr: {m['lr']:.1e} - "
        f"grad_norm: {m['grad_norm']:.3f} - real tokens: {100 * m['prob_real_tokens']:.0f}% - "
        f"peak_mem (GiB): {m['peak_allocated_mem']:.2f} - tokens/s/proc: {m['wps']:.1f} "
        f"(avg {m['avg_wps']:.1f}) - ETA: {eta:%Y-%m-%d %H:%M:%S}"
    )


def format_eval_line(m: dict) -> str:
    return (
        f"step: {m['step']:06d} - eval_loss: {m['eval_loss']:.3f} (text {m['text_eval_loss']:.3f}, "
        f"audio {m['audio_eval_loss']:.3f}) - eval_perplexity: {m['perplexity']:.3f} - "
        f"train_loss: {m['train_loss']:.3f} - batches: {m['eval_batches']}"
    )
