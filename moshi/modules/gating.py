"""Gated feed-forward (SwiGLU-style) and the activation-name factory shared by the transformers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "gelu": F.gelu,
    "silu": F.silu,
    "mish": F.mish,
    "softsign": F.softsign,
    "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Returns the activation function called ``name`` (Kyutai's names: ``silu``, ``gelu``, ...)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


def gating_hidden_size(dim: int, dim_feedforward: int) -> int:
    """Hidden width of the gated FFN.

    A gated FFN has three matrices instead of two, so the hidden width is ``2/3`` of ``dim_feedforward`` to keep
    the parameter count; the exact ``4·dim`` case uses ``21·dim/8`` (Kyutai's rule, kept for weight
    compatibility).
    """
    if dim_feedforward == 4 * dim:
        return 21 * dim // 8
    return 2 * dim_feedforward // 3


class ActivationGating(nn.Module):
    """``linear_out(act(a) * b)`` where ``[a | b] = linear_in(x)``: the **first** half is activated.

    Args:
        dim (int): model width.
        dim_feedforward (int): nominal FFN width (see :func:`gating_hidden_size`).
        activation (Callable): activation applied to the first half.
        quantized (bool): int8 weights; not supported, only ``False`` is accepted.
        **factory_kwargs: ``device`` and ``dtype`` of the two Linears.
    """

    def __init__(
        self,
        dim: int,
        dim_feedforward: int,
        activation: Callable[[torch.Tensor], torch.Tensor],
        quantized: bool = False,
        **factory_kwargs: Any,
    ) -> None:
        super().__init__()
        if quantized:
            raise NotImplementedError("ActivationGating(quantized=True): int8 quantisation is not supported")
        hidden = gating_hidden_size(dim, dim_feedforward)
        self.hidden = hidden
        self.activation = activation
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False, **factory_kwargs)
        self.linear_out = nn.Linear(hidden, dim, bias=False, **factory_kwargs)
        n_params = sum(p.numel() for p in self.parameters())
        if n_params > 2 * dim * dim_feedforward:
            raise ValueError(
                f"gated FFN has {n_params} parameters, more than 2*dim*dim_feedforward = {2 * dim * dim_feedforward}"
            )

    def gate(self, u: torch.Tensor) -> torch.Tensor:
        """``act(first half) * second half`` of a ``linear_in`` output ``[..., 2*hidden]``."""
        if self.activation is F.silu:
            return _SiluGate.apply(u)
        # unbind (not two slices): its backward stacks the two gradients into one fresh buffer, where each
        # slice's backward would zero-fill a full-size buffer and copy into it.
        a, b = u.view(*u.shape[:-1], 2, self.hidden).unbind(-2)
        return self.activation(a) * b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.gate(self.linear_in(x)))


class _SiluGate(torch.autograd.Function):
    """``silu(a) * b`` for ``[a | b] = u``, with both halves' gradients written into one buffer.

    Autograd's chain (silu, mul, then the backward of splitting ``u``) gives the same bits but allocates each
    half's gradient and then copies both into a third buffer; this writes them in place and keeps ``silu(a)``
    from the forward instead of recomputing it.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        a, b = u.view(*u.shape[:-1], 2, u.shape[-1] // 2).unbind(-2)
        s = F.silu(a)
        ctx.save_for_backward(a, b, s)
        return s * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        a, b, s = ctx.saved_tensors
        grad_u = grad.new_empty(*grad.shape[:-1], 2, a.shape[-1])
        grad_a, grad_b = grad_u.unbind(-2)
        torch.mul(grad, s, out=grad_b)
        # grad·b goes into grad_a's own slot and silu's backward then runs in place there (an elementwise kernel
        # reading and writing the same element): no temporary of that size.
        torch.mul(grad, b, out=grad_a)
        torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)
        return grad_u.view(*grad.shape[:-1], 2 * a.shape[-1])


def make_gating(
    name: str,
    dim: int,
    dim_feedforward: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ActivationGating:
    """Builds an :class:`ActivationGating` with the activation called ``name``."""
    return ActivationGating(dim, dim_feedforward, get_activation(name), device=device, dtype=dtype)
