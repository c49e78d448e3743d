"""Causal streaming convolutions: padding rules, causality, chunked streaming equals one-shot."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from moshi.modules.conv import StreamingConv1d, StreamingConvTranspose1d, with_context
from moshi.modules.resample import ConvDownsample1d, ConvTrUpsample1d
from tests.helpers.numerics import assert_close_f32

# An ELU written into a strided slice of the padded input and one on a contiguous tensor may take the
# vectorised and the scalar ``expm1`` on different samples: a few ulps apart, so compare them as a sum of a
# few float32 terms.
ELU_DEPTH = 4

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
    torch.testing.assert_close(y, expected, rtol=0, atol=0)  # the same conv1d call on the same padded input


@pytest.mark.parametrize("kernel_size, stride, dilation, pad_mode", CONV_CASES)
def test_conv_chunked_streaming_equals_one_shot(kernel_size, stride, dilation, pad_mode):
    conv = StreamingConv1d(3, 5, kernel_size, stride=stride, dilation=dilation, pad_mode=pad_mode)
    x = torch.randn(2, 3, stride * 12)
    expected = conv(x)
    with conv.streaming(2):
        y = torch.cat([conv(c) for c in _chunks(x, [stride, stride * 3, stride * 8])], dim=-1)
    assert_close_f32(y, expected, depth=3 * kernel_size)  # chunks may run other kernels than the whole input


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
    assert_close_f32(y[1], expected[1], depth=2 * 5)  # batch-2 streaming call against a longer one-shot call


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
    assert_close_f32(y, full[..., : 7 * stride], depth=4 * kernel_size)  # polyphase conv against conv_transpose1d
    with convtr.streaming(3):
        streamed = torch.cat([convtr(c) for c in _chunks(x, [1, 2, 4])], dim=-1)
    assert_close_f32(streamed, y, depth=4 * kernel_size)


def test_resample_keys_shapes_and_round_trip_lengths():
    down = ConvDownsample1d(2, 6, learnt=True)
    up = ConvTrUpsample1d(2, 6, learnt=True, channel_wise=True)
    assert {k: tuple(v.shape) for k, v in down.state_dict().items()} == {"conv.conv.conv.weight": (6, 6, 4)}
    assert {k: tuple(v.shape) for k, v in up.state_dict().items()} == {"convtr.convtr.convtr.weight": (6, 1, 4)}
    x = torch.randn(2, 6, 10)
    # Replicate padding: two copies of the first frame on the left.
    padded = torch.cat([x[..., :1], x[..., :1], x], dim=-1)
    torch.testing.assert_close(down(x), F.conv1d(padded, down.conv.conv.conv.weight, stride=2), rtol=0, atol=0)
    assert up(down(x)).shape == (2, 6, 10)


# ---- fast paths: polyphase transposed conv, cached weights, activation written into the padded input ----------


@pytest.mark.parametrize(
    "kernel_size, stride, groups, bias",
    [
        pytest.param(5, 2, 1, True, id="k5-s2-kernel-not-multiple"),
        pytest.param(7, 3, 1, False, id="k7-s3-no-bias"),
        pytest.param(12, 6, 2, True, id="k12-s6-groups2"),
        pytest.param(2, 1, 1, True, id="k2-s1"),
    ],
)
def test_conv_transpose_matches_conv_transpose1d_and_streams(kernel_size, stride, groups, bias):
    convtr = StreamingConvTranspose1d(4, 6, kernel_size, stride=stride, groups=groups, bias=bias)
    x = torch.randn(2, 4, 9)
    layer = convtr.convtr.convtr
    full = F.conv_transpose1d(x, layer.weight, layer.bias, stride=stride, groups=groups)
    with torch.no_grad():
        y = convtr(x)
        with convtr.streaming(2):
            streamed = torch.cat([convtr(c) for c in _chunks(x, [1, 5, 3])], dim=-1)
    assert_close_f32(y, full[..., : 9 * stride], depth=4 * kernel_size)  # polyphase conv against conv_transpose1d
    assert_close_f32(streamed, y, depth=4 * kernel_size)


def test_conv_transpose_gradients_match_conv_transpose1d():
    convtr = StreamingConvTranspose1d(3, 5, 8, stride=4)
    layer = convtr.convtr.convtr
    x = torch.randn(2, 3, 6, requires_grad=True)
    target = torch.randn(2, 5, 24)
    (convtr(x) * target).sum().backward()
    ours = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    for t in (x, layer.weight, layer.bias):
        t.grad = None
    reference = F.conv_transpose1d(x, layer.weight, layer.bias, stride=4)[..., :24]
    (reference * target).sum().backward()
    for got, expected in zip(ours, (x.grad, layer.weight.grad, layer.bias.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_conv_transpose_cached_weight_follows_parameter_updates():
    convtr = StreamingConvTranspose1d(3, 4, 6, stride=3)
    layer = convtr.convtr.convtr
    x = torch.randn(1, 3, 5)

    def reference() -> torch.Tensor:
        return F.conv_transpose1d(x, layer.weight, layer.bias, stride=3)[..., :15]

    with torch.inference_mode():
        first = convtr(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
        torch.testing.assert_close(convtr(x), reference(), rtol=1e-5, atol=1e-6)
        convtr.load_state_dict({k: torch.randn_like(v) for k, v in convtr.state_dict().items()})
        torch.testing.assert_close(convtr(x), reference(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(first, convtr(x).detach())
    # A cache built in inference mode is not saved for backward when only the input needs a gradient.
    layer.requires_grad_(False)
    x.requires_grad_(True)
    convtr(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("length", [64, 128, 100])
@pytest.mark.parametrize("grad", [False, True])
def test_with_context_equals_concatenated_activation(length, grad):
    context = torch.randn(2, 5, 4)
    x = torch.randn(2, 5, length)
    elu = torch.nn.ELU(alpha=0.7)
    with torch.set_grad_enabled(grad):
        got = with_context(context, x, elu)
        expected = torch.cat([context, elu(x)], dim=-1)
    assert torch.equal(got[..., :4], context)  # copied, bit for bit
    assert_close_f32(got, expected, depth=ELU_DEPTH)
    assert torch.equal(with_context(context, x), torch.cat([context, x], dim=-1))  # a pure copy


@pytest.mark.parametrize("kernel_size, stride, dilation, pad_mode", CONV_CASES)
@pytest.mark.parametrize("steps", [64, 70])
def test_conv_with_activation_equals_left_padded_conv1d_of_activation(kernel_size, stride, dilation, pad_mode, steps):
    conv = StreamingConv1d(3, 5, kernel_size, stride=stride, dilation=dilation, pad_mode=pad_mode)
    elu = torch.nn.ELU()
    x = torch.randn(2, 3, stride * steps)
    pad = (kernel_size - 1) * dilation + 1 - stride
    layer = conv.conv.conv
    with torch.inference_mode():
        activated = elu(x)
        padded = F.pad(activated, (pad, 0), mode=pad_mode) if pad else activated
        expected = F.conv1d(padded, layer.weight, layer.bias, stride=stride, dilation=dilation)
        # The same conv on an activation that may differ by a few ulps (see ELU_DEPTH).
        assert_close_f32(conv(x, activation=elu), expected, depth=3 * kernel_size + ELU_DEPTH)
        with conv.streaming(2):
            streamed = torch.cat([conv(c, activation=elu) for c in x.split(stride * 32, dim=-1)], dim=-1)
        assert_close_f32(streamed, expected, depth=3 * kernel_size + ELU_DEPTH)


def test_conv_transpose_with_activation_equals_conv_transpose_of_activation():
    convtr = StreamingConvTranspose1d(4, 3, 8, stride=4)
    elu = torch.nn.ELU()
    x = torch.randn(2, 4, 128)
    with torch.inference_mode():
        # Two polyphase taps of 4 channels on an activation a few ulps apart (see ELU_DEPTH).
        assert_close_f32(convtr(x, activation=elu), convtr(elu(x)), depth=4 * 2 + ELU_DEPTH)
