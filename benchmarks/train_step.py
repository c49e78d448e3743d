"""Training-step throughput and peak memory of the trainer's step (`finetune.trainer.train_step`).

    python benchmarks/train_step.py                      # tiny + mid on CPU
    python benchmarks/train_step.py --device cuda        # + moshiko-7B shape, LoRA r128, B16, 100 s, ckpt on
    python benchmarks/train_step.py --cases 7b --device cuda --compile
    python benchmarks/train_step.py --dsaa               # DSAA: tiny DSAA vs the same Moshi, text-loss memory
    python benchmarks/train_step.py --dsaa --device cuda # + moshiko-7B + Qwen2.5-3B-shaped LLM, B8 x 180 s

Batches are **synthetic random codes** (the codes cache makes Mimi absent from the step, so this is what a
warm-cache step costs). Weights are random; the model goes through the trainer's own dtype policy and, on
CUDA, FSDP2 mixed precision (bf16 compute, fp32 trained params). Tokens are all predicted positions,
``(1 + dep_q) · B · T`` per step, per process. Prints one human line and one JSON line per case.

DSAA (``--dsaa``): the tiny DSAA model (the ``tiny`` Moshi + a tiny random Qwen2 LLM) against the same Moshi
fully fine-tuned without the LLM, and the peak memory of the text loss alone (forward + backward) at a
150k vocabulary, from full logits and chunked. On CPU every measurement runs in its own process, because the
CPU peak is the process's peak RSS (``ru_maxrss``), which never goes down.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from finetune.args import TrainArgs
from finetune.distributed import init_distributed, select_device
from finetune.model_build import allocate
from finetune.model_family import DSAAFamily, ModelFamily, MoshiFamily
from finetune.monitoring.utils import peak_memory_gib
from finetune.trainer import build_optimizer, train_step
from moshi.models.lm import LMModel
from moshi.models.loaders import CheckpointInfo, default_lm_kwargs

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
    "tiny_full": (TINY, 4, 50, 0, False),  # the Moshi of dsaa_tiny, fully fine-tuned, without the LLM
}


def _args(rank: int, gc: bool, param_dtype: str, compile_: bool) -> TrainArgs:
    lora = {"enable": rank > 0, "rank": max(rank, 1), "scaling": 2.0}
    return TrainArgs.from_dict({
        "data": {"train_data": "unused.jsonl"}, "run_dir": "unused", "lora": lora, "full_finetuning": rank == 0,
        "gradient_checkpointing": gc, "param_dtype": param_dtype, "compile": compile_,
    }, validate=False)


class _RandomSource:
    """A family whose source model is its own skeleton filled with random values: no checkpoint is read, and
    the model goes through the trainer's build (dtype policy, FSDP2 units, broadcast, forward registration)."""

    description: Any = None

    def source(self, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
        model = allocate(self.skeleton(self.description, dtype), torch.device("cpu"))  # type: ignore[attr-defined]
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
                elif name.endswith("alpha"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        return model, self.description


class RandomMoshi(_RandomSource, MoshiFamily):
    pass


class RandomDSAA(_RandomSource, DSAAFamily):
    pass


def _random_info(kwargs: dict | None) -> CheckpointInfo:
    unused = Path("random-weights")
    return CheckpointInfo(moshi_weights=unused, mimi_weights=unused, tokenizer=unused, lm_config=kwargs)


def build(kwargs: dict, rank: int, gc: bool, device: torch.device, compile_: bool) -> tuple[LMModel, ModelFamily]:
    """Random-weight Moshi through the trainer's family and build."""
    args = _args(rank, gc, "bfloat16" if device.type == "cuda" else "float32", compile_)
    family = RandomMoshi(args, _random_info(kwargs))
    return family.build(device), family  # type: ignore[return-value]


def random_codes(
    model: LMModel, batch: int, frames: int, device: torch.device, seed: int, text_vocab: int | None = None
) -> torch.Tensor:
    """Random codes `[B, 1+n_q, T]`; text ids below `text_vocab` (default: the model's text_card)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.card, (batch, 1 + model.n_q, frames), generator=g)
    codes[:, 0] = torch.randint(0, text_vocab or model.text_card, (batch, frames), generator=g)
    return codes.to(device)


def run_case(name: str, device: torch.device, warmup: int, steps: int, compile_: bool) -> dict:
    kwargs, batch, frames, rank, gc = CASES[name]
    kwargs = default_lm_kwargs() if kwargs is None else dict(kwargs)
    model, family = build(kwargs, rank, gc, device, compile_)
    model.train()
    opt = build_optimizer(family.param_groups(model), device)
    loss_fn = family.loss(model)
    codes = [random_codes(model, batch, frames, device, s) for s in range(2)]
    return time_steps(f"train_step/{name}", model, opt, loss_fn, codes, device, warmup, steps,
                      {"batch": batch, "frames": frames, "lora_rank": rank, "gradient_checkpointing": gc,
                       "compile": compile_})


def time_steps(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn, codes: list[torch.Tensor],
               device: torch.device, warmup: int, steps: int, config: dict) -> dict:
    """Median wall time of `train_step` over `steps` steps after `warmup`, and the process's peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(model, opt, [codes[i % 2]], loss_fn, max_norm=1.0, step=i + 1)  # syncs (loss to host)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    batch, frames = codes[0].shape[0], codes[0].shape[-1]
    tokens = (1 + model.dep_q) * batch * frames
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = ""
    return {
        "name": name, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "config": dict(config, params=n_params, trained_params=n_train),
        "data": "synthetic random codes (no Mimi in the step, as with a warm codes cache)",
        "median_s": med, "tokens_per_s": tokens / med, "peak_gib": peak_memory_gib(device),
        "steps": steps, "git_sha": sha,
    }


# --------------------------------------------------------------------------------------------- DSAA cases
# Tiny DSAA = the TINY Moshi + a tiny random Qwen2 LLM; compared with the same TINY Moshi, fully fine-tuned,
# without the LLM. "dsaa_7b" (CUDA) = moshiko-7B shape + a Qwen2.5-3B-shaped random LLM built from its config.
TINY_LLM = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512,
            "tie_word_embeddings": True}
QWEN25_3B = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
             "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
             "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
# name: (moshi kwargs (None = moshiko), LLM config, batch, frames, gradient checkpointing)
DSAA_CASES = {
    "dsaa_tiny": (TINY, TINY_LLM, 4, 50, False),
    "dsaa_7b": (None, QWEN25_3B, 8, 2250, True),  # 8 x 180 s
}


def build_dsaa(kwargs: dict, llm_kwargs: dict, gc: bool, device: torch.device, compile_: bool):
    """Random-weight DSAA model through the trainer's family and build (groups, dtype policy, FSDP2 units)."""
    from transformers import Qwen2Config

    from moshi.models.dsaa_loading import DSAABlock

    args = TrainArgs.from_dict({
        "data": {"train_data": "unused.jsonl"}, "run_dir": "unused", "lora": {"enable": False},
        "full_finetuning": True, "text_llm": {"enable": True}, "gradient_checkpointing": gc,
        "param_dtype": "bfloat16" if device.type == "cuda" else "float32", "compile": compile_,
    }, validate=False)
    llm_config = Qwen2Config(**llm_kwargs).to_dict()
    block = DSAABlock(hf_repo_id="random", revision=None, llm_weights="embedded", llm_config=llm_config,
                      text_dim=llm_kwargs["hidden_size"], text_vocab=llm_kwargs["vocab_size"], pad_id=2, epad_id=2,
                      bos_id=1, proj_hidden=None, proj_dropout=0.1)  # type: ignore[arg-type]
    family = RandomDSAA(args, _random_info(kwargs))
    family.description = dict(kwargs, dsaa=block.to_dict())
    return family.build(device), family


def run_dsaa_case(name: str, device: torch.device, warmup: int, steps: int, compile_: bool) -> dict:
    from moshi.models.dsaa import dsaa_dims

    kwargs, llm_kwargs, batch, frames, gc = DSAA_CASES[name]
    kwargs = default_lm_kwargs() if kwargs is None else dict(kwargs)
    model, family = build_dsaa(kwargs, llm_kwargs, gc, device, compile_)
    model.train()
    opt = build_optimizer(family.param_groups(model), device)
    loss_fn = family.loss(model)
    codes = [random_codes(model, batch, frames, device, s, text_vocab=dsaa_dims(model).text_in_vocab)
             for s in range(2)]
    return time_steps(f"train_step/{name}", model, opt, loss_fn, codes, device, warmup, steps,
                      {"batch": batch, "frames": frames, "gradient_checkpointing": gc, "compile": compile_,
                       "llm": f"Qwen2 D_l={llm_kwargs['hidden_size']} V={llm_kwargs['vocab_size']} "
                              f"layers={llm_kwargs['num_hidden_layers']}",
                       "audio_loss_skip_every": family.args.audio_loss_skip_every})


def text_loss_memory(rows: int, dim: int, vocab: int, chunk_rows: int | None, device: torch.device) -> dict:
    """Peak memory of forward + backward of the text loss alone (float32), chunked or from full logits.

    CPU: run in a fresh process; the figure is the rise of the process's peak RSS (ru_maxrss) over its value
    once inputs exist (so it includes the [V, D] weight gradient, which both variants allocate). CUDA: the rise
    of max_memory_allocated over the inputs.
    """
    import torch.nn.functional as F

    from finetune.loss import chunked_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=g).to(device).requires_grad_()
    head = torch.nn.Linear(dim, vocab, bias=False, device=device)
    with torch.no_grad():  # in place: a temporary [V, D] copy would set the process's peak before the pass
        head.weight.normal_(0.0, 0.02, generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(device)
    weights = torch.ones(rows, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base, peak_before = torch.cuda.memory_allocated(device) / 2**30, 0.0
    else:
        base, peak_before = _rss_gib(), peak_memory_gib(device)
    t0 = time.perf_counter()
    if chunk_rows is None:
        loss = (F.cross_entropy(head(hidden), targets, reduction="none") * weights).sum()
    else:
        loss, _ = chunked_linear_cross_entropy(hidden, head, targets, weights, chunk_rows)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    peak = peak_memory_gib(device)
    rise = peak - base  # exact when this pass set the process's peak (`exact`)
    return {"name": "text_loss_memory", "device": str(device), "rows": rows, "dim": dim, "vocab": vocab,
            "chunk_rows": chunk_rows, "peak_rise_gib": rise, "exact": peak > peak_before, "seconds": dt,
            "full_logits_gib": rows * vocab * 4 / 2**30}


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _in_subprocess(argv: list[str]) -> list[dict]:
    """Runs this script with `argv` in a fresh process (its own peak RSS); returns its JSON lines."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    r = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"benchmark subprocess {argv} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def _print_case(r: dict) -> None:
    c = r["config"]
    kind = ("DSAA " + c["llm"]) if "llm" in c else ("LoRA r" + str(c["lora_rank"]) if c["lora_rank"] else "full FT")
    print(f"{r['name']} on {r['device_name']}: {r['median_s'] * 1e3:.1f} ms/step, "
          f"{r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.2f} GiB "
          f"(B={c['batch']}, T={c['frames']}, {kind}, {c['trained_params']:,} trained / {c['params']:,})")
    print(json.dumps(r))


def _print_loss_memory(r: dict) -> None:
    how = "full logits" if r["chunk_rows"] is None else f"chunks of {r['chunk_rows']} rows"
    print(f"text loss fwd+bwd, N={r['rows']} D={r['dim']} V={r['vocab']} float32, {how}: peak +"
          f"{r['peak_rise_gib']:.2f} GiB over the inputs ({r['seconds']:.1f} s; the full logits alone are "
          f"{r['full_logits_gib']:.2f} GiB)")
    print(json.dumps(r))


def run_dsaa(device: torch.device, warmup: int, steps: int, compile_: bool, rows: int) -> None:
    """The DSAA comparison; on CPU each measurement in its own process (see the module docstring)."""
    chunks: list[int | None] = [None, 1024, 256]
    common = ["--warmup", str(warmup), "--steps", str(steps)] + (["--compile"] if compile_ else [])
    cases = ["tiny_full", "dsaa_tiny"] + (["dsaa_7b"] if device.type == "cuda" else [])
    for name in cases:
        if device.type == "cpu":
            for r in _in_subprocess(["--device", "cpu", "--cases", name, *common]):
                _print_case(r)
        else:
            _print_case(run_dsaa_case(name, device, warmup, steps, compile_) if name in DSAA_CASES
                        else run_case(name, device, warmup, steps, compile_))
            torch.cuda.empty_cache()
    for chunk in chunks:
        if device.type == "cpu":
            probe = ["--device", "cpu", "--loss-probe", f"{rows},2048,151936,{chunk or 0}"]
            for r in _in_subprocess(probe):
                _print_loss_memory(r)
        else:
            _print_loss_memory(text_loss_memory(rows, 2048, 151936, chunk, device))
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu / cuda / auto")
    p.add_argument("--cases", default=None, help="comma list of tiny,mid,7b (default: tiny,mid on CPU, all on CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer layer")
    p.add_argument("--dsaa", action="store_true", help="the DSAA comparison (see the module docstring)")
    p.add_argument("--loss-rows", type=int, default=500, help="--dsaa: rows N = B*T of the text-loss probe")
    p.add_argument("--loss-probe", default=None, help=argparse.SUPPRESS)  # ROWS,DIM,VOCAB,CHUNK (0 = full)
    a = p.parse_args()
    device = select_device(a.device)
    init_distributed(device)
    if a.loss_probe is not None:
        rows, dim, vocab, chunk = (int(x) for x in a.loss_probe.split(","))
        print(json.dumps(text_loss_memory(rows, dim, vocab, chunk or None, device)))
        return
    if a.dsaa:
        run_dsaa(device, a.warmup, a.steps, a.compile, a.loss_rows)
        return
    all_cases = {**CASES, **DSAA_CASES}
    cases = a.cases.split(",") if a.cases else (["tiny", "mid", "7b"] if device.type == "cuda" else ["tiny", "mid"])
    for name in cases:
        if name not in all_cases:
            raise SystemExit(f"unknown case {name!r}; choose from {sorted(all_cases)}")
        if name.endswith("7b") and device.type != "cuda":
            raise SystemExit(f"the {name} case needs --device cuda")
        run = run_dsaa_case if name in DSAA_CASES else run_case
        _print_case(run(name, device, a.warmup, a.steps, a.compile))
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
