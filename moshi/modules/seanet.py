"""SEANet convolutional encoder/decoder of the Mimi codec (causal, streamable).

The layer lists are plain ``nn.Sequential`` named ``model`` so that state-dict keys read
``encoder.model.{i}...`` and ``decoder.model.{i}...`` exactly as in Kyutai's checkpoints; activations take an
index too even though they have no weights.

Speed (CPU inference, autograd off): the layers run through :func:`run_layers`, which lets each conv write
the preceding ELU straight into its padded input, and long calls run the high-rate stages in time blocks
(see ``BLOCK_SAMPLES``). Neither changes the math: results equal the plain path up to float32 rounding
(blocks and whole inputs may run different conv kernels). With autograd on, every layer runs plainly on the
whole input.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch
from torch import nn

from .conv import StreamingConv1d, StreamingConvTranspose1d
from .streaming import StreamingContainer, StreamingModule

# Long calls run the high-rate stages (where 10 s of audio make 61 MB activations) in time blocks of about
# BLOCK_SAMPLES audio samples per batch item: block-sized tensors stay in cache and reuse freed memory, where
# full-length ones are fresh mmaps that page-fault on first touch (together about 40% of a one-shot call on
# CPU). Causal convs carry their left context from block to block, so the result is that of one call.
# Larger batches get shorter blocks, down to a quarter of it (measured on CPU, batch 1 and 8).
BLOCK_SAMPLES = 15360
BLOCKED_STAGES = 2


def _activation(name: str, params: dict | None) -> nn.Module:
    """``nn.<name>(**params)``, e.g. ``ELU`` with ``{"alpha": 1.0}``; unknown names raise ``ValueError``."""
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"activation {name!r} is not a torch.nn module name (e.g. 'ELU')")
    return cls(**(params or {}))


class SEANetResnetBlock(StreamingContainer):
    """Residual block ``x + block(x)``, ``block`` = [act, conv(dim→dim/compress), act, conv(→dim)].

    It streams on its own (``with block.streaming(B):``): its convs keep their left context between calls.

    Args:
        dim (int): channels.
        kernel_sizes (Sequence[int]): kernel of each conv of the block.
        dilations (Sequence[int]): dilation of each conv of the block.
        activation (str): ``torch.nn`` activation name.
        activation_params (dict | None): its keyword arguments.
        norm (str): must be ``"none"``.
        norm_params (dict | None): arguments of the norm (none apply with ``"none"``).
        causal (bool): must be True.
        pad_mode (str): padding of the convs.
        compress (int): channel reduction of the hidden layer.
        true_skip (bool): identity shortcut (otherwise a learnt 1x1 conv, key ``shortcut``).
        device (torch.device | str | None): where the weights live.
        dtype (torch.dtype | None): weight dtype.
    """

    def __init__(
        self,
        dim: int,
        kernel_sizes: Sequence[int] = (3, 1),
        dilations: Sequence[int] = (1, 1),
        activation: str = "ELU",
        activation_params: dict | None = None,
        norm: str = "none",
        norm_params: dict | None = None,
        causal: bool = True,
        pad_mode: str = "constant",
        compress: int = 2,
        true_skip: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(kernel_sizes) != len(dilations):
            raise ValueError(f"kernel_sizes {list(kernel_sizes)} and dilations {list(dilations)} differ in length")
        hidden = dim // compress
        layers: list[nn.Module] = []
        for i, (kernel_size, dilation) in enumerate(zip(kernel_sizes, dilations)):
            in_ch = dim if i == 0 else hidden
            out_ch = dim if i == len(kernel_sizes) - 1 else hidden
            layers += [
                _activation(activation, activation_params),
                StreamingConv1d(
                    in_ch, out_ch, kernel_size, dilation=dilation, norm=norm, norm_kwargs=norm_params, causal=causal,
                    pad_mode=pad_mode, device=device, dtype=dtype,
                ),
            ]
        self.block = nn.Sequential(*layers)
        self.shortcut: nn.Module
        if true_skip:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = StreamingConv1d(
                dim, dim, 1, norm=norm, norm_kwargs=norm_params, causal=causal, pad_mode=pad_mode, device=device,
                dtype=dtype,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on the block's fresh conv output: saves one full-size allocation (same sum, bit for bit).
        return run_layers(self.block, x).add_(self.shortcut(x))


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (StreamingConv1d, StreamingConvTranspose1d))


def _is_activation(module: nn.Module) -> bool:
    return not isinstance(module, StreamingModule) and next(module.parameters(), None) is None


def run_layers(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``, handing each activation that precedes a conv to that conv (``conv(x, activation=act)``).

    The conv can then write the activation's output straight into its left-padded input instead of
    concatenating a fresh copy; the values are those of calling the layers one by one.
    """
    modules = list(layers)
    i = 0
    while i < len(modules):
        module = modules[i]
        following = modules[i + 1] if i + 1 < len(modules) else None
        if following is not None and _is_conv(following) and _is_activation(module):
            x = following(x, activation=module)
            i += 2
        else:
            x = module(x)
            i += 1
    return x


def _top_streaming_modules(module: nn.Module) -> list[StreamingModule]:
    """Streaming modules inside ``module`` that are not themselves inside another streaming module."""
    found: list[StreamingModule] = []
    for child in module.children():
        if isinstance(child, StreamingModule):
            found.append(child)
        else:
            found.extend(_top_streaming_modules(child))
    return found


def block_length(block_samples: int, batch: int, stride: int) -> int:
    """Steps per time block at the blocked layers' input: about ``block_samples / batch`` audio samples per
    item (at least a quarter of ``block_samples``), a whole number of ``stride`` steps; 0 disables blocking."""
    per_item = max(block_samples // batch, block_samples // 4)
    return per_item // stride


def _run_in_blocks(layers: nn.Sequential, x: torch.Tensor, block: int) -> torch.Tensor | None:
    """``layers(x)`` computed over time blocks of ``block`` steps, or None when blocks could change the result.

    Outside streaming, the convs get a throwaway streaming state for the duration of the call; inside a
    streaming block their own state carries on. Callers use it only with autograd off (states are updated in
    place). A stream paused by an exec mask would not advance between blocks, so then it returns None.
    """
    stateful = _top_streaming_modules(layers)
    streaming = [module.is_streaming for module in stateful]
    if any(streaming):
        if not all(streaming):
            return None
        for module in stateful:
            state = module._streaming_state
            if state is None or not bool(state.exec_mask.all()):
                return None
    with ExitStack() as stack:
        if not any(streaming):
            for module in stateful:
                stack.enter_context(module.streaming(x.shape[0]))
        outputs = [run_layers(layers, chunk) for chunk in x.split(block, dim=-1)]
    return torch.cat(outputs, dim=-1)


def _block_kwargs(conv: dict) -> dict:
    """Conv keyword arguments under :class:`SEANetResnetBlock`'s names (its ``norm_params`` is ``norm_kwargs``)."""
    kwargs = dict(conv)
    kwargs["norm_params"] = kwargs.pop("norm_kwargs")
    return kwargs


def _check_causal(causal: bool) -> None:
    if not causal:
        raise ValueError("seanet causal=False is not supported")


class SEANetEncoder(StreamingContainer):
    """Waveform ``[B, channels, L]`` -> latent ``[B, dimension, L / prod(ratios)]``.

    It streams on its own (``with encoder.streaming(B):``), each call taking a multiple of ``hop_length``
    samples.

    Args:
        channels (int): audio channels.
        dimension (int): latent size.
        n_filters (int): channels after the first conv; doubled at each downsampling.
        n_residual_layers (int): residual blocks per stage.
        ratios (Sequence[int]): downsampling ratios, applied in *reverse* order.
        activation (str): ``torch.nn`` activation name.
        activation_params (dict | None): its keyword arguments.
        norm (str): must be ``"none"``.
        norm_params (dict | None): arguments of the norm (none apply with ``"none"``).
        kernel_size (int): kernel of the first conv.
        last_kernel_size (int): kernel of the last conv.
        residual_kernel_size (int): kernel of the residual blocks' first conv.
        dilation_base (int): dilation of residual block j is ``dilation_base ** j``.
        causal (bool): must be True.
        pad_mode (str): padding of the convs.
        true_skip (bool): identity shortcuts in the residual blocks.
        compress (int): channel reduction inside the residual blocks.
        disable_norm_outer_blocks (int): accepted for config compatibility (no effect with ``norm="none"``).
        mask_fn (nn.Module | None): must be None (masking a layer's output is a training feature).
        mask_position (int | None): layer index ``mask_fn`` would follow; ignored without it.
        device (torch.device | str | None): where the weights live.
        dtype (torch.dtype | None): weight dtype.
    """

    def __init__(
        self,
        channels: int = 1,
        dimension: int = 128,
        n_filters: int = 32,
        n_residual_layers: int = 3,
        ratios: Sequence[int] = (8, 5, 4, 2),
        activation: str = "ELU",
        activation_params: dict | None = None,
        norm: str = "none",
        norm_params: dict | None = None,
        kernel_size: int = 7,
        last_kernel_size: int = 7,
        residual_kernel_size: int = 3,
        dilation_base: int = 2,
        causal: bool = True,
        pad_mode: str = "constant",
        true_skip: bool = True,
        compress: int = 2,
        disable_norm_outer_blocks: int = 0,
        mask_fn: nn.Module | None = None,
        mask_position: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_causal(causal)
        if mask_fn is not None:
            raise ValueError("SEANetEncoder mask_fn is not supported by this package (a training feature)")
        self.channels = channels
        self.dimension = dimension
        self.ratios = list(reversed(ratios))
        self.hop_length = 1
        for ratio in self.ratios:
            self.hop_length *= ratio
        act = {"activation": activation, "activation_params": activation_params or {"alpha": 1.0}}
        conv = {
            "norm": norm, "norm_kwargs": norm_params, "causal": causal, "pad_mode": pad_mode, "device": device,
            "dtype": dtype,
        }
        mult = 1
        layers: list[nn.Module] = [StreamingConv1d(channels, n_filters, kernel_size, **conv)]
        for ratio in self.ratios:
            width = mult * n_filters
            for j in range(n_residual_layers):
                layers.append(
                    SEANetResnetBlock(
                        width, kernel_sizes=(residual_kernel_size, 1), dilations=(dilation_base**j, 1),
                        compress=compress, true_skip=true_skip, **act, **_block_kwargs(conv),
                    )
                )
            layers.append(_activation(act["activation"], act["activation_params"]))
            layers.append(StreamingConv1d(width, width * 2, kernel_size=ratio * 2, stride=ratio, **conv))
            mult *= 2
        layers.append(_activation(act["activation"], act["activation_params"]))
        layers.append(StreamingConv1d(mult * n_filters, dimension, last_kernel_size, **conv))
        self.model = nn.Sequential(*layers)
        blocked = min(BLOCKED_STAGES, len(self.ratios))
        self._blocked_layers = 1 + blocked * (n_residual_layers + 2)
        self._blocked_stride = 1
        for ratio in self.ratios[:blocked]:
            self._blocked_stride *= ratio
        # Time-block budget of long calls (see BLOCK_SAMPLES); 0 runs every layer on the whole input.
        self.block_samples = BLOCK_SAMPLES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = block_length(self.block_samples, x.shape[0], self._blocked_stride) * self._blocked_stride
        length = x.shape[-1]
        if torch.is_grad_enabled() or block == 0 or length <= block or length % self._blocked_stride:
            return run_layers(self.model, x)
        high_rate = _run_in_blocks(self.model[: self._blocked_layers], x, block)
        if high_rate is None:
            return run_layers(self.model, x)
        return run_layers(self.model[self._blocked_layers :], high_rate)


class SEANetDecoder(StreamingContainer):
    """Latent ``[B, dimension, T]`` -> waveform ``[B, channels, T * prod(ratios)]``.

    Takes the same arguments as :class:`SEANetEncoder` (ratios applied in the given order, no mask), plus
    ``final_activation`` (``torch.nn`` name or None; Mimi has none) and its ``final_activation_params``, and
    ``trim_right_ratio`` (must be 1.0: a causal decoder trims on the right). It streams on its own, any
    number of frames per call.
    """

    def __init__(
        self,
        channels: int = 1,
        dimension: int = 128,
        n_filters: int = 32,
        n_residual_layers: int = 3,
        ratios: Sequence[int] = (8, 5, 4, 2),
        activation: str = "ELU",
        activation_params: dict | None = None,
        final_activation: str | None = None,
        final_activation_params: dict | None = None,
        norm: str = "none",
        norm_params: dict | None = None,
        kernel_size: int = 7,
        last_kernel_size: int = 7,
        residual_kernel_size: int = 3,
        dilation_base: int = 2,
        causal: bool = True,
        pad_mode: str = "constant",
        true_skip: bool = True,
        compress: int = 2,
        disable_norm_outer_blocks: int = 0,
        trim_right_ratio: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_causal(causal)
        if trim_right_ratio != 1.0:
            raise ValueError(f"trim_right_ratio={trim_right_ratio} is not supported (causal decoders trim right)")
        self.channels = channels
        self.dimension = dimension
        self.ratios = list(ratios)
        self.hop_length = 1
        for ratio in self.ratios:
            self.hop_length *= ratio
        act = {"activation": activation, "activation_params": activation_params or {"alpha": 1.0}}
        conv = {"norm": norm, "norm_kwargs": norm_params, "causal": causal, "device": device, "dtype": dtype}
        mult = 2 ** len(self.ratios)
        layers: list[nn.Module] = [
            StreamingConv1d(dimension, mult * n_filters, kernel_size, pad_mode=pad_mode, **conv)
        ]
        for ratio in self.ratios:
            width = mult * n_filters
            layers.append(_activation(act["activation"], act["activation_params"]))
            layers.append(StreamingConvTranspose1d(width, width // 2, kernel_size=ratio * 2, stride=ratio, **conv))
            for j in range(n_residual_layers):
                layers.append(
                    SEANetResnetBlock(
                        width // 2, kernel_sizes=(residual_kernel_size, 1), dilations=(dilation_base**j, 1),
                        compress=compress, true_skip=true_skip, pad_mode=pad_mode, **act,
                        **_block_kwargs(conv),
                    )
                )
            mult //= 2
        layers.append(_activation(act["activation"], act["activation_params"]))
        layers.append(StreamingConv1d(n_filters, channels, last_kernel_size, pad_mode=pad_mode, **conv))
        if final_activation is not None:
            layers.append(_activation(final_activation, final_activation_params))
        self.model = nn.Sequential(*layers)
        blocked = min(BLOCKED_STAGES, len(self.ratios))
        self._first_blocked_layer = 1 + (len(self.ratios) - blocked) * (n_residual_layers + 2)
        self._blocked_stride = 1
        for ratio in self.ratios[len(self.ratios) - blocked :]:
            self._blocked_stride *= ratio
        # Time-block budget of long calls (see BLOCK_SAMPLES); 0 runs every layer on the whole input.
        self.block_samples = BLOCK_SAMPLES

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        low_rate = run_layers(self.model[: self._first_blocked_layer], z)
        high_rate = self.model[self._first_blocked_layer :]
        block = block_length(self.block_samples, z.shape[0], self._blocked_stride)
        if torch.is_grad_enabled() or block == 0 or low_rate.shape[-1] <= block:
            return run_layers(high_rate, low_rate)
        out = _run_in_blocks(high_rate, low_rate, block)
        if out is None:
            return run_layers(high_rate, low_rate)
        return out
