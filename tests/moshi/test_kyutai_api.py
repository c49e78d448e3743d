"""Code written against Kyutai's ``moshi`` 0.2.13 runs on this package.

The table below lists the public names of Kyutai's package for the parts implemented here (LM, LMGen,
loaders, Mimi and its SEANet/conv/transformer/quantiser modules, LoRA, streaming, sampling, the
per-codebook cross entropy), each at its module path, with the parameter names of callables (``None`` for
constants). A name resolves here when importing its module and getting the attribute works; a callable
matches when its positional parameters start with Kyutai's, it has each of Kyutai's keyword-only
parameters, and any parameter it adds has a default (``*args``/``**kwargs`` are not compared).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from moshi._unsupported import UnsupportedError
from moshi.models import LMGen, loaders
from moshi.models.compression import (
    TINY_MIMI_CONFIG,
    CompressionModel,
    MimiModel,
    WrapperCompressionModel,
    build_mimi,
)
from moshi.modules.conv import pad1d, pad_for_conv1d, unpad1d
from moshi.quantization import (
    DummyQuantizer,
    QuantizedResult,
    ResidualVectorQuantizer,
    SplitResidualVectorQuantizer,
)
from moshi.utils.utils import cross_entropy
from tests.helpers.configs import small_lm_kwargs

KYUTAI_API: dict[str, list[tuple[str, str | None]]] = {
    "moshi.models.compression": [
        ("CompressionModel", ""),
        ("CompressionModel.forward", "x"),
        ("CompressionModel.encode", "x"),
        ("CompressionModel.decode", "codes"),
        ("CompressionModel.decode_latent", "codes"),
        ("CompressionModel.set_num_codebooks", "n"),
        (
            "MimiModel",
            "encoder, decoder, quantizer, frame_rate, encoder_frame_rate, sample_rate, channels, causal, "
            "encoder_transformer, decoder_transformer, resample_method, upsample_channel_wise_bug, "
            "freeze_encoder, freeze_quantizer, freeze_quantizer_level",
        ),
        ("MimiModel.set_num_codebooks", "n"),
        ("MimiModel.forward", "x"),
        ("MimiModel.encode", "x"),
        ("MimiModel.encode_to_latent", "x, quantize"),
        ("MimiModel.decode", "codes"),
        ("MimiModel.decode_latent", "codes"),
        ("WrapperCompressionModel", "model"),
        ("WrapperCompressionModel.forward", "x"),
        ("WrapperCompressionModel.encode", "x"),
        ("WrapperCompressionModel.decode", "codes"),
        ("WrapperCompressionModel.decode_latent", "codes"),
        ("WrapperCompressionModel.set_num_codebooks", "n"),
    ],
    "moshi.models.lm": [
        ("LMOutput", "logits, mask, text_logits, text_mask"),
        (
            "LMModel",
            "delays, n_q, dep_q, card, text_card, text_card_out, demux_second_text_stream, dim, num_heads, "
            "hidden_scale, norm, norm_emb, bias_proj, depformer_dim, depformer_dim_feedforward, "
            "depformer_multi_linear, depformer_weights_per_step, depformer_weights_per_step_schedule, "
            "depformer_low_rank_embeddings, depformer_pos_emb, depformer_norm, existing_text_padding_id, "
            "existing_text_end_padding_id, extra_heads_num_heads, extra_heads_dim, context, causal, "
            "condition_provider, fuser, quantize, device, dtype, gradient_checkpointing, **kwargs",
        ),
        ("LMModel.forward", "codes, condition_tensors"),
        ("LMModel.forward_text", "sequence, sum_condition, cross_attention_src"),
        ("LMModel.forward_depformer_training", "sequence, transformer_out"),
        ("LMModel.forward_depformer", "depformer_cb_index, sequence, transformer_out"),
        (
            "LMGen",
            "lm_model, use_sampling, temp, temp_text, top_k, top_k_text, cfg_coef, check, "
            "condition_tensors, on_text_hook, on_text_logits_hook, on_audio_hook, support_out_of_sync, "
            "cfg_is_masked_until, cfg_is_no_text",
        ),
        ("LMGen.step", "input_tokens, depformer_replace_tokens"),
        ("LMGen.step_with_extra_heads", "input_tokens, depformer_replace_tokens"),
        ("LMGen.depformer_step", "text_token, transformer_out"),
    ],
    "moshi.models.lm_utils": [
        (
            "ScaledEmbedding",
            "num_embeddings, embedding_dim, *args, norm, zero_idx, low_rank, lr, demux_second_stream, "
            "**kwargs",
        ),
        ("ScaledEmbedding.forward", "input, *args, **kwargs"),
    ],
    "moshi.models.loaders": [
        ("hf_get", "filename, hf_repo, check_local_file_exists, revision"),
        (
            "CheckpointInfo",
            "moshi_weights, mimi_weights, tokenizer, lm_config, raw_config, mimi_config, model_type, "
            "lora_weights, lm_gen_config, tts_config, stt_config, model_id",
        ),
        ("CheckpointInfo.get_mimi", "device"),
        ("CheckpointInfo.get_moshi", "device, dtype, load_weight, **kwargs"),
        ("CheckpointInfo.get_text_tokenizer", ""),
        ("get_mimi", "filename, mimi_config, device, num_codebooks"),
        ("get_moshi_lm", "filename, lm_kwargs, device, dtype, lora_weights, fuse_lora, lm_kwargs_overrides"),
        ("get_lora_moshi", "model, lora_weights, lora_rank, lora_scaling, dtype, device, fuse_lora"),
    ],
    "moshi.modules.conv": [
        ("apply_parametrization_norm", "module, norm"),
        ("get_extra_padding_for_conv1d", "x, kernel_size, stride, padding_total"),
        ("pad_for_conv1d", "x, kernel_size, stride, padding_total"),
        ("pad1d", "x, paddings, mode, value"),
        ("unpad1d", "x, paddings"),
        ("NormConv1d", "*args, causal, norm, norm_kwargs, **kwargs"),
        ("NormConv1d.forward", "x"),
        ("NormConvTranspose1d", "*args, causal, norm, norm_kwargs, **kwargs"),
        ("NormConvTranspose1d.forward", "x"),
        (
            "StreamingConv1d",
            "in_channels, out_channels, kernel_size, stride, dilation, groups, bias, causal, norm, "
            "norm_kwargs, pad_mode",
        ),
        ("StreamingConv1d.forward", "x"),
        (
            "StreamingConvTranspose1d",
            "in_channels, out_channels, kernel_size, stride, groups, bias, causal, norm, trim_right_ratio, "
            "norm_kwargs",
        ),
        ("StreamingConvTranspose1d.forward", "x"),
    ],
    "moshi.modules.gating": [
        ("ActivationGating", "dim, dim_feedforward, activation, quantized, **factory_kwargs"),
        ("ActivationGating.forward", "x"),
        ("make_gating", "name, dim, dim_feedforward, **factory_kwargs"),
    ],
    "moshi.modules.lora": [
        ("replace_all_linear_with_lora", "module, rank, scaling, device, dtype"),
        ("replace_lora_with_linear", "module"),
        ("LoRALinear", "in_features, out_features, rank, scaling, bias, device, dtype"),
        ("LoRALinear.merge_weight", ""),
        ("LoRALinear.forward", "x"),
    ],
    "moshi.modules.resample": [
        ("ConvDownsample1d", "stride, dimension, causal, learnt, channel_wise"),
        ("ConvDownsample1d.forward", "x"),
        ("ConvTrUpsample1d", "stride, dimension, causal, learnt, channel_wise"),
        ("ConvTrUpsample1d.forward", "x"),
    ],
    "moshi.modules.rope": [
        ("apply_rope", "q, k, offset, max_period, interleave, time_before_heads"),
        ("RotaryEmbedding", "interleave, max_period"),
        ("RotaryEmbedding.forward", "q, k, offset, time_before_heads"),
    ],
    "moshi.modules.seanet": [
        (
            "SEANetResnetBlock",
            "dim, kernel_sizes, dilations, activation, activation_params, norm, norm_params, causal, "
            "pad_mode, compress, true_skip",
        ),
        ("SEANetResnetBlock.forward", "x"),
        (
            "SEANetEncoder",
            "channels, dimension, n_filters, n_residual_layers, ratios, activation, activation_params, "
            "norm, norm_params, kernel_size, last_kernel_size, residual_kernel_size, dilation_base, "
            "causal, pad_mode, true_skip, compress, disable_norm_outer_blocks, mask_fn, mask_position",
        ),
        ("SEANetEncoder.forward", "x"),
        (
            "SEANetDecoder",
            "channels, dimension, n_filters, n_residual_layers, ratios, activation, activation_params, "
            "final_activation, final_activation_params, norm, norm_params, kernel_size, last_kernel_size, "
            "residual_kernel_size, dilation_base, causal, pad_mode, true_skip, compress, "
            "disable_norm_outer_blocks, trim_right_ratio",
        ),
        ("SEANetDecoder.forward", "z"),
    ],
    "moshi.modules.streaming": [
        ("State", "batch_size, device"),
        ("State.set_exec_mask", "exec_mask"),
        ("State.reset", "reset_mask"),
        ("StreamingModule", ""),
        ("StreamingModule.set_streaming_detached", "streaming_detached"),
        ("StreamingModule.streaming_forever", "batch_size"),
        ("StreamingModule.streaming", "batch_size"),
        ("StreamingModule.reset_streaming", "reset_mask"),
        ("StreamingModule.get_streaming_state", ""),
        ("StreamingModule.set_streaming_state", "state"),
        ("StreamingModule.set_exec_mask", "exec_mask"),
        ("StreamingContainer", ""),
    ],
    "moshi.modules.transformer": [
        ("LayerNormF32", "normalized_shape, eps, elementwise_affine, bias, device, dtype"),
        ("LayerNormF32.forward", "input"),
        ("RMSNorm", "dim, eps, dtype, device"),
        ("RMSNorm.forward", "x"),
        ("LayerScale", "channels, init, channel_last, device, dtype"),
        ("LayerScale.forward", "x"),
        ("create_norm_fn", "norm_type, dim, **kwargs"),
        ("create_sin_embedding", "positions, dim, max_period, dtype"),
        ("set_attention_context", "model, context"),
        (
            "StreamingMultiheadAttention",
            "embed_dim, num_heads, causal, context, rope, kv_repeat, weights_per_step, "
            "weights_per_step_schedule, cross_attention, cache_cross_attention, device, dtype",
        ),
        ("StreamingMultiheadAttention.forward", "query, key, value"),
        (
            "StreamingTransformerLayer",
            "d_model, num_heads, dim_feedforward, causal, context, rope, norm, layer_scale, gating, "
            "kv_repeat, weights_per_step, weights_per_step_schedule, activation, skip_self_attn, "
            "cross_attention, device, dtype",
        ),
        ("StreamingTransformerLayer.forward", "x, cross_attention_src"),
        (
            "StreamingTransformer",
            "d_model, num_heads, num_layers, dim_feedforward, causal, context, positional_embedding, "
            "max_period, positional_scale, betas, layer_class, quantize, checkpointing, device, dtype, "
            "**kwargs",
        ),
        ("StreamingTransformer.forward", "x, *args, **kwargs"),
        ("ProjectedTransformer", "input_dimension, output_dimensions, d_model, *, conv_layout, **kwargs"),
        ("ProjectedTransformer.forward", "x, *args, **kwargs"),
    ],
    "moshi.quantization": [
        (
            "ResidualVectorQuantizer",
            "dimension, input_dimension, output_dimension, n_q, q_dropout, no_quantization_rate, bins, "
            "decay, threshold_usage_ratio, replaced_usage_ratio, codebook_offset, force_projection",
        ),
        ("ResidualVectorQuantizer.forward", "x, frame_rate"),
        ("ResidualVectorQuantizer.encode", "x"),
        ("ResidualVectorQuantizer.decode", "codes"),
        ("ResidualVectorQuantizer.set_num_codebooks", "n"),
        ("SplitResidualVectorQuantizer", "*, n_q, n_q_semantic, **kwargs"),
        ("SplitResidualVectorQuantizer.forward", "x, frame_rate"),
        ("SplitResidualVectorQuantizer.encode", "x"),
        ("SplitResidualVectorQuantizer.decode", "codes"),
        ("SplitResidualVectorQuantizer.set_num_codebooks", "n"),
        ("BaseQuantizer", ""),
        ("BaseQuantizer.forward", "x, frame_rate"),
        ("BaseQuantizer.encode", "x"),
        ("BaseQuantizer.decode", "codes"),
        ("BaseQuantizer.set_num_codebooks", "n"),
        ("BaseQuantizer.ema_frozen_", "ema_frozen"),
        ("DummyQuantizer", "dimension, input_dimension, output_dimension"),
        ("DummyQuantizer.forward", "x, frame_rate"),
        ("DummyQuantizer.encode", "x"),
        ("DummyQuantizer.decode", "codes"),
        ("DummyQuantizer.set_num_codebooks", "n"),
        ("QuantizedResult", "x, codes, bandwidth, penalty, metrics"),
    ],
    "moshi.quantization.base": [
        ("QuantizedResult", "x, codes, bandwidth, penalty, metrics"),
        ("BaseQuantizer", ""),
        ("BaseQuantizer.forward", "x, frame_rate"),
        ("BaseQuantizer.encode", "x"),
        ("BaseQuantizer.decode", "codes"),
        ("BaseQuantizer.set_num_codebooks", "n"),
        ("BaseQuantizer.ema_frozen_", "ema_frozen"),
        ("DummyQuantizer", "dimension, input_dimension, output_dimension"),
        ("DummyQuantizer.forward", "x, frame_rate"),
        ("DummyQuantizer.encode", "x"),
        ("DummyQuantizer.decode", "codes"),
        ("DummyQuantizer.set_num_codebooks", "n"),
    ],
    "moshi.quantization.core_vq": [
        (
            "EuclideanCodebook",
            "dim, codebook_size, decay, epsilon, threshold_usage_ratio, replaced_usage_ratio, "
            "check_unused_every",
        ),
        ("EuclideanCodebook.encode", "x"),
        ("EuclideanCodebook.decode", "codes"),
        (
            "VectorQuantization",
            "dim, codebook_size, codebook_dim, decay, epsilon, threshold_usage_ratio, **kwargs",
        ),
        ("VectorQuantization.encode", "x"),
        ("VectorQuantization.decode", "codes"),
        ("ResidualVectorQuantization", "*, num_quantizers, codebook_offset, **kwargs"),
        ("ResidualVectorQuantization.encode", "x, n_q"),
        ("ResidualVectorQuantization.decode", "codes"),
    ],
    "moshi.quantization.vq": [
        (
            "ResidualVectorQuantizer",
            "dimension, input_dimension, output_dimension, n_q, q_dropout, no_quantization_rate, bins, "
            "decay, threshold_usage_ratio, replaced_usage_ratio, codebook_offset, force_projection",
        ),
        ("ResidualVectorQuantizer.forward", "x, frame_rate"),
        ("ResidualVectorQuantizer.encode", "x"),
        ("ResidualVectorQuantizer.decode", "codes"),
        ("ResidualVectorQuantizer.set_num_codebooks", "n"),
        ("SplitResidualVectorQuantizer", "*, n_q, n_q_semantic, **kwargs"),
        ("SplitResidualVectorQuantizer.forward", "x, frame_rate"),
        ("SplitResidualVectorQuantizer.encode", "x"),
        ("SplitResidualVectorQuantizer.decode", "codes"),
        ("SplitResidualVectorQuantizer.set_num_codebooks", "n"),
    ],
    "moshi.utils.sampling": [
        ("multinomial", "input, num_samples, replacement, *, generator"),
        ("sample_top_k", "probs, k"),
        ("sample_top_p", "probs, p"),
        ("sample_token", "logits, use_sampling, temp, top_k, top_p"),
    ],
    "moshi.utils.utils": [
        ("cross_entropy", "logits, targets, mask, dtype, logits_soft_clip"),
    ],
}

# Names Kyutai's packages re-export from their submodules: the same rows, checked at both paths.
REEXPORTS: dict[str, dict[str, tuple[str, ...]]] = {
    "moshi.models": {
        "moshi.models.compression": ("CompressionModel", "MimiModel"),
        "moshi.models.lm": ("LMModel", "LMGen"),
        "moshi.models.loaders": ("get_mimi", "get_moshi_lm"),
    },
    "moshi.modules": {
        "moshi.modules.conv": (
            "NormConv1d", "NormConvTranspose1d", "StreamingConv1d", "StreamingConvTranspose1d", "pad_for_conv1d",
            "pad1d", "unpad1d",
        ),
        "moshi.modules.seanet": ("SEANetEncoder", "SEANetDecoder"),
        "moshi.modules.transformer": ("StreamingTransformer",),
    },
}
for _package, _sources in REEXPORTS.items():
    KYUTAI_API[_package] = [
        row for module, names in _sources.items() for row in KYUTAI_API[module] if row[0].split(".")[0] in names
    ]


def _resolve(module: str, path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _signature_problems(fn: Any, kyutai: str) -> list[str]:
    """Why ``fn`` cannot be called as Kyutai's callable of parameters ``kyutai`` (empty when it can)."""
    positional: list[str] = []
    keyword_only: list[str] = []
    after_star = False
    for token in (t.strip() for t in kyutai.split(",") if t.strip()):
        if token.startswith("**"):
            continue
        if token.startswith("*"):
            after_star = True
        else:
            (keyword_only if after_star else positional).append(token)
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    ours = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = []
    if ours[: len(positional)] != positional:
        problems.append(f"positional parameters {ours} do not start with {positional}")
    by_name = {p.name: p for p in params}
    for name in keyword_only:
        if name not in by_name or by_name[name].kind not in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            problems.append(f"no keyword parameter {name!r}")
    for p in params:
        extra = p.name not in positional and p.name not in keyword_only
        if extra and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is inspect.Parameter.empty:
            problems.append(f"added parameter {p.name!r} has no default")
    return problems


def _table_params() -> list[Any]:
    return [
        pytest.param(module, path, signature, id=f"{module}:{path}")
        for module, entries in KYUTAI_API.items()
        for path, signature in entries
    ]


@pytest.mark.parametrize("module, path, signature", _table_params())
def test_kyutai_public_name_resolves_with_the_same_parameters(module, path, signature):
    obj = _resolve(module, path)
    if signature is None:
        return
    fn = obj.__init__ if inspect.isclass(obj) else obj
    assert _signature_problems(fn, signature) == []


@pytest.mark.parametrize(
    "name, value",
    [
        ("DEFAULT_REPO", "kyutai/moshiko-pytorch-bf16"),
        ("MOSHI_NAME", "model.safetensors"),
        ("MOSHI_Q8_NAME", "model.q8.safetensors"),
        ("MIMI_NAME", "tokenizer-e351c8d8-checkpoint125.safetensors"),
        ("TEXT_TOKENIZER_NAME", "tokenizer_spm_32k_3.model"),
        ("SAMPLE_RATE", 24000),
        ("FRAME_RATE", 12.5),
    ],
)
def test_loader_constants_have_kyutai_values(name, value):
    assert getattr(loaders, name) == value


def test_package_version_and_conv_normalizations():
    import moshi
    from moshi.modules.conv import CONV_NORMALIZATIONS

    assert isinstance(moshi.__version__, str) and moshi.__version__
    assert "none" in CONV_NORMALIZATIONS  # the only weight parametrisation Mimi's inference needs


def test_signature_check_rejects_renamed_reordered_and_required_extra_parameters():
    def same(a, b=1, *args, c=2, **kwargs): ...

    def extra_with_default(a, b=1, d=3, *, c=2): ...

    def renamed(a, x=1, *, c=2): ...

    def swapped(b, a, *, c=2): ...

    def required_extra(a, b, d, *, c): ...

    assert _signature_problems(same, "a, b, *args, c, **kwargs") == []
    assert _signature_problems(extra_with_default, "a, b, *, c") == []
    assert _signature_problems(renamed, "a, b, *, c") != []
    assert _signature_problems(swapped, "a, b, *, c") != []
    assert _signature_problems(required_extra, "a, b, *, c") == ["added parameter 'd' has no default"]


# ---- pieces of Kyutai's package not implemented here: one clear error ------------------------------------------

UNSUPPORTED_MODULES = [
    "moshi.conditioners",
    "moshi.conditioners.base",
    "moshi.conditioners.text",
    "moshi.conditioners.tensors",
    "moshi.models.tts",
    "moshi.utils.quantize",
    "moshi.utils.compile",
    "moshi.utils.autocast",
    "moshi.run_tts",
]


@pytest.mark.parametrize("module", UNSUPPORTED_MODULES)
def test_importing_an_unsupported_module_says_it_is_not_supported(module):
    with pytest.raises(UnsupportedError, match=r"is not supported by this package") as info:
        importlib.import_module(module)
    assert isinstance(info.value, ImportError) and isinstance(info.value, NotImplementedError)
    assert module.split(".")[1] in str(info.value)


@pytest.mark.parametrize(
    "module, name",
    [
        ("moshi", "conditioners"),
        ("moshi.models.loaders", "get_conditioner"),
        ("moshi.models.loaders", "get_conditioner_provider"),
        ("moshi.models.loaders", "get_condition_fuser"),
        ("moshi.modules.conv", "TransposedLayerNorm"),
    ],
)
def test_unsupported_names_raise_the_same_error_on_import_and_on_use(module, name):
    with pytest.raises(UnsupportedError, match=rf"{name}.*is not supported by this package"):
        getattr(importlib.import_module(module), name)
    with pytest.raises(ImportError, match="is not supported by this package"):
        exec(f"from {module} import {name}", {})


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        loaders.nope  # noqa: B018


# ---- cross entropy ---------------------------------------------------------------------------------------------


def test_cross_entropy_equals_the_hand_computation_and_zeroes_masked_positions():
    logits = torch.tensor([[[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], [[1.0, 3.0, 0.0], [float("nan"), 0.0, 0.0]]]])
    targets = torch.tensor([[[0, 2], [1, -1]]])  # [B=1, K=2, T=2]
    mask = torch.tensor([[[True, True], [True, False]]])
    ce = cross_entropy(logits, targets, mask)
    expected = torch.tensor(
        [[[math.log(math.exp(2) + 1 + math.exp(-1)) - 2, math.log(3.0)], [math.log(math.e + math.exp(3) + 1) - 3, 0]]]
    )
    assert ce.shape == (1, 2, 2) and ce.dtype == torch.float32
    torch.testing.assert_close(ce, expected, rtol=1e-6, atol=1e-6)


def test_cross_entropy_soft_clip_dtype_and_clean_gradients_at_masked_positions():
    logits = torch.tensor([[[[40.0, 0.0], [float("nan"), 1.0]]]], requires_grad=True)
    targets = torch.tensor([[[1, 0]]])
    mask = torch.tensor([[[True, False]]])
    ce = cross_entropy(logits, targets, mask, dtype=torch.float64, logits_soft_clip=30.0)
    clipped = 30.0 * math.tanh(40.0 / 30.0)
    assert ce.dtype == torch.float64
    torch.testing.assert_close(ce[0, 0], torch.tensor([math.log(math.exp(clipped) + 1), 0.0], dtype=torch.float64))
    ce.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[0, 0, 1], torch.zeros(2))


def test_cross_entropy_shape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"logits \(1, 2, 3, 4\)"):
        cross_entropy(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2).bool())


# ---- quantisers, codecs and conv helpers ------------------------------------------------------------------------


def test_dummy_quantizer_passes_the_latent_through():
    quantizer = DummyQuantizer(4)
    x = torch.randn(2, 4, 3)
    result = quantizer(x, 12.5)
    assert isinstance(result, QuantizedResult)
    assert torch.equal(result.x, x) and result.codes.shape == (2, 1, 4, 3)
    assert float(result.bandwidth) == pytest.approx(4 * 3 * 32 * 12.5 / 1000)  # 32 bits per float per item
    assert torch.equal(quantizer.decode(quantizer.encode(x)), x)
    assert (quantizer.cardinality, quantizer.num_codebooks, quantizer.total_codebooks) == (1, 1, 1)
    with pytest.raises(AttributeError, match="cannot be changed"):
        quantizer.set_num_codebooks(2)
    projected = DummyQuantizer(4, input_dimension=6, output_dimension=8)
    assert projected.encode(torch.randn(2, 6, 3)).shape == (2, 1, 4, 3)
    assert projected(torch.randn(2, 6, 3), 12.5).x.shape == (2, 8, 3)


def test_mimi_runs_with_a_dummy_quantizer():
    mimi = build_mimi(TINY_MIMI_CONFIG)
    dummy = MimiModel(
        mimi.encoder, mimi.decoder, DummyQuantizer(32), 12.5, 25.0, 24000, 1, True,
        mimi.encoder_transformer, mimi.decoder_transformer,
    )
    dummy.load_state_dict(mimi.state_dict(), strict=False)
    x = torch.randn(1, 1, 3840)
    with torch.no_grad():
        codes = dummy.encode(x)
        assert codes.shape == (1, 1, 32, 2) and codes.dtype == torch.float32
        torch.testing.assert_close(dummy.decode(codes), dummy.decode_latent(dummy.encode_to_latent(x, quantize=False)))


@pytest.mark.parametrize("split", [False, True])
def test_quantizer_forward_returns_codes_reconstruction_and_bandwidth(split):
    if split:
        quantizer = SplitResidualVectorQuantizer(n_q=3, dimension=4, bins=16, input_dimension=6).eval()
    else:
        quantizer = ResidualVectorQuantizer(4, n_q=3, bins=16).eval()
    x = torch.randn(2, 6 if split else 4, 5)
    result = quantizer(x, 12.5)
    assert torch.equal(result.codes, quantizer.encode(x))
    assert torch.equal(result.x, quantizer.decode(result.codes))
    assert float(result.bandwidth) == pytest.approx(3 * 4 * 12.5 / 1000)  # 3 levels of log2(16) bits
    assert float(result.penalty) == 0.0
    if split:
        assert quantizer.semantic_quantizer is quantizer.rvq_first
        assert quantizer.acoustic_quantizer is quantizer.rvq_rest
    with pytest.raises(RuntimeError, match=r"training mode .* call \.eval\(\)"):
        quantizer.train()(x, 12.5)


def test_mimi_forward_reconstructs_through_the_codes_and_trims_to_the_input():
    mimi = build_mimi(TINY_MIMI_CONFIG)
    x = torch.randn(1, 1, 3000)
    with torch.no_grad():
        result = mimi(x)
        codes = mimi.encode(x)
        torch.testing.assert_close(result.x, mimi.decode(codes)[..., :3000])
    assert torch.equal(result.codes, codes)


def test_compression_model_is_abstract_and_a_wrapper_delegates():
    with pytest.raises(TypeError, match="abstract"):
        CompressionModel()
    mimi = build_mimi(TINY_MIMI_CONFIG)
    wrapper = WrapperCompressionModel(mimi)
    assert isinstance(mimi, CompressionModel) and isinstance(wrapper, CompressionModel)
    assert (wrapper.frame_size, wrapper.sample_rate, wrapper.num_codebooks) == (1920, 24000, 8)
    assert wrapper.quantizer is mimi.quantizer
    x = torch.randn(1, 1, 1920)
    with torch.no_grad():
        expected = mimi.decode(mimi.encode(x))
        with wrapper.streaming(1):
            assert mimi.is_streaming
            # A first streamed frame starts from the one-shot initial state; only float rounding may differ.
            torch.testing.assert_close(wrapper.decode(wrapper.encode(x)), expected, rtol=1e-5, atol=1e-5)


def test_pad1d_reflects_inputs_shorter_than_the_padding():
    x = torch.tensor([[1.0, 2.0]])
    assert pad1d(x, (3, 1), mode="reflect").tolist() == [[0.0, 0.0, 2.0, 1.0, 2.0, 0.0]]
    assert pad1d(x, (1, 2), value=5.0).tolist() == [[5.0, 1.0, 2.0, 5.0, 5.0]]
    assert torch.equal(unpad1d(pad1d(x, (3, 1), mode="reflect"), (3, 1)), x)
    with pytest.raises(ValueError, match="cannot remove paddings"):
        unpad1d(x, (2, 1))


@pytest.mark.parametrize(
    "length, kernel_size, stride, padding_total, padded",
    [(10, 4, 2, 2, 10), (11, 4, 2, 2, 12), (7, 7, 3, 4, 9), (1, 3, 1, 2, 1), (5, 8, 4, 0, 8)],
)
def test_pad_for_conv1d_completes_the_last_window(length, kernel_size, stride, padding_total, padded):
    out = pad_for_conv1d(torch.ones(1, 1, length), kernel_size, stride, padding_total)
    assert out.shape[-1] == padded
    assert torch.equal(out[..., length:], torch.zeros(1, 1, padded - length))
    # Every sample (plus the left padding) now ends inside a whole window: (L + P - K) is a multiple of S.
    assert (padded + padding_total - kernel_size) % stride == 0 or padded + padding_total < kernel_size


# ---- Kyutai's documented usage, unchanged, on tiny local checkpoints ---------------------------------------------

# The tiny Mimi has 64 codes per codebook, so the LM's audio vocabulary is 64 too.
LM_KWARGS = small_lm_kwargs(card=64)


def _write_checkpoints(folder) -> tuple[str, str]:
    mimi_weight, moshi_weight = folder / "mimi.safetensors", folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in build_mimi(TINY_MIMI_CONFIG).state_dict().items()}, mimi_weight)
    lm = loaders.get_moshi_lm(None, lm_kwargs=LM_KWARGS, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, moshi_weight)
    return str(mimi_weight), str(moshi_weight)


def _stream_through_lm(mimi: MimiModel, moshi: Any, all_codes: list[torch.Tensor]) -> torch.Tensor:
    lm_gen = LMGen(moshi, temp=0.8, temp_text=0.7)
    out_wav_chunks = []
    with torch.no_grad(), lm_gen.streaming(1), mimi.streaming(1):
        for code in all_codes:
            tokens_out = lm_gen.step(code)
            if tokens_out is not None:
                assert tokens_out.shape == (1, 1 + moshi.dep_q, 1)
                out_wav_chunks.append(mimi.decode(tokens_out[:, 1:]))
    assert len(out_wav_chunks) == len(all_codes) - moshi.max_delay
    return torch.cat(out_wav_chunks, dim=-1)


def test_kyutai_usage_example_runs_on_tiny_local_checkpoints(tmp_path):
    mimi_weight, moshi_weight = _write_checkpoints(tmp_path)

    mimi = loaders.get_mimi(mimi_weight, mimi_config=TINY_MIMI_CONFIG, device="cpu")
    mimi.set_num_codebooks(8)
    wav = torch.randn(1, 1, 1920 * 4)
    with torch.no_grad():
        codes = mimi.encode(wav)
        decoded = mimi.decode(codes)
        frame_size = int(mimi.sample_rate / mimi.frame_rate)
        all_codes = []
        with mimi.streaming(batch_size=1):
            for offset in range(0, wav.shape[-1], frame_size):
                frame = wav[:, :, offset : offset + frame_size]
                frame_codes = mimi.encode(frame)
                assert frame_codes.shape == (1, 8, 1)
                all_codes.append(frame_codes)
    assert codes.shape == (1, 8, 4) and decoded.shape == (1, 1, 1920 * 4)

    moshi = loaders.get_moshi_lm(moshi_weight, lm_kwargs=LM_KWARGS, device="cpu")
    out_wav = _stream_through_lm(mimi, moshi, all_codes)
    assert out_wav.shape == (1, 1, 1920 * 3) and torch.isfinite(out_wav).all()


def test_kyutai_checkpoint_info_flow_runs_on_a_local_repo(tmp_path):
    _write_checkpoints(tmp_path)
    (tmp_path / "mimi_config.json").write_text(json.dumps(TINY_MIMI_CONFIG))
    config = {
        **LM_KWARGS,
        "moshi_name": "model.safetensors",
        "mimi_name": "mimi.safetensors",
        "mimi_config_name": "mimi_config.json",
        "tokenizer_name": "tokenizer.model",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))

    checkpoint_info = loaders.CheckpointInfo.from_hf_repo(str(tmp_path))
    mimi = checkpoint_info.get_mimi(device="cpu")
    moshi = checkpoint_info.get_moshi(device="cpu", dtype=torch.float32)
    assert mimi.num_codebooks == 2  # as many as the LM's user stream
    with torch.no_grad(), mimi.streaming(1):
        all_codes = [mimi.encode(torch.randn(1, 1, mimi.frame_size)) for _ in range(3)]
    out_wav = _stream_through_lm(mimi, moshi, all_codes)
    assert out_wav.shape == (1, 1, 1920 * 2)
