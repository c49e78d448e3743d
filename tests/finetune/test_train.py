"""The trainer end to end on the tiny generated assets: learning, exports, exact resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.args import ConfigError, TrainArgs
from finetune.checkpointing import ResumeMismatchError, latest_resumable
from finetune.loss import MoshiLoss
from finetune.model_family import MoshiFamily
from finetune.trainer import Trainer, build_optimizer, train_step
from moshi.models.loaders import CheckpointInfo
from tests.helpers.tiny_run import REPO, make_tiny_assets, run_trainer, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("codes_cache")  # Mimi codes shared by the runs of this module


def _args(assets, run_dir, cache_dir, **overrides) -> TrainArgs:
    return TrainArgs.from_dict(tiny_config(assets, run_dir, cache_dir, **overrides))


def _write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.train.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _run_killed(cfg_path: Path, point: str, step: int) -> subprocess.CompletedProcess:
    """Trains `cfg_path` in a subprocess that SIGKILLs itself at fault point `point` of step `step`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tests.helpers.crash_run", str(cfg_path), point, str(step)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fixed_batch_is_overfit(assets, tmp_path, mode):
    overrides = {"full_finetuning": True, "lora.enable": False} if mode == "full" else {}
    args = _args(assets, tmp_path / "run", None, **overrides)
    device = torch.device("cpu")
    torch.manual_seed(0)
    family = MoshiFamily(args)
    model = family.build(device)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "lora":
        assert trained and all("lora" in n for n in trained)
    else:
        assert trained == {n for n, _ in model.named_parameters()}
    opt = build_optimizer(family.param_groups(model), device)
    for g in opt.param_groups:
        g["lr"] = 1e-2
    loss_fn = family.loss(model)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, model.card, (2, 1 + model.n_q, 25), generator=g)
    codes[:, 0] = torch.randint(0, model.text_card, (2, 25), generator=g)
    losses = [train_step(model, opt, [codes], loss_fn, max_norm=1.0, step=i).loss for i in range(40)]
    assert losses[-1] < 0.3 * losses[0], losses


def test_in_process_run_logs_evaluates_and_exports_loadable_checkpoints(assets, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = _args(assets, run_dir, cache_dir, do_eval=True, eval_freq=2)
    trainer = run_trainer(args)
    losses = _losses(run_dir)
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    records = [json.loads(x) for x in (run_dir / "metrics.train.jsonl").read_text().splitlines()]
    for key in ("text_loss", "audio_loss", "grad_norm", "lr", "wps", "prob_real_tokens", "peak_allocated_mem"):
        assert all(key in r for r in records)
    assert all(r["loss"] == pytest.approx(r["text_loss"] + r["audio_loss"]) for r in records)
    evals = [json.loads(x) for x in (run_dir / "metrics.eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(e["perplexity"] == pytest.approx(torch.tensor(e["eval_loss"]).exp().item(), rel=1e-5) for e in evals)
    saved_args = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert "key" not in saved_args["wandb"]

    # The LoRA export loads through moshi's loaders (base weights + lora.safetensors + config.json).
    ckpt = run_dir / "checkpoints" / "checkpoint_000004" / "consolidated"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "lora.safetensors"]
    info = CheckpointInfo.from_hf_repo(str(assets), config_path=ckpt / "config.json",
                                       lora_weights=ckpt / "lora.safetensors")
    loaded = info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=True)
    codes = next(iter(trainer.data.train)).codes
    trainer.model.eval()
    with torch.no_grad():
        want, got = trainer.model(codes), loaded(codes)
    torch.testing.assert_close(got.text_logits, want.text_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits[want.mask], want.logits[want.mask], rtol=1e-5, atol=1e-5)


def test_kill_and_resume_reproduces_the_uninterrupted_run(assets, tmp_path, cache_dir):
    """Straight 6 steps vs. SIGKILL (inside checkpoint 4's write, then right after checkpoint 2) + resume."""
    straight = tmp_path / "straight"
    args = _args(assets, straight, cache_dir, max_steps=6)
    run_trainer(args)

    killed = tmp_path / "killed"
    cfg = tiny_config(assets, killed, cache_dir, max_steps=6)
    cfg_path = _write_yaml(tmp_path / "killed.yaml", cfg)
    # 1) killed while writing checkpoint 4: checkpoint 2 must stay the resumable one
    r = _run_killed(cfg_path, "before_rename", 4)
    assert r.returncode == -9, r.stderr[-2000:]
    assert latest_resumable(killed).name == "checkpoint_000002"
    assert not (killed / "checkpoints" / "checkpoint_000004").exists()
    # 2) resumed, then killed right after checkpoint 4 is complete
    cfg["resume"] = True
    _write_yaml(cfg_path, cfg)
    r = _run_killed(cfg_path, "after_checkpoint", 4)
    assert r.returncode == -9, r.stderr[-2000:]
    assert latest_resumable(killed).name == "checkpoint_000004"
    # 3) resumed in-process to the end
    args2 = TrainArgs.from_dict(cfg)
    trainer2 = Trainer(args2, device="cpu")
    try:
        trainer2.setup()
        assert trainer2.step == 4
        trainer2.train()
    finally:
        trainer2.close()

    want, got = _losses(straight), _losses(killed)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    for (s1, l1), (_, l2) in zip(want, got):
        assert l1 == pytest.approx(l2, rel=1e-6, abs=1e-6), (s1, l1, l2)
    a = load_file(str(straight / "checkpoints" / "checkpoint_000006" / "consolidated" / "lora.safetensors"))
    b = load_file(str(killed / "checkpoints" / "checkpoint_000006" / "consolidated" / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)

    # A resume whose config changed in a way that matters is refused, naming the key.
    cfg_changed = dict(cfg, lora={"enable": True, "rank": 8, "scaling": 2.0})
    with pytest.raises(ResumeMismatchError, match=r"lora\.rank: 4 in the checkpoint, 8 now"):
        t = Trainer(TrainArgs.from_dict(cfg_changed), device="cpu")
        try:
            t.setup()
        finally:
            t.close()


def test_existing_run_dir_needs_resume_or_overwrite(assets, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("x")
    cfg_path = _write_yaml(tmp_path / "c.yaml", tiny_config(assets, run_dir, cache_dir))
    from train import train

    with pytest.raises(FileExistsError, match=r"run_dir .*run already exists.*resume: true.*overwrite_run_dir: true"):
        train(str(cfg_path))
    assert (run_dir / "keep.txt").read_text() == "x"  # nothing touched
    both = tiny_config(assets, run_dir, cache_dir, resume=True, overwrite_run_dir=True)
    with pytest.raises(ValueError, match="resume: true and overwrite_run_dir: true"):
        train(str(_write_yaml(tmp_path / "b.yaml", both)))


@pytest.mark.parametrize("lora,full", [(True, True), (False, False)])
def test_lora_and_full_finetuning_both_or_neither_is_rejected_before_touching_disk(assets, tmp_path, lora, full):
    run_dir = tmp_path / "run"
    cfg = tiny_config(assets, run_dir, None, full_finetuning=full, **{"lora.enable": lora})
    from train import train

    with pytest.raises(ConfigError, match="lora.enable.*full_finetuning|full_finetuning"):
        train(str(_write_yaml(tmp_path / "c.yaml", cfg)))
    assert not run_dir.exists()


def test_overwrite_run_dir_starts_over(assets, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "checkpoint_000099").mkdir(parents=True)
    args = _args(assets, run_dir, cache_dir, overwrite_run_dir=True, max_steps=1, do_ckpt=False)
    run_trainer(args)
    assert not (run_dir / "checkpoints").exists() and [s for s, _ in _losses(run_dir)] == [1]
    shutil.rmtree(run_dir)


def test_non_finite_loss_stops_before_the_optimizer_step():
    from moshi.models.lm import LMModel
    from tests.helpers.configs import small_lm_kwargs

    model = LMModel(**small_lm_kwargs())
    with torch.no_grad():
        model.text_linear.weight[0, 0] = float("inf")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = MoshiLoss.for_model(model, 1.0, 0.5)
    codes = torch.randint(0, 32, (2, 5, 6))
    from finetune.trainer import NonFiniteError

    with pytest.raises(NonFiniteError, match="non-finite values at step 7"):
        train_step(model, opt, [codes], loss_fn, max_norm=1.0, step=7)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "text_linear.weight")
    assert all(p.grad is None for p in model.parameters())
