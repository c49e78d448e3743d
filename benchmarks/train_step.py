"""Training-step throughput and peak memory of the trainer's step (`finetune.trainer.train_step`).

    python benchmarks/train_step.py                      # tiny + mid on CPU
    python benchmarks/train_step.py --device cuda        # + moshiko-7B shape, LoRA r128, B16, 100 s, ckpt on
    python benchmarks/train_step.py --cases 7b --device cuda --compile

Batches are **synthetic random codes** (the codes cache makes Mimi absent from the step, so this is what a
warm-cache step costs). Weights are random; the model goes through the trainer's own dtype policy and, on
CUDA, FSDP2 mixed precision (bf16 compute, fp32 trained params). Tokens are counted as upstream:
``(1 + dep_q) · B · T`` per step, per process. Prints one human line and one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.args import TrainArgs  # noqa: E402
from finetune.distributed import apply_fsdp, init_distributed, select_device, uses_fsdp  # noqa: E402
from finetune.monitoring.utils import peak_memory_gib  # noqa: E402
from finetune.trainer import MoshiLoss, build_optimizer, train_step  # noqa: E402
from finetune.wrapped_model import (  # noqa: E402
    _set_trainable,
    compile_layers,
    default_param_groups,
    dtype_policy,
    transformer_layer_units,
)
from moshi.models.lm import LMModel  # noqa: E402
from moshi.models.loaders import default_lm_kwargs  # noqa: E402
from moshi.modules.lora import replace_all_linear_with_lora  # noqa: E402

TINY = {
    "dim": 64, "text_card": 48, "n_q": 8, "dep_q": 4, "card": 64, "num_heads": 4, "num_layers": 2,
    "hidden_scale": 4.125, "context": 100, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 32, "depformer_dim_feedforward": 132,
    "depformer_num_heads": 2, "depformer_num_layers": 2, "depformer_multi_linear": True,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 0, 1, 1, 1],
}
MID = {
    "dim": 512, "text_card": 32000, "n_q": 16, "dep_q": 8, "card": 256, "num_heads": 8, "num_layers": 8,
    "hidden_scale": 4.125, "context": 3000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 256, "depformer_dim_feedforward": 1056,
    "depformer_num_heads": 4, "depformer_num_layers": 2, "depformer_multi_linear": True,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}
# name: (lm kwargs, batch, frames, lora rank (0 = full FT), gradient checkpointing)
CASES = {
    "tiny": (TINY, 4, 50, 16, False),
    "mid": (MID, 4, 125, 64, False),
    "7b": (None, 16, 1250, 128, True),
}


def _args(rank: int, gc: bool, param_dtype: str, compile_: bool) -> TrainArgs:
    lora = {"enable": rank > 0, "rank": max(rank, 1), "scaling": 2.0}
    return TrainArgs.from_dict({
        "data": {"train_data": "unused.jsonl"}, "run_dir": "unused", "lora": lora, "full_finetuning": rank == 0,
        "gradient_checkpointing": gc, "param_dtype": param_dtype, "compile": compile_,
    }, validate=False)


def build(kwargs: dict, rank: int, gc: bool, device: torch.device, compile_: bool) -> tuple[LMModel, TrainArgs]:
    """Random-weight model through the trainer's dtype policy / FSDP2 path (meta build, then materialise)."""
    args = _args(rank, gc, "bfloat16" if device.type == "cuda" else "float32", compile_)
    policy = dtype_policy(args.param_dtype, device)
    model = LMModel(**kwargs, gradient_checkpointing=gc, device="meta", dtype=policy.frozen)
    if rank > 0:
        replace_all_linear_with_lora(model, rank, 2.0)
    _set_trainable(model, args, policy.trained)
    if compile_:
        compile_layers(model)
    if uses_fsdp(device):
        apply_fsdp(model, device, transformer_layer_units(model), compute_dtype=policy.compute)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
            elif name.endswith("alpha"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model, args


def random_codes(model: LMModel, batch: int, frames: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.card, (batch, 1 + model.n_q, frames), generator=g)
    codes[:, 0] = torch.randint(0, model.text_card, (batch, frames), generator=g)
    return codes.to(device)


def run_case(name: str, device: torch.device, warmup: int, steps: int, compile_: bool) -> dict:
    kwargs, batch, frames, rank, gc = CASES[name]
    kwargs = default_lm_kwargs() if kwargs is None else dict(kwargs)
    model, args = build(kwargs, rank, gc, device, compile_)
    model.train()
    opt = build_optimizer(default_param_groups(model, args), device)
    loss_fn = MoshiLoss.for_model(model, args)
    codes = [random_codes(model, batch, frames, device, s) for s in range(2)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(model, opt, [codes[i % 2]], loss_fn, max_norm=1.0, step=i)  # syncs (loss to host)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = (1 + model.dep_q) * batch * frames
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = ""
    return {
        "name": f"train_step/{name}", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "config": {"batch": batch, "frames": frames, "lora_rank": rank,
                                                       "gradient_checkpointing": gc, "compile": compile_,
                                                       "params": n_params, "trained_params": n_train},
        "data": "synthetic random codes (no Mimi in the step, as with a warm codes cache)",
        "median_s": med, "tokens_per_s": tokens / med, "peak_gib": peak_memory_gib(device),
        "steps": steps, "git_sha": sha,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu / cuda / auto")
    p.add_argument("--cases", default=None, help="comma list of tiny,mid,7b (default: tiny,mid on CPU, all on CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer layer")
    a = p.parse_args()
    device = select_device(a.device)
    init_distributed(device)
    cases = a.cases.split(",") if a.cases else (["tiny", "mid", "7b"] if device.type == "cuda" else ["tiny", "mid"])
    for name in cases:
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; choose from {sorted(CASES)}")
        if name == "7b" and device.type != "cuda":
            raise SystemExit("the 7b case needs --device cuda")
        r = run_case(name, device, a.warmup, a.steps, a.compile)
        print(f"{r['name']} on {r['device_name']}: {r['median_s'] * 1e3:.1f} ms/step, "
              f"{r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.2f} GiB "
              f"(B={r['config']['batch']}, T={r['config']['frames']}, "
              f"{'LoRA r' + str(r['config']['lora_rank']) if r['config']['lora_rank'] else 'full FT'})")
        print(json.dumps(r))
        del r
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
