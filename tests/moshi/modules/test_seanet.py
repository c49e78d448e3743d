"""SEANet fast paths: time blocks and fused activations give the result of plain whole-input layers."""

from __future__ import annotations

import pytest
import torch

from moshi.modules.seanet import SEANetDecoder, SEANetEncoder, block_length
from moshi.modules.streaming import StreamingContainer
from tests.helpers.numerics import assert_close_f32, summed_fan_in

# Mimi's ratios (hop 960) with small widths.
SMALL = {"n_filters": 4, "dimension": 16, "n_residual_layers": 1, "ratios": [8, 6, 5, 4], "last_kernel_size": 3}


def _plain(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The definition: every layer of ``module.model`` in turn, on the whole input."""
    for layer in module.model:
        x = layer(x)
    return x


@pytest.fixture(scope="module")
def encoder() -> SEANetEncoder:
    torch.manual_seed(0)
    return SEANetEncoder(**SMALL)


@pytest.fixture(scope="module")
def decoder() -> SEANetDecoder:
    torch.manual_seed(1)
    return SEANetDecoder(**SMALL)


def test_block_length_scales_with_batch_and_whole_strides():
    assert block_length(15360, 1, 20) == 768
    assert block_length(15360, 8, 20) == 192  # a quarter of the budget at most batch sizes
    assert block_length(15360, 2, 20) == 384
    assert block_length(0, 1, 20) == 0


@pytest.mark.parametrize("side", ["encoder", "decoder"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("block_samples", [1920, 4000])
def test_blocked_seanet_equals_plain_layers(request, side, batch, block_samples):
    module = request.getfixturevalue(side)
    # Several blocks and a partial last one: 21 latent frames, 960 samples each.
    x, out_shape = (torch.randn(batch, 1, 960 * 21), (batch, 16, 21))
    if side == "decoder":
        x, out_shape = torch.randn(batch, 16, 21), (batch, 1, 960 * 21)
    module.block_samples = block_samples
    try:
        with torch.inference_mode():
            got = module(x)
            expected = _plain(module, x)
    finally:
        module.block_samples = 15360
    assert got.shape == out_shape
    # Blocks and the whole input may run different conv kernels: equal up to float32 rounding of every sum.
    assert_close_f32(got, expected, depth=summed_fan_in(module))


def _streamed(module: torch.nn.Module, x: torch.Tensor, sizes: list[int], block_samples: int) -> torch.Tensor:
    holder = StreamingContainer()
    holder.module = module
    module.block_samples = block_samples
    try:
        with torch.inference_mode(), holder.streaming(x.shape[0]):
            return torch.cat([module(chunk) for chunk in x.split(sizes, dim=-1)], dim=-1)
    finally:
        module.block_samples = 15360


def test_long_streaming_calls_run_in_blocks_and_equal_plain_streaming(encoder, decoder):
    x = torch.randn(2, 1, 960 * 40)
    sizes = [960 * 2, 960 * 30, 960 * 8]  # the long middle call is split into blocks
    expected = _streamed(encoder, x, sizes, block_samples=0)
    blocked = _streamed(encoder, x, sizes, block_samples=3840)
    assert_close_f32(blocked, expected, depth=summed_fan_in(encoder))  # other kernels for blocks, see above
    z = torch.randn(2, 16, 40)
    expected = _streamed(decoder, z, [2, 30, 8], block_samples=0)
    blocked = _streamed(decoder, z, [2, 30, 8], block_samples=3840)
    assert_close_f32(blocked, expected, depth=summed_fan_in(decoder))


def test_paused_streams_are_not_blocked(encoder):
    holder = StreamingContainer()
    holder.module = encoder
    x = torch.randn(2, 1, 960 * 20)
    encoder.block_samples = 3840
    try:
        with torch.inference_mode(), holder.streaming(2):
            holder.set_exec_mask(torch.tensor([True, False]))
            got = encoder(x)
        encoder.block_samples = 0
        with torch.inference_mode(), holder.streaming(2):
            holder.set_exec_mask(torch.tensor([True, False]))
            expected = encoder(x)
    finally:
        encoder.block_samples = 15360
    assert_close_f32(got, expected, depth=summed_fan_in(encoder))  # paused or not, sums may run other kernels


def test_autograd_runs_plain_layers_with_gradients(encoder, decoder):
    x = torch.randn(1, 1, 960 * 21, requires_grad=True)
    z = encoder(x)
    y = decoder(z)
    with torch.inference_mode():
        expected = decoder(encoder(x))
    # Autograd runs unfused activations and whole inputs: same sums, possibly other kernels.
    assert_close_f32(y, expected, depth=summed_fan_in(encoder, decoder))
    y.square().sum().backward()
    grads = [p.grad for p in [*encoder.parameters(), *decoder.parameters()]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0
    encoder.zero_grad(set_to_none=True)
    decoder.zero_grad(set_to_none=True)
