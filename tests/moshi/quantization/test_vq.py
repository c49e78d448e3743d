"""Vector quantisers: nearest-codeword choice, round trips, split-RVQ semantics, legacy buffer names."""

from __future__ import annotations

import pytest
import torch

from moshi.quantization import EuclideanCodebook, ResidualVectorQuantizer, SplitResidualVectorQuantizer
from tests.helpers.numerics import assert_codes_match

# The float32 distances of ``torch.cdist`` (a matrix product for these sizes) and the float64 reference may
# order two codewords differently only when their distances are within float32 rounding of a squared
# distance, about eps * (|x|^2 + |c|^2) / |x - c|: below 1e-4 for unit-normal data and distances above 0.01.
CDIST_TOL = 1e-4


def _brute_force_nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each row of ``x``, in float64 with an explicit loop."""
    x, centroids = x.double(), centroids.double()
    return torch.stack([((centroids - row) ** 2).sum(-1).argmin() for row in x])


def _set_codebook(codebook: EuclideanCodebook, centroids: torch.Tensor, usage: torch.Tensor) -> None:
    codebook.load_state_dict(
        {"_initialized": torch.ones(1), "cluster_usage": usage, "embedding_sum": centroids * usage[:, None]}
    )


def test_codebook_centroids_are_sums_over_clamped_usage():
    codebook = EuclideanCodebook(dim=3, codebook_size=4, epsilon=1e-5)
    total = torch.randn(4, 3)
    usage = torch.tensor([2.0, 0.5, 0.0, 1e-7])
    codebook.load_state_dict({"_initialized": torch.ones(1), "cluster_usage": usage, "embedding_sum": total})
    expected = total / torch.tensor([2.0, 0.5, 1e-5, 1e-5])[:, None]
    torch.testing.assert_close(codebook.embedding, expected, rtol=0, atol=0)  # the same division


@pytest.mark.parametrize("size, dim", [pytest.param(5, 2, id="5x2"), pytest.param(64, 8, id="64x8")])
def test_codebook_picks_nearest_codeword(size, dim):
    codebook = EuclideanCodebook(dim=dim, codebook_size=size)
    _set_codebook(codebook, torch.randn(size, dim), torch.rand(size) + 0.5)
    x = torch.randn(2, 7, dim)
    codes = codebook.encode(x)
    assert codes.shape == (2, 7) and codes.dtype == torch.int64
    expected = _brute_force_nearest(x.reshape(-1, dim), codebook.embedding).view(1, 1, -1)
    latents = x.reshape(-1, dim).T[None]  # [1, dim, 14]
    assert_codes_match(codes.view(1, 1, -1), expected, latents, [codebook.embedding], CDIST_TOL)


def test_codebook_cache_follows_buffer_changes():
    codebook = EuclideanCodebook(dim=2, codebook_size=3)
    before = codebook.embedding.clone()
    codebook.embedding_sum.mul_(2.0)  # in-place edit
    torch.testing.assert_close(codebook.embedding, before * 2.0)
    new = torch.randn(3, 2)
    _set_codebook(codebook, new, torch.ones(3))  # load
    torch.testing.assert_close(codebook.embedding, new)


@pytest.mark.parametrize("rows,size", [(1, 2048), (30, 64), (5, 16), (40, 16)])
def test_codebook_codes_equal_cdist_argmin(rows, size):
    """The cached distance operand reproduces ``torch.cdist``'s own computation: same codes, bit for bit
    (both sides run the same matmul on the same shapes, or ``cdist`` itself below its matmul threshold)."""
    torch.manual_seed(rows + size)
    codebook = EuclideanCodebook(dim=32, codebook_size=size)
    _set_codebook(codebook, torch.randn(size, 32), torch.rand(size) + 0.5)
    x = torch.randn(2, rows, 32)
    expected = torch.cdist(x.reshape(1, -1, 32), codebook.embedding[None], p=2)[0].argmin(-1).view(2, rows)
    assert torch.equal(codebook.encode(x), expected)


def test_codebook_accepts_legacy_buffer_names():
    codebook = EuclideanCodebook(dim=2, codebook_size=3)
    total, usage = torch.randn(3, 2), torch.rand(3) + 1.0
    codebook.load_state_dict({"inited": torch.ones(1), "cluster_size": usage, "embed_avg": total}, strict=True)
    torch.testing.assert_close(codebook.embedding_sum, total, rtol=0, atol=0)
    torch.testing.assert_close(codebook.cluster_usage, usage, rtol=0, atol=0)
    codebook.load_state_dict({"inited": torch.ones(1), "cluster_size": usage, "embed_sum": total * 3}, strict=True)
    torch.testing.assert_close(codebook.embedding_sum, total * 3, rtol=0, atol=0)


def test_rvq_encodes_residuals_and_decode_of_codewords_round_trips():
    rvq = ResidualVectorQuantizer(dimension=4, n_q=3, bins=16)
    x = torch.randn(2, 4, 5)
    codes = rvq.encode(x)
    assert codes.shape == (2, 3, 5)
    residual = x.clone()
    expected = []
    codebooks = [layer._codebook.embedding for layer in rvq.vq.layers]
    for centroids in codebooks:
        flat = residual.transpose(1, 2).reshape(-1, 4)
        expected.append(_brute_force_nearest(flat, centroids).view(2, 5))
        residual = residual - centroids[expected[-1]].transpose(1, 2)
    expected_codes = torch.stack(expected, dim=1)
    assert_codes_match(codes, expected_codes, x, codebooks, CDIST_TOL)
    torch.testing.assert_close(rvq.decode(expected_codes), x - residual, rtol=1e-5, atol=1e-5)


def test_rvq_decode_of_codebook_vectors_returns_them():
    rvq = ResidualVectorQuantizer(dimension=4, n_q=1, bins=8)
    centroids = rvq.vq.layers[0]._codebook.embedding
    x = centroids[torch.tensor([[3, 0, 7, 7]])].transpose(1, 2)  # [1, 4, 4]: codewords 3, 0, 7, 7
    codes = rvq.encode(x)
    assert codes.tolist() == [[[3, 0, 7, 7]]]
    torch.testing.assert_close(rvq.decode(codes), x, rtol=0, atol=0)


def _split_rvq() -> SplitResidualVectorQuantizer:
    return SplitResidualVectorQuantizer(dimension=6, n_q=5, bins=16, input_dimension=10, output_dimension=12)


def test_split_rvq_keys_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in _split_rvq().state_dict().items()}
    assert shapes["rvq_first.input_proj.weight"] == (6, 10, 1)
    assert shapes["rvq_first.output_proj.weight"] == (12, 6, 1)
    assert shapes["rvq_rest.vq.layers.3._codebook.embedding_sum"] == (16, 6)
    assert shapes["rvq_rest.vq.layers.3._codebook.cluster_usage"] == (16,)
    assert shapes["rvq_rest.vq.layers.3._codebook._initialized"] == (1,)
    assert "rvq_rest.vq.layers.4._codebook._initialized" not in shapes
    assert len(shapes) == 4 + 3 * 5


def test_split_rvq_acoustic_levels_quantise_the_projected_input_not_the_semantic_residual():
    quantizer = _split_rvq()
    x = torch.randn(2, 10, 3)
    codes = quantizer.encode(x)
    assert codes.shape == (2, 5, 3)
    # The same projections and distances on the same shapes: the same bits.
    torch.testing.assert_close(codes[:, :1], quantizer.rvq_first.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(codes[:, 1:], quantizer.rvq_rest.encode(x), rtol=0, atol=0)
    expected = quantizer.rvq_first.decode(codes[:, :1]) + quantizer.rvq_rest.decode(codes[:, 1:])
    torch.testing.assert_close(quantizer.decode(codes), expected, rtol=0, atol=0)


def test_split_rvq_num_codebooks_limits_encode_and_decode_takes_any_prefix():
    quantizer = _split_rvq()
    x = torch.randn(1, 10, 4)
    all_codes = quantizer.encode(x)
    quantizer.set_num_codebooks(3)
    assert quantizer.num_codebooks == 3
    codes = quantizer.encode(x)
    torch.testing.assert_close(codes, all_codes[:, :3], rtol=0, atol=0)
    assert quantizer.decode(all_codes[:, :2]).shape == (1, 12, 4)
    with pytest.raises(ValueError, match=r"num_codebooks must be in \[1, 5\], got 6"):
        quantizer.set_num_codebooks(6)
    with pytest.raises(ValueError, match="between 1 and 5 codebooks, got 6"):
        quantizer.decode(torch.zeros(1, 6, 4, dtype=torch.long))
