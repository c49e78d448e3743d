"""The training log's numbers: the FLOP count behind MFU, the device peak, and what the step timer measures."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
import torch

from finetune.args import TrainArgs
from finetune.model_family import MoshiFamily
from finetune.monitoring.flops import flops_per_frame, llm_flops_per_token, peak_flops
from finetune.trainer import DataComponents, Trainer
from moshi.models.lm import LMModel
from moshi.models.loaders import CheckpointInfo
from tests.helpers.configs import small_lm_kwargs

TINY = {"dim": 8, "num_layers": 1, "num_heads": 1, "hidden_scale": 4, "gating": "silu", "context": 3,
        "text_card": 10, "card": 6, "n_q": 4, "dep_q": 2, "depformer_dim": 4, "depformer_num_layers": 1,
        "depformer_num_heads": 1, "depformer_dim_feedforward": 12}


def test_flops_per_frame_equals_the_hand_count_of_a_tiny_config():
    # Temporal layer (D = 8, gated FFN hidden 21·8/8 = 21 for the 4·D width, 5 frames attend to context 3):
    qkv, out, attn, ffn = 2 * 8 * 24, 2 * 8 * 8, 2 * 2 * 8 * 3, 3 * 2 * 8 * 21
    text_head = 2 * 8 * 10
    # Depformer, per codebook step (D_d = 4, FFN 12 -> hidden 8, attends over the 2 codebook steps):
    dep_step = 2 * 8 * 4 + (2 * 4 * 12 + 2 * 4 * 4 + 2 * 2 * 4 * 2 + 3 * 2 * 4 * 8) + 2 * 4 * 6
    forward = qkv + out + attn + ffn + text_head + 2 * dep_step
    assert forward == 2704
    assert flops_per_frame(TINY, frames=5) == 3 * forward
    # Longer sequences only cost more attention, up to the context.
    assert flops_per_frame(TINY, frames=2) == 3 * (forward - 2 * 2 * 8 * 1)
    assert flops_per_frame(TINY, frames=100) == 3 * forward


def test_llm_flops_per_token_counts_grouped_query_attention():
    cfg = {"hidden_size": 8, "num_hidden_layers": 2, "intermediate_size": 16, "num_attention_heads": 2,
           "num_key_value_heads": 1, "vocab_size": 10}
    # q 8 + k 4 + v 4 outputs, o 8x8, scores and values over 3 tokens, gated FFN, LM head.
    layer = 2 * 8 * 16 + 2 * 8 * 8 + 2 * 2 * 8 * 3 + 3 * 2 * 8 * 16
    assert llm_flops_per_token(cfg, frames=3) == 3 * (2 * layer + 2 * 8 * 10)


def test_cpu_peak_is_measured_once_per_process():
    first = peak_flops(torch.device("cpu"))
    assert first is not None and first > 1e8
    assert peak_flops(torch.device("cpu")) == first


# ----------------------------------------------------------------------------- the step timer


class _TinyFamily(MoshiFamily):
    """The small test LM with seeded weights; no checkpoint files."""

    def source(self, dtype: torch.dtype):
        torch.manual_seed(0)
        return LMModel(**small_lm_kwargs(), dtype=dtype), None


class _SlowData:
    """Random codes forever, each batch after `delay` seconds; resumable position."""

    def __init__(self, delay: float) -> None:
        self.delay, self.i = delay, 0

    def __iter__(self):
        for i in itertools.count(self.i):
            self.i = i
            time.sleep(self.delay)
            yield torch.randint(0, 32, (2, 5, 6), generator=torch.Generator().manual_seed(i))

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


SLOW = 1.0  # seconds added by each evaluation and each checkpoint; a tiny step takes a few ms


def test_step_time_excludes_eval_and_checkpoints_and_reports_the_data_wait(tmp_path: Path, monkeypatch):
    def slow_eval():
        time.sleep(SLOW)
        return [torch.randint(0, 32, (2, 5, 6))]

    args = TrainArgs.from_dict({
        "data": {"train_data": "unused.jsonl"}, "run_dir": str(tmp_path / "run"), "lora": {"enable": False},
        "full_finetuning": True, "max_steps": 3, "param_dtype": "float32", "gradient_checkpointing": False,
        "tensorboard": False, "do_eval": True, "eval_freq": 1, "eval_batches": 1, "ckpt_freq": 1,
    }, validate=False)
    unused = Path("unused")
    info = CheckpointInfo(moshi_weights=unused, mimi_weights=unused, tokenizer=unused,
                          lm_config=small_lm_kwargs(), raw_config=small_lm_kwargs())
    hooks = []
    # The model files and manifests above are placeholders (the family and data are injected): skip the
    # pre-flight file checks, which have tests of their own.
    monkeypatch.setattr("finetune.trainer.preflight", lambda _args: info)

    def slow_checkpoint(point: str, step: int) -> None:
        hooks.append((point, step))
        time.sleep(SLOW / 2)

    trainer = Trainer(args, data_factory=lambda *_: DataComponents(_SlowData(0.05), slow_eval),
                      family=_TinyFamily(args, info), device="cpu", fault_hook=slow_checkpoint)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
    assert hooks == [(p, s) for s in (1, 2, 3) for p in ("before_rename", "after_checkpoint")]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        # Each step followed an evaluation and a checkpoint of SLOW seconds each: none of it is in the step.
        assert 0.05 <= r["step_seconds"] < SLOW, r
        assert 0.05 / r["step_seconds"] <= r["data_share"] + 1e-6 and r["data_share"] < 1.0
        assert r["wps"] == pytest.approx(2 * 6 * 3 / r["step_seconds"], rel=1e-6)  # (1 + dep_q) · B · T
        assert 0 < r["real_wps"] < r["wps"]  # delayed streams leave positions without a target
        assert r["real_wps"] == pytest.approx(r["prob_real_tokens"] * r["wps"], rel=1e-6)
        assert 0 < r["mfu"] < 1
    assert trainer.meter.seconds == pytest.approx(sum(r["step_seconds"] for r in records), rel=1e-6)
