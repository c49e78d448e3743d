"""Residual vector quantisers with input/output projections, and Mimi's split (semantic + acoustic) variant."""

from __future__ import annotations

import torch
from torch import nn

from .core_vq import ResidualVectorQuantization


class ResidualVectorQuantizer(nn.Module):
    """Projects latents to the codebook size, quantises them residually, and projects back on decode.

    Args:
        dimension (int): codebook vector size.
        input_dimension (int | None): latent size on the way in (defaults to ``dimension``).
        output_dimension (int | None): latent size on the way out (defaults to ``dimension``).
        n_q (int): number of levels, all active until :meth:`set_num_codebooks` lowers it.
        bins (int): codewords per level.
        force_projection (bool): keep 1x1 projections even when the sizes match (Mimi does).
        epsilon (float): lower bound of the cluster usage when computing centroids.
        device (torch.device | str | None): where parameters and buffers live.
        dtype (torch.dtype | None): dtype of the projections (codebooks are always float32).
    """

    def __init__(
        self,
        dimension: int = 256,
        input_dimension: int | None = None,
        output_dimension: int | None = None,
        n_q: int = 8,
        bins: int = 1024,
        force_projection: bool = False,
        epsilon: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dimension = dimension
        self.input_dimension = input_dimension or dimension
        self.output_dimension = output_dimension or dimension
        self.max_n_q = n_q
        self.n_q = n_q
        self.bins = bins
        factory = {"device": device, "dtype": dtype}
        self.input_proj: nn.Module
        self.output_proj: nn.Module
        if self.input_dimension == dimension and not force_projection:
            self.input_proj = nn.Identity()
        else:
            self.input_proj = nn.Conv1d(self.input_dimension, dimension, 1, bias=False, **factory)
        if self.output_dimension == dimension and not force_projection:
            self.output_proj = nn.Identity()
        else:
            self.output_proj = nn.Conv1d(dimension, self.output_dimension, 1, bias=False, **factory)
        self.vq = ResidualVectorQuantization(n_q, dimension, bins, epsilon, device=device)

    def set_num_codebooks(self, n: int) -> None:
        """Sets how many levels :meth:`encode` uses (0 ≤ n ≤ the number built)."""
        if not 0 <= n <= self.max_n_q:
            raise ValueError(f"num_codebooks must be in [0, {self.max_n_q}], got {n}")
        self.n_q = n

    @property
    def num_codebooks(self) -> int:
        return self.n_q

    @property
    def total_codebooks(self) -> int:
        return self.max_n_q

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, input_dimension, T]`` -> codes ``[B, n_q, T]`` (int64)."""
        return self.vq.encode(self.input_proj(x), self.n_q)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, K, T]`` (any K ≤ the number built) -> ``[B, output_dimension, T]``."""
        quantized = self.vq.decode(codes)
        weight = getattr(self.output_proj, "weight", None)
        if weight is not None:
            quantized = quantized.to(weight.dtype)
        return self.output_proj(quantized)


class SplitResidualVectorQuantizer(nn.Module):
    """Mimi's quantiser: ``n_q_semantic`` semantic levels (``rvq_first``) beside the acoustic ones (``rvq_rest``).

    Both quantisers read the *same* latent through their own input projection: the acoustic levels do not see
    the residual of the semantic level. Decoding sums the two projected reconstructions.

    Args:
        dimension (int): codebook vector size.
        n_q (int): total number of levels.
        n_q_semantic (int): levels in ``rvq_first``.
        bins (int): codewords per level.
        input_dimension (int | None): latent size on the way in.
        output_dimension (int | None): latent size on the way out.
        epsilon (float): lower bound of the cluster usage when computing centroids.
        device (torch.device | str | None): where parameters and buffers live.
        dtype (torch.dtype | None): dtype of the projections.
    """

    def __init__(
        self,
        dimension: int = 256,
        n_q: int = 8,
        n_q_semantic: int = 1,
        bins: int = 1024,
        input_dimension: int | None = None,
        output_dimension: int | None = None,
        epsilon: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= n_q_semantic < n_q:
            raise ValueError(f"n_q_semantic must be in [1, n_q={n_q}), got {n_q_semantic}")
        common = {
            "dimension": dimension,
            "input_dimension": input_dimension,
            "output_dimension": output_dimension,
            "bins": bins,
            "force_projection": True,
            "epsilon": epsilon,
            "device": device,
            "dtype": dtype,
        }
        self.max_n_q = n_q
        self.n_q_semantic = n_q_semantic
        self.dimension = dimension
        self.bins = bins
        self.rvq_first = ResidualVectorQuantizer(n_q=n_q_semantic, **common)
        self.rvq_rest = ResidualVectorQuantizer(n_q=n_q - n_q_semantic, **common)

    @property
    def num_codebooks(self) -> int:
        return self.rvq_first.n_q + self.rvq_rest.n_q

    @property
    def total_codebooks(self) -> int:
        return self.max_n_q

    @property
    def cardinality(self) -> int:
        return self.bins

    def set_num_codebooks(self, n: int) -> None:
        """Sets how many levels :meth:`encode` returns (``n_q_semantic ≤ n ≤ n_q``)."""
        if not self.n_q_semantic <= n <= self.max_n_q:
            raise ValueError(f"num_codebooks must be in [{self.n_q_semantic}, {self.max_n_q}], got {n}")
        self.rvq_rest.set_num_codebooks(n - self.n_q_semantic)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, input_dimension, T]`` -> codes ``[B, num_codebooks, T]`` (int64)."""
        codes = self.rvq_first.encode(x)
        if self.rvq_rest.n_q > 0:
            codes = torch.cat([codes, self.rvq_rest.encode(x)], dim=1)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, K, T]`` for any ``n_q_semantic ≤ K ≤ n_q`` -> ``[B, output_dimension, T]``."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, K, T], got shape {tuple(codes.shape)}")
        if not self.n_q_semantic <= codes.shape[1] <= self.max_n_q:
            raise ValueError(
                f"codes must have between {self.n_q_semantic} and {self.max_n_q} codebooks, got {codes.shape[1]}"
            )
        quantized = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if codes.shape[1] > self.n_q_semantic:
            quantized = quantized + self.rvq_rest.decode(codes[:, self.n_q_semantic :])
        return quantized
