"""Forward+backward time of one LM training step (teacher forcing + cross-entropy).

Usage:
    python benchmarks/lm_step.py                       # tiny and mid configs on CPU, float32, 2 threads
    python benchmarks/lm_step.py --config mid --iters 5
    python benchmarks/lm_step.py --loss logits         # full logits + plain CE (moshi-finetune's)
    python benchmarks/lm_step.py --device cuda         # adds the moshiko-7B shape (random weights, bf16)

``--loss trainer`` (default) is the step ``train.py`` runs: ``MoshiLoss``, whose text head is fused into a
chunked cross-entropy (``LMModel.forward_train``); ``--loss logits`` is ``model(codes)`` then masked CE on the
full logits, as moshi-finetune's trainer does. ``benchmarks/lm_vs_kyutai.py`` times both against Kyutai's
package.

Prints one human line and one JSON line per config. Each config runs in its own subprocess so that the CPU peak
memory (max RSS) is per config. Timings on a shared machine are noisy: compare medians of several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# Also Kyutai's LMModel: benchmarks/lm_vs_kyutai.py imports this file in a venv with their package.
from moshi.models.lm import LMModel

MOSHIKO_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]

TINY = {
    "dim": 64, "text_card": 100, "existing_text_padding_id": 3, "n_q": 4, "dep_q": 2, "card": 32, "num_heads": 4,
    "num_layers": 2, "hidden_scale": 4.125, "causal": True, "layer_scale": None, "context": 10,
    "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "depformer_dim": 32, "depformer_dim_feedforward": 132, "depformer_num_heads": 2, "depformer_num_layers": 2,
    "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": 2,
    "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
    "depformer_weights_per_step": True, "delays": [0, 0, 1, 0, 1],
}
# Moshiko's structure at a CPU-friendly size; text_card stays 32000 (the text head is ~40% of the parameters).
MID = {
    **TINY, "dim": 512, "num_layers": 8, "num_heads": 8, "text_card": 32000, "card": 256, "n_q": 16, "dep_q": 8,
    "context": 3000, "depformer_dim": 256, "depformer_num_layers": 2, "depformer_num_heads": 4,
    "depformer_dim_feedforward": int(4.125 * 256), "depformer_context": 8, "delays": MOSHIKO_DELAYS,
}
CONFIGS = {"tiny": TINY, "mid": MID}


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def random_codes(model: LMModel, batch: int, frames: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    audio = torch.randint(0, model.card, (batch, model.n_q, frames), generator=gen)
    text = torch.randint(0, model.text_card, (batch, 1, frames), generator=gen)
    return torch.cat([text, audio], 1).to(device)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): steadier than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _trainer_loss(model: LMModel, codes: torch.Tensor) -> torch.Tensor:
    from finetune.loss import MoshiLoss

    return MoshiLoss(model.delays, model.dep_q, 1.0, 1.0, ())(model, codes).total()


def _logits_loss(model: LMModel, codes: torch.Tensor) -> torch.Tensor:
    out = model(codes)
    targets = codes[:, 1 : 1 + model.dep_q]
    audio = F.cross_entropy(out.logits[out.mask].float(), targets[out.mask])
    text = F.cross_entropy(out.text_logits[out.text_mask].float(), codes[:, :1][out.text_mask])
    return audio + text


LOSSES = {"trainer": _trainer_loss, "logits": _logits_loss}


def run_one(
    name: str,
    device: str,
    dtype: torch.dtype,
    batch: int,
    frames: int,
    warmup: int,
    iters: int,
    loss: str,
    model: LMModel | None = None,
) -> dict:
    """Times ``iters`` training steps of config ``name`` (or of ``model``, already built) after ``warmup``."""
    dev = torch.device(device)
    if name == "7b":
        from moshi.models.loaders import default_lm_kwargs

        kwargs = default_lm_kwargs()
    else:
        kwargs = dict(CONFIGS[name])
    if model is None:
        torch.manual_seed(0)
        model = LMModel(**kwargs, device=dev, dtype=dtype)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    codes = random_codes(model, batch, frames, dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times, cpu_times = [], []
    for i in range(warmup + iters):
        sync()
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        LOSSES[loss](model, codes).backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(_cpu_seconds() - start_cpu)
        model.zero_grad(set_to_none=True)
    median = statistics.median(times)
    if dev.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(dev) / 2**30
        peak_kind = "cuda max_memory_allocated"
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        peak_kind = "process max RSS"
    return {
        "name": f"lm_step/{name}",
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "frames": frames,
        "loss": loss,
        "params": n_params,
        "median_s": round(median, 5),
        "min_s": round(min(times), 5),
        "cpu_median_s": round(statistics.median(cpu_times), 5),
        "frames_per_s": round(batch * frames / median, 2),
        "peak_gib": round(peak_gib, 3),
        "peak_kind": peak_kind,
        "iters": iters,
        "git": _git_sha(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="all", choices=["all", "tiny", "mid", "7b"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]; 'all' adds 7b only on cuda")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (default for 7b)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loss", default="trainer", choices=sorted(LOSSES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.config == "all":
        names = ["tiny", "mid"] + (["7b"] if args.device.startswith("cuda") else [])
        for name in names:
            cmd = [sys.executable, __file__, "--config", name] + [
                f"--{k}={v}" for k, v in vars(args).items() if k != "config" and v is not None
            ]
            subprocess.run(cmd, check=True, env=os.environ.copy())
        return

    default_dtype = "bfloat16" if args.config == "7b" else "float32"
    dtype = getattr(torch, args.dtype or default_dtype)
    result = run_one(args.config, args.device, dtype, args.batch, args.frames, args.warmup, args.iters, args.loss)
    print(
        f"{result['name']}: {result['device']} {result['dtype']} B={result['batch']} T={result['frames']} "
        f"loss={result['loss']} "
        f"params={result['params'] / 1e6:.2f}M  fwd+bwd median {result['median_s'] * 1000:.1f} ms  "
        f"{result['frames_per_s']:.1f} frames/s  peak {result['peak_gib']:.2f} GiB ({result['peak_kind']})",
        flush=True,
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
