"""Repairs Whisper word timings whose start is too early.

Whisper(-timestamped) often starts the first word of a segment at the end of the
previous segment, so the word's span swallows the silence before it: "hello" lasting
3 s. Training then places the word's text tokens seconds before it is spoken. Two
repairs, both of which only ever move a start *later* (ends are kept):

* with the audio (`--audio`): within the word's [start, end], find where the word's
  channel first rises above its noise floor (frame RMS in dB) and move the start there
  when that skips at least `--min-shift` seconds of silence;
* always: a word longer than `--max-base-sec + --max-sec-per-char * len(word)` gets
  its start moved to `end - that maximum`.

The left channel holds `SPEAKER_MAIN` words, the right channel every other label.

Usage:
    python scripts/fix_alignments.py data.jsonl --audio                # in place, backups as .json.bak
    python scripts/fix_alignments.py data.jsonl --audio --out fixed/   # fixed copies under fixed/
    python scripts/fix_alignments.py some/dir/ a.json --dry-run        # report only

Inputs are manifests (.jsonl, .jsonl.gz: the .json beside each audio), alignment .json
files or folders (searched recursively for .json). A summary (`fix_alignments_summary.json`)
and a histogram of the shifts (`fix_alignments_shifts.png`) go to `--report-dir`
(default: `--out`, else `./fix_alignments_report`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from finetune.data.alignments import (
    MAIN_SPEAKER,
    AlignedWord,
    AlignmentError,
    alignment_path_for,
    parse_alignments,
    write_alignments,
)
from finetune.data.audio import AudioReadError, frame_rms_db, read_audio
from finetune.data.manifest import read_manifest
from moshi.utils.atomic import atomic_write_json

logger = logging.getLogger("fix_alignments")

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")


@dataclass(frozen=True)
class FixOptions:
    max_base_sec: float = 0.5  # a word may last this long ...
    max_sec_per_char: float = 0.2  # ... plus this much per character
    frame_sec: float = 0.01  # energy frame
    margin_db: float = 12.0  # speech = this far above the channel's noise floor ...
    min_level_db: float = -55.0  # ... and at least this loud (dBFS)
    noise_percentile: float = 10.0  # the noise floor is this percentile of the frame levels
    min_shift_sec: float = 0.1  # silence shorter than this at a word's start is left alone
    pre_roll_sec: float = 0.02  # the new start sits this much before the detected onset


@dataclass(frozen=True)
class Shift:
    """One moved word: `new_start - old_start` seconds, and which repair moved it."""

    index: int
    text: str
    speaker: str
    old_start: float
    new_start: float
    reason: str  # "onset", "duration" or "onset+duration"

    @property
    def seconds(self) -> float:
        return self.new_start - self.old_start


@dataclass(frozen=True)
class ChannelLevels:
    """Frame levels of one file's channels, computed once and shared by its words."""

    db: np.ndarray  # [channels, frames], dBFS
    frame_sec: float
    threshold_db: np.ndarray  # [channels]: level above which a frame counts as speech
    duration: float

    @classmethod
    def from_audio(cls, wav: np.ndarray, sample_rate: int, opts: FixOptions) -> ChannelLevels:
        db = frame_rms_db(wav, sample_rate, opts.frame_sec)
        floor = np.percentile(db, opts.noise_percentile, axis=-1)
        threshold = np.maximum(floor + opts.margin_db, opts.min_level_db)
        return cls(db, opts.frame_sec, threshold, wav.shape[-1] / sample_rate)


def max_plausible_duration(text: str, opts: FixOptions) -> float:
    return opts.max_base_sec + opts.max_sec_per_char * len(text.strip())


def channel_for(speaker: str, n_channels: int) -> int:
    """Left channel for the main speaker, right channel for anyone else (left if mono)."""
    return 0 if speaker == MAIN_SPEAKER or n_channels < 2 else 1


def speech_onset(db: np.ndarray, frame_sec: float, start: float, end: float, threshold_db: float) -> float | None:
    """Time of the first frame within [start, end) whose level reaches `threshold_db`, or None."""
    i0 = max(0, int(np.floor(start / frame_sec)))
    i1 = min(len(db), int(np.ceil(end / frame_sec)))
    loud = np.flatnonzero(db[i0:i1] >= threshold_db)
    if loud.size == 0:
        return None
    return max(start, (i0 + int(loud[0])) * frame_sec)


def fix_word(word: AlignedWord, opts: FixOptions, levels: ChannelLevels | None = None) -> tuple[AlignedWord, str]:
    """One word's repaired timing and the reasons it moved ("" if it did not)."""
    start, reasons = word.start, []
    if levels is not None:
        ch = channel_for(word.speaker, levels.db.shape[0])
        onset = speech_onset(levels.db[ch], levels.frame_sec, word.start, word.end, float(levels.threshold_db[ch]))
        if onset is not None and onset - word.start >= opts.min_shift_sec:
            start = min(max(word.start, onset - opts.pre_roll_sec), word.end)
            reasons.append("onset")
    limit = max_plausible_duration(word.text, opts)
    if word.end - start > limit:
        start = word.end - limit
        reasons.append("duration")
    if not reasons:
        return word, ""
    return replace(word, start=start), "+".join(reasons)


def fix_words(
    words: Sequence[AlignedWord], opts: FixOptions, levels: ChannelLevels | None = None
) -> tuple[list[AlignedWord], list[Shift]]:
    """Repairs every word; returns them sorted by start, and the shifts made."""
    out, shifts = [], []
    for i, w in enumerate(words):
        new, reason = fix_word(w, opts, levels)
        out.append(new)
        if reason:
            shifts.append(Shift(i, w.text, w.speaker, w.start, new.start, reason))
    out.sort(key=lambda w: w.start)
    return out, shifts


def summarize(shifts: Sequence[Shift], n_words: int) -> dict:
    sec = np.array([s.seconds for s in shifts], dtype=np.float64)
    by_reason: dict[str, int] = {}
    for s in shifts:
        by_reason[s.reason] = by_reason.get(s.reason, 0) + 1
    stats = {}
    if sec.size:
        stats = {"mean": float(sec.mean()), "median": float(np.median(sec)),
                 "p90": float(np.percentile(sec, 90)), "max": float(sec.max()), "total": float(sec.sum())}
    return {"words": n_words, "words_moved": len(shifts), "moved_by": by_reason, "shift_sec": stats}


def plot_shifts(shifts: Sequence[Shift], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sec = [s.seconds for s in shifts]
    if sec:
        ax.hist(sec, bins=min(50, max(5, len(sec) // 5)), color="tab:blue")
    else:
        ax.text(0.5, 0.5, "no word moved", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("start moved later by (s)")
    ax.set_ylabel("words")
    ax.set_title(f"fix_alignments: {len(sec)} words moved")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------- files


def find_audio_beside(json_path: Path) -> Path | None:
    for ext in AUDIO_EXTENSIONS:
        p = json_path.with_suffix(ext)
        if p.exists():
            return p
    return None


def collect_inputs(inputs: Sequence[str]) -> list[tuple[Path, Path | None]]:
    """(alignment json, its audio or None) for every input, in order, without duplicates."""
    pairs: dict[Path, Path | None] = {}
    for item in inputs:
        p = Path(item)
        name = p.name.lower()
        if p.is_dir():
            for j in sorted(p.rglob("*.json")):
                pairs.setdefault(j.resolve(), find_audio_beside(j))
        elif name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
            for e in read_manifest(p, require_duration=False):
                pairs.setdefault(alignment_path_for(e.path).resolve(), e.path)
        elif name.endswith(".json"):
            if not p.is_file():
                raise FileNotFoundError(f"alignment file not found: {p}")
            pairs.setdefault(p.resolve(), find_audio_beside(p))
        else:
            raise ValueError(f"input {item!r}: expected a manifest (.jsonl), an alignment .json or a folder")
    return list(pairs.items())


def fix_file(json_path: Path, audio: Path | None, opts: FixOptions) -> tuple[list[AlignedWord], list[Shift], dict]:
    """Repairs one alignment file. Returns (words, shifts, the JSON's other keys to keep)."""
    try:
        with open(json_path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise AlignmentError(f"{json_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    words, _ = parse_alignments(obj, str(json_path))
    levels = None
    if audio is not None:
        wav, sr = read_audio(audio)
        levels = ChannelLevels.from_audio(wav, sr, opts)
    fixed, shifts = fix_words(words, opts, levels)
    extra = {k: v for k, v in obj.items() if k != "alignments"}
    return fixed, shifts, extra


def output_path(json_path: Path, out_dir: Path | None, root: Path) -> Path:
    return json_path if out_dir is None else out_dir / json_path.relative_to(root)


def run(inputs: Sequence[str], opts: FixOptions, use_audio: bool, out_dir: Path | None, report_dir: Path,
        dry_run: bool = False, progress: bool = True) -> dict:
    from tqdm import tqdm

    pairs = collect_inputs(inputs)
    if not pairs:
        raise ValueError(f"no alignment files found in {list(inputs)}")
    root = Path(os.path.commonpath([str(j.parent) for j, _ in pairs]))
    all_shifts: list[Shift] = []
    n_words = files_changed = 0
    missing, errors, no_audio = [], [], []
    for json_path, audio in tqdm(pairs, desc="fix_alignments", unit="file", disable=not progress):
        if not json_path.exists():
            missing.append(str(json_path))
            continue
        if use_audio and (audio is None or not audio.exists()):
            no_audio.append(str(json_path))
        try:
            words, shifts, extra = fix_file(json_path, audio if use_audio and audio and audio.exists() else None, opts)
        except (AlignmentError, AudioReadError) as e:
            errors.append(str(e))
            logger.error("%s", e)
            continue
        n_words += len(words)
        all_shifts += shifts
        files_changed += bool(shifts)
        target = output_path(json_path, out_dir, root)
        if dry_run or (out_dir is None and not shifts):
            continue
        if out_dir is None:
            backup = json_path.with_name(json_path.name + ".bak")
            if not backup.exists():  # a second run keeps the true original
                shutil.copy2(json_path, backup)
        write_alignments(target, words, extra)

    summary = {"files": len(pairs), "files_changed": files_changed, **summarize(all_shifts, n_words),
               "missing_alignments": missing, "errors": errors, "files_without_audio": no_audio,
               "in_place": out_dir is None, "dry_run": dry_run, "used_audio": use_audio, "options": asdict(opts),
               "largest_shifts": [asdict(s) | {"seconds": s.seconds}
                                  for s in sorted(all_shifts, key=lambda s: -s.seconds)[:20]]}
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report_dir / "fix_alignments_summary.json", summary, indent=2)
    plot_shifts(all_shifts, report_dir / "fix_alignments_shifts.png")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="manifests (.jsonl), alignment .json files or folders")
    p.add_argument("--audio", action="store_true", help="use the audio beside each json to find speech onsets")
    p.add_argument("--out", type=Path, default=None, help="write fixed copies here (default: in place + .json.bak)")
    p.add_argument("--report-dir", type=Path, default=None, help="summary JSON + histogram PNG folder")
    p.add_argument("--dry-run", action="store_true", help="report only, write no alignment file")
    d = FixOptions()
    p.add_argument("--max-base-sec", type=float, default=d.max_base_sec, help="longest plausible word: base ...")
    p.add_argument("--max-sec-per-char", type=float, default=d.max_sec_per_char, help="... plus this per character")
    p.add_argument("--frame-sec", type=float, default=d.frame_sec, help="energy frame length")
    p.add_argument("--margin-db", type=float, default=d.margin_db, help="speech: dB above the noise floor")
    p.add_argument("--min-level-db", type=float, default=d.min_level_db, help="speech: at least this dBFS")
    p.add_argument("--min-shift", type=float, default=d.min_shift_sec, help="ignore shorter leading silences")
    p.add_argument("--pre-roll", type=float, default=d.pre_roll_sec, help="start this much before the onset")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    for name in ("max_base_sec", "max_sec_per_char", "frame_sec"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    opts = FixOptions(max_base_sec=args.max_base_sec, max_sec_per_char=args.max_sec_per_char,
                      frame_sec=args.frame_sec, margin_db=args.margin_db, min_level_db=args.min_level_db,
                      min_shift_sec=args.min_shift, pre_roll_sec=args.pre_roll)
    report_dir = args.report_dir or args.out or Path("fix_alignments_report")
    s = run(args.inputs, opts, args.audio, args.out, report_dir, args.dry_run, progress=not args.no_progress)
    stats = s["shift_sec"]
    print(f"fix_alignments: {s['words_moved']}/{s['words']} words moved in {s['files_changed']}/{s['files']} files"
          + (f", median {stats['median']:.2f}s, max {stats['max']:.2f}s" if stats else "")
          + f"; {len(s['errors'])} errors, {len(s['missing_alignments'])} missing; report in {report_dir}")
    return 1 if s["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
