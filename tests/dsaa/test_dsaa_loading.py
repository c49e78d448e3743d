"""Saving and loading DSAA checkpoints: round trip offline, fork format, strictness, errors (property 7, 9)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from moshi.models.dsaa import dsaa_dims, initialize_dsaa_modules
from moshi.models.dsaa_loading import (
    TextLLMSpec,
    build_dsaa_model,
    load_dsaa_checkpoint,
    load_dsaa_model,
    load_llm,
    load_llm_tokenizer,
    save_dsaa_checkpoint,
)
from moshi.models.dsaa_tokens import resolve_special_tokens
from tests.dsaa.tiny_llm import random_codes
from tests.helpers.configs import small_lm_kwargs


def _model_from_dir(llm_dir, proj_hidden=None, tie_check=True):
    spec = TextLLMSpec(hf_repo_id=str(llm_dir))
    tokenizer = load_llm_tokenizer(spec)
    model = build_dsaa_model(
        small_lm_kwargs(), load_llm(spec), resolve_special_tokens(tokenizer), proj_hidden=proj_hidden
    )
    initialize_dsaa_modules(model, 0)
    with torch.no_grad():  # make the projectors matter, so a wrong load would show in the logits
        model.text_projector.alpha.fill_(0.7)
    return model.eval(), tokenizer, spec


def _assert_same_outputs(a, b):
    codes = random_codes(a, steps=5)
    out_a, out_b = a(codes), b(codes)
    torch.testing.assert_close(out_a.logits, out_b.logits, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out_a.text_logits, out_b.text_logits, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_then_load_offline_gives_identical_logits(tmp_path, make_llm_dir, tie, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer, spec = _model_from_dir(make_llm_dir(tie=tie, arch="qwen2" if tie else "llama"))
    save_dsaa_checkpoint(model, tmp_path / "ckpt", tokenizer, spec.hf_repo_id)
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert ("text_llm.lm_head.weight" in state) is (not tie)
    block = json.loads((tmp_path / "ckpt" / "config.json").read_text())["dsaa"]
    assert block["llm_weights"] == "embedded" and block["text_dim"] == 32 and block["bos_id"] == 1
    # The LLM folder is gone: loading must not need it.
    os.rename(spec.hf_repo_id, spec.hf_repo_id + ".moved")
    try:
        loaded, loaded_tok = load_dsaa_checkpoint(tmp_path / "ckpt", dtype=torch.float32)
    finally:
        os.rename(spec.hf_repo_id + ".moved", spec.hf_repo_id)
    _assert_same_outputs(model, loaded)
    hf = loaded.text_llm.hf_model
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) is tie
    assert loaded_tok.encode(" hello", add_special_tokens=False) == tokenizer.encode(
        " hello", add_special_tokens=False
    )
    assert not any(p.requires_grad for p in loaded.text_llm.parameters())


def test_reference_llm_weights_are_not_stored_and_reload_from_the_repo(tmp_path, tiny_llm_dir):
    model, tokenizer, spec = _model_from_dir(tiny_llm_dir)
    save_dsaa_checkpoint(model, tmp_path / "ckpt", tokenizer, spec.hf_repo_id, save_weights=False)
    assert not any(k.startswith("text_llm.") for k in load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dsaa"]["llm_weights"] == "reference"
    loaded, _ = load_dsaa_checkpoint(tmp_path / "ckpt" / "model.safetensors", dtype=torch.float32)
    _assert_same_outputs(model, loaded)


def test_fork_format_loads_given_the_yaml_section(tmp_path, tiny_llm_dir):
    model, _, spec = _model_from_dir(tiny_llm_dir, proj_hidden=40)
    fork_file = tmp_path / "dsaa.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("text_llm.")}, str(fork_file))
    text_llm = {"enable": True, "hf_repo_id": spec.hf_repo_id}
    loaded, tokenizer = load_dsaa_model(
        str(fork_file), text_llm, lm_kwargs=small_lm_kwargs(), dtype=torch.float32
    )
    assert dsaa_dims(loaded).proj_hidden == 40 and loaded.text_initial_token_id == 1 and loaded.text_padding_token_id == 223
    _assert_same_outputs(model, loaded)


def test_plain_moshi_checkpoint_asks_for_setup_new_model(moshi_source, tiny_llm_dir):
    with pytest.raises(ValueError, match="plain Moshi checkpoint.*setup_new_model"):
        load_dsaa_model(str(moshi_source), {"hf_repo_id": str(tiny_llm_dir)}, lm_kwargs=small_lm_kwargs())


def test_width_mismatch_between_checkpoint_and_llm_names_the_tensors(tmp_path, tiny_llm_dir, make_llm_dir):
    model, _, _ = _model_from_dir(tiny_llm_dir)
    fork_file = tmp_path / "dsaa.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("text_llm.")}, str(fork_file))
    other = {"hf_repo_id": str(make_llm_dir(hidden=16))}
    with pytest.raises(
        ValueError, match=r"width mismatch.*text_projector.fusion.4.weight.*\(32, 320\).*hidden_size 16"
    ):
        load_dsaa_model(str(fork_file), other, lm_kwargs=small_lm_kwargs(), dtype=torch.float32)


def test_loading_is_strict_and_lists_the_names(tmp_path, tiny_llm_dir):
    model, tokenizer, spec = _model_from_dir(tiny_llm_dir)
    save_dsaa_checkpoint(model, tmp_path / "ckpt", tokenizer, spec.hf_repo_id)
    path = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(path))
    state["text_projector.extra.weight"] = torch.zeros(2)
    del state["depformer_projectors.1.skip.weight"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"depformer_projectors.1.skip.weight.*text_projector.extra.weight"):
        load_dsaa_checkpoint(tmp_path / "ckpt")


def test_save_refuses_to_overwrite_and_missing_llm_names_the_key(tmp_path, tiny_llm_dir):
    model, tokenizer, spec = _model_from_dir(tiny_llm_dir)
    save_dsaa_checkpoint(model, tmp_path / "ckpt", tokenizer, spec.hf_repo_id)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        save_dsaa_checkpoint(model, tmp_path / "ckpt", tokenizer, spec.hf_repo_id)
    with pytest.raises(FileNotFoundError, match="text_llm.hf_repo_id='/nonexistent/llm'"):
        load_llm(TextLLMSpec(hf_repo_id="/nonexistent/llm"))


def test_llm_skeleton_has_meta_parameters_and_the_real_rotary_tables(tiny_llm_dir):
    from torch import nn

    from moshi.models.dsaa_loading import llm_from_config

    register = nn.Module.register_parameter
    reference = load_llm(TextLLMSpec(hf_repo_id=str(tiny_llm_dir)))
    skeleton = llm_from_config(reference.config.to_dict(), TextLLMSpec(hf_repo_id=str(tiny_llm_dir)))
    assert nn.Module.register_parameter is register  # nothing in torch was patched
    assert all(p.is_meta for p in skeleton.parameters())
    buffers = dict(reference.named_buffers())
    assert buffers and set(dict(skeleton.named_buffers())) == set(buffers)
    for name, buffer in skeleton.named_buffers():
        assert not buffer.is_meta
        torch.testing.assert_close(buffer, buffers[name].to(buffer.dtype), rtol=0, atol=0)  # same formula, same op
