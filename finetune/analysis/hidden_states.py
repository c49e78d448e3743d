"""Per-frame hidden states of a Moshi or DSAA model, recorded by forward hooks during one teacher-forced pass.

Streams (each ``[B, T, dim]`` at the model's time steps; position ``t`` is the state that predicts frame
``t``'s text token):

- ``layer.{i}``: output of temporal transformer layer ``i``;
- ``out_norm`` (Moshi) / ``a`` (DSAA): the temporal transformer's output after ``out_norm``;
- DSAA only: ``h`` (the frozen LLM's final-norm state), ``text_proj`` (the text projector's output, what the
  text head reads), ``alpha_fusion`` (its learned correction ``alpha * fusion([h, a])``, so
  ``text_proj = h + alpha_fusion``) and ``dep_proj.{k}`` (the input the depformer reads at step ``k``).

Which streams can change when the model trains is recorded per stream: under DSAA's default groups the
temporal transformer and the LLM are frozen, so ``layer.*``, ``a`` and ``h`` are identical for every
checkpoint of a run, and only the projector streams move. A Moshi LoRA or full fine-tune changes them all.

The rows stored per frame are only the frames with real audio and text (not the ``-1`` zero-token frames
after the end of a file), with their file, frame index in the file, time, text token and PAD/EPAD/speech masks.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.analysis.shards import ShardWriter
from moshi.models.dsaa import dsaa_param_group_prefixes, is_dsaa


@dataclass(frozen=True)
class StreamSpec:
    name: str
    module: str  # the hooked module
    dim: int
    depends_on_training: bool


def _frozen_prefixes(model: nn.Module, only_text: bool, frozen_modules: Sequence[str]) -> tuple[str, ...]:
    if not is_dsaa(model):
        return ()
    return dsaa_param_group_prefixes(model, only_text, frozen_modules)["frozen"]


def stream_specs(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    *,
    only_text: bool = False,
    frozen_modules: Sequence[str] = (),
    trained: bool = True,
) -> list[StreamSpec]:
    """The streams of ``model``: the chosen temporal layers (negative indices count from the end; None: all),
    ``out_norm``/``a`` and, for DSAA, ``h``, ``text_proj``, ``alpha_fusion`` and ``dep_proj.{k}``.

    Args:
        only_text, frozen_modules: the run's ``only_text`` and ``text_llm.frozen_modules`` (DSAA groups).
        trained (bool): whether the run trained anything of a Moshi model (LoRA or full fine-tuning).
    """
    n_layers = len(model.transformer.layers)
    chosen = range(n_layers) if layers is None else layers
    indices = []
    for i in chosen:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ValueError(f"--layers: layer {i} does not exist (the temporal transformer has {n_layers})")
        if j not in indices:
            indices.append(j)
    frozen = _frozen_prefixes(model, only_text, frozen_modules)

    def changes(*prefixes: str) -> bool:
        if not is_dsaa(model):
            return trained
        return any(not any(p == f or p.startswith(f + ".") for f in frozen) for p in prefixes)

    temporal = ("emb", "transformer")
    specs = [StreamSpec(f"layer.{j}", f"transformer.layers.{j}", model.dim, changes(*temporal)) for j in indices]
    if not is_dsaa(model):
        return specs + [StreamSpec("out_norm", "out_norm", model.dim, trained)]
    text_dim = model.text_projector.text_dim
    specs += [
        StreamSpec("a", "out_norm", model.dim, changes(*temporal, "out_norm")),
        StreamSpec("h", "text_llm", text_dim, False),
        StreamSpec("text_proj", "text_projector", text_dim, changes("text_projector")),
        StreamSpec("alpha_fusion", "text_projector.fusion", text_dim, changes("text_projector")),
    ]
    for k in range(model.dep_q):
        module = f"depformer_projectors.{model.depformer_input_index(k)}"
        specs.append(StreamSpec(f"dep_proj.{k}", module, model.depformer_dim, changes("depformer_projectors")))
    return specs


class StateRecorder:
    """Forward hooks that keep the outputs of the streams' modules during :meth:`recording`.

    A module called several times in one pass (a depformer projector shared by several steps) yields its
    outputs in call order, which is step order.
    """

    def __init__(self, model: nn.Module, specs: Sequence[StreamSpec]) -> None:
        self.model = model
        self.specs = list(specs)
        modules = dict(model.named_modules())
        missing = sorted({s.module for s in self.specs} - set(modules))
        if missing:
            raise ValueError(f"the model has no module(s) {missing} to record")
        self._modules = modules
        self._calls: dict[str, list[torch.Tensor]] = {}

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._calls.setdefault(name, []).append(output.detach())
        return hook

    @contextmanager
    def recording(self) -> Iterator[StateRecorder]:
        self._calls = {}
        handles = [self._modules[m].register_forward_hook(self._hook(m)) for m in {s.module for s in self.specs}]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def states(self) -> dict[str, torch.Tensor]:
        """``name -> [B, T, dim]`` of the last recorded pass."""
        out: dict[str, torch.Tensor] = {}
        used: dict[str, int] = {}
        for s in self.specs:
            calls = self._calls.get(s.module, [])
            if s.name == "alpha_fusion":
                out[s.name] = self.model.text_projector.alpha.detach() * calls[0]
                continue
            i = used.get(s.module, 0)
            if i >= len(calls):
                raise RuntimeError(f"module {s.module} ran {len(calls)} time(s); stream {s.name} found no output")
            out[s.name] = calls[i]
            if s.name.startswith("dep_proj."):
                used[s.module] = i + 1
        return out


@torch.no_grad()
def recorded_forward(model: nn.Module, recorder: StateRecorder, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """One teacher-forced pass of ``model`` on ``codes [B, K, T]``, returning the recorded streams."""
    with recorder.recording():
        model(codes)
        return recorder.states()


@dataclass
class BatchInfo:
    """Where the samples of a batch come from: file name and first frame of each sample."""

    index: int
    codes: torch.Tensor  # [B, K, T]
    files: list[str]
    start_frames: list[int]


def frame_rows(
    states: dict[str, torch.Tensor],
    batch: BatchInfo,
    file_index: Callable[[str], int],
    *,
    frame_rate: float,
    pad_id: int,
    epad_id: int,
    zero_id: int = -1,
    keep: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Flattens ``[B, T, dim]`` streams to rows of the valid frames, with the per-frame columns.

    A frame is valid when its text token and the model's first audio codebook are not the zero token.
    ``keep`` (bool ``[B, T]``) further selects frames (subsampling).
    """
    codes = batch.codes
    B, _, T = codes.shape
    text = codes[:, 0].cpu()
    valid = (text != zero_id) & (codes[:, 1].cpu() != zero_id)
    if keep is not None:
        valid &= keep.cpu()
    b_idx, t_idx = torch.nonzero(valid, as_tuple=True)
    files = torch.tensor([file_index(f) for f in batch.files], dtype=torch.int32)
    starts = torch.tensor(batch.start_frames, dtype=torch.int64)
    frame = starts[b_idx] + t_idx
    tokens = text[b_idx, t_idx]
    pad, epad = tokens == pad_id, tokens == epad_id
    rows = {
        "file": files[b_idx],
        "frame": frame.to(torch.int32),
        "time": (frame.to(torch.float64) / frame_rate).to(torch.float32),
        "text": tokens.to(torch.int64),
        "pad": pad.to(torch.uint8),
        "epad": epad.to(torch.uint8),
        "speech": (~pad & ~epad).to(torch.uint8),
    }
    for name, x in states.items():
        if x.shape[:2] != (B, T):
            raise RuntimeError(f"stream {name} has shape {tuple(x.shape)}, expected [{B}, {T}, ...]")
        rows[name] = x[b_idx.to(x.device), t_idx.to(x.device)]
    return rows


@dataclass
class Timing:
    plain_s: float = 0.0
    extract_s: float = 0.0
    write_s: float = 0.0
    batches: int = 0

    @property
    def overhead(self) -> float:
        """Extraction time over the plain forward time, minus 1 (0.05 = 5 % slower)."""
        return self.extract_s / self.plain_s - 1.0 if self.plain_s > 0 else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"plain_forward_s": self.plain_s, "extraction_s": self.extract_s, "write_s": self.write_s,
                "timed_batches": self.batches, "overhead": self.overhead}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extract(
    model: nn.Module,
    compute: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    batches: Iterable[BatchInfo],
    writer: ShardWriter,
    *,
    frame_rate: float,
    pad_id: int,
    epad_id: int,
    timed_batches: int = 0,
    keep: Callable[[BatchInfo], torch.Tensor] | None = None,
    extra_columns: Callable[[BatchInfo, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    progress: Callable[[Iterable[BatchInfo]], Iterable[BatchInfo]] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Timing:
    """Stores ``compute(codes)`` (``name -> [B, T, dim]``) for the valid frames of every batch not yet in
    ``writer``.

    For the first ``timed_batches`` new batches (after one untimed warm-up forward) a plain forward
    (``model(codes)``, no hooks) also runs on the same batch, so the extraction's cost (``compute`` plus moving
    the rows to the host in the storage dtype) can be compared with it; the disk writes are timed apart.

    Args:
        keep: selects frames of a batch (bool ``[B, T]``), e.g. a seeded subsample.
        extra_columns: more per-row columns from the batch and its rows (e.g. the held-out flag).
        on_batch: called with each batch index once the batch is handed to the writer.

    Raises:
        shards.BudgetReached: the size budget was reached (what was written stays valid).
    """
    device = next(model.parameters()).device
    timing = Timing()
    done = writer.done_batches
    todo = (b for b in batches if b.index not in done)
    for batch in progress(todo) if progress is not None else todo:
        batch = replace(batch, codes=batch.codes.to(device))
        timed = timing.batches < timed_batches
        if timed and timing.batches == 0:
            with torch.no_grad():  # untimed warm-up: first-call costs would be charged to the plain forward
                model(batch.codes)
        if timed:
            with torch.no_grad():
                _sync(device)
                t0 = time.perf_counter()
                model(batch.codes)
                _sync(device)
                timing.plain_s += time.perf_counter() - t0
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            states = compute(batch.codes)
        rows = frame_rows(states, batch, writer.file_index, frame_rate=frame_rate, pad_id=pad_id, epad_id=epad_id,
                          keep=None if keep is None else keep(batch))
        rows = {k: (v.to("cpu", writer.stream_dtype) if k in states else v) for k, v in rows.items()}
        t1 = time.perf_counter()
        if extra_columns is not None:
            rows.update(extra_columns(batch, rows))
        writer.add(batch.index, rows, list(states))
        t2 = time.perf_counter()
        if timed:
            timing.extract_s += t1 - t0
            timing.batches += 1
        timing.write_s += t2 - t1
        if on_batch is not None:
            on_batch(batch.index)
    return timing


def hidden_state_fn(model: nn.Module, specs: Sequence[StreamSpec]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """``codes -> streams`` by one hooked forward (the ``compute`` of :func:`extract`)."""
    recorder = StateRecorder(model, specs)
    return lambda codes: recorded_forward(model, recorder, codes)


def header_streams(specs: Sequence[StreamSpec]) -> dict[str, dict[str, Any]]:
    return {s.name: {"dim": s.dim, "module": s.module, "depends_on_training": s.depends_on_training}
            for s in specs}


# ----------------------------------------------------------------------------------------------------------------
# Batches of a training config


def config_batches(
    args: Any,
    tokenizer: Any,
    mimi: nn.Module,
    *,
    split: str = "eval",
    batch_size: int | None = None,
    max_batches: int | None = None,
    duration_sec: float | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    augment: bool = False,
) -> tuple[Iterator[BatchInfo], int, float]:
    """Finite, deterministic batches of the config's eval or train data through the training data pipeline.

    The chunks are the eval loader's (file order, no augmentation, rank ``r`` of ``W`` takes every ``W``-th
    chunk); ``split="train"`` reads ``data.train_data`` the same way. With ``augment`` the first
    ``max_batches`` batches of the training loader are used instead (its seeded order and ``data.aug``
    augmentations). Batch indices count per rank.

    Returns:
        ``(batches, number of batches, frame rate)``.
    """
    from finetune.data.dataset import build_codes_store, build_eval_loader, build_train_loader

    if split not in ("eval", "train"):
        raise ValueError(f"--split must be eval or train, got {split!r}")
    data = args.data
    if split == "train":
        data = replace(data, eval_data=data.train_data)
    changes: dict[str, Any] = {"data": data}
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if max_batches is not None:
        changes["eval_batches"] = max_batches * world_size
    if duration_sec is not None:
        changes["eval_duration_sec"] = duration_sec
    run_args = replace(args, **changes)
    store = build_codes_store(run_args, mimi, device=device)
    if augment:
        if split != "train":
            raise ValueError("--augment reads the training loader (data.train_data): use --split train")
        if max_batches is None:
            raise ValueError("--augment reads the endless training loader: give --max-batches")
        loader: Any = build_train_loader(run_args, tokenizer, store, rank, world_size)
        count = max_batches
    else:
        loader = build_eval_loader(run_args, tokenizer, store, rank, world_size)
        count = len(loader)

    def generate() -> Iterator[BatchInfo]:
        for i, batch in zip(range(count), loader):
            files, starts = [], []
            for src, chunk in zip(batch.source, batch.chunk):
                source = loader.sources[src]
                c = source.chunks[chunk]
                files.append(str(source.entries[c.file].path))
                starts.append(c.start_frame)
            yield BatchInfo(i, batch.codes, files, starts)

    return generate(), count, store.codec.frame_rate


def script_device(name: str) -> torch.device:
    """``--device``: auto/cpu/cuda pick ``cuda:LOCAL_RANK`` under torchrun; an explicit ``cuda:N`` is kept."""
    from finetune.distributed import select_device

    return select_device(name) if name in ("auto", "cpu", "cuda") else torch.device(name)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's ``RANK``/``WORLD_SIZE``; 0 and 1 alone)."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def load_for_analysis(
    config: str | Path, checkpoint: str | Path | None, device: torch.device, dtype: str | None
) -> tuple[Any, Any, Any]:
    """``(TrainArgs, LoadedModel, text tokenizer)`` of a training config and optionally one of its checkpoints.

    The tokenizer is the one the run's data pipeline uses (the model family's), so the text rows are the
    training ones.
    """
    from finetune.args import TrainArgs
    from finetune.model_build import resolve_checkpoint_info
    from finetune.model_family import model_family
    from finetune.model_loading import load_from_config

    args = TrainArgs.load(config)
    loaded = load_from_config(args, checkpoint, device=device, dtype=None if dtype == "auto" else dtype)
    tokenizer = model_family(args, resolve_checkpoint_info(args)).text_tokenizer(loaded.lm)
    return args, loaded, tokenizer


def run_trains_moshi(args: Any) -> bool:
    """Whether a Moshi run changes its model (LoRA or full fine-tuning)."""
    return bool(args.full_finetuning or (args.lora is not None and args.lora.enable))


def add_data_arguments(parser: argparse.ArgumentParser, split: str, store_dtype: str) -> None:
    """The data and storage options get_hidden_states.py and get_vectors.py share (see :func:`shard_writer`)."""
    parser.add_argument("config", type=Path, help="training YAML (model paths and data)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint of the run (default: the base model)")
    parser.add_argument("--split", default=split, choices=["eval", "train"], help="which data of the config")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's batch_size")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="batches per rank (default: the config's eval_batches over all ranks)")
    parser.add_argument("--duration-sec", type=float, default=None, help="chunk length (default: eval_duration_sec)")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="size of one shard")
    parser.add_argument("--budget-gb", type=float, default=50.0, help="cap on the shards of one rank")
    parser.add_argument("--store-dtype", default=store_dtype, help="float32, bfloat16 or float16")
    parser.add_argument("--timed-batches", type=int, default=4,
                        help="batches also run as a plain forward, to measure the extraction's cost")


def shard_writer(opts: argparse.Namespace, header: dict[str, Any], rank: int) -> ShardWriter:
    """The writer the options of :func:`add_data_arguments` ask for, in ``--out``."""
    from finetune.analysis.shards import storage_dtype

    return ShardWriter(opts.out, header, rank=rank, stream_dtype=storage_dtype(opts.store_dtype),
                       shard_bytes=int(opts.shard_mb * 2**20), budget_bytes=int(opts.budget_gb * 2**30))


def report_timing(timing: dict[str, float], rank: int) -> None:
    """Prints the extraction's cost next to the plain forward's on the same batches."""
    if timing["timed_batches"]:
        print(f"rank {rank}: plain forward {timing['plain_forward_s']:.3f} s, extraction "
              f"{timing['extraction_s']:.3f} s over the same {timing['timed_batches']} batch(es): "
              f"{100 * timing['overhead']:+.1f} %; writing shards {timing['write_s']:.3f} s", flush=True)


def run_extraction(
    loaded: Any,
    compute: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    batches: Iterable[BatchInfo],
    count: int,
    writer: ShardWriter,
    *,
    frame_rate: float,
    rank: int,
    timed_batches: int,
    desc: str,
    record: dict[str, Any],
    keep: Callable[[BatchInfo], torch.Tensor] | None = None,
    extra_columns: Callable[[BatchInfo, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """A script's whole extraction: progress bar, :func:`extract`, a clean stop at the budget, the manifest
    marked complete, ``extraction.rankR.json`` (timing, sources, ``record``) and the timing printed."""
    import sys

    from tqdm import tqdm

    from finetune.analysis.shards import BudgetReached
    from finetune.reporting import write_json

    model = loaded.lm
    bar = tqdm(total=count, initial=len(writer.done_batches), desc=f"{desc} (rank {rank})", unit="batch",
               disable=rank != 0)
    try:
        timing: Timing | None = extract(
            model, compute, batches, writer, frame_rate=frame_rate, pad_id=model.text_padding_token_id,
            epad_id=model.end_of_text_padding_id, timed_batches=timed_batches, keep=keep,
            extra_columns=extra_columns, on_batch=lambda _: bar.update())
    except BudgetReached as e:
        print(f"warning: {e}; stopping with what fits", file=sys.stderr)
        timing = None
    finally:
        bar.close()
    summary = timing.as_dict() if timing is not None else {}
    writer.finish(**summary)
    result = {"timing": summary, "device": str(loaded.device), "dtype": str(loaded.dtype),
              "sources": loaded.sources, "batches_stored": len(writer.done_batches), "batches_total": count, **record}
    write_json(writer.folder / f"extraction.rank{rank}.json", result)
    if timing is not None:
        report_timing(summary, rank)
    return result
