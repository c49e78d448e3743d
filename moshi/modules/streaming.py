"""One streaming mechanism shared by every stateful layer (convs, attention, whole models).

A layer that keeps state between calls subclasses :class:`StreamingModule` with its own ``@dataclass`` state
deriving from :class:`State`, and implements only :meth:`StreamingModule._init_streaming_state`. Entering
``with model.streaming(batch_size):`` creates the state of every streaming child at once, and leaving the
block drops all of it, so no layer needs its own cache flag. Outside a streaming block the state is ``None``
and a layer is expected to behave as a one-shot call (usually by building a throwaway state), which keeps a
single code path for streaming and full-sequence use.

Example of a subclass::

    @dataclass
    class _MyState(State):
        previous: torch.Tensor

        def reset(self, reset_mask: torch.Tensor) -> None:
            super().reset(reset_mask)
            self.previous[:] = torch.where(reset_mask[:, None, None], 0.0, self.previous)

    class MyLayer(StreamingModule[_MyState]):
        def _init_streaming_state(self, batch_size: int) -> _MyState:
            return _MyState(batch_size, self.weight.device, previous=torch.zeros(batch_size, 4, 2))
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn


@dataclass
class State:
    """Base of every streaming state.

    Args:
        batch_size (int): number of independent streams carried by the state.
        device (torch.device): device of the state tensors.

    ``exec_mask`` (bool ``[B]``) says which batch items are executed by the next call: items with a false entry
    must keep their state unchanged, which lets a batch of desynchronised streams share one model call.
    """

    batch_size: int
    device: torch.device
    exec_mask: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.exec_mask = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)

    def set_exec_mask(self, exec_mask: torch.Tensor) -> None:
        """Sets which batch items the next calls execute (bool ``[B]``)."""
        if exec_mask.shape != (self.batch_size,):
            raise ValueError(f"exec_mask must have shape ({self.batch_size},), got {tuple(exec_mask.shape)}")
        self.exec_mask[:] = exec_mask

    def reset(self, reset_mask: torch.Tensor) -> None:
        """Returns the items where ``reset_mask`` (bool ``[B]``) is true to their initial state.

        Subclasses extend this for their own tensors and must call ``super().reset(reset_mask)``.
        """
        self.exec_mask[:] = torch.where(reset_mask, torch.ones_like(self.exec_mask), self.exec_mask)

    def reset_all(self) -> None:
        """Returns every item to its initial state without reading anything back from the device.

        A masked :meth:`reset` may have to ask the device whether every item was reset (to zero a host-side step
        counter); with no mask the answer is known, so a full reset costs no host sync and may run inside a CUDA
        graph capture. States with such counters override this to zero them.
        """
        self.reset(torch.ones_like(self.exec_mask))


StateT = TypeVar("StateT", bound=State)


class StreamingModule(nn.Module, Generic[StateT], abc.ABC):
    """A module that may carry a streaming state between calls.

    The state lives in ``self._streaming_state`` (``None`` when not streaming). A module marked detached with
    :meth:`set_streaming_detached` is skipped when one of its parents starts or stops streaming: it streams
    along its own axis (the depformer streams over the codebooks of one frame) and is driven by its owner.
    """

    def __init__(self) -> None:
        super().__init__()
        self._streaming_state: StateT | None = None
        self._streaming_detached: bool = False

    @abc.abstractmethod
    def _init_streaming_state(self, batch_size: int) -> StateT:
        """Builds a fresh state for ``batch_size`` streams."""

    @property
    def is_streaming(self) -> bool:
        return self._streaming_state is not None

    def set_streaming_detached(self, streaming_detached: bool) -> None:
        """Detached modules are not reached by a parent's ``streaming``/``reset_streaming`` calls."""
        self._streaming_detached = streaming_detached

    def _streaming_modules(self) -> Iterator[tuple[str, StreamingModule]]:
        """Yields ``(name, module)`` for self and every streaming descendant not behind a detached one."""

        def visit(prefix: str, module: nn.Module) -> Iterator[tuple[str, StreamingModule]]:
            if isinstance(module, StreamingModule):
                if module is not self and module._streaming_detached:
                    return
                yield prefix, module
            for name, child in module.named_children():
                yield from visit(f"{prefix}.{name}" if prefix else name, child)

        yield from visit("", self)

    def _apply_streaming(self, fn: Callable[[str, StreamingModule], None]) -> None:
        for name, module in self._streaming_modules():
            fn(name, module)

    def _start_streaming(self, batch_size: int) -> None:
        def start(name: str, module: StreamingModule) -> None:
            if module._streaming_state is not None:
                raise RuntimeError(f"module {name or type(module).__name__!r} is already streaming")
            module._streaming_state = module._init_streaming_state(batch_size)

        self._apply_streaming(start)

    def _stop_streaming(self) -> None:
        def stop(name: str, module: StreamingModule) -> None:
            module._streaming_state = None

        self._apply_streaming(stop)

    @contextmanager
    def streaming(self, batch_size: int) -> Iterator[None]:
        """Streams ``batch_size`` items through this module and its (non-detached) children; state is dropped
        on exit, even on error."""
        self._start_streaming(batch_size)
        try:
            yield
        finally:
            self._stop_streaming()

    def streaming_forever(self, batch_size: int) -> None:
        """Enters streaming mode with no scope (for servers that stream until the process ends)."""
        self._start_streaming(batch_size)

    def reset_streaming(self, reset_mask: torch.Tensor | None = None) -> None:
        """Resets the state of the items where ``reset_mask`` is true (all items when ``None``)."""

        def reset(name: str, module: StreamingModule) -> None:
            state = module._streaming_state
            if state is None:
                raise RuntimeError(f"module {name or type(module).__name__!r} is not streaming")
            if reset_mask is None:
                state.reset_all()
            else:
                state.reset(reset_mask.to(state.device))

        self._apply_streaming(reset)

    def set_exec_mask(self, exec_mask: torch.Tensor) -> None:
        """Sets the per-item exec mask on every streaming state of this module tree."""

        def apply(name: str, module: StreamingModule) -> None:
            if module._streaming_state is None:
                raise RuntimeError(f"module {name or type(module).__name__!r} is not streaming")
            module._streaming_state.set_exec_mask(exec_mask.to(module._streaming_state.device))

        self._apply_streaming(apply)

    def get_streaming_state(self) -> dict[str, Any]:
        """Returns the states of this module tree by module name (for saving/restoring a session)."""
        return {name: module._streaming_state for name, module in self._streaming_modules()}

    def set_streaming_state(self, state: dict[str, Any]) -> None:
        """Restores the states returned by :meth:`get_streaming_state` (one per module name); the module names
        must match exactly."""
        modules = dict(self._streaming_modules())
        if set(modules) != set(state):
            missing = sorted(set(modules) - set(state))
            extra = sorted(set(state) - set(modules))
            raise ValueError(f"streaming state names do not match: missing {missing}, unexpected {extra}")
        for name, module in modules.items():
            module._streaming_state = state[name]


class StreamingContainer(StreamingModule[State]):
    """A streaming module with no state of its own: it only groups streaming children."""

    def _init_streaming_state(self, batch_size: int) -> State:
        device = next(iter(self.parameters()), torch.empty(0)).device
        return State(batch_size, device)
