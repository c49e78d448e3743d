"""A full disk during a checkpoint: one `CheckpointError` naming the folder, no temporary folder left, the
previous checkpoint intact and the run resumable once space is freed."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

import finetune.checkpointing as ck
from finetune.checkpointing import Checkpointer, CheckpointError, latest_resumable, list_checkpoints
from tests.helpers.configs import small_lm_kwargs
from tests.helpers.models import small_lora_lm


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _dcp_no_space(*args, **kwargs):
    """What `torch.distributed.checkpoint.save` raises when a shard write hits a full disk."""
    from torch.distributed.checkpoint.api import CheckpointException

    raise CheckpointException("save failed", {0: (OSError(errno.ENOSPC, "No space left on device"), None)})


def _tmp_rename_fails(real):
    def replace(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".checkpoint_"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    return replace


def _model_and_opt(seed: int = 0):
    model = small_lora_lm(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(torch.randint(0, 32, (2, 5, 6)))
    out.logits[out.mask].float().logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _checkpointer(run_dir, model, opt) -> Checkpointer:
    base = dict(small_lm_kwargs(), moshi_name="model.safetensors")
    return Checkpointer(run_dir, model, opt, base, lora=True, lora_rank=4, lora_scaling=2.0, save_adapters=True,
                        export_dtype=torch.float32, num_ckpt_keep=None, fingerprint={"seed": 0})


def _assert_clean_failure(err: CheckpointError, run_dir: Path) -> None:
    msg = str(err)
    assert "checkpoint_000002" in msg and "disk full" in msg and "No space left on device" in msg
    assert "Traceback" not in msg
    assert f"latest complete checkpoint is {run_dir / 'checkpoints' / 'checkpoint_000001'}" in msg
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint_000001"]


PHASES = {
    "resume_state": ("torch.distributed.checkpoint.save", _dcp_no_space),
    "rank_state": ("finetune.checkpointing.torch.save", _no_space),
    "export": ("finetune.checkpointing.atomic_save_safetensors", _no_space),
    "config": ("finetune.checkpointing.atomic_write_json", _no_space),
    "marker": ("finetune.checkpointing.atomic_write_text", _no_space),
    "rename": ("finetune.checkpointing.os.replace", None),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_enospc_at_each_phase_keeps_the_previous_checkpoint_and_the_run_resumable(tmp_path, monkeypatch, phase):
    model, opt = _model_and_opt()
    c = _checkpointer(tmp_path, model, opt)
    c.save(1, {"data": 1})
    want = {k: v.clone() for k, v in model.state_dict().items()}
    target, fake = PHASES[phase]
    monkeypatch.setattr(target, fake or _tmp_rename_fails(os.replace))
    with pytest.raises(CheckpointError) as info:
        c.save(2, {"data": 2})
    _assert_clean_failure(info.value, tmp_path)
    monkeypatch.undo()  # space freed

    fresh, opt2 = _model_and_opt(seed=1)
    fresh.load_state_dict({k: v for k, v in want.items() if "lora" not in k}, strict=False)
    step, state = _checkpointer(tmp_path, fresh, opt2).load(latest_resumable(tmp_path))
    assert step == 1 and state["data"] == 1
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    c.save(2, {"data": 2})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2] and latest_resumable(tmp_path).name.endswith("2")


def test_low_free_space_is_warned_before_writing(tmp_path, monkeypatch, caplog):
    model, opt = _model_and_opt()
    c = _checkpointer(tmp_path, model, opt)
    c.save(1, {})
    size = ck.folder_bytes(tmp_path / "checkpoints" / "checkpoint_000001")
    assert size > 0
    real = shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real(p)._replace(free=size // 2))
    with caplog.at_level(logging.WARNING, logger="finetune.checkpointing"):
        c.save(2, {})
    assert "low disk space" in caplog.text and "the last checkpoint took" in caplog.text


def _can_mount_tmpfs() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


def test_real_full_tmpfs(tmp_path):
    """A run_dir on a tmpfs that holds one checkpoint and a half: the second one fails cleanly."""
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    model, opt = _model_and_opt()
    probe = tmp_path / "probe"
    _checkpointer(probe, model, opt).save(1, {})
    size = ck.folder_bytes(probe / "checkpoints" / "checkpoint_000001")
    mnt = tmp_path / f"mnt-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    kib = (size * 3 // 2) // 1024 + 64
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed here: {r.stderr.strip()}")
    try:
        c = _checkpointer(mnt, model, opt)
        c.save(1, {"data": 1})
        with pytest.raises(CheckpointError) as info:
            c.save(2, {"data": 2})
        _assert_clean_failure(info.value, mnt)
        subprocess.run(["mount", "-o", f"remount,size={4 * kib}k", str(mnt)], check=True)  # space freed
        step, state = c.load(latest_resumable(mnt))
        assert step == 1 and state["data"] == 1
        c.save(2, {"data": 2})
        assert latest_resumable(mnt).name == "checkpoint_000002"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
