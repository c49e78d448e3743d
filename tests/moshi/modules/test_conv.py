"""Causal streaming convolutions: padding rules, causality, chunked streaming equals one-shot."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from moshi.modules.conv import StreamingConv1d, StreamingConvTranspose1d
from moshi.modules.resample import ConvDownsample1d, ConvTrUpsample1d

CONV_CASES = [
    pytest.param(3, 1, 1, "constant", id="k3-s1"),
    pytest.param(3, 1, 2, "constant", id="k3-s1-dil2"),
    pytest.param(8, 4, 1, "constant", id="k8-s4"),
    pytest.param(7, 2, 3, "constant", id="k7-s2-dil3"),
    pytest.param(4, 2, 1, "replicate", id="k4-s2-replicate"),
    pytest.param(1, 1, 1, "constant", id="k1-nopad"),
]


def _chunks(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == x.shape[-1]
    return list(torch.split(x, sizes, dim=-1))


@pytest.mark.parametrize("kernel_size, stride, dilation, pad_mode", CONV_CASES)
def test_conv_one_shot_equals_left_padded_conv1d(kernel_size, stride, dilation, pad_mode):
    conv = StreamingConv1d(3, 5, kernel_size, stride=stride, dilation=dilation, pad_mode=pad_mode)
    x = torch.randn(2, 3, stride * 12)
    pad = (kernel_size - 1) * dilation + 1 - stride
    padded = F.pad(x, (pad, 0), mode=pad_mode) if pad else x
    expected = F.conv1d(padded, conv.conv.conv.weight, conv.conv.conv.bias, stride=stride, dilation=dilation)
    y = conv(x)
    assert y.shape == (2, 5, 12)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kernel_size, stride, dilation, pad_mode", CONV_CASES)
def test_conv_chunked_streaming_equals_one_shot(kernel_size, stride, dilation, pad_mode):
    conv = StreamingConv1d(3, 5, kernel_size, stride=stride, dilation=dilation, pad_mode=pad_mode)
    x = torch.randn(2, 3, stride * 12)
    expected = conv(x)
    with conv.streaming(2):
        y = torch.cat([conv(c) for c in _chunks(x, [stride, stride * 3, stride * 8])], dim=-1)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel_size, stride, dilation, pad_mode", CONV_CASES)
def test_conv_is_causal(kernel_size, stride, dilation, pad_mode):
    conv = StreamingConv1d(2, 2, kernel_size, stride=stride, dilation=dilation, pad_mode=pad_mode)
    x = torch.randn(1, 2, stride * 10)
    changed = x.clone()
    changed[..., stride * 6 :] += 1.0
    torch.testing.assert_close(conv(x)[..., :6], conv(changed)[..., :6], rtol=0, atol=0)
    assert not torch.equal(conv(x)[..., 6:], conv(changed)[..., 6:])


def test_conv_reset_streaming_restarts_from_initial_state():
    conv = StreamingConv1d(2, 3, 4, stride=2, pad_mode="replicate")
    x = torch.randn(1, 2, 8)
    with conv.streaming(1):
        first = conv(x)
        conv(torch.randn(1, 2, 6))
        conv.reset_streaming()
        again = conv(x)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_conv_exec_mask_freezes_state_of_masked_items():
    conv = StreamingConv1d(2, 3, 5, stride=1)
    x = torch.randn(2, 2, 6)
    x_next = torch.randn(2, 2, 6)
    with conv.streaming(2):
        conv(x)
        conv.set_exec_mask(torch.tensor([True, False]))
        conv(torch.randn(2, 2, 6))  # item 1 is not executed: its left context must not move
        conv.set_exec_mask(torch.tensor([True, True]))
        y = conv(x_next)
    expected = conv(torch.cat([x, x_next], dim=-1))[..., 6:]
    torch.testing.assert_close(y[1], expected[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [0, 5])
def test_conv_rejects_length_not_multiple_of_stride(length):
    conv = StreamingConv1d(1, 1, 4, stride=2)
    with pytest.raises(ValueError, match="positive multiple of the stride 2"):
        conv(torch.randn(1, 1, length))


@pytest.mark.parametrize(
    "kernel_size, stride, groups",
    [
        pytest.param(4, 2, 1, id="k4-s2"),
        pytest.param(16, 8, 1, id="k16-s8"),
        pytest.param(10, 5, 2, id="k10-s5-groups2"),
        pytest.param(3, 3, 1, id="k3-s3-no-overlap"),
        pytest.param(4, 2, 4, id="k4-s2-depthwise"),
    ],
)
def test_conv_transpose_trims_right_and_streams_like_one_shot(kernel_size, stride, groups):
    convtr = StreamingConvTranspose1d(4, 4, kernel_size, stride=stride, groups=groups)
    x = torch.randn(3, 4, 7)
    full = F.conv_transpose1d(x, convtr.convtr.convtr.weight, convtr.convtr.convtr.bias, stride=stride, groups=groups)
    y = convtr(x)
    assert y.shape == (3, 4, 7 * stride)
    torch.testing.assert_close(y, full[..., : 7 * stride], rtol=1e-5, atol=1e-6)
    with convtr.streaming(3):
        streamed = torch.cat([convtr(c) for c in _chunks(x, [1, 2, 4])], dim=-1)
    torch.testing.assert_close(streamed, y, rtol=1e-6, atol=1e-6)


def test_resample_keys_shapes_and_round_trip_lengths():
    down, up = ConvDownsample1d(2, 6), ConvTrUpsample1d(2, 6)
    assert {k: tuple(v.shape) for k, v in down.state_dict().items()} == {"conv.conv.conv.weight": (6, 6, 4)}
    assert {k: tuple(v.shape) for k, v in up.state_dict().items()} == {"convtr.convtr.convtr.weight": (6, 1, 4)}
    x = torch.randn(2, 6, 10)
    # Replicate padding: two copies of the first frame on the left.
    padded = torch.cat([x[..., :1], x[..., :1], x], dim=-1)
    torch.testing.assert_close(down(x), F.conv1d(padded, down.conv.conv.conv.weight, stride=2), rtol=0, atol=0)
    assert up(down(x)).shape == (2, 6, 10)
