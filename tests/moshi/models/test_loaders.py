"""Loaders: both attention-name layouts, LoRA files, config handling, local repos with no network."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moshi.models import loaders
from moshi.models.loaders import CheckpointInfo, get_moshi_lm, hf_get
from moshi.modules.lora import (
    LoRALinear,
    init_lora_for_training,
    lora_state_dict,
    replace_all_linear_with_lora,
)
from tests.helpers.configs import small_lm_kwargs
from tests.helpers.models import filled_small_lm, fixture_codes


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(fixture_codes())
    return torch.cat([out.text_logits.flatten(), out.logits.nan_to_num().flatten()])


def _legacy_state(model) -> dict[str, torch.Tensor]:
    """The pre-2025 layout: per-set attention projections stacked under in_proj_weight / out_proj.weight."""
    state = dict(model.state_dict())
    legacy = {}
    prefixes = sorted({m.group(1) for k in state if (m := re.match(r"(.*\.self_attn\.)(in|out)_projs\.", k))})
    for prefix in prefixes:
        for new, old in (("in_projs", "in_proj_weight"), ("out_projs", "out_proj.weight")):
            keys = sorted(
                (k for k in state if k.startswith(prefix + new + ".")), key=lambda k: int(k.split(".")[-2])
            )
            legacy[prefix + old] = torch.cat([state.pop(k) for k in keys])
    legacy.update(state)
    return legacy


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_current_and_legacy_layouts_load_to_the_same_logits(tmp_path):
    model = filled_small_lm()
    current = _save(tmp_path / "current.safetensors", model.state_dict())
    legacy_state = _legacy_state(model)
    assert legacy_state["depformer.layers.0.self_attn.in_proj_weight"].shape == (192, 32)
    assert legacy_state["transformer.layers.1.self_attn.out_proj.weight"].shape == (64, 64)
    legacy = _save(tmp_path / "legacy.safetensors", legacy_state)
    reference = _logits(model)
    for path in (current, legacy):
        loaded = get_moshi_lm(path, lm_kwargs=small_lm_kwargs(), dtype=torch.float32)
        assert not loaded.training and not any(p.is_meta for p in loaded.parameters())
        assert list(loaded.state_dict()) == list(model.state_dict())
        assert torch.equal(_logits(loaded), reference)  # the same weights and modules: a bit-exact round trip


def test_weights_are_cast_to_the_requested_dtype(tmp_path):
    path = _save(tmp_path / "w.safetensors", filled_small_lm().state_dict())
    model = get_moshi_lm(path, lm_kwargs=small_lm_kwargs())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_mismatched_file_lists_missing_and_unexpected_keys(tmp_path):
    state = dict(filled_small_lm().state_dict())
    state.pop("linears.1.weight")
    state["bogus.weight"] = torch.zeros(2)
    path = _save(tmp_path / "bad.safetensors", state)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*linears\.1\.weight.*bogus\.weight"):
        get_moshi_lm(path, lm_kwargs=small_lm_kwargs(), dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        get_moshi_lm(tmp_path / "nope.safetensors", lm_kwargs=small_lm_kwargs())


def _lora_files(tmp_path):
    base = filled_small_lm()
    base_path = _save(tmp_path / "model.safetensors", base.state_dict())
    lora_model = filled_small_lm()
    replace_all_linear_with_lora(lora_model, rank=4, scaling=2.0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    lora_path = _save(tmp_path / "lora.safetensors", lora_state_dict(lora_model))
    return base_path, lora_path, lora_model


def test_lora_weights_through_get_moshi_lm_fused_and_not(tmp_path):
    base_path, lora_path, lora_model = _lora_files(tmp_path)
    kwargs = small_lm_kwargs(lora=True, lora_rank=4, lora_scaling=2.0)
    reference = _logits(lora_model)
    unfused = get_moshi_lm(base_path, lm_kwargs=kwargs, dtype=torch.float32, lora_weights=lora_path)
    assert isinstance(unfused.text_linear, LoRALinear)
    assert torch.equal(_logits(unfused), reference)  # the same LoRA modules and weights as saved
    fused = get_moshi_lm(base_path, lm_kwargs=kwargs, dtype=torch.float32, lora_weights=lora_path, fuse_lora=True)
    assert not any(isinstance(m, LoRALinear) for m in fused.modules())
    torch.testing.assert_close(_logits(fused), reference, atol=2e-4, rtol=1e-4)


def test_unexpected_lora_key_is_fatal(tmp_path):
    base_path, lora_path, lora_model = _lora_files(tmp_path)
    state = lora_state_dict(lora_model)
    state["transformer.layers.9.self_attn.in_projs.0.lora_A.weight"] = torch.zeros(4, 64)
    bad = _save(tmp_path / "bad_lora.safetensors", state)
    kwargs = small_lm_kwargs(lora=True, lora_rank=4, lora_scaling=2.0)
    with pytest.raises(RuntimeError, match=r"unexpected keys.*layers\.9"):
        get_moshi_lm(base_path, lm_kwargs=kwargs, dtype=torch.float32, lora_weights=bad)


def test_missing_lora_factors_start_as_no_ops(tmp_path):
    base_path, lora_path, lora_model = _lora_files(tmp_path)
    state = {k: v for k, v in lora_state_dict(lora_model).items() if not k.startswith("linears.")}
    partial = _save(tmp_path / "partial.safetensors", state)
    kwargs = small_lm_kwargs(lora=True, lora_rank=4, lora_scaling=2.0)
    model = get_moshi_lm(base_path, lm_kwargs=kwargs, dtype=torch.float32, lora_weights=partial)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.count_nonzero(model.linears[0].lora_B.weight) == 0


def test_lora_weights_without_lora_in_config_is_an_error(tmp_path):
    base_path, lora_path, _ = _lora_files(tmp_path)
    with pytest.raises(ValueError, match='"lora": true'):
        get_moshi_lm(base_path, lm_kwargs=small_lm_kwargs(), lora_weights=lora_path)


def test_config_rewrites_and_overrides(tmp_path):
    path = _save(tmp_path / "w.safetensors", filled_small_lm().state_dict())
    kwargs = small_lm_kwargs(depformer_causal=True, demux_second_stream=False)
    model = get_moshi_lm(path, lm_kwargs=kwargs, dtype=torch.float32, lm_kwargs_overrides={"context": 3})
    assert model.transformer.layers[0].self_attn.context == 3
    assert "depformer_causal" in kwargs  # the caller's dict is not mutated
    with pytest.raises(TypeError, match="depformer_foo"):
        get_moshi_lm(None, lm_kwargs=small_lm_kwargs(depformer_foo=1))
    with pytest.raises(NotImplementedError, match="conditioners"):
        get_moshi_lm(None, lm_kwargs=small_lm_kwargs(conditioners={"x": {}}))


def test_default_kwargs_are_read_only_copies():
    with pytest.raises(TypeError):
        loaders.DEFAULT_LM_KWARGS["dim"] = 1  # type: ignore[index]
    assert loaders._lm_kwargs is loaders.DEFAULT_LM_KWARGS
    copy = loaders.default_lm_kwargs()
    copy["delays"].append(5)
    assert len(loaders.default_lm_kwargs()["delays"]) == 17
    assert "depformer_causal" not in copy
    json.dumps(loaders.default_lm_kwargs())


def test_constants():
    assert (loaders.SAMPLE_RATE, loaders.FRAME_RATE) == (24000, 12.5)
    assert loaders.MOSHI_NAME == "model.safetensors"
    assert loaders.MIMI_NAME == "tokenizer-e351c8d8-checkpoint125.safetensors"
    assert loaders.TEXT_TOKENIZER_NAME == "tokenizer_spm_32k_3.model"
    assert loaders.DEFAULT_REPO == "kyutai/moshiko-pytorch-bf16"


def test_hf_get_resolves_local_references(tmp_path):
    assert hf_get(tmp_path) == tmp_path
    assert hf_get("file:///a/b.bin") == Path("/a/b.bin")
    assert hf_get("some/local.bin") == Path("some/local.bin")
    assert hf_get("w.bin", str(tmp_path)) == tmp_path / "w.bin"
    with pytest.raises(ValueError, match="hf://owner/repo/path"):
        hf_get("hf://owner/repo")


def test_checkpoint_info_from_a_local_repo_pops_non_lm_keys(tmp_path):
    model = filled_small_lm()
    _save(tmp_path / "moshi.safetensors", model.state_dict())
    config = small_lm_kwargs(
        moshi_name="moshi.safetensors", model_type="hibiki", lm_gen_config={"temp": 0.5}, tokenizer_name="tok.model"
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    info = CheckpointInfo.from_hf_repo(str(tmp_path))
    assert info.moshi_weights == tmp_path / "moshi.safetensors"
    assert info.tokenizer == tmp_path / "tok.model"
    assert info.mimi_weights == tmp_path / loaders.MIMI_NAME
    assert info.model_type == "hibiki" and info.lm_gen_config == {"temp": 0.5}
    assert info.lm_config == small_lm_kwargs() and info.raw_config == config
    loaded = info.get_moshi(dtype=torch.float32)
    assert torch.equal(loaded.text_emb.weight[2], loaded.text_emb.weight[3])  # hibiki fix-up
    assert torch.equal(loaded.text_emb.weight[4:], model.text_emb.weight[4:])
    with pytest.raises(FileNotFoundError, match="tok.model"):
        info.get_text_tokenizer()


def test_checkpoint_info_without_config_uses_moshiko_defaults(tmp_path):
    info = CheckpointInfo.from_hf_repo(str(tmp_path), moshi_weights=str(tmp_path / "x.safetensors"))
    assert info.lm_config is None and info.raw_config is None
    assert info.moshi_weights == tmp_path / "x.safetensors"
    assert info.tokenizer == tmp_path / loaders.TEXT_TOKENIZER_NAME and info.lora_weights is None


def test_invalid_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON at line 1"):
        CheckpointInfo.from_hf_repo(str(tmp_path))


def test_get_lora_moshi_loads_a_lora_file_fused_or_not(tmp_path):
    base_path, lora_path, lora_model = _lora_files(tmp_path)
    reference = _logits(lora_model)
    unfused = loaders.get_lora_moshi(
        get_moshi_lm(base_path, lm_kwargs=small_lm_kwargs(), dtype=torch.float32), str(lora_path), 4, 2.0,
        dtype=torch.float32, fuse_lora=False,
    )
    assert isinstance(unfused.text_linear, LoRALinear)
    assert torch.equal(_logits(unfused), reference)  # the same LoRA modules and weights as saved
    fused = loaders.get_lora_moshi(
        get_moshi_lm(base_path, lm_kwargs=small_lm_kwargs(), dtype=torch.float32), lora_path, 4, 2.0,
        dtype=torch.float32,
    )
    assert not any(isinstance(m, LoRALinear) for m in fused.modules())
    torch.testing.assert_close(_logits(fused), reference, atol=2e-4, rtol=1e-4)


def test_get_lora_moshi_without_a_file_adds_unfused_factors(tmp_path):
    base_path, _, _ = _lora_files(tmp_path)
    base = get_moshi_lm(base_path, lm_kwargs=small_lm_kwargs(), dtype=torch.float32)
    reference = _logits(base)
    model = loaders.get_lora_moshi(base, None, 4, 2.0)  # dtype (bf16 by default) applies to loaded files only
    assert isinstance(model.text_linear, LoRALinear) and model.text_linear.lora_A.weight.shape == (4, 64)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    init_lora_for_training(model)
    assert torch.equal(_logits(model), reference)  # B = 0: every LoRA layer adds exact zeros


def test_get_lora_moshi_refuses_a_file_that_is_not_safetensors(tmp_path):
    base = filled_small_lm()
    with pytest.raises(ValueError, match=r"\.safetensors file, got .*lora\.pt"):
        loaders.get_lora_moshi(base, tmp_path / "lora.pt", 4, 2.0)
