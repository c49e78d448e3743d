"""DSAA building blocks for users of the DSAA fork, plus experimental modules.

The DSAA blocks themselves live in :mod:`moshi.modules.dsaa_blocks` and are re-exported here under the names
the fork's code imports. This file also holds modules no model in the repo uses yet:

- :class:`TopKSparseAutoencoder`: a top-k sparse autoencoder for inspecting the vectors a DSAA model feeds its
  projectors (``moshi.models.dsaa.dsaa_vectors``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from moshi.modules.dsaa_blocks import (
    MaskedEmbedding,
    ResidualDepformerProjector,
    StreamingLLM,
    TextPreservingProjector,
    masked_lookup,
)


class SAEOutput(NamedTuple):
    reconstruction: torch.Tensor
    codes: torch.Tensor


class TopKSparseAutoencoder(nn.Module):
    """A sparse autoencoder whose codes keep the ``k`` largest ReLU activations of each row.

    ``codes = topk_k(relu(encoder(x - decoder.bias)))`` and ``reconstruction = decoder(codes)``. Subtracting the
    decoder bias first centres the input, so the bias learns the data mean.

    Args:
        input_dim (int): width of the analysed vectors.
        latent_dim (int): number of dictionary atoms.
        k (int): active atoms per row (``1 <= k <= latent_dim``).
        tied_init (bool): initialise the decoder as the encoder's transpose with unit-norm atoms, which is a
            good starting point for top-k SAEs; the weights are not tied afterwards.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        k: int,
        tied_init: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= k <= latent_dim:
            raise ValueError(f"k must be in [1, latent_dim={latent_dim}], got {k}")
        self.k = k
        self.encoder = nn.Linear(input_dim, latent_dim, device=device, dtype=dtype)
        self.decoder = nn.Linear(latent_dim, input_dim, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.zeros_(self.encoder.bias)
            nn.init.zeros_(self.decoder.bias)
            if tied_init:
                atoms = self.encoder.weight / self.encoder.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
                self.encoder.weight.copy_(atoms)
                self.decoder.weight.copy_(atoms.t())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., input_dim]`` -> sparse non-negative codes ``[..., latent_dim]`` (``<= k`` non-zeros)."""
        pre = torch.relu(self.encoder(x - self.decoder.bias))
        top = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` ``[..., latent_dim]`` -> ``[..., input_dim]``."""
        return self.decoder(codes)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        codes = self.encode(x)
        return SAEOutput(self.decode(codes), codes)


__all__ = [
    "MaskedEmbedding",
    "ResidualDepformerProjector",
    "SAEOutput",
    "StreamingLLM",
    "TextPreservingProjector",
    "TopKSparseAutoencoder",
    "masked_lookup",
]
