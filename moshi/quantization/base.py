"""The interface every quantiser of a compression model offers, its result type, and a pass-through quantiser."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn

# Bits charged per float of a latent that is passed through unquantised (for the bandwidth estimate).
_FLOAT_BITS = 32


@dataclass
class QuantizedResult:
    """What a quantiser's ``forward`` returns.

    Args:
        x (torch.Tensor): the quantised latent (or, from a compression model, the decoded audio).
        codes (torch.Tensor): the codes ``[B, K, T]``.
        bandwidth (torch.Tensor): bandwidth of the codes in kb/s (a scalar tensor).
        penalty (torch.Tensor | None): training penalty (commitment loss); zero or None outside training.
        metrics (dict): extra training metrics.
    """

    x: torch.Tensor
    codes: torch.Tensor
    bandwidth: torch.Tensor
    penalty: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)


class BaseQuantizer(nn.Module, abc.ABC):
    """A quantiser: latent ``[B, D, T]`` <-> codes ``[B, K, T]``."""

    def __init__(self) -> None:
        super().__init__()
        self._ema_frozen = False

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, frame_rate: int) -> QuantizedResult:
        """Quantises ``x`` and reports the codes and their bandwidth at ``frame_rate`` frames per second."""

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent -> codes."""

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> latent."""

    @property
    @abc.abstractmethod
    def cardinality(self) -> int:
        """Codes per codebook."""

    @property
    @abc.abstractmethod
    def total_codebooks(self) -> int:
        """Codebooks the quantiser has."""

    @property
    @abc.abstractmethod
    def num_codebooks(self) -> int:
        """Codebooks :meth:`encode` uses."""

    @abc.abstractmethod
    def set_num_codebooks(self, n: int) -> None:
        """Sets how many codebooks :meth:`encode` uses."""

    @property
    def semantic_quantizer(self) -> BaseQuantizer:
        """The quantiser of the semantic levels (the whole quantiser unless it is split)."""
        return self

    @property
    def acoustic_quantizer(self) -> BaseQuantizer:
        """The quantiser of the acoustic levels (the whole quantiser unless it is split)."""
        return self

    @property
    def ema_frozen(self) -> bool:
        """Whether codebook updates are frozen; the codebooks here never update, so this is only recorded."""
        return self._ema_frozen

    def ema_frozen_(self, ema_frozen: bool) -> None:
        """Records whether codebook (EMA) updates are frozen; see :attr:`ema_frozen`."""
        self._ema_frozen = ema_frozen


def projection(
    in_dim: int,
    out_dim: int,
    force: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A bias-free 1x1 conv from ``in_dim`` to ``out_dim`` channels; the identity when the sizes match, unless
    ``force`` keeps the conv (a checkpoint may hold its weights)."""
    if in_dim == out_dim and not force:
        return nn.Identity()
    return nn.Conv1d(in_dim, out_dim, 1, bias=False, device=device, dtype=dtype)


class DummyQuantizer(BaseQuantizer):
    """Passes the (projected) latent through unquantised: the "codes" are the floats ``[B, 1, D, T]``.

    Useful to run a compression model without quantisation. Its bandwidth counts 32 bits per float.

    Args:
        dimension (int): latent size between the projections.
        input_dimension (int | None): latent size on the way in (defaults to ``dimension``).
        output_dimension (int | None): latent size on the way out (defaults to ``dimension``).
        device (torch.device | str | None): where the projections live.
        dtype (torch.dtype | None): their dtype.
    """

    def __init__(
        self,
        dimension: int,
        input_dimension: int | None = None,
        output_dimension: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dimension = dimension
        self.input_dimension = input_dimension or dimension
        self.output_dimension = output_dimension or dimension
        self.input_proj = projection(self.input_dimension, dimension, False, device, dtype)
        self.output_proj = projection(dimension, self.output_dimension, False, device, dtype)

    def forward(self, x: torch.Tensor, frame_rate: int) -> QuantizedResult:
        latent = self.input_proj(x)
        bandwidth = latent.numel() * _FLOAT_BITS * frame_rate / 1000 / len(x)
        return QuantizedResult(self.output_proj(latent), latent.unsqueeze(1), torch.tensor(bandwidth, device=x.device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, input_dimension, T]`` -> ``[B, 1, dimension, T]`` (the projected floats)."""
        return self.input_proj(x).unsqueeze(1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, 1, dimension, T]`` -> ``[B, output_dimension, T]``."""
        return self.output_proj(codes.squeeze(1))

    @property
    def cardinality(self) -> int:
        return 1

    @property
    def total_codebooks(self) -> int:
        return 1

    @property
    def num_codebooks(self) -> int:
        return 1

    def set_num_codebooks(self, n: int) -> None:
        raise AttributeError("DummyQuantizer has exactly one (unquantised) codebook; it cannot be changed")
