"""Every SEANet module streams on its own: chunked calls inside ``streaming(B)`` equal one call on the whole input.

Tolerance: streamed and one-shot calls convolve the same samples with the same weights, but on tensors of
different lengths, for which the conv backend may order its float32 accumulations differently. Each output is
a sum of at most ``C_in * K`` (here <= 16 * 7) unit-scale products per layer, so the per-layer rounding
difference is a few ulp of the sum (~1e-6 relative); a handful of layers keeps it well under 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from moshi.models.compression import DEFAULT_MIMI_CONFIG
from moshi.modules.seanet import SEANetDecoder, SEANetEncoder, SEANetResnetBlock

TOL = {"rtol": 1e-5, "atol": 1e-5}

# Mimi's SEANet settings at tiny widths; two stages so chunks cross a stride boundary inside the network.
TINY_SEANET = {**DEFAULT_MIMI_CONFIG["seanet"], "dimension": 8, "n_filters": 2, "ratios": [4, 2]}
HOP = 8  # product of the ratios


def _streamed(module: torch.nn.Module, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    assert sum(sizes) == x.shape[-1]
    with module.streaming(x.shape[0]):
        return torch.cat([module(chunk) for chunk in x.split(sizes, dim=-1)], dim=-1)


@pytest.mark.parametrize("true_skip", [True, False])
@pytest.mark.parametrize("sizes", [[60], [1] * 60, [7, 13, 40], [20, 20, 20]])
def test_resnet_block_streams_like_one_shot(true_skip, sizes):
    block = SEANetResnetBlock(8, dilations=[2, 1], pad_mode="constant", causal=True, true_skip=true_skip)
    x = torch.randn(2, 8, 60)
    with torch.no_grad():
        expected = block(x)
        streamed = _streamed(block, x, sizes)
    assert streamed.shape == (2, 8, 60)
    torch.testing.assert_close(streamed, expected, **TOL)


def test_resnet_block_has_its_own_state_and_reset_restarts_it():
    block = SEANetResnetBlock(4, kernel_sizes=[3, 1], dilations=[4, 1], causal=True)
    x = torch.randn(3, 4, 12)
    assert block._streaming_state is None
    with torch.no_grad(), block.streaming(3):
        assert block.is_streaming and block.block[1].is_streaming
        block(torch.randn(3, 4, 5))
        block.reset_streaming()
        restarted = block(x)
    assert not block.is_streaming and not block.block[1].is_streaming
    torch.testing.assert_close(restarted, block(x), **TOL)


@pytest.mark.parametrize(
    "frames", [pytest.param([12], id="one-call"), [1] * 12, [2, 4, 6], [5, 7]]
)
def test_encoder_streams_like_one_shot(frames):
    encoder = SEANetEncoder(**TINY_SEANET)
    x = torch.randn(2, 1, 12 * HOP)
    with torch.no_grad():
        expected = encoder(x)
        streamed = _streamed(encoder, x, [f * HOP for f in frames])
    assert expected.shape == (2, 8, 12)
    torch.testing.assert_close(streamed, expected, **TOL)


@pytest.mark.parametrize("frames", [pytest.param([12], id="one-call"), [1] * 12, [3, 4, 5], [6, 6]])
def test_decoder_streams_like_one_shot(frames):
    decoder = SEANetDecoder(**TINY_SEANET)
    z = torch.randn(2, 8, 12)
    with torch.no_grad():
        expected = decoder(z)
        streamed = _streamed(decoder, z, frames)
    assert expected.shape == (2, 1, 12 * HOP)
    torch.testing.assert_close(streamed, expected, **TOL)


def test_encoder_reset_streaming_restarts_every_layer():
    encoder = SEANetEncoder(**TINY_SEANET)
    x = torch.randn(1, 1, 4 * HOP)
    with torch.no_grad(), encoder.streaming(1):
        encoder(torch.randn(1, 1, 3 * HOP))
        encoder.reset_streaming()
        restarted = encoder(x)
    with torch.no_grad():
        torch.testing.assert_close(restarted, encoder(x), **TOL)
