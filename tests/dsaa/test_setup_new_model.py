"""``setup_new_model``: determinism, Moshi tensors reused, DSAA modules initialised, errors (property 8, 9)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import setup_new_model
from moshi.models.dsaa import dsaa_dims
from moshi.models.dsaa_loading import load_dsaa_checkpoint
from tests.dsaa.tiny_llm import random_codes


def test_setup_is_byte_deterministic_and_copies_the_moshi_tensors(
    tmp_path, moshi_source, tiny_llm_dir, write_config, capsys
):
    config = write_config(moshi_source, tiny_llm_dir)
    setup_new_model.main([str(config), "--out", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    setup_new_model.main([str(config), "--out", str(tmp_path / "b")])
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    out = load_file(str(tmp_path / "a" / "model.safetensors"))
    src = load_file(str(moshi_source))
    moshi_keys = [
        k
        for k in src
        if not k.startswith(("text_emb.", "text_linear.", "depformer_in.", "depformer_text_emb."))
    ]
    assert moshi_keys and all(torch.equal(out[k], src[k]) for k in moshi_keys)
    assert not any(k.startswith(("text_emb.", "text_linear.", "depformer_in.")) for k in out)
    assert "depformer_text_emb.emb.weight" in out and "depformer_text_emb.weight" not in out
    llm = load_file(str(tiny_llm_dir / "model.safetensors"))
    assert torch.equal(
        out["text_head.weight"], llm["model.embed_tokens.weight"]
    )  # tied LLM: head = embedding
    assert torch.equal(out["depformer_text_emb.emb.weight"], llm["model.embed_tokens.weight"])
    assert "text_llm.lm_head.weight" not in out and torch.equal(
        out["text_llm.model.embed_tokens.weight"], llm["model.embed_tokens.weight"]
    )
    assert out["text_projector.alpha"].item() == pytest.approx(0.1)

    assert "D_m=64 D_d=32 D_l=32 V_in=320 V=320 H=48 P=2" in printed
    assert "PAD=223 'Ġ'" in printed and "BOS=1 '<|im_start|>'" in printed
    assert "text_emb" in printed and "dropped" in printed and "trainable (proj)" in printed
    assert f"LLM {tiny_llm_dir}" in printed


def test_setup_output_loads_and_runs_for_another_llm_width(
    tmp_path, moshi_source, make_llm_dir, write_config
):
    llm_dir = make_llm_dir(hidden=16, arch="llama", tie=False)
    config = write_config(moshi_source, llm_dir, param_dtype="bfloat16")
    setup_new_model.run(config, tmp_path / "w")
    model, tokenizer = load_dsaa_checkpoint(tmp_path / "w", dtype=torch.float32)
    assert dsaa_dims(model).text_dim == 16 and dsaa_dims(model).depformer_dim == 32
    assert torch.equal(model.depformer_text_proj.weight[16:], torch.zeros(16, 16))
    assert tokenizer.convert_ids_to_tokens(model.text_initial_token_id) == "<|im_start|>"
    out = model(random_codes(model, steps=4))
    assert out.text_logits.shape == (2, 1, 4, 320) and not torch.isnan(out.text_logits).any()
    state = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert state["text_head.weight"].dtype == torch.bfloat16 and "text_llm.lm_head.weight" in state


def test_setup_refuses_to_overwrite_without_force(tmp_path, moshi_source, tiny_llm_dir, write_config):
    config = write_config(moshi_source, tiny_llm_dir)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "dsaa.safetensors").write_bytes(b"user file")
    setup_new_model.run(config, tmp_path / "w")
    with pytest.raises(FileExistsError, match="--force"):
        setup_new_model.run(config, tmp_path / "w")
    setup_new_model.run(config, tmp_path / "w", force=True)
    assert (tmp_path / "w" / "dsaa.safetensors").read_bytes() == b"user file"


def test_keep_adapters_reuses_dsaa_tensors_of_a_dsaa_source(
    tmp_path, moshi_source, tiny_llm_dir, write_config
):
    first = write_config(moshi_source, tiny_llm_dir, seed=3)
    setup_new_model.run(first, tmp_path / "dsaa")
    source = load_file(str(tmp_path / "dsaa" / "model.safetensors"))
    again = write_config(tmp_path / "dsaa" / "model.safetensors", tiny_llm_dir, seed=11)
    setup_new_model.run(again, tmp_path / "kept", keep_adapters=True)
    setup_new_model.run(again, tmp_path / "fresh")
    kept = load_file(str(tmp_path / "kept" / "model.safetensors"))
    fresh = load_file(str(tmp_path / "fresh" / "model.safetensors"))
    key = "depformer_projectors.1.fc1.weight"
    assert torch.equal(kept[key], source[key]) and not torch.equal(fresh[key], source[key])
    assert torch.equal(
        fresh["transformer.layers.0.gating.linear_in.weight"],
        source["transformer.layers.0.gating.linear_in.weight"],
    )


def test_missing_llm_path_is_an_error_naming_the_key(tmp_path, moshi_source, write_config):
    config = write_config(moshi_source, tmp_path / "no_such_llm")
    with pytest.raises(FileNotFoundError, match="text_llm.hf_repo_id="):
        setup_new_model.run(config, tmp_path / "w")


def test_moshi_tensor_shape_mismatch_is_an_error_naming_the_tensor(
    tmp_path, moshi_source, tiny_llm_dir, write_config
):
    import json

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(moshi_source.read_bytes())
    kwargs = json.loads((moshi_source.parent / "config.json").read_text())
    kwargs["depformer_dim"] = 48
    (bad / "config.json").write_text(json.dumps(kwargs))
    with pytest.raises(ValueError, match="depformer"):
        setup_new_model.run(write_config(bad / "model.safetensors", tiny_llm_dir), tmp_path / "w")


def test_disabled_text_llm_is_an_error(tmp_path, moshi_source, tiny_llm_dir, write_config):
    config = write_config(moshi_source, tiny_llm_dir, enable=False)
    with pytest.raises(ValueError, match="text_llm.enable must be true"):
        setup_new_model.run(config, tmp_path / "w")


def test_source_flag_lets_one_yaml_name_the_checkpoint_it_writes(
    tmp_path, moshi_source, tiny_llm_dir, write_config
):
    import yaml

    setup_new_model.run(write_config(moshi_source, tiny_llm_dir), tmp_path / "direct")
    want = (tmp_path / "direct" / "model.safetensors").read_bytes()
    # The training YAML's moshi_path names the output, which does not exist yet.
    config = write_config(tmp_path / "w" / "model.safetensors", tiny_llm_dir)
    with pytest.raises(FileNotFoundError):
        setup_new_model.run(config, tmp_path / "w")
    assert setup_new_model.main([str(config), "--out", str(tmp_path / "w"), "--source", str(moshi_source)]) == 0
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == want
    # `--source repo`: the plain Moshi of moshi_paths.hf_repo_id (here a local folder in the hub layout).
    raw = yaml.safe_load(config.read_text())
    raw["moshi_paths"]["hf_repo_id"] = str(moshi_source.parent)
    config.write_text(yaml.safe_dump(raw))
    assert setup_new_model.main([str(config), "--out", str(tmp_path / "r"), "--source", "repo"]) == 0
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == want
