"""Top-k sparse autoencoders for analysing the vectors a model computes (one per stream of stored vectors).

``modules.TopKSparseAutoencoder`` re-exports :class:`TopKSparseAutoencoder`; ``finetune.analysis.sae_training``
trains it and ``scripts/ae_train.py`` writes its checkpoints.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from ..utils.atomic import atomic_save_safetensors


class SAEOutput(NamedTuple):
    reconstruction: torch.Tensor
    codes: torch.Tensor


class TopKSparseAutoencoder(nn.Module):
    """A sparse autoencoder whose codes keep the ``k`` largest activations of each row.

    Two code rules:

    - ReLU top-k (``signed=False``): ``codes = topk_k(relu(encoder(x - decoder.bias)))`` and
      ``reconstruction = decoder(codes)``. Subtracting the decoder bias first centres the input, so the bias
      learns the data mean.
    - signed top-k (``signed=True``): the input is scaled to unit norm, the ``k`` entries of
      ``encoder(x / |x|)`` largest in magnitude are kept with their sign, and the decoder bias stays zero, so
      only directions are encoded and the code can be signed (an embedding compressor rather than a
      dictionary of non-negative features).

    Args:
        input_dim (int): width of the analysed vectors.
        latent_dim (int): number of dictionary atoms.
        k (int): active atoms per row (``1 <= k <= latent_dim``).
        tied_init (bool): initialise the decoder as the encoder's transpose with unit-norm atoms, which is a
            good starting point for top-k SAEs; the weights are not tied afterwards.
        signed (bool): the signed top-k rule above.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        k: int,
        tied_init: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        signed: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= k <= latent_dim:
            raise ValueError(f"k must be in [1, latent_dim={latent_dim}], got {k}")
        self.k = k
        self.signed = signed
        self.encoder = nn.Linear(input_dim, latent_dim, device=device, dtype=dtype)
        self.decoder = nn.Linear(latent_dim, input_dim, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.zeros_(self.encoder.bias)
            nn.init.zeros_(self.decoder.bias)
            if tied_init:
                atoms = self.encoder.weight / self.encoder.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
                self.encoder.weight.copy_(atoms)
                self.decoder.weight.copy_(atoms.t())
        if signed:
            self.decoder.bias.requires_grad_(False)

    @property
    def input_dim(self) -> int:
        return self.encoder.in_features

    @property
    def latent_dim(self) -> int:
        return self.encoder.out_features

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the code reconstructs: ``x`` itself, or ``x / |x|`` for the signed rule."""
        if self.signed:
            return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x

    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """``encoder(prepare_input(x) - decoder.bias)`` ``[..., latent_dim]``, before the top-k selection."""
        return self.encoder(self.prepare_input(x) - self.decoder.bias)

    def select(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The sparse codes of pre-activations: the top ``k`` (default ``self.k``) by the model's rule."""
        k = self.k if k is None else k
        if self.signed:
            top = torch.topk(pre.abs(), k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, pre.gather(-1, top.indices))
        pre = torch.relu(pre)
        top = torch.topk(pre, k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., input_dim]`` -> sparse codes ``[..., latent_dim]`` (``<= k`` non-zeros)."""
        return self.select(self.preactivations(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` ``[..., latent_dim]`` -> ``[..., input_dim]``."""
        return self.decoder(codes)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        codes = self.encode(x)
        return SAEOutput(self.decode(codes), codes)

    def save(self, path: str | os.PathLike, **metadata: str) -> None:
        """Writes the weights and the shape (``input_dim``, ``latent_dim``, ``k``, ``signed``) as safetensors,
        atomically; ``metadata`` strings (stream name, objective...) are stored alongside."""
        meta = {
            "input_dim": str(self.input_dim),
            "latent_dim": str(self.latent_dim),
            "k": str(self.k),
            "signed": str(int(self.signed)),
            **metadata,
        }
        atomic_save_safetensors(path, self.state_dict(), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> TopKSparseAutoencoder:
        """A model written by :meth:`save` (its shape read from the file's metadata)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            missing = [key for key in ("input_dim", "latent_dim", "k") if key not in meta]
            if missing:
                raise ValueError(f"{path}: not a sparse-autoencoder checkpoint (no {', '.join(missing)} metadata)")
            state = {key: f.get_tensor(key) for key in f.keys()}
        model = cls(int(meta["input_dim"]), int(meta["latent_dim"]), int(meta["k"]), tied_init=False,
                    device=device, dtype=state["encoder.weight"].dtype, signed=meta.get("signed") == "1")
        model.load_state_dict(state)
        model.metadata = dict(meta)
        return model


__all__ = ["SAEOutput", "TopKSparseAutoencoder"]
