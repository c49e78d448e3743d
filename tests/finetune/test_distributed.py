"""Two processes (torchrun, gloo, FSDP2) train exactly like one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.args import TrainArgs
from finetune.checkpointing import latest_resumable
from tests.helpers.tiny_run import REPO, make_tiny_assets, run_trainer, tiny_config

pytestmark = pytest.mark.slow


def _losses(run_dir: Path) -> list[tuple[int, float, float]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.train.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs]


def test_torchrun_two_processes_match_one_process(tmp_path):
    assets = make_tiny_assets(tmp_path / "assets")
    cache = tmp_path / "cache"

    single = tmp_path / "single"
    args = TrainArgs.from_dict(tiny_config(assets, single, cache, batch_size=2, max_steps=4, do_eval=True,
                                           eval_freq=4))
    run_trainer(args)

    multi = tmp_path / "multi"
    cfg = tiny_config(assets, multi, cache, batch_size=1, max_steps=4, do_eval=True, eval_freq=4)
    cfg_path = tmp_path / "multi.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", MOSHI_FT_DEVICE="cpu")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "train", str(cfg_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FSDP2: 4 layer units + root, mesh cpu×2" in r.stdout + r.stderr

    want, got = _losses(single), _losses(multi)
    assert [s for s, _, _ in got] == [1, 2, 3, 4]
    for (s, l1, g1), (_, l2, g2) in zip(want, got):
        assert l2 == pytest.approx(l1, rel=1e-4), (s, l1, l2)
        assert g2 == pytest.approx(g1, rel=1e-3), (s, g1, g2)  # global grad norm over the shards

    # The sharded run's export (gathered on rank 0) equals the single-process one; resume state is per rank.
    a = load_file(str(single / "checkpoints" / "checkpoint_000004" / "consolidated" / "lora.safetensors"))
    b = load_file(str(multi / "checkpoints" / "checkpoint_000004" / "consolidated" / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)  # Adam amplifies float noise
    resume = latest_resumable(multi) / "resume"
    assert (resume / "rank_00000.pt").is_file() and (resume / "rank_00001.pt").is_file()
    evals = [json.loads(x) for x in (multi / "metrics.eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [4] and evals[0]["eval_batches"] == 2
