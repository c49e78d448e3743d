"""Mimi against the numbers Kyutai's package gives: default config, weights from the
deterministic fill of ``tests/helpers/fill.py``.

One full-size model (79M parameters) is built for the whole module; the input is 3 frames (5760 samples).
"""

from __future__ import annotations

import math

import pytest
import torch

from moshi.models.compression import MimiModel, build_mimi
from tests.helpers.fill import fill_state_dict
from tests.helpers.numerics import assert_close_f32, assert_quantizer_codes_match, mimi_depth

FRAME = 1920


@pytest.fixture(scope="module")
def mimi() -> MimiModel:
    torch.manual_seed(0)
    model = build_mimi()
    fill_state_dict(model)
    model.set_num_codebooks(8)
    return model


@pytest.fixture(scope="module")
def signal() -> torch.Tensor:
    t = torch.arange(3 * FRAME, dtype=torch.float64)
    x = 0.5 * torch.sin(2 * math.pi * 440 * t / 24000) + 0.2 * torch.sin(2 * math.pi * 97 * t / 24000)
    return x.float().view(1, 1, -1)


EXPECTED_CODES = [
    [1372, 1112, 382], [618, 598, 1697], [678, 1440, 1440], [623, 623, 623],
    [1232, 304, 1917], [44, 726, 644], [59, 59, 59], [1247, 1247, 1291],
]


@pytest.fixture(scope="module")
def codes(mimi: MimiModel, signal: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return mimi.encode(signal)


@pytest.fixture(scope="module")
def decoded(mimi: MimiModel, codes: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return mimi.decode(codes)


def test_latent_before_quantizer_matches_reference(mimi, signal):
    with torch.inference_mode():
        latent = mimi.encode_to_latent(signal, quantize=False)
    assert latent.shape == (1, 512, 3)
    expected = torch.tensor(
        [
            [-0.866940, -1.931015, -0.473436],
            [2.224247, 3.666158, 3.768047],
            [0.440737, -0.154024, 0.838061],
            [1.383639, 0.964006, -1.612213],
        ]
    )
    torch.testing.assert_close(latent[0, :4], expected, rtol=0, atol=1e-4)
    assert latent.abs().double().sum().item() == pytest.approx(3889.8498, abs=2e-2)


def test_codes_match_reference(mimi, signal, codes):
    assert codes.dtype == torch.int64
    assert codes.shape == (1, 8, 3)
    # The reference codes come from another machine, whose latent agrees with ours to the 1e-4 per element
    # asserted above (at most 1e-4 * sqrt(512) in L2 per frame): a code may differ only at a near tie of
    # that size.
    with torch.inference_mode():
        latent = mimi.encode_to_latent(signal, quantize=False)
    reference = torch.tensor([EXPECTED_CODES])
    assert_quantizer_codes_match(mimi.quantizer, latent, codes, reference, latent_gap=1e-4 * 512**0.5)


def test_quantized_latent_matches_reference(mimi, codes):
    with torch.inference_mode():
        quantized = mimi.quantizer.decode(codes)
    assert quantized.shape == (1, 512, 3)
    assert quantized.abs().double().sum().item() == pytest.approx(249.74469, abs=1e-3)
    torch.testing.assert_close(quantized[0, :3, 0], torch.tensor([0.230839, 0.166221, 0.044071]), rtol=0, atol=1e-5)


def test_decode_matches_reference(decoded):
    assert decoded.shape == (1, 1, 3 * FRAME)
    y = decoded[0, 0]
    first = torch.tensor([-0.0247101, -0.1478445, -0.0092619, -0.0654877, -0.0675002])
    torch.testing.assert_close(y[:5], first, rtol=0, atol=1e-5)
    torch.testing.assert_close(y[1920:1923], torch.tensor([-0.1302740, -0.1710880, -0.2143126]), rtol=0, atol=1e-5)
    assert y.abs().double().sum().item() == pytest.approx(1301.5169, abs=1e-2)


def test_partial_frame_is_zero_padded_to_whole_frames(mimi, signal):
    with torch.inference_mode():
        codes = mimi.encode(signal[..., :2020])
        padded = torch.nn.functional.pad(signal[..., :2020], (0, 2 * FRAME - 2020))
        expected = mimi.encode(padded)
    assert codes.shape == (1, 8, 2)
    assert torch.equal(codes, expected)  # the same padded input through the same kernels


def test_streaming_encode_gives_the_codes_of_one_shot(mimi, signal, codes):
    chunks = signal.split(FRAME, dim=-1)
    with torch.inference_mode():
        with mimi.streaming(1):
            streamed = torch.cat([mimi.encode(chunk) for chunk in chunks], dim=-1)
        with mimi.streaming(1):
            streamed_latent = torch.cat([mimi.encode_to_latent(c, quantize=False) for c in chunks], dim=-1)
        latent = mimi.encode_to_latent(signal, quantize=False)
    # Frame-sized calls run other kernels than the whole signal: the latents agree to float32 rounding over
    # the encoder's accumulation depth, and the codes except at near ties of that size.
    assert_close_f32(streamed_latent, latent, depth=mimi_depth(mimi, "encoder"))
    assert_quantizer_codes_match(mimi.quantizer, latent, codes, streamed, latent_b=streamed_latent)


def test_streaming_decode_matches_one_shot(mimi, codes, decoded):
    with torch.inference_mode(), mimi.streaming(1):
        streamed = torch.cat([mimi.decode(codes[..., t : t + 1]) for t in range(codes.shape[-1])], dim=-1)
    # One-frame calls run other kernels than the whole sequence: equal up to rounding over the decoder.
    assert_close_f32(streamed, decoded, depth=mimi_depth(mimi, "decoder"))


def test_time_blocks_give_the_codes_and_audio_of_whole_input_layers(mimi):
    """13 frames are longer than one time block: blocking may change only the float32 summation order.

    A batch-1 conv goes to a different kernel above a size threshold, so a block and the whole input may sum
    in different orders; an error in the blocks (a lost or repeated left context) moves the outputs by
    their own size, far above the tolerance.
    """
    x = 0.3 * torch.randn(1, 1, 13 * FRAME, generator=torch.Generator().manual_seed(3))
    sides = (mimi.encoder, mimi.decoder)

    def run(block_samples: int, codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for side in sides:
            side.block_samples = block_samples
        with torch.inference_mode():
            own = mimi.encode(x)
            # Both runs decode the same codes, so a legitimate near-tie flip cannot move the audio.
            return mimi.encode_to_latent(x, quantize=False), own, mimi.decode(own if codes is None else codes)

    try:
        whole_latent, whole_codes, whole_audio = run(0, None)
        latent, codes, audio = run(15360, whole_codes)
    finally:
        for side in sides:
            side.block_samples = 15360
    assert_close_f32(latent, whole_latent, depth=mimi_depth(mimi, "encoder"))
    assert_quantizer_codes_match(mimi.quantizer, whole_latent, whole_codes, codes, latent_b=latent)
    assert_close_f32(audio, whole_audio, depth=mimi_depth(mimi, "decoder"))
