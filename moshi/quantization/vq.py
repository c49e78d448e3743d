"""Residual vector quantisers with input/output projections, and Mimi's split (semantic + acoustic) variant."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import BaseQuantizer, QuantizedResult, projection
from .core_vq import ResidualVectorQuantization


def _bandwidth(num_codebooks: int, bins: int, frame_rate: float, device: torch.device) -> torch.Tensor:
    """kb/s of ``num_codebooks`` codes of ``log2(bins)`` bits each, ``frame_rate`` times a second."""
    return torch.tensor(num_codebooks * math.log2(bins) * frame_rate / 1000, device=device)


def _check_eval(module: nn.Module) -> None:
    if module.training:
        raise RuntimeError(
            f"{type(module).__name__}.forward in training mode (codebook EMA updates, quantiser dropout) is not "
            "supported by this package: the codebooks are frozen; call .eval() first"
        )


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, K, T], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")


class ResidualVectorQuantizer(BaseQuantizer):
    """Projects latents to the codebook size, quantises them residually, and projects back on decode.

    Args:
        dimension (int): codebook vector size.
        input_dimension (int | None): latent size on the way in (defaults to ``dimension``).
        output_dimension (int | None): latent size on the way out (defaults to ``dimension``).
        n_q (int): number of levels, all active until :meth:`set_num_codebooks` lowers it.
        q_dropout (bool): training only (random number of levels); must be False.
        no_quantization_rate (float): training only (share of unquantised batches); must be 0.
        bins (int): codewords per level.
        decay (float): codebook EMA decay (training only; recorded).
        threshold_usage_ratio (float): training only (dead-code threshold; recorded).
        replaced_usage_ratio (float): training only (usage of a replaced code; recorded).
        codebook_offset (int): index of the first level among all the levels of the model.
        force_projection (bool): keep 1x1 projections even when the sizes match (Mimi does).
        epsilon (float): lower bound of the cluster usage when computing centroids.
        device (torch.device | str | None): where parameters and buffers live.
        dtype (torch.dtype | None): dtype of the projections (codebooks are always float32).
    """

    def __init__(
        self,
        dimension: int = 128,
        input_dimension: int | None = None,
        output_dimension: int | None = None,
        n_q: int = 8,
        q_dropout: bool = False,
        no_quantization_rate: float = 0.0,
        bins: int = 1024,
        decay: float = 0.99,
        threshold_usage_ratio: float = 0.1,
        replaced_usage_ratio: float = 1.0,
        codebook_offset: int = 0,
        force_projection: bool = False,
        epsilon: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if q_dropout or no_quantization_rate:
            raise ValueError(
                "q_dropout and no_quantization_rate are quantiser-training features, not supported by this package"
            )
        self.dimension = dimension
        self.input_dimension = input_dimension or dimension
        self.output_dimension = output_dimension or dimension
        self.max_n_q = n_q
        self.n_q = n_q
        self.bins = bins
        self.input_proj = projection(self.input_dimension, dimension, force_projection, device, dtype)
        self.output_proj = projection(dimension, self.output_dimension, force_projection, device, dtype)
        self.vq = ResidualVectorQuantization(
            num_quantizers=n_q, codebook_offset=codebook_offset, dim=dimension, codebook_size=bins, decay=decay,
            epsilon=epsilon, threshold_usage_ratio=threshold_usage_ratio, replaced_usage_ratio=replaced_usage_ratio,
            device=device,
        )

    def forward(self, x: torch.Tensor, frame_rate: int) -> QuantizedResult:
        """Quantises ``x`` (eval mode only): the decoded codes, the codes, their bandwidth and a zero penalty."""
        _check_eval(self)
        codes = self.encode(x)
        bandwidth = _bandwidth(self.n_q, self.bins, frame_rate, x.device)
        return QuantizedResult(self.decode(codes), codes, bandwidth, torch.zeros((), device=x.device))

    @property
    def cardinality(self) -> int:
        return self.bins

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
        _check_codes(codes)
        quantized = self.vq.decode(codes)
        weight = getattr(self.output_proj, "weight", None)
        if weight is not None:
            quantized = quantized.to(weight.dtype)
        return self.output_proj(quantized)


class SplitResidualVectorQuantizer(BaseQuantizer):
    """Mimi's quantiser: ``n_q_semantic`` semantic levels (``rvq_first``) beside the acoustic ones (``rvq_rest``).

    Both quantisers read the *same* latent through their own input projection: the acoustic levels do not see
    the residual of the semantic level. Decoding sums the two projected reconstructions.

    Args:
        n_q (int): total number of levels.
        n_q_semantic (int): levels in ``rvq_first``.
        **kwargs: :class:`ResidualVectorQuantizer` arguments shared by both parts (``dimension``, ``bins``,
            ``input_dimension``, ``output_dimension``, ``device``, ``dtype``, ...); projections are always kept.
    """

    def __init__(self, *, n_q: int = 8, n_q_semantic: int = 1, **kwargs: Any) -> None:
        super().__init__()
        if not 1 <= n_q_semantic < n_q:
            raise ValueError(f"n_q_semantic must be in [1, n_q={n_q}), got {n_q_semantic}")
        if "force_projection" in kwargs:
            raise ValueError("SplitResidualVectorQuantizer always projects: do not pass force_projection")
        self.max_n_q = n_q
        self.n_q_semantic = n_q_semantic
        self.rvq_first = ResidualVectorQuantizer(n_q=n_q_semantic, force_projection=True, **kwargs)
        self.rvq_rest = ResidualVectorQuantizer(
            n_q=n_q - n_q_semantic, force_projection=True, codebook_offset=n_q_semantic, **kwargs
        )
        self.dimension = self.rvq_first.dimension
        self.bins = self.rvq_first.bins

    def forward(self, x: torch.Tensor, frame_rate: int) -> QuantizedResult:
        """Quantises ``x`` (eval mode only): the decoded codes, the codes, their bandwidth and a zero penalty."""
        _check_eval(self)
        codes = self.encode(x)
        bandwidth = _bandwidth(codes.shape[1], self.bins, frame_rate, x.device)
        return QuantizedResult(self.decode(codes), codes, bandwidth, torch.zeros((), device=x.device))

    @property
    def semantic_quantizer(self) -> ResidualVectorQuantizer:
        return self.rvq_first

    @property
    def acoustic_quantizer(self) -> ResidualVectorQuantizer:
        return self.rvq_rest

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
        _check_codes(codes)
        if not self.n_q_semantic <= codes.shape[1] <= self.max_n_q:
            raise ValueError(
                f"codes must have between {self.n_q_semantic} and {self.max_n_q} codebooks, got {codes.shape[1]}"
            )
        quantized = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if codes.shape[1] > self.n_q_semantic:
            quantized = quantized + self.rvq_rest.decode(codes[:, self.n_q_semantic :])
        return quantized
