"""Checkpoint layout, exports, retention, resume state and failure safety (no data pipeline involved)."""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import finetune.checkpointing as ck
from finetune.checkpointing import (
    Checkpointer,
    CheckpointError,
    ResumeMismatchError,
    latest_resumable,
    list_checkpoints,
    merge_lora_state_dict,
)
from moshi.models.lm import LMModel
from moshi.models.loaders import get_moshi_lm
from moshi.modules.lora import replace_lora_with_linear
from tests.helpers.configs import small_lm_kwargs
from tests.helpers.models import small_lora_lm


def _codes(b: int = 2, t: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 32, (b, 5, t), generator=g)
    codes[:, 0] = torch.randint(0, 100, (b, t), generator=g)
    return codes


def _train_a_bit(model: LMModel, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        out = model(_codes())
        loss = out.text_logits.float().logsumexp(-1).mean() + out.logits[out.mask].float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def _checkpointer(run_dir, model, opt, save_adapters=True, keep=None, fingerprint=None) -> Checkpointer:
    base = dict(small_lm_kwargs(), moshi_name="model.safetensors")
    return Checkpointer(run_dir, model, opt, base, lora=True, lora_rank=4, lora_scaling=2.0,
                        save_adapters=save_adapters, export_dtype=torch.float32, num_ckpt_keep=keep,
                        fingerprint=fingerprint or {"lora.rank": 4, "seed": 0})


def test_merge_lora_state_dict_equals_fused_module():
    model = small_lora_lm()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    merged = merge_lora_state_dict(model.state_dict(), scaling=2.0)
    fused = small_lora_lm()
    fused.load_state_dict(model.state_dict())
    replace_lora_with_linear(fused)
    ref = fused.state_dict()
    assert sorted(merged) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k])


def test_exports_load_through_moshi_loaders_and_give_the_same_logits(tmp_path):
    model = small_lora_lm()
    base_path = tmp_path / "base.safetensors"
    from safetensors.torch import save_file

    torch.manual_seed(0)
    plain = LMModel(**small_lm_kwargs())
    save_file(plain.state_dict(), str(base_path))
    model.load_state_dict(plain.state_dict(), strict=False)  # frozen_W from the base file (pre-hook renames)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train_a_bit(model, opt)
    codes = _codes()
    model.eval()
    want = model(codes)

    folder = _checkpointer(tmp_path / "run", model, opt).save(2, {"x": 1})
    lora_file = folder / "consolidated" / "lora.safetensors"
    cfg = json.loads((folder / "consolidated" / "config.json").read_text())
    assert (cfg["lora"], cfg["lora_rank"], cfg["lora_scaling"], cfg["moshi_name"]) == (True, 4, 2.0, "model.safetensors")
    keys = list(load_file(str(lora_file)))
    assert keys == sorted(keys) and all(".lora_A." in k or ".lora_B." in k for k in keys)
    lm_cfg = {k: v for k, v in cfg.items() if k != "moshi_name"}
    loaded = get_moshi_lm(base_path, lm_kwargs=lm_cfg, dtype=torch.float32, lora_weights=lora_file, fuse_lora=True)
    got = loaded(codes)
    torch.testing.assert_close(got.text_logits, want.text_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits[want.mask], want.logits[want.mask], rtol=1e-5, atol=1e-5)

    merged_folder = _checkpointer(tmp_path / "run2", model, opt, save_adapters=False).save(2, {})
    cfg2 = json.loads((merged_folder / "consolidated" / "config.json").read_text())
    assert cfg2["lora"] is False  # merged weights: loading must not wrap them in fresh LoRA layers
    merged = merged_folder / "consolidated" / "consolidated.safetensors"
    assert not any("lora" in k or "frozen" in k for k in load_file(str(merged)))
    loaded2 = get_moshi_lm(merged, lm_kwargs={k: v for k, v in cfg2.items() if k != "moshi_name"},
                           dtype=torch.float32)
    torch.testing.assert_close(loaded2(codes).text_logits, want.text_logits, rtol=1e-5, atol=1e-5)


def test_resume_state_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model = small_lora_lm()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train_a_bit(model, opt)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    data_state = {"batches": 3, "rng": np.random.default_rng(1).bit_generator.state, "arr": np.arange(4)}
    folder = _checkpointer(tmp_path, model, opt).save(2, {"data": data_state})
    want_next = (torch.rand(3), np.random.rand(2), random.random())
    _train_a_bit(model, opt)  # the state moves on; loading must bring it back
    want_params = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = small_lora_lm(seed=1)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k}, strict=False)
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    step, state = _checkpointer(tmp_path, fresh, opt2).load(folder)
    assert step == 2 and state["data"]["batches"] == 3
    assert state["data"]["rng"] == data_state["rng"]
    np.testing.assert_array_equal(state["data"]["arr"], np.arange(4))
    got_next = (torch.rand(3), np.random.rand(2), random.random())
    torch.testing.assert_close(got_next[0], want_next[0])
    np.testing.assert_array_equal(got_next[1], want_next[1])
    assert got_next[2] == want_next[2]
    _train_a_bit(fresh, opt2)  # same optimizer state → same parameters after the same steps
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, want_params[k], rtol=1e-6, atol=1e-6)


def test_retention_by_step_number_and_incomplete_checkpoints_are_ignored(tmp_path):
    model = small_lora_lm()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    c = _checkpointer(tmp_path, model, opt, keep=2)
    for step in (5, 10, 15):
        c.save(step, {})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 15]
    # a folder without the COMPLETE marker (e.g. copied by hand, or an old layout) is never resumed from
    (tmp_path / "checkpoints" / "checkpoint_000020" / "resume").mkdir(parents=True)
    assert latest_resumable(tmp_path).name == "checkpoint_000015"


def test_full_disk_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = small_lora_lm()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    c = _checkpointer(tmp_path, model, opt)
    c.save(1, {})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "atomic_save_safetensors", no_space)
    with pytest.raises(CheckpointError, match=r"checkpoint_000002.*disk full.*latest complete checkpoint is .*checkpoint_000001"):
        c.save(2, {})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_000001"]  # no half-written folder
    monkeypatch.undo()
    step, _ = c.load(latest_resumable(tmp_path))
    assert step == 1


def test_resume_with_changed_config_names_the_keys(tmp_path):
    model = small_lora_lm()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    folder = _checkpointer(tmp_path, model, opt, fingerprint={"lora.rank": 4, "seed": 0, "batch_size": 2}).save(1, {})
    changed = _checkpointer(tmp_path, model, opt, fingerprint={"lora.rank": 8, "seed": 0, "batch_size": 3})
    with pytest.raises(ResumeMismatchError) as e:
        changed.load(folder)
    msg = str(e.value)
    assert "lora.rank: 4 in the checkpoint, 8 now" in msg and "batch_size" in msg and "seed" not in msg
