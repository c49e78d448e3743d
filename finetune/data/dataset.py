"""Training and eval batches: manifest -> chunks -> (Mimi codes, cached) + text row -> `Batch`.

The flow for one batch: each sampler (one per source, per rank) hands out chunk
indices; the files of the batch get their codes from the `CodesStore` (memory, disk
cache, or one batched Mimi call for the missing ones); every chunk is cut from its
file's codes at frame 12.5*offset; the interleaver writes its text row from the file's
alignments (loaded once per file); code augmentations run last.

Ordering (one rule for every rank): an epoch of a source is a permutation of all its
chunks (seeded by seed, source, epoch when `data.shuffle`, else file order); rank r of
W takes positions r, r+W, ... . The permutation spans the whole source, not each manifest,
so chunks of different manifests mix within an epoch. Several sources in one stage are
mixed per sample with a generator seeded by (seed, rank, stage); a merged DSAA group is
mixed per batch.

`TrainLoader` is infinite and `Stateful` (`state_dict`/`load_state_dict`: batches and
samples produced, each sampler's epoch and position, the mixing generators), so a
resumed run continues with exactly the batches the uninterrupted run would have seen.
`EvalLoader` is finite and yields the same batches at every evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from finetune.args import AugArgs, TrainArgs
from finetune.data.alignments import AlignedWord, AlignmentError, alignment_path_for, load_alignments
from finetune.data.augment import apply_wave_plan, augment_codes, draw_wave_plan, sample_rng
from finetune.data.chunks import Chunk, num_frames, plan_chunks
from finetune.data.codes_cache import AudioCodec, CodesStore, FileCodes, read_stereo
from finetune.data.interleaver import Interleaver, InterleaverStats
from finetune.data.manifest import ManifestEntry, read_manifest
from finetune.data.scan import (
    LineProblem,
    ScanOptions,
    describe_duplicates,
    duplicate_lines,
    format_problems,
    scan_entries,
)
from finetune.data.sources import Source, parse_sources
from finetune.data.text_tokenizer import TextTokenizer
from finetune.logging_utils import log_main, rank

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class DataError(ValueError):
    """The dataset cannot produce batches (empty, too small for the ranks, missing files)."""


@dataclass
class Batch:
    """`codes [B, 1 + 2 n_q, T]` int64: row 0 text, then the model's n_q audio rows, then the user's."""

    codes: torch.Tensor
    stats: InterleaverStats = field(default_factory=InterleaverStats)
    source: list[int] = field(default_factory=list)  # source index of each sample
    chunk: list[int] = field(default_factory=list)  # chunk index (in its source's plan) of each sample

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(self.codes.to(device, non_blocking=non_blocking), self.stats, self.source, self.chunk)


# ----------------------------------------------------------------------------- sources


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A data warning, on rank 0, once per process (the pre-flight check and the loader read the same sources)."""
    if rank() == 0 and message not in _WARNED:
        _WARNED.add(message)
        logger.warning("%s", message)


class SourceData:
    """One source's manifest entries, chunk plan and (lazily, once per file) alignments.

    With `scan` (the default), every line is checked up front (`finetune.data.scan`): unusable lines
    raise one `DataError` listing them all, or are left out and counted with `skip_bad_files`.
    Lines naming the same audio file twice are trained on as written, with a warning.
    """

    def __init__(self, source: Source, chunk_sec: float, frame_rate: float = 12.5,
                 scan: ScanOptions | None = ScanOptions()):
        self.source = source
        self.name = source.spec
        self.entries: list[ManifestEntry] = [e for m in source.manifests for e in read_manifest(m)]
        if not self.entries:
            raise DataError(f"source {source.spec!r} has no manifest lines ({', '.join(map(str, source.manifests))})")
        for group in duplicate_lines(self.entries):
            _warn_once(f"source {self.name!r}: {describe_duplicates(group)}; every line is trained on")
        self.skipped: list[LineProblem] = []
        if scan is not None:
            self._scan(scan)
        self.chunks: list[Chunk] = plan_chunks(self.entries, chunk_sec, frame_rate)
        self._words: dict[int, tuple[list[AlignedWord], list[float]]] = {}
        self.unsorted_files = 0

    def _scan(self, opts: ScanOptions) -> None:
        problems = scan_entries(self.entries, opts)
        if not problems:
            return
        if not opts.skip_bad_files:
            raise DataError(
                f"source {self.name!r}: {len(problems)} problem(s) in {len({p.where for p in problems})} manifest "
                f"line(s):\n{format_problems(problems)}\n(fix or remove these lines, or set "
                "data.skip_bad_files: true to train without them; python -m finetune.data.check lists every issue)"
            )
        bad = {p.where for p in problems}
        self.skipped = problems
        self.entries = [e for e in self.entries if e.where not in bad]
        _warn_once(f"source {self.name!r}: skipping {len(bad)} bad manifest line(s) (data.skip_bad_files):\n"
                   f"{format_problems(problems)}")
        if not self.entries:
            raise DataError(f"source {self.name!r}: every manifest line is unusable:\n{format_problems(problems)}")

    def words(self, file: int) -> tuple[list[AlignedWord], list[float]]:
        got = self._words.get(file)
        if got is None:
            e = self.entries[file]
            report: dict[str, Any] = {}
            try:
                words = load_alignments(alignment_path_for(e.path), e.duration, report=report)
            except AlignmentError as err:
                raise AlignmentError(f"{err} (audio {e.path}, {e.where})") from None
            if not report.get("was_sorted", True):
                self.unsorted_files += 1
                logger.warning("alignments of %s were not sorted by start time; sorted on load", e.path)
            got = (words, [w.start for w in words])
            self._words[file] = got
        return got


def load_sources(spec: str, key: str, chunk_sec: float, frame_rate: float = 12.5,
                 scan: ScanOptions | None = ScanOptions()) -> list[SourceData]:
    return [SourceData(s, chunk_sec, frame_rate, scan) for s in parse_sources(spec, key=key)]


def scan_options(args: TrainArgs) -> ScanOptions:
    """The data scan a run's config asks for."""
    return ScanOptions(args.data.cache_dir, args.data.duration_tolerance_sec, args.data.skip_bad_files)


# ----------------------------------------------------------------------------- samplers


class ChunkSampler:
    """Infinite, sharded, seeded order over one source's chunks (Stateful)."""

    def __init__(self, num_chunks: int, name: str, seed: int, source_index: int, rank: int, world_size: int,
                 shuffle: bool):
        if num_chunks < world_size:
            raise DataError(
                f"source {name!r} has {num_chunks} chunk(s), fewer than the {world_size} ranks: "
                f"rank(s) {num_chunks}..{world_size - 1} would get no data (add data or use fewer GPUs)"
            )
        self.num_chunks, self.name = num_chunks, name
        self.seed, self.source_index, self.rank, self.world_size = seed, source_index, rank, world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.source_index, self.epoch, 0x5EED])
            order = rng.permutation(self.num_chunks)
        else:
            order = np.arange(self.num_chunks)
        return order[self.rank :: self.world_size]

    def next(self) -> int:
        if self.pos >= len(self._order):
            self.epoch += 1
            self.pos = 0
            self._order = self._epoch_order()
            logger.info("rank %d: source %r starts epoch %d", self.rank, self.name, self.epoch)
        idx = int(self._order[self.pos])
        self.pos += 1
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "num_chunks": self.num_chunks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_chunks"] != self.num_chunks:
            raise DataError(f"cannot resume source {self.name!r}: it had {state['num_chunks']} chunks, "
                            f"now {self.num_chunks} (the data changed)")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order()


# ----------------------------------------------------------------------------- samples


class SampleBuilder:
    """Chunks -> `[B, 1 + 2 n_q, T]` codes (text row + audio rows), with augmentation."""

    def __init__(self, store: CodesStore, interleaver: Interleaver, duration_sec: float,
                 aug: AugArgs | None = None, seed: int = 0, rank: int = 0):
        self.store = store
        self.codec: AudioCodec = store.codec
        self.interleaver = interleaver
        self.duration_sec = float(duration_sec)
        self.T = num_frames(duration_sec, self.codec.frame_rate)
        self.nq = self.codec.num_codebooks
        self.aug = aug if aug is not None and (aug.any_wave or aug.any_codes) else None
        self.seed, self.rank = seed, rank
        self.skipped_empty = 0

    def real_frames(self, fc: FileCodes, chunk: Chunk) -> int:
        return max(0, min(self.T, fc.num_frames - chunk.start_frame))

    def build(self, items: Sequence[tuple[SourceData, Chunk, int]]) -> tuple[torch.Tensor, InterleaverStats]:
        """`items` = (source, chunk, sample index); the sample index seeds the augmentation."""
        stats = InterleaverStats()
        rngs = [sample_rng(self.seed, self.rank, i) if self.aug else None for _, _, i in items]
        plans = [draw_wave_plan(self.aug, r) if self.aug and self.aug.any_wave else None for r in rngs]
        wave_idx = [k for k, p in enumerate(plans) if p is not None and p.active]
        augmented = set(wave_idx)
        plain_idx = [k for k in range(len(items)) if k not in augmented]
        out = np.full((len(items), 1 + 2 * self.nq, self.T), -1, dtype=np.int64)

        file_codes = self.store.get_many([items[k][0].entries[items[k][1].file] for k in plain_idx])
        for k, fc in zip(plain_idx, file_codes):
            src, chunk, _ = items[k]
            real = self.real_frames(fc, chunk)
            if real == 0:
                self.skipped_empty += 1
                logger.warning("chunk %s starts after the end of its audio (%.2fs): the manifest duration "
                               "is wrong; the sample is all -1", chunk.where(src.entries), fc.num_samples
                               / self.codec.sample_rate)
            audio = fc.codes[:, :, chunk.start_frame : chunk.start_frame + real]
            out[k, 1:, :real] = audio.reshape(2 * self.nq, real).numpy()
            words, starts = src.words(chunk.file)
            out[k, 0] = self.interleaver.build(words, chunk.offset_sec, self.duration_sec, self.T, real, starts,
                                               stats)
        if wave_idx:
            self._build_augmented(items, plans, wave_idx, out, stats)
        if self.aug is not None and self.aug.any_codes:
            for k, r in enumerate(rngs):
                augment_codes(out[k], self.aug, r, self.nq, self.interleaver.pad_id, self.interleaver.epad_id)
        return torch.from_numpy(out), stats

    def _build_augmented(self, items, plans, idx, out, stats) -> None:
        """Chunks with wave effects: read, augment, encode together (no cache)."""
        sr = self.codec.sample_rate
        n_out = round(self.duration_sec * sr)
        waves = []
        for k in idx:
            src, chunk, _ = items[k]
            e = src.entries[chunk.file]
            factor = max(1.0, plans[k].read_factor())
            wav = read_stereo(e.path, sr, start_sec=chunk.offset_sec, duration_sec=self.duration_sec * factor,
                              where=e.where)
            # real audio (of the model channel) after the effects: shorter at the end of a file
            model_speed = plans[k].speed if plans[k].speed is not None and 0 in plans[k].channels else 1.0
            real = max(1, min(n_out, int(wav.shape[-1] / model_speed)))
            waves.append(apply_wave_plan(wav, plans[k], n_out, sr)[:, :real])
        codes = self.codec.encode_stereo(waves)
        for k, c in zip(idx, codes):
            src, chunk, _ = items[k]
            real = min(self.T, c.shape[-1])
            out[k, 1:, :real] = c[:, :, :real].reshape(2 * self.nq, real).numpy()
            words, starts = src.words(chunk.file)
            plan = plans[k]
            if plan.speed is not None and 0 in plan.channels:  # the model's audio is faster: move its words
                o = chunk.offset_sec
                words = [AlignedWord(w.text, o + (w.start - o) / plan.speed, o + (w.end - o) / plan.speed,
                                     w.speaker) for w in words]
                starts = [w.start for w in words]
            out[k, 0] = self.interleaver.build(words, chunk.offset_sec, self.duration_sec, self.T, real, starts,
                                               stats)


# ----------------------------------------------------------------------------- loaders


@dataclass
class Stage:
    """A run stage: which sources, their mixing probabilities, how many batches it lasts."""

    name: str
    sources: list[int]
    probs: list[float]
    steps: int
    per_batch: bool  # mix sources per batch (merged group) or per sample (weighted mixing)


def plan_stages(args: TrainArgs, sources: Sequence[SourceData]) -> list[Stage]:
    """Stages from `max_steps` / `data.merge_group` (see `finetune.args` for the two meanings)."""
    steps = args.stage_steps
    if not args.uses_stages:
        return [Stage("all", list(range(len(sources))), [s.source.weight for s in sources], steps[0], False)]
    if len(steps) != len(sources):  # validate() catches this for configs; keep builders safe too
        raise DataError(f"max_steps lists {len(steps)} stages but data.train_data has {len(sources)} sources")
    names = [s.name for s in sources]
    group = [names.index(g) for g in args.data.merge_group]
    stages = []
    if group:
        total = sum(steps[i] for i in group)
        stages.append(Stage("merged:" + "+".join(names[i] for i in group), group,
                            [steps[i] / total for i in group], total, True))
    stages += [Stage(names[i], [i], [1.0], steps[i], False) for i in range(len(sources)) if i not in group]
    return stages


class TrainLoader:
    """Infinite iterator of training `Batch`es over the stages; `Stateful` for exact resume.

    Stage k lasts `steps_k * num_microbatches` batches; after the last stage, the last
    stage continues. `stage` is the index of the stage of the next batch.
    """

    def __init__(self, sources: list[SourceData], stages: list[Stage], builder: SampleBuilder, batch_size: int,
                 num_microbatches: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, log_every: int = 100):
        self.sources, self.stages, self.builder = sources, stages, builder
        self.batch_size, self.num_microbatches = batch_size, num_microbatches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.log_every = log_every
        self.samplers = [ChunkSampler(len(s.chunks), s.name, seed, i, rank, world_size, shuffle)
                         for i, s in enumerate(sources)]
        self.mix_rngs = [np.random.default_rng([seed, rank, k, 0x31C]) for k in range(len(stages))]
        self.batches = 0
        self.samples = 0
        self.stats = InterleaverStats()  # cumulative since start (or resume)
        self._bounds = np.cumsum([st.steps * num_microbatches for st in stages])

    @property
    def stage(self) -> int:
        return int(min(np.searchsorted(self._bounds, self.batches, side="right"), len(self.stages) - 1))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def _next_chunk(self, src: int) -> int:
        self.samples += 1
        return self.samplers[src].next()

    def __next__(self) -> Batch:
        k = self.stage
        st = self.stages[k]
        rng = self.mix_rngs[k]

        def pick() -> int:
            if len(st.sources) == 1:
                return st.sources[0]
            return st.sources[int(rng.choice(len(st.sources), p=st.probs))]

        batch_src = pick() if st.per_batch else None
        chosen = [batch_src if batch_src is not None else pick() for _ in range(self.batch_size)]
        first = self.samples
        ids = [self._next_chunk(s) for s in chosen]
        items = [(self.sources[s], self.sources[s].chunks[c], first + j) for j, (s, c) in enumerate(zip(chosen, ids))]
        codes, stats = self.builder.build(items)
        self.batches += 1
        self.stats.add(stats)
        if self.log_every and self.batches % self.log_every == 0:
            store = self.builder.store
            log_main(logger, "data: %d batches, stage %s; %s; codes: %d encoded, %d disk hits, %d Mimi calls",
                     self.batches, st.name, self.stats.summary(), store.encoded_files, store.hits_disk,
                     store.codec.calls)
        return Batch(codes, stats, chosen, ids)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "batches": self.batches,
            "samples": self.samples,
            "samplers": [s.state_dict() for s in self.samplers],
            "mix_rngs": [r.bit_generator.state for r in self.mix_rngs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("world_size", "batch_size", "rank"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"cannot resume the data loader: {key} was {state.get(key)}, "
                                f"now {getattr(self, key)}")
        if len(state["samplers"]) != len(self.samplers) or len(state["mix_rngs"]) != len(self.mix_rngs):
            raise DataError("cannot resume the data loader: the sources or stages changed")
        for s, ss in zip(self.samplers, state["samplers"]):
            s.load_state_dict(ss)
        for r, rs in zip(self.mix_rngs, state["mix_rngs"]):
            r.bit_generator.state = rs
        self.batches = int(state["batches"])
        self.samples = int(state["samples"])


class EvalLoader:
    """Finite, deterministic eval batches: the same list at every evaluation, equal count on every rank.

    Chunks of all eval sources (weights ignored) in file order; rank r takes r, r+W, ...;
    every rank yields `num_batches` = min(`eval_batches` // W (at least 1), what the
    smallest shard allows), so collective forward passes (FSDP) stay in step.
    """

    def __init__(self, sources: list[SourceData], builder: SampleBuilder, batch_size: int, max_batches: int,
                 rank: int = 0, world_size: int = 1):
        self.sources, self.builder, self.batch_size = sources, builder, batch_size
        refs = [(i, c) for i, s in enumerate(sources) for c in range(len(s.chunks))]
        per_rank = len(refs) // world_size
        self.num_batches = min(per_rank // batch_size, max(1, max_batches // world_size))
        if self.num_batches < 1:
            raise DataError(
                f"eval data has {len(refs)} chunk(s) of {builder.duration_sec}s: not enough for one batch of "
                f"{batch_size} on each of {world_size} rank(s) (add eval data or lower eval_duration_sec)"
            )
        self.refs = refs[rank::world_size][: self.num_batches * batch_size]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        B = self.batch_size
        for b in range(self.num_batches):
            part = self.refs[b * B : (b + 1) * B]
            items = [(self.sources[i], self.sources[i].chunks[c], j) for j, (i, c) in enumerate(part)]
            codes, stats = self.builder.build(items)
            yield Batch(codes, stats, [i for i, _ in part], [c for _, c in part])


# ----------------------------------------------------------------------------- builders


def build_codes_store(args: TrainArgs, mimi: Any, device: torch.device | str | None = None,
                      encoder_id: str | None = None) -> CodesStore:
    """The codes store of a run: Mimi (already set to the LM's number of codebooks), `data.cache_dir`."""
    return CodesStore(AudioCodec(mimi, device=device), args.data.cache_dir, encoder_id=encoder_id)


def build_train_loader(args: TrainArgs, tokenizer: TextTokenizer, store: CodesStore, rank: int = 0,
                       world_size: int = 1, log_every: int = 100) -> TrainLoader:
    """The training iterator of a run (infinite, Stateful). Raises `DataError` on unusable data."""
    fr = store.codec.frame_rate
    sources = load_sources(args.data.train_data, "data.train_data", args.duration_sec, fr, scan_options(args))
    stages = plan_stages(args, sources)
    builder = SampleBuilder(store, Interleaver(tokenizer, fr), args.duration_sec, args.data.aug, args.seed, rank)
    loader = TrainLoader(sources, stages, builder, args.batch_size, args.num_microbatches, args.seed, rank,
                         world_size, args.data.shuffle, log_every)
    n = sum(len(s.chunks) for s in sources)
    log_main(logger, "train data: %d source(s), %d files, %d chunks of %.1fs, %d stage(s): %s", len(sources),
             sum(len(s.entries) for s in sources), n, args.duration_sec, len(stages),
             ", ".join(f"{st.name} ({st.steps} steps)" for st in stages))
    return loader


def build_eval_loader(args: TrainArgs, tokenizer: TextTokenizer, store: CodesStore, rank: int = 0,
                      world_size: int = 1) -> EvalLoader:
    """The eval batches (chunks of `eval_duration_sec`, no augmentation, `eval_batches` over all ranks)."""
    if not args.data.eval_data.strip():
        raise DataError("data.eval_data is empty (needed by do_eval)")
    fr = store.codec.frame_rate
    sources = load_sources(args.data.eval_data, "data.eval_data", args.eval_duration_sec, fr, scan_options(args))
    builder = SampleBuilder(store, Interleaver(tokenizer, fr), args.eval_duration_sec, None, args.seed, rank)
    return EvalLoader(sources, builder, args.batch_size, args.eval_batches, rank, world_size)


def all_entries(sources: Sequence[SourceData]) -> list[ManifestEntry]:
    """Every distinct audio file of the sources (first occurrence order)."""
    seen: set[Path] = set()
    out = []
    for s in sources:
        for e in s.entries:
            if e.path not in seen:
                seen.add(e.path)
                out.append(e)
    return out

