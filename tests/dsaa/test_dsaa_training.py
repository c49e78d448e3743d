"""DSAA training: groups, frozen tensors, the chunked text loss, audio-loss
skipping, and a run through ``train()`` whose checkpoint loads offline with the trained model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.args import ConfigError, TrainArgs
from finetune.loss import moshi_loss_terms
from finetune.model_family import DSAAFamily
from finetune.trainer import build_optimizer, build_scheduler, train_step
from moshi.models.dsaa_loading import load_dsaa_model
from tests.dsaa.tiny_llm import random_codes, tiny_dsaa
from tests.helpers.tiny_run import make_tiny_assets

PROJ = ("text_projector", "depformer_projectors")
FINETUNE = ("text_head", "depformer_text_emb", "depformer_text_proj", "depformer", "depformer_emb", "linears",
            "depformer_norms")


def _args(tmp_path: Path, **overrides) -> TrainArgs:
    cfg = {
        "data": {"train_data": str(tmp_path / "unused.jsonl")}, "run_dir": str(tmp_path / "run"),
        "full_finetuning": True, "lora": {"enable": False}, "text_llm": {"enable": True},
        "max_steps": 10, "param_dtype": "float32", "gradient_checkpointing": False,
        "optim": {"proj_lr": 1e-2, "proj_wd": 0.05, "finetune_lr": 3e-3, "finetune_wd": 0.01, "pct_start": 0.2},
        "audio_loss_skip_every": 0,
    }
    cfg.update(overrides)
    return TrainArgs.from_dict(cfg, validate=False)


def _top(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.mark.parametrize("only_text", [False, True])
def test_steps_change_only_the_trained_groups_at_their_peak_lr(tmp_path, only_text):
    args = _args(tmp_path, only_text=only_text)
    model = tiny_dsaa(max_pos=16)
    family = DSAAFamily(args)
    groups = family.prepare(model, torch.float32)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(family.param_groups(model), torch.device("cpu"))
    sched = build_scheduler(opt, args)
    loss_fn = family.loss(model)
    codes = random_codes(model, batch=2, steps=8)
    for step in range(1, 4):
        train_step(model, opt, [codes], loss_fn, max_norm=1.0, step=step)
        sched.step()

    proj, finetune = (("text_projector",), ("text_head",)) if only_text else (PROJ, FINETUNE)
    # Every trainable tensor is in exactly one optimizer group, and the groups are the documented modules.
    by_id = {id(p): n for n, p in model.named_parameters()}
    in_groups = {g["name"]: [by_id[id(p)] for p in g["params"]] for g in opt.param_groups}
    flat = [n for names in in_groups.values() for n in names]
    assert len(flat) == len(set(flat))
    assert set(flat) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {_top(n) for n in in_groups["proj"]} == set(proj) & {_top(n) for n in before}
    assert {_top(n) for n in in_groups["finetune"]} == set(finetune) & {_top(n) for n in before}
    assert sorted(in_groups["proj"]) == sorted(groups["proj"])
    # Each group peaks at its own lr (OneCycleLR max_lr per group).
    peaks = {g["name"]: g["max_lr"] for g in opt.param_groups}
    assert peaks == {"proj": 1e-2, "finetune": 3e-3}
    seen = {g["name"]: [] for g in opt.param_groups}
    probe = build_optimizer(family.param_groups(model), torch.device("cpu"))
    probe_sched = build_scheduler(probe, args)
    for _ in range(args.total_steps):
        for g in probe.param_groups:
            seen[g["name"]].append(g["lr"])
        probe.step()
        probe_sched.step()
    assert {k: max(v) for k, v in seen.items()} == pytest.approx(peaks, rel=1e-9)

    trained = set(proj + finetune)
    for name, p in model.named_parameters():
        if _top(name) in trained:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
            assert p.grad is None and not p.requires_grad, name
    assert all(p.grad is None for p in model.text_llm.parameters())


def test_audio_loss_is_skipped_every_n_steps_in_training_only(tmp_path):
    args = _args(tmp_path, audio_loss_skip_every=4)
    model = tiny_dsaa(max_pos=16)
    family = DSAAFamily(args)
    family.prepare(model, torch.float32)
    loss_fn = family.loss(model)
    assert [s for s in range(1, 13) if loss_fn.skips_audio(s)] == [4, 8, 12]
    assert not any(DSAAFamily(_args(tmp_path)).loss(model).skips_audio(s) for s in range(1, 13))
    codes = random_codes(model, batch=2, steps=8)
    model.train()

    def depformer_grads(step: int) -> tuple[torch.Tensor, list[bool]]:
        model.zero_grad(set_to_none=True)
        loss_fn.begin_step(step)
        terms = loss_fn(model, codes)
        sums = loss_fn.weight_sums(codes)
        terms.total(sums[0], sums[1]).backward()
        return sums, [p.grad is not None for p in model.depformer.parameters()]

    sums, has_grad = depformer_grads(4)
    assert sums[1] == 0 and sums[0] > 0
    assert not any(has_grad)  # only the audio loss reaches the depformer
    sums, has_grad = depformer_grads(5)
    assert sums[1] > 0 and all(has_grad)
    # Evaluation (eval mode) reports the audio loss even on a skipped step.
    loss_fn.begin_step(8)
    model.eval()
    with torch.no_grad():
        assert loss_fn(model, codes).audio_weight > 0


def test_chunked_text_loss_equals_the_full_logits_loss(tmp_path):
    args = _args(tmp_path, text_padding_weight=0.3)
    model = tiny_dsaa(max_pos=16)
    family = DSAAFamily(args)
    family.prepare(model, torch.float32)
    model.eval()  # no dropout: both passes see the same function
    codes = random_codes(model, batch=2, steps=9, seed=3)
    codes[0, 0, ::3] = model.text_padding_token_id  # PAD targets get text_padding_weight
    codes[1, 0, 1] = model.end_of_text_padding_id
    codes[1, 0, 5] = -1  # no target
    loss_fn = family.loss(model)
    loss_fn.chunk_rows = 4  # several chunks and a ragged last one

    def run(fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        terms = fn()
        terms.total().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.stack([t.detach() for t in terms.as_tuple()]), grads

    chunked, g_chunked = run(lambda: loss_fn(model, codes))

    def full():
        out = model(codes)
        return moshi_loss_terms(out.text_logits, out.text_mask, out.logits, out.mask, codes,
                                args.first_codebook_weight_multiplier, 0.3, (model.text_padding_token_id, model.end_of_text_padding_id))

    reference, g_full = run(full)
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    assert set(g_chunked) == set(g_full)
    for name in g_full:
        torch.testing.assert_close(g_chunked[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def dsaa_run_config(tmp_path_factory, make_llm_dir) -> tuple[dict, Path, Path]:
    """A tiny DSAA training config on generated assets, its setup_new_model checkpoint and the LLM folder."""
    import setup_new_model

    tmp_path = tmp_path_factory.mktemp("dsaa_run")
    assets = make_tiny_assets(tmp_path / "assets", files=2, eval_files=1)
    llm_dir = make_llm_dir(hidden=32, max_pos=64)
    cfg = {
        "data": {"train_data": str(assets / "data" / "train.jsonl"), "eval_data": str(assets / "data" / "eval.jsonl")},
        "moshi_paths": {"hf_repo_id": str(assets)},
        "run_dir": str(tmp_path / "run"), "full_finetuning": True, "lora": {"enable": False},
        "text_llm": {"enable": True, "hf_repo_id": str(llm_dir), "proj_hidden": 48},
        "duration_sec": 2.0, "batch_size": 2, "max_steps": 2, "log_freq": 1, "param_dtype": "float32",
        "gradient_checkpointing": False, "tensorboard": False, "do_eval": True, "eval_freq": 2,
        "eval_duration_sec": 2.0, "eval_batches": 1, "ckpt_freq": 2, "seed": 0, "audio_loss_skip_every": 2,
        "optim": {"proj_lr": 1e-3, "finetune_lr": 1e-3, "pct_start": 0.5},
    }
    setup_yaml = tmp_path / "setup.yaml"
    setup_yaml.write_text(yaml.safe_dump(cfg))
    weights = setup_new_model.run(setup_yaml, tmp_path / "weights")
    cfg["moshi_paths"]["moshi_path"] = str(weights / "model.safetensors")
    return cfg, weights, llm_dir


def test_train_writes_a_dsaa_checkpoint_that_loads_offline_with_the_trained_logits(
    tmp_path, dsaa_run_config, monkeypatch
):
    import train as train_entry
    from finetune.trainer import Trainer

    cfg, weights, llm_dir = dsaa_run_config
    cfg = dict(cfg, run_dir=str(tmp_path / "run"))
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(cfg))

    made: list[Trainer] = []

    class Recording(Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, device="cpu", **{n: v for n, v in k.items() if n != "device"})
            made.append(self)

    monkeypatch.setattr(train_entry, "Trainer", Recording)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train_entry.train(str(train_yaml))
    trainer = made[0]

    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["audio_loss"] > 0 and records[1]["audio_loss"] == 0  # step 2: audio skipped
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.eval.jsonl").read_text().splitlines()]
    assert evals[0]["audio_eval_loss"] > 0

    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint_000002" / "consolidated"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "consolidated.safetensors", "tokenizer"]
    block = json.loads((ckpt / "config.json").read_text())["dsaa"]
    assert block["llm_weights"] == "embedded" and block["hf_repo_id"] == str(llm_dir)
    saved, source = load_file(str(ckpt / "consolidated.safetensors")), load_file(str(weights / "model.safetensors"))
    assert saved.keys() == source.keys()
    for name in saved:  # frozen tensors are bit-identical to the set-up checkpoint, trained ones moved
        frozen = _top(name) in ("text_llm", "emb", "transformer", "out_norm")
        assert torch.equal(saved[name], source[name]) == frozen, name

    loaded, tokenizer = load_dsaa_model(ckpt, cfg["text_llm"], device="cpu", dtype=torch.float32)
    assert tokenizer.encode(" ", add_special_tokens=False)[0] == loaded.text_padding_token_id == trainer.model.text_padding_token_id
    codes = next(iter(trainer.data.train)).codes
    trainer.model.eval()
    with torch.no_grad():
        want, got = trainer.model(codes), loaded(codes)
    torch.testing.assert_close(got.text_logits, want.text_logits, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0, equal_nan=True)


def test_a_text_llm_token_key_changed_after_setup_is_refused_naming_the_key(tmp_path, dsaa_run_config):
    from types import SimpleNamespace

    cfg, weights, _ = dsaa_run_config
    block = json.loads((weights / "config.json").read_text())["dsaa"]
    model = SimpleNamespace(text_padding_token_id=block["pad_id"], end_of_text_padding_id=block["epad_id"],
                            text_initial_token_id=block["bos_id"])
    args = TrainArgs.from_dict(cfg)
    tok = DSAAFamily(args).text_tokenizer(model)
    assert (tok.pad_id, tok.epad_id, tok.bos_id) == (model.text_padding_token_id, model.end_of_text_padding_id,
                                                     model.text_initial_token_id)
    args = TrainArgs.from_dict(dict(cfg, text_llm=dict(cfg["text_llm"], pad_token="<|im_end|>")))
    with pytest.raises(ValueError, match=r"text_llm\.pad_token: id \d+ from the tokenizer, \d+ in the model"):
        DSAAFamily(args).text_tokenizer(model)


@pytest.mark.slow
def test_two_processes_with_fsdp2_train_and_export_the_same_format(tmp_path, dsaa_run_config):
    """torchrun, gloo, FSDP2 (Moshi and LLM decoder layers as units; the 0-dim alpha promoted to a vector)."""
    import os
    import socket
    import subprocess
    import sys

    from tests.helpers.tiny_run import REPO

    cfg, weights, _ = dsaa_run_config
    cfg = dict(cfg, run_dir=str(tmp_path / "run"), batch_size=1, do_eval=False)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MOSHI_FT_DEVICE="cpu", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(port), "-m", "train", str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FSDP2: 6 layer units + root, mesh cpu×2" in r.stdout + r.stderr  # 2 + 2 Moshi, 2 LLM layers
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint_000002" / "consolidated"
    saved, source = load_file(str(ckpt / "consolidated.safetensors")), load_file(str(weights / "model.safetensors"))
    assert saved.keys() == source.keys() and saved["text_projector.alpha"].shape == ()
    for name in saved:
        frozen = _top(name) in ("text_llm", "emb", "transformer", "out_norm")
        assert torch.equal(saved[name], source[name]) == frozen, name
    loaded, _ = load_dsaa_model(ckpt, cfg["text_llm"], device="cpu", dtype=torch.float32)
    assert torch.equal(loaded.text_projector.alpha.detach(), saved["text_projector.alpha"])


# ----------------------------------------------------------------------------- config errors (property 9)


def _write_manifests(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp_path / f"src{i}.jsonl"
        p.write_text("")
        paths.append(str(p))
    return paths


def test_lora_together_with_dsaa_is_refused_naming_both_keys(tmp_path):
    (train_data,) = _write_manifests(tmp_path, 1)
    with pytest.raises(ConfigError) as e:
        TrainArgs.from_dict({"data": {"train_data": train_data}, "run_dir": str(tmp_path / "run"),
                             "lora": {"enable": True}, "full_finetuning": False, "text_llm": {"enable": True}})
    assert "lora.enable" in str(e.value) and "text_llm.enable" in str(e.value)


def test_max_steps_length_must_match_the_train_data_sources(tmp_path):
    sources = _write_manifests(tmp_path, 3)
    with pytest.raises(ConfigError) as e:
        TrainArgs.from_dict({"data": {"train_data": ",".join(sources)}, "run_dir": str(tmp_path / "run"),
                             "lora": {"enable": False}, "full_finetuning": True, "text_llm": {"enable": True},
                             "max_steps": [5, 5]})
    message = str(e.value)
    assert "max_steps" in message and "data.train_data" in message and "2 stages" in message
    assert "3 sources" in message
