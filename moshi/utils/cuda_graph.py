"""CUDA graphs for the per-frame work of streaming generation (the temporal step, the depformer loop).

A frame launches hundreds of small kernels; replaying them as one captured graph removes the launch overhead
that dominates at batch size 1. :class:`CUDAGraphed` wraps a function of tensors: the first call runs eagerly
(it allocates the lazily created buffers and warms up the kernels), the second captures the graph and replays
it, later calls copy their inputs into the captured buffers and replay. It is a plain call on CPU, or when the
``NO_CUDA_GRAPH`` environment variable is set (other than ``""``, ``0``, ``no``, ``n``), so every device runs
the same model code.

What may be captured: functions whose tensors keep their shapes and whose streaming state is updated in place
(Moshi's attention caches and offsets), using only the default CUDA generator for sampling. The outputs are the
captured buffers and are overwritten by the next call: use them before calling again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

_OFF_VALUES = ("", "0", "no", "n")


def cuda_graphs_enabled(device: torch.device | str) -> bool:
    """Whether frames on ``device`` are captured: CUDA only, unless ``NO_CUDA_GRAPH`` turns them off."""
    return torch.device(device).type == "cuda" and os.environ.get("NO_CUDA_GRAPH", "").lower() in _OFF_VALUES


def _signature(args: tuple[torch.Tensor, ...]) -> list[tuple[Any, ...]]:
    return [(tuple(a.shape), a.dtype, a.device) for a in args]


class CUDAGraphed:
    """``fn(*tensors)`` run eagerly, then captured on its second call and replayed (see the module docstring).

    Args:
        fn (Callable): a function of tensors returning a tensor or a tuple of tensors.
        enabled (bool): capture at all (:func:`cuda_graphs_enabled` of the model's device, and whether ``fn``
            is safe to capture).
    """

    def __init__(self, fn: Callable[..., Any], enabled: bool) -> None:
        self.fn = fn
        self.enabled = enabled
        self._calls = 0
        self._graph: Any = None
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._outputs: Any = None
        self._shapes: list[tuple[Any, ...]] | None = None

    def reset(self) -> None:
        """Drops the captured graph (the next two calls run eagerly, then capture again)."""
        self._calls = 0
        self._graph = None
        self._inputs = ()
        self._outputs = None
        self._shapes = None

    def __call__(self, *args: torch.Tensor) -> Any:
        if not self.enabled:
            return self.fn(*args)
        shapes = _signature(args)
        if self._shapes is not None and shapes != self._shapes:
            raise ValueError(f"a CUDA-graphed call changed its input shapes from {self._shapes} to {shapes}")
        self._shapes = shapes
        self._calls += 1
        if self._calls == 1:
            return self.fn(*args)
        if self._graph is None:
            self._inputs = tuple(a.clone() for a in args)
            self._graph = torch.cuda.CUDAGraph()
            # Capture records the kernels without running them; the replay below runs this call.
            with torch.cuda.graph(self._graph):
                self._outputs = self.fn(*self._inputs)
        for buffer, value in zip(self._inputs, args, strict=True):
            buffer.copy_(value)
        self._graph.replay()
        return self._outputs
