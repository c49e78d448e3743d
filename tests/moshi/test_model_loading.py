"""load_model: every checkpoint kind loads and gives the logits of the model it was saved from; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moshi.models.model_loading import load_model, resolve_device, resolve_dtype
from moshi.modules.lora import LoRALinear
from tests.helpers import checkpoints as ck


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return ck.shared_base_assets(tmp_path_factory)


def _codes(model, steps: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, model.card, (2, model.num_codebooks, steps), generator=g)
    codes[:, 0] = torch.randint(0, model.text_card, (2, steps), generator=g)
    return codes


def _logits(model, codes) -> torch.Tensor:
    with torch.no_grad():
        out = model(codes)
    return torch.cat([out.text_logits.flatten(), out.logits.nan_to_num().flatten()])


# float32 logits of a 2-layer, 64-wide model: fusing W + s*B@A reorders a few float32 sums (relative error
# ~1e-6 per product), so 1e-5 is far below any real difference (LoRA changes the logits by ~1e-2).
FUSED_TOL = {"rtol": 1e-5, "atol": 1e-5}


def test_resolve_device_and_dtype():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, cpu) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("fp32", cpu) is torch.float32
    assert resolve_dtype("float16", cpu) is torch.float16
    assert resolve_dtype(torch.float64, cpu) is torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        resolve_dtype("half", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


def test_base_moshi_from_its_folder(assets):
    loaded = load_model(assets, device="cpu")
    reference = ck.base_lm(assets)
    assert loaded.kind == "moshi" and loaded.dtype is torch.float32 and not loaded.lm.training
    codes = _codes(reference)
    assert torch.equal(_logits(loaded.lm, codes), _logits(reference, codes))
    assert loaded.mimi.num_codebooks == 4  # max(dep_q, n_q - dep_q) of the tiny LM
    assert loaded.text_tokenizer.get_piece_size() == reference.text_card
    assert loaded.sources["weights"] == str(assets / "model.safetensors")
    assert loaded.sources["mimi"] == str(assets / "mimi.safetensors")
    assert loaded.lm_gen_config == {}
    # the same through hf_repo, the way Kyutai's tools name a base model
    assert torch.equal(_logits(load_model(hf_repo=str(assets), device="cpu").lm, codes), _logits(reference, codes))


def test_lora_export_fused_and_unfused(assets, tmp_path):
    model = ck.lora_lm(assets)
    ckpt = ck.write_moshi_export(tmp_path / "run", assets, model, "lora")
    codes = _codes(model)
    want = _logits(model, codes)
    assert not torch.allclose(want, _logits(ck.base_lm(assets), codes), atol=1e-3)  # the adapters matter

    fused = load_model(ckpt, hf_repo=str(assets), device="cpu")
    assert fused.kind == "lora" and fused.sources["lora"].endswith("consolidated/lora.safetensors")
    assert not any(isinstance(m, LoRALinear) for m in fused.lm.modules())
    torch.testing.assert_close(_logits(fused.lm, codes), want, **FUSED_TOL)

    unfused = load_model(ckpt / "consolidated", hf_repo=str(assets), fuse_lora=False, device="cpu")
    assert any(isinstance(m, LoRALinear) for m in unfused.lm.modules())
    assert torch.equal(_logits(unfused.lm, codes), want)  # the same modules and weights

    # --lora-weight with the export's config is the same model
    explicit = load_model(hf_repo=str(assets), lora_weight=ckpt / "consolidated" / "lora.safetensors",
                          config=ckpt / "consolidated" / "config.json", device="cpu")
    assert explicit.kind == "lora"
    torch.testing.assert_close(_logits(explicit.lm, codes), want, **FUSED_TOL)
    from_folder = load_model(assets, lora_weight=ckpt / "consolidated" / "lora.safetensors",
                             config=ckpt / "consolidated" / "config.json", device="cpu")
    assert from_folder.kind == "lora" and from_folder.sources["weights"] == str(assets / "model.safetensors")
    torch.testing.assert_close(_logits(from_folder.lm, codes), want, **FUSED_TOL)


def test_merged_and_full_exports(assets, tmp_path):
    lora = ck.lora_lm(assets)
    merged_ckpt = ck.write_moshi_export(tmp_path / "merged_run", assets, lora, "merged")
    codes = _codes(lora)
    merged = load_model(merged_ckpt, hf_repo=str(assets), device="cpu")
    assert merged.kind == "merged"
    torch.testing.assert_close(_logits(merged.lm, codes), _logits(lora, codes), **FUSED_TOL)

    full = ck.full_lm(assets)
    full_ckpt = ck.write_moshi_export(tmp_path / "full_run", assets, full, "full")
    loaded = load_model(full_ckpt, hf_repo=str(assets), device="cpu")
    assert loaded.kind == "full"
    assert torch.equal(_logits(loaded.lm, codes), _logits(full, codes))

    # an older merged export whose config still says "lora": true is not wrapped in fresh LoRA layers
    config_path = merged_ckpt / "consolidated" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, lora=True)))
    (tmp_path / "merged_run" / "args.yaml").unlink()
    legacy = load_model(merged_ckpt, hf_repo=str(assets), device="cpu")
    assert legacy.kind == "merged" and not any(isinstance(m, LoRALinear) for m in legacy.lm.modules())
    torch.testing.assert_close(_logits(legacy.lm, codes), _logits(lora, codes), **FUSED_TOL)


def test_bfloat16_on_request(assets):
    loaded = load_model(assets, device="cpu", dtype="bf16")
    assert {p.dtype for p in loaded.lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.mimi.parameters()} == {torch.float32}


def test_lora_file_that_does_not_match_the_base(assets, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = ck.write_moshi_export(tmp_path / "run", assets, ck.lora_lm(assets), "lora")
    lora_file = ckpt / "consolidated" / "lora.safetensors"
    state = load_file(str(lora_file))
    state.pop("linears.0.lora_A.weight")
    state["transformer.layers.7.gating.linear_in.lora_A.weight"] = torch.zeros(4, 64)
    save_file(state, str(lora_file))
    with pytest.raises(ValueError, match=r"lora\.safetensors does not match the LoRA layers.*linears\.0\.lora_A"
                       r".*transformer\.layers\.7"):
        load_model(ckpt, hf_repo=str(assets), device="cpu")

    config_path = ckpt / "consolidated" / "config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), lora_rank=8)))
    with pytest.raises(ValueError, match=r"lora\.safetensors: LoRA tensor shapes do not match.*lora_rank"):
        load_model(ckpt, hf_repo=str(assets), device="cpu")


def test_folder_without_weights_and_missing_paths(tmp_path):
    (tmp_path / "empty" / "consolidated").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"consolidated: no weights in the checkpoint folder"):
        load_model(tmp_path / "empty", device="cpu")
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere"):
        load_model(tmp_path / "nowhere", device="cpu")


@pytest.fixture(scope="module")
def dsaa_checkpoint(tmp_path_factory):
    return ck.shared_dsaa_checkpoint(tmp_path_factory)


def test_dsaa_checkpoint_loads_offline_with_its_llm_and_tokenizer(assets, dsaa_checkpoint):
    from tests.dsaa.tiny_llm import random_codes

    model, folder = dsaa_checkpoint
    loaded = load_model(folder, hf_repo=str(assets), device="cpu")
    assert loaded.kind == "dsaa" and loaded.is_dsaa
    assert loaded.sources["llm"] == f"embedded in {folder / 'consolidated.safetensors'}"
    assert loaded.text_tokenizer.convert_tokens_to_ids("<|im_start|>") is not None
    assert loaded.mimi.num_codebooks == 4
    codes = random_codes(model, steps=5)
    assert torch.equal(_logits(loaded.lm, codes), _logits(model, codes))


def test_dsaa_checkpoint_without_its_llm(assets, dsaa_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = dsaa_checkpoint
    broken = tmp_path / "no_llm"
    broken.mkdir()
    state = {k: v for k, v in load_file(str(folder / "consolidated.safetensors")).items()
             if not k.startswith("text_llm.")}
    save_file(state, str(broken / "consolidated.safetensors"))
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no_llm/consolidated\.safetensors.*no text_llm\.\* tensors"):
        load_model(broken, hf_repo=str(assets), device="cpu")

    # an LLM stored by reference, offline: the message names the repo it would come from
    config = json.loads((folder / "config.json").read_text())
    config["dsaa"]["llm_weights"] = "reference"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="hf_repo_id='tiny-llm'"):
        load_model(broken, hf_repo=str(assets), device="cpu")


def _train_args(tmp_path: Path, **cfg):
    from finetune.args import TrainArgs

    return TrainArgs.from_dict({"data": {"train_data": "unused.jsonl"}, "run_dir": str(tmp_path / "run"), **cfg},
                               validate=False)


def test_load_from_config_base_and_checkpoint(assets, tmp_path):
    from finetune.model_loading import load_from_config

    args = _train_args(tmp_path, moshi_paths={"hf_repo_id": str(assets)}, lora={"enable": True, "rank": 4})
    base = load_from_config(args, device="cpu")
    reference = ck.base_lm(assets)
    codes = _codes(reference)
    assert base.kind == "moshi" and torch.equal(_logits(base.lm, codes), _logits(reference, codes))

    lora = ck.lora_lm(assets)
    ckpt = ck.write_moshi_export(tmp_path / "run", assets, lora, "lora")
    loaded = load_from_config(args, ckpt, device="cpu")
    assert loaded.kind == "lora" and loaded.sources["weights"] == str(assets / "model.safetensors")
    torch.testing.assert_close(_logits(loaded.lm, codes), _logits(lora, codes), **FUSED_TOL)


def test_load_from_config_dsaa(assets, dsaa_checkpoint, tmp_path):
    from finetune.model_loading import load_from_config
    from tests.dsaa.tiny_llm import random_codes

    model, folder = dsaa_checkpoint
    args = _train_args(tmp_path, moshi_paths={"hf_repo_id": str(assets), "moshi_path": str(folder)},
                       full_finetuning=True, lora={"enable": False}, text_llm={"enable": True})
    codes = random_codes(model, steps=4)
    for checkpoint in (None, folder):
        loaded = load_from_config(args, checkpoint, device="cpu")
        assert loaded.kind == "dsaa" and loaded.sources["mimi"] == str(assets / "mimi.safetensors")
        assert torch.equal(_logits(loaded.lm, codes), _logits(model, codes))
