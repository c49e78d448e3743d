"""Mimi structure (Kyutai's names/shapes), the audio API contract and streaming, on the tiny configuration."""

from __future__ import annotations

import pytest
import torch

from moshi.models.compression import DEFAULT_MIMI_CONFIG, TINY_MIMI_CONFIG, MimiModel, build_mimi
from tests.helpers.numerics import assert_close_f32, assert_quantizer_codes_match, mimi_depth

FRAME = 1920


def _reference_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of Kyutai's Mimi, written out by hand from its published checkpoint."""
    shapes: dict[str, tuple[int, ...]] = {}
    enc = "encoder.model"
    shapes[f"{enc}.0.conv.conv.weight"] = (64, 1, 7)
    shapes[f"{enc}.0.conv.conv.bias"] = (64,)
    for i, c in zip((1, 4, 7, 10), (64, 128, 256, 512)):
        shapes[f"{enc}.{i}.block.1.conv.conv.weight"] = (c // 2, c, 3)
        shapes[f"{enc}.{i}.block.1.conv.conv.bias"] = (c // 2,)
        shapes[f"{enc}.{i}.block.3.conv.conv.weight"] = (c, c // 2, 1)
        shapes[f"{enc}.{i}.block.3.conv.conv.bias"] = (c,)
    for i, (cin, cout, k) in {3: (64, 128, 8), 6: (128, 256, 10), 9: (256, 512, 12), 12: (512, 1024, 16),
                              14: (1024, 512, 3)}.items():
        shapes[f"{enc}.{i}.conv.conv.weight"] = (cout, cin, k)
        shapes[f"{enc}.{i}.conv.conv.bias"] = (cout,)
    dec = "decoder.model"
    shapes[f"{dec}.0.conv.conv.weight"] = (1024, 512, 7)
    shapes[f"{dec}.0.conv.conv.bias"] = (1024,)
    for i, (cin, cout, k) in {2: (1024, 512, 16), 5: (512, 256, 12), 8: (256, 128, 10), 11: (128, 64, 8)}.items():
        shapes[f"{dec}.{i}.convtr.convtr.weight"] = (cin, cout, k)
        shapes[f"{dec}.{i}.convtr.convtr.bias"] = (cout,)
    for i, c in zip((3, 6, 9, 12), (512, 256, 128, 64)):
        shapes[f"{dec}.{i}.block.1.conv.conv.weight"] = (c // 2, c, 3)
        shapes[f"{dec}.{i}.block.1.conv.conv.bias"] = (c // 2,)
        shapes[f"{dec}.{i}.block.3.conv.conv.weight"] = (c, c // 2, 1)
        shapes[f"{dec}.{i}.block.3.conv.conv.bias"] = (c,)
    shapes[f"{dec}.14.conv.conv.weight"] = (1, 64, 3)
    shapes[f"{dec}.14.conv.conv.bias"] = (1,)
    for side in ("encoder", "decoder"):
        for i in range(8):
            p = f"{side}_transformer.transformer.layers.{i}"
            shapes[f"{p}.self_attn.out_projs.0.weight"] = (512, 512)
            shapes[f"{p}.self_attn.in_projs.0.weight"] = (1536, 512)
            for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                         "layer_scale_1.scale", "layer_scale_2.scale"):
                shapes[f"{p}.{name}"] = (512,)
            shapes[f"{p}.linear1.weight"] = (2048, 512)
            shapes[f"{p}.linear2.weight"] = (512, 2048)
    for rvq, levels in (("rvq_first", 1), ("rvq_rest", 31)):
        shapes[f"quantizer.{rvq}.input_proj.weight"] = (256, 512, 1)
        shapes[f"quantizer.{rvq}.output_proj.weight"] = (512, 256, 1)
        for j in range(levels):
            cb = f"quantizer.{rvq}.vq.layers.{j}._codebook"
            shapes[f"{cb}._initialized"] = (1,)
            shapes[f"{cb}.cluster_usage"] = (2048,)
            shapes[f"{cb}.embedding_sum"] = (2048, 256)
    shapes["downsample.conv.conv.conv.weight"] = (512, 512, 4)
    shapes["upsample.convtr.convtr.convtr.weight"] = (512, 1, 4)
    return shapes


def to_legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a state dict to the layout of Kyutai's published files: stacked attention, old codebook names."""
    renames = {
        "self_attn.in_projs.0.weight": "self_attn.in_proj_weight",
        "self_attn.out_projs.0.weight": "self_attn.out_proj.weight",
        "_codebook._initialized": "_codebook.inited",
        "_codebook.cluster_usage": "_codebook.cluster_size",
        "_codebook.embedding_sum": "_codebook.embed_avg",
    }
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            if key.endswith(new):
                key = key[: -len(new)] + old
        legacy[key] = value
    return legacy


@pytest.fixture(scope="module")
def tiny() -> MimiModel:
    torch.manual_seed(0)
    return build_mimi(TINY_MIMI_CONFIG)


def test_default_state_dict_names_and_shapes_match_kyutai():
    model = build_mimi(device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _reference_shapes()
    assert len(shapes) == 318
    assert sum(p.numel() for p in model.parameters()) == 79_308_609
    assert sum(b.numel() for b in model.buffers()) == 16_842_784
    assert all(b.dtype == torch.float32 for b in model.buffers())


def test_default_model_loads_current_and_legacy_names_strictly():
    model = build_mimi(device="meta")
    state = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    legacy = to_legacy_names(state)
    assert "encoder_transformer.transformer.layers.0.self_attn.in_proj_weight" in legacy
    assert "quantizer.rvq_rest.vq.layers.5._codebook.embed_avg" in legacy
    result = build_mimi(device="meta").load_state_dict(legacy, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_tiny_config_keeps_frame_size_and_rates(tiny):
    assert (tiny.frame_size, tiny.frame_rate, tiny.sample_rate, tiny.channels) == (1920, 12.5, 24000, 1)
    assert tiny.encoder_frame_rate == 25.0
    assert (tiny.num_codebooks, tiny.total_codebooks, tiny.cardinality) == (8, 8, 64)
    assert sum(p.numel() for p in tiny.parameters()) < 200_000  # fast on CPU


@pytest.mark.parametrize("length", [1, 1919, 1920, 1921, 5000])
def test_any_length_is_zero_padded_to_whole_frames(tiny, length):
    x = torch.randn(2, 1, length)
    frames = -(-length // FRAME)
    with torch.inference_mode():
        codes = tiny.encode(x)
        expected = tiny.encode(torch.nn.functional.pad(x, (0, frames * FRAME - length)))
        audio = tiny.decode(codes)
    assert codes.shape == (2, 8, frames) and codes.dtype == torch.int64
    assert torch.equal(codes, expected)  # the same padded input through the same kernels
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    assert audio.shape == (2, 1, frames * FRAME)


def test_batched_encode_equals_per_item_encode(tiny):
    x = torch.randn(3, 1, 2 * FRAME)
    with torch.inference_mode():
        batched = tiny.encode(x)
        single = torch.cat([tiny.encode(x[i : i + 1]) for i in range(3)])
        latent = tiny.encode_to_latent(x, quantize=False)
        single_latent = torch.cat([tiny.encode_to_latent(x[i : i + 1], quantize=False) for i in range(3)])
    # Batch 3 and batch 1 may run different kernels: latents equal up to rounding, codes up to near ties.
    assert_close_f32(single_latent, latent, depth=mimi_depth(tiny, "encoder"))
    assert_quantizer_codes_match(tiny.quantizer, latent, batched, single, latent_b=single_latent)


def test_streaming_encode_and_decode_equal_one_shot_with_batch(tiny):
    x = torch.randn(3, 1, 6 * FRAME)
    with torch.inference_mode():
        codes = tiny.encode(x)
        audio = tiny.decode(codes)
        with tiny.streaming(3):
            chunks = torch.split(x, [FRAME, 3 * FRAME, 2 * FRAME], dim=-1)
            streamed_codes = torch.cat([tiny.encode(c) for c in chunks], dim=-1)
        with tiny.streaming(3):
            streamed_latent = torch.cat([tiny.encode_to_latent(c, quantize=False) for c in chunks], dim=-1)
        with tiny.streaming(3):
            streamed_audio = torch.cat([tiny.decode(codes[..., t : t + 2]) for t in range(0, 6, 2)], dim=-1)
        latent = tiny.encode_to_latent(x, quantize=False)
    # Chunks run other shapes than the whole input: latents equal up to rounding, codes up to near ties.
    assert_close_f32(streamed_latent, latent, depth=mimi_depth(tiny, "encoder"))
    assert_quantizer_codes_match(tiny.quantizer, latent, codes, streamed_codes, latent_b=streamed_latent)
    assert_close_f32(streamed_audio, audio, depth=mimi_depth(tiny, "decoder"))


def test_reset_streaming_restarts_the_stream(tiny):
    x = torch.randn(1, 1, 2 * FRAME)
    with torch.inference_mode(), tiny.streaming(1):
        first = tiny.encode(x)
        tiny.encode(torch.randn(1, 1, FRAME))
        tiny.reset_streaming()
        again = tiny.encode(x)
    assert torch.equal(first, again)  # the same calls from the same state


def test_set_num_codebooks_changes_encode_output(tiny):
    x = torch.randn(1, 1, FRAME)
    with torch.inference_mode():
        full = tiny.encode(x)
        tiny.set_num_codebooks(3)
        try:
            fewer = tiny.encode(x)
        finally:
            tiny.set_num_codebooks(8)
        assert tiny.decode(fewer).shape == (1, 1, FRAME)
    assert torch.equal(fewer, full[:, :3])  # the first levels run the same ops on the same shapes
    with pytest.raises(ValueError, match=r"num_codebooks must be in \[1, 8\], got 9"):
        tiny.set_num_codebooks(9)


@pytest.mark.parametrize(
    "shape, message",
    [
        pytest.param((1, FRAME), r"audio must be \[B, 1, L\], got shape \(1, 1920\)", id="2d"),
        pytest.param((1, 2, FRAME), r"expects 1 channel\(s\), got 2", id="stereo"),
        pytest.param((1, 1, 0), "audio is empty", id="empty"),
    ],
)
def test_bad_audio_layout_raises(tiny, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny.encode(torch.zeros(shape))


def test_wrong_sample_rate_raises(tiny):
    with pytest.raises(ValueError, match="expects 24000 Hz audio, got 16000 Hz"):
        tiny.encode(torch.zeros(1, 1, FRAME), sample_rate=16000)
    tiny.check_sample_rate(24000)


def test_streaming_chunk_must_be_whole_frames(tiny):
    with tiny.streaming(1), pytest.raises(ValueError, match="multiple of 1920 samples, got 1000"):
        tiny.encode(torch.zeros(1, 1, 1000))


def test_bad_codes_raise(tiny):
    with pytest.raises(ValueError, match="codes must be an integer tensor"):
        tiny.decode(torch.zeros(1, 8, 2))
    with pytest.raises(ValueError, match=r"codes must be \[B, K, T\]"):
        tiny.decode(torch.zeros(8, 2, dtype=torch.long))


def test_config_errors_name_the_key():
    bad = {**TINY_MIMI_CONFIG, "sampel_rate": 24000}
    with pytest.raises(ValueError, match=r"unknown keys \['sampel_rate'\]"):
        build_mimi(bad)
    bad = {**TINY_MIMI_CONFIG, "seanet": {**TINY_MIMI_CONFIG["seanet"], "n_filterz": 4}}
    with pytest.raises(ValueError, match="n_filterz"):
        build_mimi(bad)
    assert DEFAULT_MIMI_CONFIG["seanet"]["n_filters"] == 64  # builders never mutate the shared configs


# ---- loaders ----------------------------------------------------------------------------------------------------


def _save(state: dict[str, torch.Tensor], path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize("legacy", [pytest.param(False, id="current-names"), pytest.param(True, id="legacy-names")])
def test_get_mimi_loads_a_weights_file_strictly(tiny, tmp_path, legacy):
    from moshi.models.loaders import get_mimi

    state = tiny.state_dict()
    path = tmp_path / "mimi.safetensors"
    _save(to_legacy_names(state) if legacy else state, path)
    loaded = get_mimi(path, mimi_config=TINY_MIMI_CONFIG, num_codebooks=5)
    assert loaded.num_codebooks == 5 and not loaded.training
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(1, 1, 2 * FRAME)
    with torch.inference_mode():
        assert torch.equal(loaded.encode(x), tiny.encode(x)[:, :5])  # same weights, same call


def test_get_mimi_lists_missing_and_unexpected_keys(tiny, tmp_path):
    from moshi.models.loaders import get_mimi

    state = dict(tiny.state_dict())
    state.pop("upsample.convtr.convtr.convtr.weight")
    state["decoder.model.99.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    _save(state, path)
    with pytest.raises(ValueError, match=r"bad.safetensors does not match.*upsample\.convtr.*decoder\.model\.99"):
        get_mimi(path, mimi_config=TINY_MIMI_CONFIG)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        get_mimi(tmp_path / "nope.safetensors", mimi_config=TINY_MIMI_CONFIG)


def test_checkpoint_info_get_mimi_uses_lm_codebooks_and_mimi_config(tiny, tmp_path):
    from moshi.models.loaders import CheckpointInfo

    path = tmp_path / "mimi.safetensors"
    _save(tiny.state_dict(), path)
    common = {"moshi_weights": tmp_path / "lm.safetensors", "mimi_weights": path, "tokenizer": tmp_path / "t.model"}
    info = CheckpointInfo(**common, lm_config={"n_q": 10, "dep_q": 3}, mimi_config=TINY_MIMI_CONFIG)
    assert info.get_mimi().num_codebooks == 7
    info = CheckpointInfo(**common, lm_config=None, mimi_config=TINY_MIMI_CONFIG)
    assert info.get_mimi().num_codebooks == 8
