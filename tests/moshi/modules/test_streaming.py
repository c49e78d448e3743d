"""The streaming mechanism: one context reaches every child, resets are per item, state is dropped on exit."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from moshi.modules.streaming import State, StreamingContainer, StreamingModule


@dataclass
class _CounterState(State):
    count: torch.Tensor

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.count[:] = torch.where(reset_mask, torch.zeros_like(self.count), self.count)


class _Counter(StreamingModule[_CounterState]):
    """Adds the number of steps already seen (per item) to its input."""

    def _init_streaming_state(self, batch_size: int) -> _CounterState:
        return _CounterState(batch_size, torch.device("cpu"), count=torch.zeros(batch_size, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        if state is None:
            return x + torch.arange(x.shape[1]).view(1, -1)
        out = x + state.count.view(-1, 1) + torch.arange(x.shape[1]).view(1, -1)
        state.count += x.shape[1] * state.exec_mask.long()
        return out


class _Tree(StreamingContainer):
    def __init__(self) -> None:
        super().__init__()
        self.a = _Counter()
        self.inner = nn.Sequential(_Counter())
        self.detached = _Counter()
        self.detached.set_streaming_detached(streaming_detached=True)


def test_streaming_context_reaches_nested_children_and_skips_detached():
    tree = _Tree()
    with tree.streaming(3):
        assert tree.a.is_streaming and tree.inner[0].is_streaming and tree.is_streaming
        assert not tree.detached.is_streaming
        assert tree.a._streaming_state.batch_size == 3
    assert not tree.a.is_streaming and not tree.inner[0].is_streaming and not tree.is_streaming


def test_state_is_cleared_when_the_block_raises():
    tree = _Tree()
    with pytest.raises(KeyError), tree.streaming(2):
        raise KeyError("boom")
    assert not tree.a.is_streaming


def test_starting_twice_raises():
    tree = _Tree()
    with tree.streaming(1), pytest.raises(RuntimeError, match="already streaming"):
        tree.a._start_streaming(1)


def test_chunked_streaming_equals_full_forward():
    layer = _Counter()
    x = torch.zeros(2, 7, dtype=torch.long)
    with layer.streaming(2):
        chunks = [layer(x[:, i : i + 3]) for i in range(0, 7, 3)]
    assert torch.equal(torch.cat(chunks, 1), layer(x))


def test_reset_with_mask_resets_only_selected_items():
    tree = _Tree()
    x = torch.zeros(2, 4, dtype=torch.long)
    with tree.streaming(2):
        tree.a(x)
        tree.reset_streaming(torch.tensor([True, False]))
        assert tree.a._streaming_state.count.tolist() == [0, 4]
        assert tree.inner[0]._streaming_state.count.tolist() == [0, 0]
        tree.a(x)
        tree.reset_streaming()
        assert tree.a._streaming_state.count.tolist() == [0, 0]


def test_exec_mask_freezes_items_and_reset_reenables_them():
    layer = _Counter()
    x = torch.zeros(2, 1, dtype=torch.long)
    with layer.streaming(2):
        layer.set_exec_mask(torch.tensor([True, False]))
        layer(x)
        layer(x)
        assert layer._streaming_state.count.tolist() == [2, 0]
        layer.set_exec_mask(torch.tensor([False, False]))
        layer.reset_streaming(torch.tensor([False, True]))
        assert layer._streaming_state.exec_mask.tolist() == [False, True]


def test_exec_mask_with_wrong_shape_is_rejected():
    layer = _Counter()
    with layer.streaming(2), pytest.raises(ValueError, match=r"shape \(2,\)"):
        layer.set_exec_mask(torch.tensor([True, False, True]))


def test_get_and_set_streaming_state_restore_a_session():
    tree = _Tree()
    x = torch.zeros(1, 2, dtype=torch.long)
    with tree.streaming(1):
        tree.a(x)
        saved = tree.get_streaming_state()
        assert set(saved) == {"", "a", "inner.0"}
    with tree.streaming(1):
        tree.set_streaming_state(state=saved)  # the parameter name of Kyutai's package
        assert tree.a._streaming_state.count.tolist() == [2]
        with pytest.raises(ValueError, match="unexpected"):
            tree.set_streaming_state({**saved, "other": None})


def test_detached_module_streams_on_its_own():
    tree = _Tree()
    with tree.streaming(2):
        with tree.detached.streaming(2):
            assert tree.detached.is_streaming
        assert not tree.detached.is_streaming
        assert tree.a.is_streaming
