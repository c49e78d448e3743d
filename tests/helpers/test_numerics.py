"""The portable comparison helpers accept rounding and near ties, and nothing more."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.numerics import EPS_F32, assert_close_f32, assert_codes_match, f32_tolerance, summed_fan_in


def test_tolerance_is_the_worst_case_for_short_sums_and_the_probabilistic_bound_for_long_ones():
    assert f32_tolerance(4, 2.0) == (4 * EPS_F32, 8 * EPS_F32)
    rtol, atol = f32_tolerance(10_000, 1.0)
    assert rtol == pytest.approx(8 * math.sqrt(10_000) * EPS_F32) and atol == rtol
    with pytest.raises(ValueError, match="positive number of accumulated terms, got 0"):
        f32_tolerance(0, 1.0)


def test_sums_in_another_order_pass_and_a_changed_term_fails():
    terms = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    forward = terms.sum(-1)
    backward = terms.flip(-1).cumsum(-1)[:, -1]  # sequential, the other way round
    assert_close_f32(backward, forward, depth=4096)
    changed = terms.clone()
    changed[5, 17] += 1.0  # one term of typical size wrong
    with pytest.raises(AssertionError):
        assert_close_f32(changed.sum(-1), forward, depth=4096)


def test_summed_fan_in_counts_linear_conv_and_transposed_conv():
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 3), torch.nn.Conv1d(4, 6, 3, groups=2), torch.nn.ConvTranspose1d(6, 2, 8, stride=4)
    )
    assert summed_fan_in(model) == 10 + 2 * 3 + 6 * 2


def _encode(latents: torch.Tensor, codebooks: list[torch.Tensor]) -> torch.Tensor:
    residual, codes = latents.transpose(1, 2), []
    for codebook in codebooks:
        level = torch.cdist(residual, codebook[None].expand(len(residual), -1, -1)).argmin(-1)
        residual = residual - codebook[level]
        codes.append(level)
    return torch.stack(codes, 1)


@pytest.fixture
def quantised() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    codebooks = [torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)]
    latents = torch.randn(2, 4, 50, generator=g)
    # Frame (0, 5) sits half-way between codeword 2 and its nearest neighbour: a tie.
    codebook = codebooks[0]
    neighbour = int(torch.cdist(codebook[2:3], codebook)[0].topk(2, largest=False).indices[1])
    latents[0, :, 5] = (codebook[2] + codebook[neighbour]) / 2
    return latents, codebooks


def test_a_flip_at_a_tie_passes_and_frees_the_later_levels_of_its_frame(quantised):
    latents, codebooks = quantised
    codes = _encode(latents, codebooks)
    assert_codes_match(codes, codes.clone().short(), latents, codebooks, 1e-4)
    first, second = torch.cdist(latents[0, :, 5][None], codebooks[0])[0].topk(2, largest=False).indices.tolist()
    flipped = codes.clone()
    flipped[0, 0, 5] = second if int(codes[0, 0, 5]) == first else first
    flipped[0, 1, 5] = (flipped[0, 1, 5] + 3) % 16
    assert_codes_match(codes, flipped, latents, codebooks, 1e-4)


def test_a_flip_without_a_tie_and_too_many_flips_fail(quantised):
    latents, codebooks = quantised
    codes = _encode(latents, codebooks)
    wrong = codes.clone()
    wrong[1, 1, 30] = (wrong[1, 1, 30] + 1) % 16
    with pytest.raises(AssertionError, match=r"level 1: 1 code flips are not near ties.*\[1, 30\]"):
        assert_codes_match(codes, wrong, latents, codebooks, 1e-4)
    shifted = codes.clone()
    shifted[:, 0, :20] = (shifted[:, 0, :20] + 1) % 16
    with pytest.raises(AssertionError, match="40 of 100 frames flipped at near ties, more than the 10 allowed"):
        assert_codes_match(codes, shifted, latents, codebooks, 1e3)
