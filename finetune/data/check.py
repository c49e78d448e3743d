"""Checks a dataset before training: every problem a manifest can hide, reported per file.

Usage:
    python -m finetune.data.check data.jsonl [--json report.json] [--duration-tolerance 0.1]
        [--silence-db -60] [--strict] [--no-audio-stats]

Without this scan such problems surface deep inside training (a mono file fails as a
bare assertion in the LM, a missing `.json` crashes mid-run) or never (silent skips).
Each file gets issues of three severities:

* error (would break training or train on wrong data; exit status 1):
  `audio_missing`, `audio_unreadable`, `not_stereo`, `duration_mismatch` (manifest vs
  file, beyond the tolerance: the manifest is stale), `alignment_missing`,
  `alignment_invalid` (not JSON, wrong shape, bad times), `words_after_end` (a word
  starts after the end of the audio: the JSON belongs to another file). Malformed
  manifest lines are listed too, each with its line; an empty manifest fails.
* warning (trains, but probably not what you want; exit 1 only with `--strict`):
  `sample_rate` (not 24 kHz: resampled on the fly), `words_unsorted` (sorted at load),
  `words_past_end` (a word ends after the audio), `empty_transcript` (no SPEAKER_MAIN
  word), `silent_channel` (a channel's RMS below `--silence-db`), `duplicate_line` (the
  same audio file on several lines: trained on once per line; named with the lines).
* info: sample rate, channels and duration of every file (in the JSON report).

Exit status: 0 clean (warnings allowed), 1 errors (or warnings with --strict, or an empty
manifest), 2 the manifest itself cannot be read or has malformed lines (every one listed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from finetune.data.alignments import (
    END_TOLERANCE_SEC,
    MAIN_SPEAKER,
    AlignmentError,
    alignment_path_for,
    parse_alignments,
)
from finetune.data.audio import DB_FLOOR, AudioReadError, read_audio
from finetune.data.manifest import ManifestEntry, ManifestError, read_manifest
from finetune.data.scan import describe_duplicates, duplicate_lines
from moshi.utils.atomic import atomic_write_json

MODEL_SAMPLE_RATE = 24000

ERROR, WARNING = "error", "warning"
SEVERITY = {
    "audio_missing": ERROR,
    "audio_unreadable": ERROR,
    "not_stereo": ERROR,
    "duration_mismatch": ERROR,
    "alignment_missing": ERROR,
    "alignment_invalid": ERROR,
    "words_after_end": ERROR,
    "sample_rate": WARNING,
    "words_unsorted": WARNING,
    "words_past_end": WARNING,
    "empty_transcript": WARNING,
    "silent_channel": WARNING,
    "duplicate_line": WARNING,
}


@dataclass(frozen=True)
class CheckOptions:
    duration_tolerance: float = 0.1  # seconds between the manifest and the file
    silence_db: float = -60.0  # a channel whose RMS (dBFS) is below this is "silent"
    audio_stats: bool = True  # decode the audio (channel levels); off: header-level checks only


@dataclass
class Issue:
    code: str
    message: str

    @property
    def severity(self) -> str:
        return SEVERITY[self.code]


@dataclass
class FileReport:
    path: str
    where: str  # manifest:line
    manifest_duration: float
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    channel_rms_db: list[float] | None = None
    words: int = 0
    main_words: int = 0
    issues: list[Issue] = field(default_factory=list)

    def add(self, code: str, message: str) -> None:
        self.issues.append(Issue(code, message))

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == ERROR]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == WARNING]

    def to_json(self) -> dict:
        d = asdict(self)
        d["issues"] = [{"code": i.code, "severity": i.severity, "message": i.message} for i in self.issues]
        return d


def _audio_info(entry: ManifestEntry, report: FileReport, opts: CheckOptions) -> None:
    import sphn

    path = entry.path
    if not path.exists():
        report.add("audio_missing", f"audio file not found: {path}")
        return
    try:
        if opts.audio_stats:
            wav, sr = read_audio(path)
            report.channels, report.duration = int(wav.shape[0]), wav.shape[-1] / sr
            rms = np.sqrt(np.mean(np.square(wav, dtype=np.float64), axis=-1))
            report.channel_rms_db = [float(20 * math.log10(max(r, 10 ** (DB_FLOOR / 20)))) for r in rms]
        else:
            reader = sphn.FileReader(str(path))
            sr, report.duration = reader.sample_rate, float(reader.duration_sec)
            report.channels = int(reader.channels)
    except (AudioReadError, ValueError, OSError) as e:
        report.add("audio_unreadable", f"cannot decode {path}: {e}")
        return
    report.sample_rate = int(sr)
    if report.channels is not None and report.channels != 2:
        report.add("not_stereo", f"{report.channels} channel(s); training needs stereo (left: model, right: user)")
    if report.sample_rate != MODEL_SAMPLE_RATE:
        report.add("sample_rate", f"{report.sample_rate} Hz, resampled to {MODEL_SAMPLE_RATE} Hz at load time")
    if report.duration == 0:
        report.add("audio_unreadable", f"{path} is empty (0 samples)")
    elif abs(report.duration - entry.duration) > opts.duration_tolerance:
        report.add("duration_mismatch", f"manifest says {entry.duration:.3f}s, the file lasts {report.duration:.3f}s "
                   "(the manifest line is stale)")
    if report.channel_rms_db is not None:
        for ch, db in enumerate(report.channel_rms_db):
            if db < opts.silence_db:
                side = "left (model)" if ch == 0 else "right (user)" if ch == 1 else f"#{ch}"
                report.add("silent_channel", f"channel {side} RMS {db:.1f} dBFS < {opts.silence_db} dBFS")


def _alignment_info(entry: ManifestEntry, report: FileReport) -> None:
    jpath = alignment_path_for(entry.path)
    if not jpath.is_file():
        report.add("alignment_missing", f"no alignment file {jpath} (run annotate.py)")
        return
    try:
        with open(jpath, encoding="utf-8") as f:
            obj = json.load(f)
        words, was_sorted = parse_alignments(obj, str(jpath))
    except json.JSONDecodeError as e:
        report.add("alignment_invalid", f"{jpath}: not valid JSON ({e.msg} at line {e.lineno})")
        return
    except (AlignmentError, UnicodeDecodeError) as e:
        report.add("alignment_invalid", str(e))
        return
    report.words = len(words)
    report.main_words = sum(w.speaker == MAIN_SPEAKER for w in words)
    if not was_sorted:
        report.add("words_unsorted", f"{jpath}: words are not sorted by start time")
    if report.main_words == 0:
        report.add("empty_transcript", f"{jpath}: no {MAIN_SPEAKER} word ({len(words)} words of other speakers)")
    duration = report.duration if report.duration is not None else entry.duration
    after = [w for w in words if w.start > duration + END_TOLERANCE_SEC]
    if after:
        report.add("words_after_end", f"{jpath}: {len(after)} word(s) start after the audio's end "
                   f"({duration:.2f}s), first {after[0].text!r} at {after[0].start:.2f}s")
    past = [w for w in words if w.end > duration + END_TOLERANCE_SEC and w.start <= duration + END_TOLERANCE_SEC]
    if past:
        report.add("words_past_end", f"{jpath}: {len(past)} word(s) end after the audio's end ({duration:.2f}s)")


def check_entry(entry: ManifestEntry, opts: CheckOptions = CheckOptions()) -> FileReport:
    """Every check of one manifest line."""
    report = FileReport(str(entry.path), entry.where, entry.duration)
    _audio_info(entry, report, opts)
    _alignment_info(entry, report)
    return report


@dataclass
class DatasetReport:
    manifest: str
    files: list[FileReport]
    bad_lines: list[str] = field(default_factory=list)  # malformed manifest lines, `file:line: why`

    @property
    def empty(self) -> bool:
        return not self.files and not self.bad_lines

    @property
    def n_errors(self) -> int:
        return sum(len(f.errors) for f in self.files) + len(self.bad_lines) + int(self.empty)

    @property
    def n_warnings(self) -> int:
        return sum(len(f.warnings) for f in self.files)

    def counts(self) -> Counter:
        return Counter(i.code for f in self.files for i in f.issues)

    def summary(self) -> dict:
        hours = sum(f.duration or 0.0 for f in self.files) / 3600
        rates = Counter(f.sample_rate for f in self.files if f.sample_rate)
        return {
            "files": len(self.files),
            "files_ok": sum(not f.issues for f in self.files),
            "files_with_errors": sum(bool(f.errors) for f in self.files),
            "files_with_warnings": sum(bool(f.warnings) and not f.errors for f in self.files),
            "hours": hours,
            "words": sum(f.words for f in self.files),
            "main_words": sum(f.main_words for f in self.files),
            "sample_rates": {str(k): v for k, v in sorted(rates.items())},
            "issues": {code: {"severity": SEVERITY[code], "files": n} for code, n in sorted(
                self.counts().items(), key=lambda kv: (SEVERITY[kv[0]] != ERROR, kv[0]))},
        }

    def to_json(self) -> dict:
        return {"manifest": self.manifest, "summary": self.summary(), "bad_lines": self.bad_lines,
                "files": [f.to_json() for f in self.files]}

    def table(self, max_examples: int | None = None) -> str:
        """The report as text: every file of every issue unless `max_examples` caps them per issue."""
        s = self.summary()
        lines = [
            f"dataset {self.manifest}: {s['files']} files, {s['hours']:.2f} h, {s['main_words']} {MAIN_SPEAKER} words; "
            f"sample rates {s['sample_rates'] or '-'}",
            f"  ok: {s['files_ok']}   with errors: {s['files_with_errors']}   "
            f"with warnings only: {s['files_with_warnings']}",
        ]
        if self.empty:
            lines.append("  the manifest has no entry: nothing to train on")
        if self.bad_lines:
            lines.append(f"  {len(self.bad_lines)} malformed manifest line(s) (left out of the checks below):")
            lines += [f"    {b}" for b in self.bad_lines]
        if s["issues"]:
            lines.append(f"  {'issue':<20} {'severity':<8} {'files':>6}  example")
            for code, info in s["issues"].items():
                examples = [(f.where, i.message) for f in self.files for i in f.issues if i.code == code]
                lines.append(f"  {code:<20} {info['severity']:<8} {info['files']:>6}  {examples[0][0]}: {examples[0][1]}")
                for where, msg in examples[1:max_examples]:
                    lines.append(f"  {'':<36}{where}: {msg}")
        return "\n".join(lines)


def check_manifest(path: str | Path, opts: CheckOptions = CheckOptions(), progress: bool = True) -> DatasetReport:
    from tqdm import tqdm

    bad_lines: list[str] = []
    entries = read_manifest(path, errors=bad_lines)
    files = [check_entry(e, opts) for e in tqdm(entries, desc="check", unit="file", disable=not progress)]
    by_entry = dict(zip(map(id, entries), files))
    for group in duplicate_lines(entries):
        for e in group:
            by_entry[id(e)].add("duplicate_line", describe_duplicates(group))
    return DatasetReport(str(Path(path).resolve()), files, bad_lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="manifest .jsonl (or .jsonl.gz)")
    p.add_argument("--json", default=None, help="write the full per-file report here")
    p.add_argument("--duration-tolerance", type=float, default=0.1, help="seconds (manifest vs file)")
    p.add_argument("--silence-db", type=float, default=-60.0, help="channel RMS (dBFS) below which it is silent")
    p.add_argument("--no-audio-stats", action="store_true", help="do not decode audio (no silence check; faster)")
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.duration_tolerance >= 0:
        p.error(f"--duration-tolerance must be >= 0, got {args.duration_tolerance}")
    opts = CheckOptions(args.duration_tolerance, args.silence_db, not args.no_audio_stats)
    try:
        report = check_manifest(args.manifest, opts, progress=not args.no_progress)
    except (ManifestError, FileNotFoundError) as e:
        print(f"check: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        atomic_write_json(args.json, report.to_json(), indent=2)
    failed = report.n_errors > 0 or (args.strict and report.n_warnings > 0)
    print(f"check: {report.n_errors} errors, {report.n_warnings} warnings -> {'FAIL' if failed else 'OK'}")
    for line in report.bad_lines:
        print(f"check: {line}", file=sys.stderr)
    if report.empty:
        print(f"check: {report.manifest} has no entry", file=sys.stderr)
    return 2 if report.bad_lines else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
