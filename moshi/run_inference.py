"""Talk to a model offline: feed a user-side wav to Moshi (or a LoRA/merged/full fine-tune, or DSAA) and write
its reply.

    python -m moshi.run_inference INFILE [OUTFILE] [--hf-repo REPO] [--checkpoint CKPT] [--lora-weight FILE]
        [--batch-size 8] [--device auto] [--dtype auto|float32|bfloat16|float16] [--temp T] [--temp-text T]
        [--top-k K] [--top-k-text K] [--greedy] [--seed 4242] [--extra-seconds S] [--transcript FILE.json]

The input is read with sphn, resampled to 24 kHz, channel 0 kept and cut into 80 ms frames (a trailing partial
frame is padded with silence); ``--extra-seconds`` of silence follow it. Every batch item gets the same input and
its own sampling stream (item ``i`` samples as a single run with ``--seed SEED+i`` would). The first frame is fed
twice, because the generator replaces every stream by its initial token at the first step. The reply has the
input's length plus the extra seconds: ``OUTFILE`` for one item, ``OUTFILE-STEM-i.wav`` for several. Item 0's
text is printed, and with ``--transcript`` every item's words are written with their start and end times (on the
80 ms frame grid). The real-time factor and the milliseconds per step close the run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models.loaders import DEFAULT_REPO, SAMPLE_RATE
from .models.model_loading import LoadedModel, load_model
from .utils.atomic import atomic_path, atomic_write_json

SEED = 4242


class InputError(ValueError):
    """The input audio cannot be used (the message names the file)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moshi.run_inference", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("infile", type=str, help="input audio (any format sphn reads; resampled to 24 kHz)")
    p.add_argument("outfile", type=str, nargs="?", default="", help="output wav (none written without it)")
    m = p.add_argument_group("model")
    m.add_argument("--hf-repo", type=str, default=None,
                   help=f"hub id or local folder of the base model (default: {DEFAULT_REPO}, or the --checkpoint "
                   "folder when it is a complete base model)")
    m.add_argument("--moshi-weight", type=str, help="local LM weights file")
    m.add_argument("--mimi-weight", type=str, help="local Mimi weights file")
    m.add_argument("--tokenizer", type=str, help="local text tokenizer file")
    m.add_argument("--config", "--lm-config", dest="config", type=str, help="the model's config.json")
    m.add_argument("--checkpoint", type=str,
                   help="a training checkpoint (run_dir/checkpoints/checkpoint_N or its consolidated/ folder) or "
                   "a DSAA checkpoint folder")
    m.add_argument("--lora-weight", type=str, help="LoRA adapters (lora.safetensors; --config must say lora: true)")
    m.add_argument("--no-fuse-lora", dest="fuse_lora", action="store_false",
                   help="keep the LoRA layers instead of folding them into the base weights")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=8, help="replies generated in parallel")
    r.add_argument("--device", type=str, default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, ...")
    r.add_argument("--dtype", type=str, default="auto",
                   help="LM dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    r.add_argument("--half", action="store_true", help="float16 instead of bfloat16 (same as --dtype float16)")
    r.add_argument("--cfg-coef", type=float, default=1.0, help="classifier-free guidance (only 1.0 is supported)")
    s = p.add_argument_group("sampling (defaults: the config's lm_gen_config, else Moshi's)")
    s.add_argument("--temp", type=float, help="audio temperature (Moshi: 0.8)")
    s.add_argument("--temp-text", type=float, help="text temperature (Moshi: 0.7)")
    s.add_argument("--top-k", type=int, help="audio top-k (Moshi: 250)")
    s.add_argument("--top-k-text", type=int, help="text top-k (Moshi: 25)")
    s.add_argument("--greedy", action="store_true", help="argmax decoding for text and audio")
    s.add_argument("--seed", type=int, default=SEED, help="item i samples from a generator seeded SEED + i")
    o = p.add_argument_group("output")
    o.add_argument("--extra-seconds", type=float, default=0.0,
                   help="keep generating on silence for this long after the input ends")
    o.add_argument("--transcript", type=str, help="write every item's words with start/end times to this JSON")
    return p


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``LMGen`` keywords the command line sets (they override the config's ``lm_gen_config``)."""
    out: dict[str, Any] = {}
    for key in ("temp", "temp_text", "top_k", "top_k_text"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.greedy:
        out["use_sampling"] = False
    return out


def read_input(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Channel 0 of ``path`` at ``sample_rate`` as float32 ``[samples]``.

    Raises:
        InputError: the file is missing, cannot be decoded or holds no samples.
    """
    import sphn

    path = Path(path)
    if not path.is_file():
        raise InputError(f"input audio not found: {path}")
    try:
        pcm, _ = sphn.read(str(path), sample_rate=sample_rate)
    except Exception as e:  # sphn reports decoder failures as plain exceptions
        raise InputError(f"cannot read input audio {path}: {e}") from None
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 1:
        pcm = pcm[None]
    (duration,) = sphn.durations([str(path)])
    if duration is not None:  # the resampler pads its last block: keep the file's own duration
        pcm = pcm[:, : int(round(duration * sample_rate))]
    if pcm.size == 0:
        raise InputError(f"input audio {path} holds no samples")
    return pcm[0]


def frames_of(pcm: np.ndarray, frame_size: int, extra_frames: int) -> torch.Tensor:
    """``[n, frame_size]``: the input cut into frames, the last one padded with silence, then silent frames."""
    n = math.ceil(len(pcm) / frame_size) + extra_frames
    padded = np.zeros(n * frame_size, dtype=np.float32)
    padded[: len(pcm)] = pcm
    return torch.from_numpy(padded).view(n, frame_size)


@dataclass
class Result:
    """What :func:`generate` returns: the reply audio and text tokens of every item, and the timing."""

    pcm: torch.Tensor  # [B, samples] float32
    text_tokens: torch.Tensor  # [B, frames] int64 (-2 where nothing was generated)
    seconds: float  # wall time of the loop
    steps: int


@torch.no_grad()
def generate(model: LoadedModel, frames: torch.Tensor, batch_size: int, **lm_gen_kwargs: Any) -> Result:
    """Runs the streaming loop over ``frames [n, frame_size]`` for ``batch_size`` items; one reply frame per input
    frame (the first input frame is fed twice so that the model sees it)."""
    lm_gen = model.make_lm_gen(**lm_gen_kwargs)
    mimi = model.mimi
    device = model.device
    audio, texts = [], []
    start = time.perf_counter()
    steps = 0
    with mimi.streaming(batch_size), lm_gen.streaming(batch_size):
        for i, frame in enumerate(frames):
            chunk = frame.to(device).view(1, 1, -1).expand(batch_size, 1, -1)
            codes = mimi.encode(chunk)
            if i == 0:
                lm_gen.step(codes)
                steps += 1
            tokens = lm_gen.step(codes)
            steps += 1
            if tokens is None:
                raise RuntimeError("the generator returned no frame after its warm-up step")
            texts.append(tokens[:, 0, 0].cpu())
            audio.append(mimi.decode(tokens[:, 1:].clamp(min=0)).float().cpu()[:, 0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return Result(torch.cat(audio, dim=-1), torch.stack(texts, dim=1), elapsed, steps)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids)


def words_of(tokens: list[int], tokenizer: Any, skip: set[int], frame_rate: float) -> list[dict[str, Any]]:
    """Words with their start and end times from one item's per-frame text tokens.

    Pieces are joined by the tokenizer's own detokenisation: a token whose decoded text adds leading whitespace
    (or follows a piece that decodes to whitespace only, such as a lone ``▁``) starts a new word. A word starts at
    the frame of its first piece, that whitespace included, and ends at the end of the frame of its last piece,
    so every time is a multiple of the frame duration. Padding (``skip``) and ungenerated (negative) ids
    are dropped.
    """
    kept = [(j, t) for j, t in enumerate(tokens) if t >= 0 and t not in skip]
    words: list[dict[str, Any]] = []
    ids: list[int] = []
    previous = ""
    boundary = True  # whitespace seen since the last word piece
    space_frame: int | None = None  # frame of a whitespace-only piece that opens the next word
    for j, token in kept:
        ids.append(token)
        text = _decode(tokenizer, ids)
        piece = text[len(previous):] if text.startswith(previous) else text
        previous = text
        if not piece.strip():
            if piece or not words:
                boundary = True
                space_frame = j if space_frame is None else space_frame
            continue
        if boundary or piece[0].isspace():
            start = j if space_frame is None else space_frame
            words.append({"word": piece.strip(), "start": start / frame_rate, "end": (j + 1) / frame_rate})
        else:
            words[-1]["word"] += piece.rstrip()
            words[-1]["end"] = (j + 1) / frame_rate
        boundary, space_frame = piece[-1].isspace(), None
    for w in words:
        w["start"], w["end"] = round(w["start"], 6), round(w["end"], 6)
    return words


def item_paths(outfile: str, batch_size: int) -> list[Path]:
    """``OUTFILE`` for one item, ``STEM-i.SUFFIX`` beside it for several."""
    out = Path(outfile)
    if batch_size == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.wav'}") for i in range(batch_size)]


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Writes mono float32 ``pcm`` atomically (temporary name, then rename)."""
    import sphn

    with atomic_path(path) as tmp:
        sphn.write_wav(str(tmp), pcm[None].astype(np.float32), sample_rate)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Loads the model, generates, writes the outputs; returns the summary it prints."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.extra_seconds < 0:
        raise ValueError(f"--extra-seconds must be >= 0, got {args.extra_seconds}")
    dtype = "float16" if args.half else args.dtype
    pcm = read_input(args.infile)
    model = load_model(
        args.checkpoint, hf_repo=args.hf_repo, moshi_weight=args.moshi_weight, mimi_weight=args.mimi_weight,
        tokenizer=args.tokenizer, config=args.config, lora_weight=args.lora_weight, fuse_lora=args.fuse_lora,
        device=args.device, dtype=dtype,
    )
    mimi = model.mimi
    frame_size = mimi.frame_size
    extra_samples = int(round(args.extra_seconds * mimi.sample_rate))
    frames = frames_of(pcm, frame_size, math.ceil(extra_samples / frame_size))
    result = generate(model, frames, args.batch_size, seed=args.seed, cfg_coef=args.cfg_coef,
                      **sampling_overrides(args))
    length = len(pcm) + extra_samples
    reply = result.pcm[:, :length].numpy()

    lm = model.lm
    skip = {lm.text_padding_token_id, lm.end_of_text_padding_id}
    transcripts = [words_of(result.text_tokens[i].tolist(), model.text_tokenizer, skip, mimi.frame_rate)
                   for i in range(args.batch_size)]
    written = []
    if args.outfile:
        for path, item in zip(item_paths(args.outfile, args.batch_size), reply, strict=True):
            write_wav(path, item, mimi.sample_rate)
            written.append(str(path))
    if args.transcript:
        atomic_write_json(args.transcript, {
            "infile": str(args.infile), "frame_rate": mimi.frame_rate, "seed": args.seed, "kind": model.kind,
            "items": [{"item": i, "text": " ".join(w["word"] for w in words), "words": words}
                      for i, words in enumerate(transcripts)],
        }, indent=2)
    ms_per_step = 1000.0 * result.seconds / max(result.steps, 1)
    return {
        "text": " ".join(w["word"] for w in transcripts[0]),
        "outputs": written,
        "samples": length,
        "ms_per_step": ms_per_step,
        "real_time_factor": result.seconds / (len(frames) / mimi.frame_rate),
        "kind": model.kind,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        summary = run(args)
    except (InputError, ValueError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary["text"])
    for path in summary["outputs"]:
        print(f"wrote {path}")
    if args.transcript:
        print(f"wrote {args.transcript}")
    print(f"{summary['kind']} model on {summary['device']} ({summary['dtype']}): "
          f"{summary['ms_per_step']:.1f} ms/step, real-time factor {summary['real_time_factor']:.2f} "
          "(below 1: faster than real time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
