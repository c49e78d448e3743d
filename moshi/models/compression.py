"""Mimi, Kyutai's streaming neural audio codec: 24 kHz mono audio <-> 12.5 Hz frames of discrete codes.

Pipeline: SEANet encoder (25 Hz) -> encoder transformer -> learnt downsample (12.5 Hz) ->
split RVQ codes; and back: RVQ decode -> depthwise upsample -> decoder transformer -> SEANet decoder.

Module and tensor names match Kyutai's so the published weights (``tokenizer-e351c8d8-checkpoint125.safetensors``)
load by name; see :func:`moshi.models.loaders.get_mimi`.

Audio contract:
    * ``encode`` takes float audio ``[B, 1, L]`` already at 24 kHz. Mimi does not resample: read files with
      ``sphn.read(path, sample_rate=24000)`` (which resamples) and, when a rate is at hand, pass it as
      ``encode(x, sample_rate=sr)`` or call :meth:`MimiModel.check_sample_rate` so a wrong rate raises.
    * Outside streaming, audio of any length ``L >= 1`` is accepted and right-padded with zeros to whole
      1920-sample frames, so ``ceil(L / 1920)`` frames come out; ``decode`` returns ``1920 * T`` samples
      (trim to ``L`` yourself).
    * In ``with mimi.streaming(B):``, every ``encode`` chunk must hold a positive multiple of 1920 samples
      (80 ms frames), and each ``decode`` call turns ``m`` frames into ``1920 * m`` samples.
"""

from __future__ import annotations

import abc
import copy
from typing import Any

import torch
from torch import nn

from ..modules.resample import ConvDownsample1d, ConvTrUpsample1d
from ..modules.seanet import SEANetDecoder, SEANetEncoder
from ..modules.streaming import StreamingContainer
from ..modules.transformer import ProjectedTransformer
from ..quantization import BaseQuantizer, QuantizedResult, SplitResidualVectorQuantizer

# Kyutai's Mimi configuration: the shapes of its published weights.
DEFAULT_MIMI_CONFIG: dict[str, Any] = {
    "sample_rate": 24000,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {
        "channels": 1,
        "dimension": 512,
        "causal": True,
        "n_filters": 64,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    },
    "quantizer": {
        "dimension": 256,
        "n_q": 32,
        "bins": 2048,
        "input_dimension": 512,
        "output_dimension": 512,
    },
    "transformer": {
        "d_model": 512,
        "num_heads": 8,
        "num_layers": 8,
        "causal": True,
        "layer_scale": 0.01,
        "context": 250,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 2048,
        "input_dimension": 512,
        "output_dimensions": [512],
    },
}

# Same structure and ratios as the default (1920-sample frames at 12.5 Hz), tiny widths: for fast CPU tests of
# the data pipeline, the trainer and DSAA. Random weights only; its codes mean nothing.
TINY_MIMI_CONFIG: dict[str, Any] = {
    "sample_rate": 24000,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {**DEFAULT_MIMI_CONFIG["seanet"], "n_filters": 4, "dimension": 32},
    "quantizer": {"dimension": 16, "n_q": 8, "bins": 64, "input_dimension": 32, "output_dimension": 32},
    "transformer": {
        **DEFAULT_MIMI_CONFIG["transformer"],
        "d_model": 32,
        "num_heads": 2,
        "num_layers": 1,
        "dim_feedforward": 64,
        "input_dimension": 32,
        "output_dimensions": [32],
    },
}

_CONFIG_KEYS = ("sample_rate", "channels", "frame_rate", "seanet", "quantizer", "transformer")


class CompressionModel(StreamingContainer, abc.ABC):
    """A streaming audio codec: audio ``[B, channels, L]`` <-> codes ``[B, K, T]`` at :attr:`frame_rate`."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> QuantizedResult:
        """Encodes and decodes ``x``; the result's ``x`` is the decoded audio."""

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Audio -> codes."""

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> audio."""

    @abc.abstractmethod
    def decode_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Latent (the quantiser's decoded codes) -> audio."""

    @abc.abstractmethod
    def set_num_codebooks(self, n: int) -> None:
        """Sets how many codebooks :meth:`encode` returns."""

    @property
    @abc.abstractmethod
    def channels(self) -> int: ...

    @property
    @abc.abstractmethod
    def frame_rate(self) -> float: ...

    @property
    @abc.abstractmethod
    def frame_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def sample_rate(self) -> int: ...

    @property
    @abc.abstractmethod
    def cardinality(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_codebooks(self) -> int: ...

    @property
    @abc.abstractmethod
    def total_codebooks(self) -> int: ...


class WrapperCompressionModel(CompressionModel):
    """Base of codecs that wrap another one: every call and property goes to ``model`` unless overridden.

    Args:
        model (CompressionModel): the wrapped codec (a child module, so it streams with the wrapper).
    """

    def __init__(self, model: CompressionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> QuantizedResult:
        return self.model(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes)

    def decode_latent(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode_latent(codes)

    def set_num_codebooks(self, n: int) -> None:
        self.model.set_num_codebooks(n)

    @property
    def quantizer(self) -> BaseQuantizer:
        return self.model.quantizer

    @property
    def channels(self) -> int:
        return self.model.channels

    @property
    def frame_rate(self) -> float:
        return self.model.frame_rate

    @property
    def frame_size(self) -> int:
        return self.model.frame_size

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def cardinality(self) -> int:
        return self.model.cardinality

    @property
    def num_codebooks(self) -> int:
        return self.model.num_codebooks

    @property
    def total_codebooks(self) -> int:
        return self.model.total_codebooks


class MimiModel(CompressionModel):
    """The Mimi codec (inference).

    Args:
        encoder (SEANetEncoder): waveform -> latent at ``encoder_frame_rate``.
        decoder (SEANetDecoder): latent at ``encoder_frame_rate`` -> waveform.
        quantizer (BaseQuantizer): latent at ``frame_rate`` <-> codes (Mimi's is a
            :class:`SplitResidualVectorQuantizer`).
        frame_rate (float): code frame rate (12.5).
        encoder_frame_rate (float): rate of the SEANet latent (25.0).
        sample_rate (int): audio sample rate (24000).
        channels (int): audio channels (1).
        causal (bool): must be True.
        encoder_transformer (ProjectedTransformer | None): runs on the encoder latent.
        decoder_transformer (ProjectedTransformer | None): runs on the upsampled latent.
        resample_method (str): only ``"conv"`` (learnt resampling convs) is supported.
        upsample_channel_wise_bug (bool): the upsample is depthwise (one kernel per channel), as in the
            published Mimi; False makes it a full transposed conv.
        freeze_encoder (bool): training only; must be False.
        freeze_quantizer (bool): training only; must be False.
        freeze_quantizer_level (int): training only; must be -1.
        device (torch.device | str | None): where the resampling convs live.
        dtype (torch.dtype | None): their dtype.
    """

    def __init__(
        self,
        encoder: SEANetEncoder,
        decoder: SEANetDecoder,
        quantizer: BaseQuantizer,
        frame_rate: float,
        encoder_frame_rate: float,
        sample_rate: int,
        channels: int,
        causal: bool = True,
        encoder_transformer: ProjectedTransformer | None = None,
        decoder_transformer: ProjectedTransformer | None = None,
        resample_method: str = "conv",
        upsample_channel_wise_bug: bool = True,
        freeze_encoder: bool = False,
        freeze_quantizer: bool = False,
        freeze_quantizer_level: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not causal:
            raise ValueError("causal=False is not supported: Mimi is a causal codec")
        if resample_method != "conv":
            raise ValueError(f"resample_method must be 'conv', got {resample_method!r}")
        if freeze_encoder or freeze_quantizer or freeze_quantizer_level != -1:
            raise ValueError(
                "freeze_encoder, freeze_quantizer and freeze_quantizer_level are Mimi-training options, not "
                "supported by this package (Mimi is always frozen here)"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.encoder_transformer = encoder_transformer
        self.decoder_transformer = decoder_transformer
        self.quantizer = quantizer
        self._channels = channels
        self._sample_rate = sample_rate
        self._frame_rate = frame_rate
        self.encoder_frame_rate = encoder_frame_rate
        frame_size = sample_rate / frame_rate
        if frame_size != int(frame_size):
            raise ValueError(f"sample_rate / frame_rate = {frame_size} must be a whole number of samples")
        self._frame_size = int(frame_size)
        self.downsample: ConvDownsample1d | None = None
        self.upsample: ConvTrUpsample1d | None = None
        if encoder_frame_rate != frame_rate:
            stride = encoder_frame_rate / frame_rate
            if stride != int(stride) or stride < 1:
                raise ValueError(
                    f"encoder_frame_rate {encoder_frame_rate} must be a whole multiple of frame_rate {frame_rate}"
                )
            dimension = encoder.dimension
            factory = {"device": device, "dtype": dtype}
            self.downsample = ConvDownsample1d(int(stride), dimension, learnt=True, **factory)
            self.upsample = ConvTrUpsample1d(
                int(stride), dimension, learnt=True, channel_wise=upsample_channel_wise_bug, **factory
            )

    # ---- properties -------------------------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def frame_rate(self) -> float:
        return self._frame_rate

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920 = 80 ms at 24 kHz)."""
        return self._frame_size

    @property
    def num_codebooks(self) -> int:
        """Codebooks that :meth:`encode` returns."""
        return self.quantizer.num_codebooks

    @property
    def total_codebooks(self) -> int:
        """Codebooks the model has (32 for Kyutai's Mimi)."""
        return self.quantizer.total_codebooks

    @property
    def cardinality(self) -> int:
        """Codes per codebook (2048)."""
        return self.quantizer.cardinality

    def set_num_codebooks(self, n: int) -> None:
        """Sets how many codebooks :meth:`encode` returns (1 ≤ n ≤ :attr:`total_codebooks`)."""
        self.quantizer.set_num_codebooks(n)

    def check_sample_rate(self, sample_rate: int) -> None:
        """Raises ``ValueError`` unless ``sample_rate`` is Mimi's (24000); Mimi never resamples by itself."""
        if sample_rate != self.sample_rate:
            raise ValueError(
                f"Mimi expects {self.sample_rate} Hz audio, got {sample_rate} Hz; resample first, "
                f"e.g. sphn.read(path, sample_rate={self.sample_rate})"
            )

    # ---- encode -----------------------------------------------------------------------------------------------

    def _check_audio(self, x: torch.Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(f"audio must be [B, {self.channels}, L], got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"Mimi expects {self.channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[-1] == 0:
            raise ValueError("audio is empty (length 0)")

    def _prepare_audio(self, x: torch.Tensor) -> torch.Tensor:
        """Checks the layout, casts to the model dtype and pads to whole frames (one-shot) or checks them."""
        self._check_audio(x)
        length = x.shape[-1]
        if self.is_streaming:
            if length % self.frame_size:
                raise ValueError(
                    f"streaming encode needs chunks of a multiple of {self.frame_size} samples, got {length}"
                )
        elif length % self.frame_size:
            extra = self.frame_size - length % self.frame_size
            x = nn.functional.pad(x, (0, extra))
        weight = self.encoder.model[0].conv.conv.weight
        return x.to(weight.dtype)

    def _to_latent(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.encoder(x)
        if self.encoder_transformer is not None:
            emb = self.encoder_transformer(emb)[0]
        if self.downsample is not None:
            emb = self.downsample(emb)
        return emb

    def encode(self, x: torch.Tensor, *, sample_rate: int | None = None) -> torch.Tensor:
        """Audio ``[B, 1, L]`` at 24 kHz -> codes ``[B, num_codebooks, ceil(L / 1920)]`` (int64).

        Args:
            x (torch.Tensor): float audio. Outside streaming it is zero-padded on the right to whole frames;
                in streaming mode ``L`` must be a positive multiple of :attr:`frame_size`.
            sample_rate (int | None): the rate of ``x`` if known; anything but 24000 raises ``ValueError``.
        """
        if sample_rate is not None:
            self.check_sample_rate(sample_rate)
        return self.quantizer.encode(self._to_latent(self._prepare_audio(x)))

    def encode_to_latent(self, x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Audio ``[B, 1, L]`` -> latent ``[B, 512, T]`` at 12.5 Hz, quantised (decode of the codes) or not."""
        latent = self._to_latent(self._prepare_audio(x))
        if not quantize:
            return latent
        return self.quantizer.decode(self.quantizer.encode(latent))

    # ---- decode -----------------------------------------------------------------------------------------------

    def decode_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, 512, T]`` at 12.5 Hz (``codes`` holds the latent, not codes) -> audio ``[B, 1, 1920 * T]``.

        The parameter keeps the name callers pass it by in Kyutai's API.
        """
        emb = codes
        if self.upsample is not None:
            emb = self.upsample(emb)
        if self.decoder_transformer is not None:
            emb = self.decoder_transformer(emb)[0]
        return self.decoder(emb)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, K, T]`` (any ``1 ≤ K ≤ total_codebooks``) -> audio ``[B, 1, 1920 * T]``, not trimmed.

        The quantiser checks the codes' layout (a :class:`~moshi.quantization.DummyQuantizer` takes floats).
        """
        if codes.shape[-1] == 0:
            raise ValueError("codes are empty (T = 0)")
        return self.decode_latent(self.quantizer.decode(codes))

    def forward(self, x: torch.Tensor) -> QuantizedResult:
        """Audio ``[B, 1, L]`` -> its reconstruction through the codes (trimmed to ``L``), with the codes.

        The quantiser must be in eval mode (its codebooks are frozen); see :meth:`encode` for the audio layout.
        """
        length = x.shape[-1]
        quantized = self.quantizer(self._to_latent(self._prepare_audio(x)), self.frame_rate)
        audio = self.decode_latent(quantized.x)[..., :length]
        return QuantizedResult(audio, quantized.codes, quantized.bandwidth, quantized.penalty, quantized.metrics)


def _check_config(config: dict[str, Any]) -> None:
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    missing = sorted(set(_CONFIG_KEYS) - set(config))
    if unknown or missing:
        raise ValueError(f"Mimi config: unknown keys {unknown}, missing keys {missing}")
    if config["channels"] != config["seanet"].get("channels", 1):
        raise ValueError(
            f"Mimi config: channels={config['channels']} differs from seanet.channels={config['seanet'].get('channels')}"
        )


def build_mimi(
    config: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MimiModel:
    """Builds an untrained :class:`MimiModel` from a config shaped like :data:`DEFAULT_MIMI_CONFIG`.

    Args:
        config (dict | None): the configuration (None: :data:`DEFAULT_MIMI_CONFIG`); not modified.
        device (torch.device | str): where to build (``"meta"`` builds without memory, e.g. to count or to
            load with ``assign=True``).
        dtype (torch.dtype): dtype of the weights; Kyutai runs Mimi in float32. Codebooks stay float32.

    Returns:
        MimiModel: in eval mode, with all codebooks active.

    Raises:
        ValueError: a section or key is unknown or missing, or the rates are inconsistent.
    """
    config = copy.deepcopy(DEFAULT_MIMI_CONFIG if config is None else config)
    _check_config(config)
    factory = {"device": device, "dtype": dtype}
    try:
        encoder = SEANetEncoder(**config["seanet"], **factory)
        decoder = SEANetDecoder(**config["seanet"], **factory)
        quantizer = SplitResidualVectorQuantizer(**config["quantizer"], **factory)
        encoder_transformer = ProjectedTransformer(**config["transformer"], **factory)
        decoder_transformer = ProjectedTransformer(**config["transformer"], **factory)
    except TypeError as error:
        raise ValueError(f"Mimi config: {error}") from error
    if config["quantizer"].get("input_dimension", encoder.dimension) != encoder.dimension:
        raise ValueError(
            f"Mimi config: quantizer.input_dimension={config['quantizer']['input_dimension']} "
            f"differs from seanet.dimension={encoder.dimension}"
        )
    encoder_frame_rate = config["sample_rate"] / encoder.hop_length
    model = MimiModel(
        encoder,
        decoder,
        quantizer,
        frame_rate=config["frame_rate"],
        encoder_frame_rate=encoder_frame_rate,
        sample_rate=config["sample_rate"],
        channels=config["channels"],
        causal=True,
        encoder_transformer=encoder_transformer,
        decoder_transformer=decoder_transformer,
        **factory,
    )
    return model.eval()
