"""Per-frame timing of streaming generation (Mimi encode, LM step, Mimi decode) against the 80 ms frame budget.

Usage, from the repository root:
    python scripts/moshi_benchmark.py --config mid --batch-sizes 1,2,4 --out runs/bench
    python scripts/moshi_benchmark.py --config 7b --device cuda --models moshi --out runs/bench7b
    python scripts/moshi_benchmark.py --checkpoint run/checkpoints/checkpoint_100/consolidated [--hf-repo BASE] \
        --out runs/bench

``--config`` builds random weights: ``tiny`` (the test-sized LM and Mimi), ``mid`` (Moshiko's structure at a
CPU-friendly size with the real Mimi) or ``7b`` (Moshiko's shape). ``--models`` picks Moshi, DSAA (Moshi's
shape whose text stream goes through a tiny random Qwen2 LLM built in memory) or both. ``--checkpoint`` times a
trained model instead (any folder ``moshi.models.model_loading.load_model`` reads).

For every model and batch size, ``--warmup`` untimed frames then ``--frames`` timed ones of a seeded test signal
stream through the codec and the generator (its sampling settings). It prints one line per setting and one JSON
object, and writes under ``--out``: ``moshi_benchmark.json`` (settings, figures, provenance),
``moshi_benchmark.csv`` (one row per setting) and ``moshi_benchmark.png`` (p50/p90/p99 per setting with the
budget). Peak memory is CUDA's max allocated on CUDA, else the process's peak RSS (which includes building the
models, so only its growth across settings is informative).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # stream_frame, lm_step: plain modules, not a package

import lm_step  # noqa: E402
import stream_frame  # noqa: E402

from finetune.reporting import add_common_arguments, provenance, pyplot, save_figure, write_csv, write_json  # noqa: E402
from moshi.models.compression import DEFAULT_MIMI_CONFIG, TINY_MIMI_CONFIG, MimiModel, build_mimi  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402
from moshi.models.lm_gen import LMGen  # noqa: E402
from moshi.models.loaders import default_lm_kwargs  # noqa: E402
from moshi.models.model_loading import load_model, resolve_device, resolve_dtype  # noqa: E402

FRAME_BUDGET_MS = 80.0
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
MODELS = ("moshi", "dsaa")
# Width of the tiny random LLM of the DSAA settings, and the special ids given to DSAA (inside its vocabulary).
DSAA_LLM_HIDDEN = 64
DSAA_IDS = {"bos_id": 1, "pad_id": 3, "epad_id": 2}


def config_shapes(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(mimi_config, lm_kwargs)`` of a random-weight config; the LM's codebooks are Mimi's size."""
    if name == "7b":
        mimi_config, lm_kwargs = DEFAULT_MIMI_CONFIG, default_lm_kwargs()
    else:
        mimi_config = TINY_MIMI_CONFIG if name == "tiny" else DEFAULT_MIMI_CONFIG
        lm_kwargs = dict(lm_step.CONFIGS[name])
    return mimi_config, {**lm_kwargs, "card": int(mimi_config["quantizer"]["bins"])}


def build_lm(model: str, lm_kwargs: dict[str, Any], max_frames: int, device: torch.device, dtype: torch.dtype,
             seed: int) -> LMModel:
    """Moshi, or DSAA over a tiny random LLM with room for ``max_frames`` positions; eval mode."""
    torch.manual_seed(seed)
    if model == "moshi":
        lm = LMModel(**lm_kwargs, device=device, dtype=dtype)
    else:
        from make_tiny_llm import build_tiny_llm  # scripts/ is this file's folder, first on sys.path

        from moshi.models.dsaa import dsaa_lm_model

        llm = build_tiny_llm(DSAA_LLM_HIDDEN, max_pos=max_frames + 1, seed=seed).to(device=device, dtype=dtype)
        lm = dsaa_lm_model(llm, **DSAA_IDS, device=device, dtype=dtype, **lm_kwargs)
    return lm.eval()


def build_mimi_for(lm: LMModel, mimi_config: dict[str, Any], device: torch.device, seed: int) -> MimiModel:
    """A random float32 Mimi encoding as many codebooks as the LM reads or writes."""
    torch.manual_seed(seed)
    mimi = build_mimi(mimi_config, device=device)
    mimi.set_num_codebooks(max(lm.dep_q, lm.n_q - lm.dep_q))
    return mimi.eval()


def test_signal(batch: int, frames: int, size: int, device: torch.device, seed: int) -> torch.Tensor:
    """Seeded ``[batch, 1, frames · size]`` audio: a 220 Hz tone plus noise (a different noise per item)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * size, dtype=torch.float64) / 24000
    tone = (0.3 * torch.sin(2 * torch.pi * 220 * t)).float()
    return (tone + 0.05 * torch.randn(batch, 1, frames * size, generator=generator)).to(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in GiB and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"  # KiB on Linux


def summarise(run: stream_frame.StreamRun, frame_ms: float) -> dict[str, Any]:
    """Quantiles per part in ms, the real-time factor and the frames over budget."""
    out: dict[str, Any] = {"frames": run.frames}
    for part in stream_frame.PARTS:
        values = np.asarray(run.wall[part]) * 1000
        out[part] = {key: round(float(np.quantile(values, q)), 3) for key, q in QUANTILES.items()}
    frame = np.asarray(run.wall["frame"]) * 1000
    # Processing time over audio time: below 1 keeps up with real time.
    out["real_time_factor"] = round(float(frame.sum() / (frame_ms * run.frames)), 4)
    out["frames_over_budget"] = int((frame > frame_ms).sum())
    return out


def bench_setting(name: str, lm_gen: LMGen, mimi: MimiModel, batch: int, args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any]:
    """Streams one batch size through ``lm_gen``; returns its row of figures."""
    size = stream_frame.frame_size(mimi)
    audio = test_signal(batch, args.warmup + args.frames, size, device, args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    with tqdm(total=args.warmup + args.frames, desc=f"{name} B={batch}", leave=False, file=sys.stderr) as bar:
        run = stream_frame.run_frames(mimi, lm_gen, audio, args.warmup, sync=sync, on_frame=bar.update)
    frame_ms = 1000 * size / mimi.sample_rate
    peak_gib, peak_kind = peak_memory(device)
    return {"model": name, "batch": batch, **summarise(run, frame_ms), "peak_memory_gib": round(peak_gib, 3),
            "peak_memory_kind": peak_kind}


def human_line(row: dict[str, Any], device: torch.device, dtype: torch.dtype) -> str:
    f = row["frame"]
    parts = " ".join(f"{part} {row[part]['p50']:.1f}" for part in stream_frame.PARTS[:-1])
    return (f"{row['model']} B={row['batch']} {device.type} {str(dtype).replace('torch.', '')}: frame p50 "
            f"{f['p50']:.1f} p90 {f['p90']:.1f} p99 {f['p99']:.1f} ms (budget {FRAME_BUDGET_MS:.0f} ms, "
            f"{row['frames_over_budget']}/{row['frames']} over); p50 {parts} ms; real-time factor "
            f"{row['real_time_factor']:.3f}; peak {row['peak_memory_gib']:.2f} GiB ({row['peak_memory_kind']})")


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    for part in stream_frame.PARTS:
        flat.update({f"{part}_{key}_ms": value for key, value in row[part].items()})
    return flat


def plot(rows: list[dict[str, Any]], title: str) -> Any:
    """Frame time quantiles per setting, with the 80 ms budget as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows)), 3.5))
    labels = [f"{row['model']}\nB={row['batch']}" for row in rows]
    x = np.arange(len(rows))
    for offset, key in zip((-0.25, 0.0, 0.25), QUANTILES):
        ax.bar(x + offset, [row["frame"][key] for row in rows], width=0.25, label=key)
    ax.axhline(FRAME_BUDGET_MS, color="black", linestyle="--", linewidth=1, label="80 ms budget")
    ax.set_xticks(x, labels)
    ax.set_ylabel("ms per frame")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[tuple[str, Any, Any]]:
    """``(name, make_lm_gen, mimi)`` per model to time."""
    if args.checkpoint is not None:
        loaded = load_model(args.checkpoint, hf_repo=args.hf_repo, device=device, dtype=dtype)
        return [(loaded.kind, loaded.make_lm_gen, loaded.mimi)]
    mimi_config, lm_kwargs = config_shapes(args.config)
    models = []
    for name in args.models:
        lm = build_lm(name, lm_kwargs, args.warmup + args.frames, device, dtype, args.seed)
        mimi = build_mimi_for(lm, mimi_config, device, args.seed)
        models.append((name, lambda lm=lm: LMGen(lm), mimi))
    return models


def parse_list(text: str, what: str, choices: tuple[str, ...] | None = None) -> list[Any]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if choices is not None:
        bad = [item for item in items if item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{what}: expected a comma-separated subset of {list(choices)}")
        return items
    try:
        values = [int(item) for item in items]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{what}: expected comma-separated positive integers, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--config", default="mid", choices=["tiny", "mid", "7b"], help="random-weight shapes")
    parser.add_argument("--checkpoint", type=Path, help="a trained model folder instead of random weights")
    parser.add_argument("--hf-repo", help="base model repo or folder of a LoRA --checkpoint (default: its config's)")
    parser.add_argument("--models", default="moshi,dsaa", type=lambda s: parse_list(s, "--models", MODELS),
                        help="random-weight models to time: moshi, dsaa or both (ignored with --checkpoint)")
    parser.add_argument("--batch-sizes", default="1", type=lambda s: parse_list(s, "--batch-sizes"))
    parser.add_argument("--frames", type=int, default=50, help="timed frames per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames first (at least the LM's delay)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.frames < 1 or args.warmup < 0:
        parser.error("--frames must be at least 1 and --warmup at least 0")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except (RuntimeError, ValueError) as error:
        parser.error(str(error))
    rows = []
    for name, make_lm_gen, mimi in load_models(args, device, dtype):
        for batch in args.batch_sizes:
            row = bench_setting(name, make_lm_gen(), mimi, batch, args, device)
            print(human_line(row, device, dtype), flush=True)
            rows.append(row)
    source = str(args.checkpoint) if args.checkpoint is not None else f"random {args.config}"
    result = {
        "name": "moshi_benchmark", "source": source, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "frames": args.frames,
        "warmup": args.warmup, "budget_ms": FRAME_BUDGET_MS, "torch": torch.__version__, "settings": rows,
        "provenance": provenance(checkpoints=[args.checkpoint] if args.checkpoint is not None else []),
    }
    write_json(args.out / "moshi_benchmark.json", result)
    write_csv(args.out / "moshi_benchmark.csv", [csv_row(row) for row in rows])
    save_figure(plot(rows, f"{source}, {device.type} {result['dtype']}"), args.out / "moshi_benchmark.png")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
