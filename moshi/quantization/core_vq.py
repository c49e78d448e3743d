"""Codebooks and residual vector quantisation (inference only: Mimi is frozen in this toolkit).

A codebook stores running sums rather than centroids (``embedding_sum`` and ``cluster_usage``), because that
is how Kyutai's checkpoints store it; the centroid of entry ``j`` is ``embedding_sum[j] / max(usage[j], eps)``.
The centroids are derived once and cached until the buffers change (load, ``.to()``, in-place edit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Names used by older checkpoints for the codebook buffers, mapped to the current names.
LEGACY_CODEBOOK_BUFFERS: dict[str, str] = {
    "inited": "_initialized",
    "cluster_size": "cluster_usage",
    "embed_avg": "embedding_sum",
    "embed_sum": "embedding_sum",
}


def _version_of(tensor: torch.Tensor) -> int | None:
    """The in-place version counter of ``tensor``, or None for inference tensors, which do not keep one."""
    try:
        return tensor._version
    except RuntimeError:
        return None

# ``torch.cdist`` computes L2 distances directly when neither side has more rows than this, else by a matmul.
_CDIST_DIRECT_MAX = 25


class EuclideanCodebook(nn.Module):
    """A codebook of ``codebook_size`` vectors of size ``dim``; codes are nearest centroids in L2 distance.

    Args:
        dim (int): size of each codeword.
        codebook_size (int): number of codewords.
        decay (float): EMA decay of codebook training; kept for the constructor's signature (no training here).
        epsilon (float): lower bound of ``cluster_usage`` when turning the sums into centroids.
        threshold_usage_ratio (float): training only (dead-code replacement threshold).
        replaced_usage_ratio (float): training only (usage given to a replaced code).
        check_unused_every (int): training only (steps between dead-code checks).
        device (torch.device | str | None): where the buffers live.

    Note:
        The buffers are float32 whatever the model dtype: distances between nearby codewords need the
        precision. An untrained codebook gets random (standard normal) centroids so that a freshly built model
        produces varied codes. Codebooks are never learnt here (Mimi stays frozen), so there is no k-means
        initialisation and ``_initialized`` starts at 1.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        threshold_usage_ratio: float = 0.1,
        replaced_usage_ratio: float = 1.0,
        check_unused_every: int = 5,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.decay = decay
        self.epsilon = epsilon
        self.threshold_usage_ratio = threshold_usage_ratio
        self.replaced_usage_ratio = replaced_usage_ratio
        self.check_unused_every = check_unused_every
        f32 = {"device": device, "dtype": torch.float32}
        self.register_buffer("_initialized", torch.ones(1, **f32))
        self.register_buffer("cluster_usage", torch.ones(codebook_size, **f32))
        self.register_buffer("embedding_sum", torch.randn(codebook_size, dim, **f32))
        self._cache_key: Any = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Older checkpoints name the buffers differently; rename them before the strict key check.
        for legacy, current in LEGACY_CODEBOOK_BUFFERS.items():
            if prefix + legacy in state_dict and prefix + current not in state_dict:
                state_dict[prefix + current] = state_dict.pop(prefix + legacy)
        self._cache_key = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroids ``[codebook_size, dim]`` and their distance operand ``[1, codebook_size, dim + 2]``.

        The operand is ``[centroid | 1 | ||centroid||^2]``: one matmul with ``[-2 x | ||x||^2 | 1]`` gives the
        squared distances. ``torch.cdist`` builds that same operand for every call (a full pass over the codebook,
        about a fifth of a streaming encode); built once here, the distances come from the very same matmul.
        """
        usage, total = self.cluster_usage, self.embedding_sum
        versions = (_version_of(usage), _version_of(total))
        key = (usage.data_ptr(), total.data_ptr(), usage.device, *versions)
        if self._cache is None or key != self._cache_key or None in versions:
            centroids = (total / usage.clamp(min=self.epsilon)[:, None])[None]
            norms = centroids.pow(2).sum(-1, keepdim=True)
            operand = torch.cat([centroids, torch.ones_like(norms), norms], dim=-1)
            self._cache = (centroids[0], operand)
            self._cache_key = key
        return self._cache

    @property
    def embedding(self) -> torch.Tensor:
        """The centroids ``[codebook_size, dim]`` (float32), recomputed only when the buffers changed."""
        return self._cached()[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest codeword of each vector: ``x [..., dim]`` -> codes ``[...]`` (int64).

        The distances are those of ``torch.cdist`` (Kyutai's choice) computed the way it computes them, then
        ``argmin``, so ties and near-ties resolve identically: past 25 vectors on either side, ``cdist`` expands
        ``||x - c||^2`` into one matmul (:meth:`_cached`); below, it sums the squared differences directly.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"codebook expects vectors of size {self.dim}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.dim).float()[None]
        centroids, operand = self._cached()
        if flat.shape[1] <= _CDIST_DIRECT_MAX and self.codebook_size <= _CDIST_DIRECT_MAX:
            distances = torch.cdist(flat, centroids[None], p=2)
        else:
            norms = flat.pow(2).sum(-1, keepdim=True)
            expanded = torch.cat([flat.mul(-2), norms, torch.ones_like(norms)], dim=-1)
            distances = expanded.matmul(operand.mT).clamp_min_(0).sqrt_()
        return distances[0].argmin(dim=-1).view(x.shape[:-1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codewords of ``codes [...]`` -> ``[..., dim]`` (float32)."""
        return nn.functional.embedding(codes, self.embedding)


class VectorQuantization(nn.Module):
    """One quantisation level over channel-first latents ``[B, dim, T]``.

    Args:
        dim (int): latent size.
        codebook_size (int): number of codewords.
        codebook_dim (int | None): codeword size; must be None or ``dim`` (no projection around the codebook).
        decay (float): see :class:`EuclideanCodebook`.
        epsilon (float): see :class:`EuclideanCodebook`.
        threshold_usage_ratio (float): see :class:`EuclideanCodebook`.
        **kwargs: further :class:`EuclideanCodebook` arguments (``replaced_usage_ratio``,
            ``check_unused_every``, ``device``).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        threshold_usage_ratio: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if codebook_dim is not None and codebook_dim != dim:
            raise ValueError(f"codebook_dim={codebook_dim} differs from dim={dim}: projected codebooks are not supported")
        self._codebook = EuclideanCodebook(
            dim, codebook_size, decay=decay, epsilon=epsilon, threshold_usage_ratio=threshold_usage_ratio, **kwargs
        )

    @property
    def codebook_size(self) -> int:
        return self._codebook.codebook_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, dim, T]`` -> codes ``[B, T]``."""
        return self._codebook.encode(x.transpose(1, 2))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, T]`` -> ``[B, dim, T]`` (float32)."""
        return self._codebook.decode(codes).transpose(1, 2)


class ResidualVectorQuantization(nn.Module):
    """A stack of levels, each quantising what the previous levels left over.

    Args:
        num_quantizers (int): number of levels.
        codebook_offset (int): index of the first level among all the levels of the model (for naming).
        **kwargs: :class:`VectorQuantization` arguments of every level (``dim``, ``codebook_size``, ...).
    """

    def __init__(self, *, num_quantizers: int, codebook_offset: int = 0, **kwargs: Any) -> None:
        super().__init__()
        self.codebook_offset = codebook_offset
        self.layers = nn.ModuleList(VectorQuantization(**kwargs) for _ in range(num_quantizers))

    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """Quantises ``x [B, dim, T]`` with the first ``n_q`` levels (all when None) -> codes ``[B, n_q, T]``."""
        n_q = len(self.layers) if n_q is None else n_q
        residual = x.float()
        codes = []
        for layer in self.layers[:n_q]:
            level_codes = layer.encode(residual)
            residual = residual - layer.decode(level_codes)
            codes.append(level_codes)
        if not codes:
            return torch.zeros(x.shape[0], 0, x.shape[-1], dtype=torch.long, device=x.device)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the codewords of ``codes [B, K, T]`` over its K levels -> ``[B, dim, T]`` (float32)."""
        if codes.shape[1] > len(self.layers):
            raise ValueError(f"got {codes.shape[1]} codebooks but this quantizer has {len(self.layers)}")
        quantized = torch.zeros((), device=codes.device)
        for k in range(codes.shape[1]):
            quantized = quantized + self.layers[k].decode(codes[:, k])
        return quantized
