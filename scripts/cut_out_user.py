"""Trims the leading silence of conversations (both channels together) and shifts their alignments.

Usage:
    python scripts/cut_out_user.py data.jsonl --out-dir trimmed/ [-o trimmed/data.jsonl]
        [--threshold-db -45] [--keep 0.2] [--min-cut 0.1] [--reference both|main]

Recordings often open with seconds of silence (or only the user, with `--reference
main`), which trains the model to wait. For each file, the first frame where a channel
(`both`: either channel; `main`: the left one) reaches `--threshold-db` dBFS is found;
everything before it, less `--keep` seconds, is cut from both channels at once so they
stay in sync, and every word time moves back by the same amount (words that ended
before the cut are dropped). Trimmed files are written under `--out-dir` (same relative
layout as in the manifest, wav + json, atomically); files with less than `--min-cut` to
remove are referenced where they are. A new manifest (default `<out-dir>/<name>.jsonl`)
lists every file with its new duration, and `cut_out_user_summary.json` the counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from finetune.data.alignments import (
    AlignedWord,
    AlignmentError,
    alignment_path_for,
    parse_alignments,
    write_alignments,
)
from finetune.data.audio import AudioReadError, frame_rms_db, read_audio, write_wav
from finetune.data.manifest import ManifestEntry, read_manifest, write_manifest
from moshi.utils.atomic import atomic_write_json

logger = logging.getLogger("cut_out_user")


@dataclass(frozen=True)
class CutOptions:
    threshold_db: float = -45.0  # a frame this loud (dBFS) is activity
    keep_sec: float = 0.2  # silence kept before the first activity
    min_cut_sec: float = 0.1  # smaller cuts are not worth rewriting the file
    frame_sec: float = 0.02
    reference: str = "both"  # "both": first activity on either channel; "main": on the left channel


def leading_cut(wav: np.ndarray, sample_rate: int, opts: CutOptions) -> int | None:
    """Samples to remove at the start of `[C, N]` audio, or None if no frame is active."""
    db = frame_rms_db(wav, sample_rate, opts.frame_sec)
    if opts.reference == "main":
        db = db[:1]
    active = np.flatnonzero((db >= opts.threshold_db).any(axis=0))
    if active.size == 0:
        return None
    onset_sec = active[0] * opts.frame_sec
    return int(round(max(0.0, onset_sec - opts.keep_sec) * sample_rate))


def shift_words(words: Sequence[AlignedWord], cut_sec: float) -> tuple[list[AlignedWord], int]:
    """Word times minus `cut_sec`; words that ended before the cut are dropped. Returns (words, dropped)."""
    out = []
    for w in words:
        if w.end <= cut_sec:
            continue
        out.append(replace(w, start=max(0.0, w.start - cut_sec), end=w.end - cut_sec))
    return out, len(words) - len(out)


def _relative_target(entry: ManifestEntry, out_dir: Path) -> Path:
    try:
        rel = entry.path.relative_to(entry.manifest.parent)
    except ValueError:
        rel = Path(entry.path.name)
    return out_dir / rel.with_suffix(".wav")


def run(manifest: Path, out_dir: Path, output: Path, opts: CutOptions, progress: bool = True) -> dict:
    from tqdm import tqdm

    entries = read_manifest(manifest)
    new_entries: list[ManifestEntry] = []
    trimmed = unchanged = silent = words_dropped = 0
    seconds_removed = 0.0
    missing_alignments, errors = [], []
    for e in tqdm(entries, desc="cut", unit="file", disable=not progress):
        try:
            wav, sr = read_audio(e.path)
        except AudioReadError as err:
            errors.append(f"{e.where}: {err}")
            continue
        duration = wav.shape[-1] / sr
        cut = leading_cut(wav, sr, opts)
        if cut is None:
            silent += 1
            logger.warning("%s: no channel reaches %.1f dBFS; kept as is", e.path, opts.threshold_db)
        if cut is None or cut / sr < opts.min_cut_sec:
            unchanged += cut is not None
            new_entries.append(replace(e, duration=duration))
            continue
        cut_sec = cut / sr
        target = _relative_target(e, out_dir)
        jpath = alignment_path_for(e.path)
        if jpath.is_file():
            try:
                obj = json.loads(jpath.read_text(encoding="utf-8"))
                words, _ = parse_alignments(obj, str(jpath))
            except (json.JSONDecodeError, AlignmentError) as err:
                errors.append(f"{jpath}: {err}")
                continue
            shifted, dropped = shift_words(words, cut_sec)
            words_dropped += dropped
            extra = {k: v for k, v in obj.items() if k != "alignments"}
            write_alignments(alignment_path_for(target), shifted, extra)
        else:
            missing_alignments.append(str(jpath))
        write_wav(target, wav[:, cut:], sr)
        trimmed += 1
        seconds_removed += cut_sec
        new_entries.append(replace(e, path=target.resolve(), duration=(wav.shape[-1] - cut) / sr))

    n = write_manifest(output, new_entries, relative=True)
    summary = {"files": len(entries), "written": n, "trimmed": trimmed, "unchanged": unchanged,
               "no_activity": silent, "seconds_removed": seconds_removed, "words_dropped": words_dropped,
               "missing_alignments": missing_alignments, "errors": errors, "manifest": str(output),
               "options": opts.__dict__}
    atomic_write_json(out_dir / "cut_out_user_summary.json", summary, indent=2)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path)
    p.add_argument("--out-dir", type=Path, required=True, help="trimmed wav + json go here")
    p.add_argument("-o", "--output", type=Path, default=None, help="new manifest (default: <out-dir>/<name>)")
    d = CutOptions()
    p.add_argument("--threshold-db", type=float, default=d.threshold_db, help="activity level (dBFS)")
    p.add_argument("--keep", type=float, default=d.keep_sec, help="seconds kept before the first activity")
    p.add_argument("--min-cut", type=float, default=d.min_cut_sec, help="do not rewrite files for less")
    p.add_argument("--frame-sec", type=float, default=d.frame_sec)
    p.add_argument("--reference", choices=["both", "main"], default=d.reference,
                   help="both: first activity on either channel; main: on the left (model) channel")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.keep < 0 or args.min_cut < 0 or args.frame_sec <= 0:
        raise ValueError(f"--keep and --min-cut must be >= 0 and --frame-sec > 0, got "
                         f"{args.keep}, {args.min_cut}, {args.frame_sec}")
    name = args.manifest.name.removesuffix(".gz")
    output = args.output or args.out_dir / name
    if output.resolve() == args.manifest.resolve():
        raise ValueError(f"-o {output}: would overwrite the input manifest")
    opts = CutOptions(args.threshold_db, args.keep, args.min_cut, args.frame_sec, args.reference)
    s = run(args.manifest, args.out_dir, output, opts, progress=not args.no_progress)
    print(f"cut_out_user: {s['trimmed']} of {s['files']} files trimmed ({s['seconds_removed']:.1f}s removed, "
          f"{s['words_dropped']} words dropped), {s['no_activity']} without activity, {len(s['errors'])} errors; "
          f"manifest {output}")
    return 1 if s["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
