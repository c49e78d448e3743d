"""Transcribes the conversations of a manifest into word alignments with whisper-timestamped.

For each audio file of the manifest, the left channel (the model's voice) is transcribed
and `<name>.json` is written beside the audio (`{"alignments": [[word, [start, end],
"SPEAKER_MAIN"], ...]}`, seconds from the file start), atomically. A file that fails gets
`<name>.json.err` with the reason and is not retried unless `--rerun_errors`; files
already annotated are skipped, so an interrupted run simply resumes. The run ends with
a summary line (done / skipped / failed, files/s, audio seconds per second) and exits
non-zero when any file failed.

Usage:
    python annotate.py data.jsonl --local                       # this machine, one process
    python annotate.py data.jsonl --local --workers 4           # 4 processes share the files
    python annotate.py data.jsonl --shards 8 --shard-index 3    # shard 3 of 8 (your own scheduler)
    python annotate.py data.jsonl --shards 64 --partition gpu   # SLURM job array (submitit)

    --whisper_model medium|large-v3|path/to/model.pt   --lang en   --device auto|cpu|cuda
    --both-channels       also transcribe the right (user) channel, labelled --other_speaker
    --keep_silence_in_segments 1.0   seconds of silence kept around VAD segments (0: none)
    --beam_size 5 --best_of 5 --temperature 0,0.2,0.4,0.6,0.8,1.0   Whisper decoding

Relative paths in the manifest resolve against the manifest's folder (as in training).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import sys
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch

from finetune.cli import run_main
from finetune.data.alignments import MAIN_SPEAKER, AlignedWord, alignment_path_for, write_alignments
from finetune.data.audio import read_audio, resample
from finetune.data.manifest import read_manifest
from finetune.logging_utils import setup_logging
from moshi.utils.atomic import atomic_write_json, atomic_write_text

logger = logging.getLogger("annotate")

WHISPER_SAMPLE_RATE = 16_000
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
T = TypeVar("T")


@dataclass(frozen=True)
class AnnotateConfig:
    """Everything a worker needs to annotate a file (picklable: sent to worker processes and SLURM jobs)."""

    whisper_model: str = "medium"
    lang: str | None = "en"
    device: str = "auto"
    beam_size: int = 5  # <= 1: greedy
    best_of: int = 5  # <= 1: one sample per non-zero temperature
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    vad: str = "auditok"  # or "none"
    vad_min_duration: float = 10.0  # the VAD only runs on longer files
    keep_silence_in_segments: float = 1.0
    max_tokens: int | None = None  # Whisper's sample_len; None: its default
    both_channels: bool = False
    other_speaker: str = "SPEAKER_OTHER"
    rerun_errors: bool = False
    min_bytes: int = 1000
    max_duration: float = 4 * 3600.0
    threads: int | None = None  # torch CPU threads per process


@dataclass
class FileResult:
    path: str
    status: str  # "done" | "skipped" | "failed"
    reason: str = ""
    audio_sec: float = 0.0
    n_words: int = 0
    mono: bool = False  # only one channel: it was transcribed as the main speaker's


@dataclass
class Summary:
    """Counts of one run (or one shard); shards' summaries add up with `merge`."""

    done: int = 0
    failed: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason kind -> count
    audio_sec: float = 0.0
    elapsed: float = 0.0
    load_sec: float = 0.0  # model loading, excluded from the rates
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    mono_files: list[str] = field(default_factory=list)

    def add(self, r: FileResult) -> None:
        if r.status == "done":
            self.done += 1
            self.audio_sec += r.audio_sec
            if r.mono:
                self.mono_files.append(r.path)
        elif r.status == "failed":
            self.failed += 1
            self.audio_sec += r.audio_sec
            self.failures.append((r.path, r.reason))
        else:
            self.skipped[r.reason.split(" (")[0]] += 1
            self.skipped_files.append((r.path, r.reason))

    def merge(self, other: Summary) -> None:
        self.done += other.done
        self.failed += other.failed
        self.skipped.update(other.skipped)
        self.audio_sec += other.audio_sec
        self.load_sec = max(self.load_sec, other.load_sec)
        self.failures += other.failures
        self.skipped_files += other.skipped_files
        self.mono_files += other.mono_files

    @property
    def processed(self) -> int:
        return self.done + self.failed

    def line(self) -> str:
        n_skip = sum(self.skipped.values())
        why = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()))
        t = self.work_sec
        load = f" (model load {self.load_sec:.1f}s)" if self.load_sec else ""
        mono = (f" ({len(self.mono_files)} mono: channel 0, their only one, transcribed as {MAIN_SPEAKER}; "
                "training needs stereo)") if self.mono_files else ""
        return (
            f"annotate: {self.done} done{mono}, {n_skip} skipped{f' ({why})' if why else ''}, {self.failed} failed "
            f"in {self.elapsed:.1f}s{load}: {self.processed / t:.2f} files/s, {self.audio_sec / t:.2f} audio-s/s"
        )

    @property
    def work_sec(self) -> float:
        return max(self.elapsed - self.load_sec, 1e-9)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = dict(self.skipped)
        d["files_per_sec"] = self.processed / self.work_sec
        d["audio_sec_per_sec"] = self.audio_sec / self.work_sec
        return d


# ---------------------------------------------------------------- planning


def error_path_for(audio: str | os.PathLike) -> Path:
    """`a/b.wav` -> `a/b.json.err`: the failure marker (holds the reason)."""
    return alignment_path_for(audio).with_name(alignment_path_for(audio).name + ".err")


def shard_paths(paths: Sequence[T], num_shards: int, index: int) -> list[T]:
    """Shard `index` of `num_shards`: every `num_shards`-th path from `index` (disjoint, covering)."""
    if num_shards < 1:
        raise ValueError(f"--shards must be >= 1, got {num_shards}")
    if not 0 <= index < num_shards:
        raise ValueError(f"--shard-index must be in [0, {num_shards}), got {index}")
    return list(paths[index::num_shards])


def skip_reason(audio: Path, rerun_errors: bool = False, min_bytes: int = 1000) -> str | None:
    """Why `audio` needs no work now, or None. The text before ' (' is the summary's category."""
    if alignment_path_for(audio).exists():
        return "already done"
    if error_path_for(audio).exists() and not rerun_errors:
        return "failed before (.json.err exists; --rerun_errors retries)"
    try:
        size = audio.stat().st_size
    except OSError:
        return None  # reading it fails and leaves a .json.err naming the problem
    if size < min_bytes:
        return f"too small ({size} bytes < {min_bytes})"
    return None


# ---------------------------------------------------------------- whisper


def resolve_device(device: str) -> torch.device:
    """`auto`/`cpu`/`cuda` as everywhere in the toolkit (`select_device`), plus an explicit `cuda:N`."""
    from finetune.distributed import select_device

    try:
        if device in ("auto", "cpu", "cuda"):
            return select_device(device)
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: {e}") from e
    if dev.type != "cuda" or dev.index is None:
        raise ValueError(f"--device: unknown device {device!r} (auto, cpu, cuda, cuda:N)")
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: {torch.cuda.device_count()} CUDA device(s) visible here")
    return dev


class ModelNotFoundError(ValueError):
    """The Whisper model is neither a local file nor cached, and could not be downloaded."""


def load_whisper(cfg: AnnotateConfig) -> Any:
    import whisper_timestamped

    if cfg.whisper_model == "large-v3":
        logger.warning(
            "large-v3 tends to invent words over the long silences of a conversation channel; "
            "medium with the VAD is the usual choice for stereo dialogue"
        )
    device = resolve_device(cfg.device)
    logger.info("loading whisper %s on %s", cfg.whisper_model, device)
    try:
        return whisper_timestamped.load_model(cfg.whisper_model, device=device)
    except (OSError, RuntimeError, ValueError) as e:
        if Path(cfg.whisper_model).exists():
            raise  # a real file that does not load: its own error says why
        raise ModelNotFoundError(
            f"whisper model {cfg.whisper_model!r}: model not found locally; pass a path or a cached model name "
            f"(--whisper_model; fetching it failed: {type(e).__name__}: {e})"
        ) from None


def widen_segments(segments: list[dict], pad: float, total: float) -> list[dict]:
    """Adds `pad` before and after each VAD segment without overlapping the previous one.

    Segment i becomes [max(end of widened i-1, start - pad), min(total, end + pad)]
    (same unit as the input: samples or seconds; samples stay integers).
    """
    out: list[dict] = []
    prev_end: float = 0
    for seg in segments:
        start = max(prev_end, seg["start"] - pad)
        end = max(start, min(total, seg["end"] + pad))
        out.append({**seg, "start": start, "end": end})
        prev_end = end
    return out


@contextlib.contextmanager
def keep_silence_around_vad_segments(seconds: float) -> Iterator[None]:
    """Inside the block, whisper-timestamped's VAD keeps `seconds` of audio around each speech segment.

    The VAD cuts speech tightly and glues the pieces together, so Whisper hears words with
    no pause between them and word edges snap to the cuts; a little real silence around each
    segment gives it its context back. The module function is swapped only inside the block
    and always restored (not thread-safe: workers are processes).
    """
    if seconds <= 0:
        yield
        return
    module = importlib.import_module("whisper_timestamped.transcribe")
    original = module.get_vad_segments

    def widened(audio, *args, **kwargs):
        # whisper-timestamped's signature: (audio, sample_rate=16000, output_sample=False, ...)
        sr = kwargs.get("sample_rate", args[0] if len(args) > 0 else WHISPER_SAMPLE_RATE)
        in_samples = kwargs.get("output_sample", args[1] if len(args) > 1 else False)
        segments = original(audio, *args, **kwargs)
        n = audio.shape[-1]
        if in_samples:
            return widen_segments(segments, round(seconds * sr), n)
        return widen_segments(segments, seconds, n / sr)

    module.get_vad_segments = widened
    try:
        yield
    finally:
        module.get_vad_segments = original


def words_from_result(result: dict, duration: float, speaker: str, source: str = "") -> list[AlignedWord]:
    """Whisper-timestamped's output -> words, times clipped to [0, duration], sorted by start.

    Whisper decodes 30 s windows and may time a word past the end of a short file;
    words with no text are dropped; a word without times is an error.
    """
    words = []
    for i, seg in enumerate(result.get("segments", [])):
        if not seg.get("words"):
            logger.debug("%s: segment %d has no words (%r)", source, i, seg.get("text", ""))
            continue
        for w in seg["words"]:
            try:
                text, start, end = w["text"], float(w["start"]), float(w["end"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{source}: segment {i}: malformed word {w!r} from whisper ({e!r})") from e
            text = text.strip()
            if not text:
                continue
            start = min(max(start, 0.0), duration)
            end = min(max(end, start), duration)
            words.append(AlignedWord(text, start, end, speaker))
    words.sort(key=lambda w: w.start)
    return words


def transcribe_channel(model: Any, audio16k: torch.Tensor, cfg: AnnotateConfig, speaker: str, source: str = "") -> list[AlignedWord]:
    """Transcribes one mono 16 kHz channel `[N]` with the decoding options of `cfg`."""
    import whisper_timestamped

    duration = audio16k.shape[-1] / WHISPER_SAMPLE_RATE
    use_vad = cfg.vad != "none" and duration > cfg.vad_min_duration
    temperature: float | tuple[float, ...] = cfg.temperatures if len(cfg.temperatures) > 1 else cfg.temperatures[0]
    with keep_silence_around_vad_segments(cfg.keep_silence_in_segments if use_vad else 0.0):
        result = whisper_timestamped.transcribe(
            model,
            audio16k,
            language=cfg.lang,
            vad=cfg.vad if use_vad else None,
            beam_size=cfg.beam_size if cfg.beam_size > 1 else None,
            best_of=cfg.best_of if cfg.best_of > 1 else None,
            temperature=temperature,
            sample_len=cfg.max_tokens,
            verbose=None,
        )
    return words_from_result(result, duration, speaker, source)


def annotate_file(model: Any, audio: Path, cfg: AnnotateConfig) -> tuple[int, float, bool]:
    """Transcribes one file and writes its alignment JSON. Returns (words, audio seconds, mono)."""
    wav, sr = read_audio(audio)
    duration = wav.shape[-1] / sr
    if duration > cfg.max_duration:
        raise ValueError(f"{audio}: {duration / 3600:.1f} h long, over the {cfg.max_duration / 3600:.1f} h limit")
    mono = wav.shape[0] == 1
    if mono and not cfg.both_channels:
        logger.warning("%s is mono: its only channel is transcribed as %s; training needs stereo (left = model, "
                       "right = user)", audio, MAIN_SPEAKER)
    channels = [(0, MAIN_SPEAKER)]
    if cfg.both_channels:
        if wav.shape[0] < 2:
            raise ValueError(f"{audio}: has {wav.shape[0]} channel(s); --both-channels needs stereo")
        channels.append((1, cfg.other_speaker))
    words: list[AlignedWord] = []
    for ch, speaker in channels:
        x = resample(torch.from_numpy(wav[ch]), sr, WHISPER_SAMPLE_RATE)
        words += transcribe_channel(model, x, cfg, speaker, source=f"{audio} channel {ch}")
    words.sort(key=lambda w: w.start)  # stable: at equal starts, main speaker first
    write_alignments(alignment_path_for(audio), words)
    error_path_for(audio).unlink(missing_ok=True)
    return len(words), duration, mono


def _is_fatal(e: BaseException) -> bool:
    """Device failures end the run (the device may be unusable); anything else is the file's fault."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA error" in str(e)


def process_path(model: Any, audio: Path, cfg: AnnotateConfig) -> FileResult:
    """Annotates one file; a failure leaves `.json.err` with the exception and traceback."""
    try:
        n_words, duration, mono = annotate_file(model, audio, cfg)
    except Exception as e:
        if _is_fatal(e):
            raise
        logger.warning("%s: failed: %r", audio, e)
        try:
            atomic_write_text(error_path_for(audio), f"{e!r}\n\n{traceback.format_exc()}")
        except OSError as e2:
            logger.error("%s: cannot write the error marker: %r", audio, e2)
        return FileResult(str(audio), "failed", repr(e))
    finally:
        if model is not None and getattr(model, "device", torch.device("cpu")).type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    logger.debug("%s: %d words", audio, n_words)
    return FileResult(str(audio), "done", audio_sec=duration, n_words=n_words, mono=mono)


# ---------------------------------------------------------------- running


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


_WORKER: dict[str, Any] = {}


def _init_worker(cfg: AnnotateConfig, log_level: int) -> None:
    setup_logging(log_level, all_ranks=True)
    _set_threads(cfg.threads)
    _WORKER["model"] = load_whisper(cfg)
    _WORKER["cfg"] = cfg


def _worker_process(audio: str) -> FileResult:
    return process_path(_WORKER["model"], Path(audio), _WORKER["cfg"])


def run_files(
    paths: Sequence[Path], cfg: AnnotateConfig, workers: int = 1, progress: bool = True
) -> Summary:
    """Annotates `paths` here (one process, or `workers` processes pulling files one at a time)."""
    t0 = time.perf_counter()
    summary = Summary()
    todo = []
    for p in paths:
        reason = skip_reason(Path(p), cfg.rerun_errors, cfg.min_bytes)
        if reason is None:
            todo.append(Path(p))
        else:
            summary.add(FileResult(str(p), "skipped", reason))
            log = logger.warning if reason.startswith("too small") else logger.debug
            log("%s: skipped: %s", p, reason)
    logger.info("%d files: %d to annotate, %d skipped", len(paths), len(todo), len(paths) - len(todo))
    if todo:
        bar = _Progress(len(todo), progress)
        if workers <= 1:
            _set_threads(cfg.threads)
            t_load = time.perf_counter()
            model = load_whisper(cfg)
            summary.load_sec = time.perf_counter() - t_load
            bar.t0 = time.perf_counter()
            for p in todo:
                bar.update(process_path(model, p, cfg), summary)
        else:
            import multiprocessing as mp

            level = logging.getLogger().getEffectiveLevel()
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context("spawn"),
                initializer=_init_worker, initargs=(cfg, level),
            ) as pool:
                futures = [pool.submit(_worker_process, str(p)) for p in todo]
                for fut in as_completed(futures):
                    bar.update(fut.result(), summary)
        bar.close()
    summary.elapsed = time.perf_counter() - t0
    return summary


class _Progress:
    """A tqdm bar (files, ETA, audio speed) or, without a terminal, a log line every 100 files."""

    def __init__(self, total: int, use_bar: bool):
        self.total, self.n, self.t0, self.audio = total, 0, time.perf_counter(), 0.0
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="annotate", unit="file", dynamic_ncols=True)

    def update(self, r: FileResult, summary: Summary) -> None:
        summary.add(r)
        self.n += 1
        self.audio += r.audio_sec
        dt = max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(audio_x=f"{self.audio / dt:.1f}", failed=summary.failed, refresh=False)
            self.bar.update(1)
        elif self.n % 100 == 0 or self.n == self.total:
            eta = (self.total - self.n) * dt / self.n
            logger.info("%d/%d files, %.2f files/s, ETA %.0f s", self.n, self.total, self.n / dt, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_shard(manifest: str, index: int, num_shards: int, cfg: AnnotateConfig, workers: int = 1,
              progress: bool = True) -> Summary:
    """One shard of a manifest: what a SLURM job, or `--shard-index`, runs."""
    paths = [e.path for e in read_manifest(manifest, require_duration=False)]
    mine = shard_paths(paths, num_shards, index)
    logger.info("shard %d/%d: %d of %d files", index, num_shards, len(mine), len(paths))
    return run_files(mine, cfg, workers=workers, progress=progress)


def _slurm_job(manifest: str, index: int, num_shards: int, cfg: AnnotateConfig) -> Summary:
    setup_logging(logging.INFO, all_ranks=True)
    return run_shard(manifest, index, num_shards, cfg, progress=False)


def run_slurm(manifest: str, cfg: AnnotateConfig, num_shards: int, log_folder: str, partition: str,
              cluster: str | None = None, poll_sec: float = 10.0) -> Summary:
    """Submits one array job per shard through submitit and waits for all of them."""
    try:
        import submitit
    except ImportError as e:
        raise RuntimeError("SLURM mode needs submitit (pip install submitit), or run with --local") from e
    t0 = time.perf_counter()
    executor = submitit.AutoExecutor(folder=log_folder, cluster=cluster)
    executor.update_parameters(
        name="annotate", timeout_min=14400, tasks_per_node=1, cpus_per_task=6,
        gpus_per_node=0 if cfg.device == "cpu" else 1,
        slurm_partition=partition or None, slurm_array_parallelism=1000,
        slurm_signal_delay_s=30, slurm_stderr_to_stdout=True,
    )
    n = num_shards
    jobs = executor.map_array(_slurm_job, [manifest] * n, list(range(n)), [n] * n, [cfg] * n)
    print(f"Job id: {jobs[0].job_id}", flush=True)
    while True:
        n_done = sum(j.done() for j in jobs)
        print(f"{n_done:4d} / {n:4d} jobs done.", flush=True)
        if n_done == n:
            break
        time.sleep(poll_sec)
    summary = Summary()
    for i, job in enumerate(jobs):
        try:
            summary.merge(job.result())
        except Exception as e:  # the whole shard died: its files stay un-annotated
            logger.error("shard %d (job %s) failed: %r", i, job.job_id, e)
            summary.failures.append((f"<shard {i}>", repr(e)))
            summary.failed += 1
    summary.load_sec = 0.0  # jobs load in parallel: rates are over the whole wall time
    summary.elapsed = time.perf_counter() - t0
    return summary


# ---------------------------------------------------------------- command line


def _both(name: str) -> list[str]:
    """`--a_b` and `--a-b` for one option: the underscore spelling keeps older command lines working."""
    spellings = [f"--{name}", f"--{name.replace('_', '-')}"]
    return list(dict.fromkeys(spellings))


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"temperatures must be >= 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="manifest .jsonl (or .jsonl.gz); only 'path' is read")
    p.add_argument(*_both("log_folder"), default=str(Path("~/tmp/mass_annotate").expanduser()),
                   help="submitit log folder (SLURM mode)")
    p.add_argument("-S", "--shards", type=int, default=1, help="number of shards (SLURM jobs)")
    p.add_argument(*_both("shard_index"), type=int, default=None,
                   help="run only this shard here (0-based), e.g. from your own job scheduler")
    p.add_argument("-l", "--local", action="store_true", help="run here instead of submitting SLURM jobs")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (each loads the model)")
    p.add_argument("--partition", default="", help="SLURM partition")
    p.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submitit cluster (default: detect); 'debug' runs the jobs in this process")
    p.add_argument("--lang", default="en", help="forced Whisper language ('auto': detect)")
    p.add_argument(*_both("whisper_model"), default="medium", help="Whisper model name or local checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument(*_both("rerun_errors"), action="store_true", help="retry files that have a .json.err")
    p.add_argument(*_both("keep_silence_in_segments"), type=float, default=1.0,
                   help="seconds of silence kept around each VAD speech segment (0: none)")
    p.add_argument("--vad", default="auditok", choices=["auditok", "silero", "none"],
                   help="VAD applied to files longer than --vad_min_duration")
    p.add_argument(*_both("vad_min_duration"), type=float, default=10.0)
    p.add_argument(*_both("beam_size"), "--beam", type=int, default=5, help="beam size (1: greedy)")
    p.add_argument(*_both("best_of"), type=int, default=5, help="samples per non-zero temperature")
    p.add_argument("--temperature", type=_temperatures, default=DEFAULT_TEMPERATURES,
                   help="temperature fallback list, e.g. 0,0.2,0.4 (one value: no fallback)")
    p.add_argument(*_both("max_tokens"), type=int, default=None, help="cap on tokens per 30 s window")
    p.add_argument(*_both("both_channels"), action="store_true",
                   help="also transcribe the right (user) channel, labelled --other_speaker")
    p.add_argument(*_both("other_speaker"), default="SPEAKER_OTHER", help="label of the user channel's words")
    p.add_argument(*_both("summary_json"), default=None, help="also write the summary as JSON here")
    p.add_argument(*_both("no_progress"), action="store_true", help="log lines instead of a progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config_from_args(args: argparse.Namespace) -> AnnotateConfig:
    if args.keep_silence_in_segments < 0:
        raise ValueError(f"--keep_silence_in_segments must be >= 0 seconds, got {args.keep_silence_in_segments}")
    if args.other_speaker == MAIN_SPEAKER:
        raise ValueError(f"--other_speaker must differ from {MAIN_SPEAKER!r}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    resolve_device(args.device)  # fail now on a bad name, not in every file
    if args.vad == "auditok":
        try:
            importlib.import_module("auditok")
        except ImportError:
            raise ValueError("--vad auditok needs the auditok package (pip install auditok), or --vad none") from None
    threads = args.threads
    if threads is None and args.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    return AnnotateConfig(
        whisper_model=args.whisper_model, lang=None if args.lang == "auto" else args.lang, device=args.device,
        beam_size=args.beam_size, best_of=args.best_of, temperatures=args.temperature, vad=args.vad,
        vad_min_duration=args.vad_min_duration, keep_silence_in_segments=args.keep_silence_in_segments,
        max_tokens=args.max_tokens, both_channels=args.both_channels, other_speaker=args.other_speaker,
        rerun_errors=args.rerun_errors, threads=threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    cfg = config_from_args(args)
    manifest = str(Path(args.manifest).resolve())
    read_manifest(manifest, require_duration=False)  # malformed lines fail here, before any job starts
    if args.local or args.shard_index is not None:
        index, shards = (args.shard_index, args.shards) if args.shard_index is not None else (0, 1)
        summary = run_shard(manifest, index, shards, cfg, workers=args.workers,
                            progress=not args.no_progress)
    else:
        if args.workers > 1:
            raise ValueError("--workers is for local runs: add --local (or --shard-index)")
        summary = run_slurm(manifest, cfg, args.shards, args.log_folder, args.partition, args.cluster)
    print(summary.line(), flush=True)
    for path in summary.mono_files:
        logger.warning("mono, channel 0 transcribed: %s", path)
    for path, reason in summary.failures[:20]:
        logger.error("failed: %s: %s", path, reason)
    if args.summary_json:
        atomic_write_json(args.summary_json, summary.to_json(), indent=2)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
