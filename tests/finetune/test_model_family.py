"""The model family chosen from the config and what it decides: trained parameters, groups, FSDP2 units."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.args import TrainArgs
from finetune.loss import MoshiLoss
from finetune.model_family import DSAAFamily, MoshiFamily, model_family
from moshi.models.lm import LMModel
from moshi.modules.lora import replace_all_linear_with_lora
from moshi.modules.transformer import StreamingTransformerLayer
from tests.helpers.configs import small_lm_kwargs


def _args(tmp_path: Path, **cfg) -> TrainArgs:
    return TrainArgs.from_dict({"data": {"train_data": "unused.jsonl"}, "run_dir": str(tmp_path / "run"), **cfg},
                               validate=False)


def test_the_config_selects_the_family(tmp_path):
    assert type(model_family(_args(tmp_path, lora={"enable": True}))) is MoshiFamily
    dsaa = _args(tmp_path, lora={"enable": False}, full_finetuning=True, text_llm={"enable": True})
    assert type(model_family(dsaa)) is DSAAFamily


@pytest.mark.parametrize("ft_embed", [False, True])
def test_moshi_lora_trains_the_adapters_and_optionally_the_embeddings(tmp_path, ft_embed):
    family = MoshiFamily(_args(tmp_path, lora={"enable": True, "rank": 2, "ft_embed": ft_embed}))
    model = LMModel(**small_lm_kwargs())
    replace_all_linear_with_lora(model, 2, 2.0)
    family.prepare(model, torch.float32)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if "lora" in n or (ft_embed and "emb" in n)}
    (group,) = family.param_groups(model)
    assert group["name"] == "all" and len(group["params"]) == len(trained)
    assert isinstance(family.loss(model), MoshiLoss) and not family.loss(model).skips_audio(4)


def test_moshi_full_finetuning_trains_everything_and_shards_transformer_layers(tmp_path):
    family = MoshiFamily(_args(tmp_path, lora={"enable": False}, full_finetuning=True, optim={"lr": 0.5}))
    model = LMModel(**small_lm_kwargs())
    family.prepare(model, torch.float32)
    assert all(p.requires_grad for p in model.parameters())
    assert family.param_groups(model)[0]["lr"] == 0.5
    units = [m for m in model.modules() if family.fsdp_unit(model)(m)]
    assert units and all(isinstance(m, StreamingTransformerLayer) for m in units)
    assert len(units) == 2 + 2  # temporal and depformer layers of the small config


def test_dsaa_shards_moshi_layers_and_llm_decoder_layers_and_skips_audio_on_schedule(tmp_path):
    from tests.dsaa.tiny_llm import tiny_dsaa

    family = DSAAFamily(_args(tmp_path, lora={"enable": False}, full_finetuning=True, text_llm={"enable": True},
                              audio_loss_skip_every=3))
    model = tiny_dsaa(max_pos=16)
    is_unit = family.fsdp_unit(model)
    names = {type(m).__name__ for m in model.modules() if is_unit(m)}
    assert names == {"StreamingTransformerLayer", "Qwen2DecoderLayer"}
    assert [s for s in range(1, 10) if family.loss(model).skips_audio(s)] == [3, 6, 9]
    groups = family.prepare(model, torch.float32)
    assert not any(p.requires_grad for p in model.text_llm.parameters())
    assert {g["name"] for g in family.param_groups(model)} == {"proj", "finetune"}
    assert set(groups) == {"proj", "finetune", "frozen"}
