"""Converts a released paired benchmark into the folder layout the spoken-LM evaluation reads.

Usage:
    python scripts/build_eval_set.py slm21 ZR2021/lexical/dev --out eval/swuggy
    python scripts/build_eval_set.py slm21 ZR2021/syntactic/dev --out eval/sblimp
    python scripts/build_eval_set.py indexed sSC/ --out eval/ssc [--sep _]
    python scripts/build_eval_set.py pairs my_pairs/ --out eval/cd_mine

    --channel moshi|user      which stereo channel holds the item (default moshi = left); silence on the other
    --order random|positive-first|negative-first   which of a pair's two stems gets the positive (default
                              random, seeded by --seed)
    --max-duration SECONDS    refuse any item longer than this (set it to the config's eval_duration_sec)
    --annotate                word alignments through annotate.py (Whisper) instead of empty ones, before the
                              folder appears; --annotate-options "..." are passed on to it, e.g.
                              "--whisper_model large-v3 --lang en --device cuda"
    --overwrite               replace an existing --out folder

Source layouts: `slm21` = a ZeroSpeech 2021 sLM21 split folder (wavs + gold.csv, lexical or syntactic);
`indexed` = wavs named `<integer><sep>...` (spoken StoryCloze), consecutive files = (positive, negative);
`pairs` = `positive/` and `negative/` subfolders with wavs at the same relative paths.

Writes under --out: data.jsonl, data_stereo/N.wav (stereo, 24 kHz), data_stereo/N.json, extra.txt
(file_index, number = 1 on the positive), side_map.csv (per file: pair id, role, source name and the
release's groupings: id, voice, word, frequency, type, subtype) and build.json (options and provenance).
The folder appears only when complete.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from finetune.cli import run_main
from finetune.eval_sets.layout import CHANNELS, ORDERS, BuildOptions, build_pair_set
from finetune.eval_sets.sources import SourcePair, read_indexed, read_pair_folders, read_slm21
from finetune.evaluation.layout import MANIFEST_NAME, EvalSetError
from finetune.reporting import provenance

REPO_ROOT = Path(__file__).resolve().parent.parent


def read_source(fmt: str, folder: Path, sep: str) -> tuple[dict[str, str], list[SourcePair]]:
    """The pairs of ``folder`` in layout ``fmt`` and a description of the source for the side map."""
    if fmt == "slm21":
        task, pairs = read_slm21(folder)
        return {"format": fmt, "task": task}, pairs
    if fmt == "indexed":
        return {"format": fmt, "sep": sep}, read_indexed(folder, sep)
    return {"format": fmt}, read_pair_folders(folder)


def annotator(channel: str, options: str, out: Path) -> Callable[[Path], None]:
    """Runs annotate.py on the built set's manifest (the right channel too when the items sit there)."""
    def run(folder: Path) -> None:
        cmd = [sys.executable, str(REPO_ROOT / "annotate.py"), str(folder / MANIFEST_NAME), "--local",
               *shlex.split(options)]
        if channel == "user":
            cmd.append("--both-channels")
        if subprocess.run(cmd).returncode != 0:
            raise EvalSetError(f"annotate.py failed on some items (its log above names them); nothing was "
                               f"written to {out}")
    return run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=["slm21", "indexed", "pairs"], help="layout of the source folder")
    p.add_argument("source", type=Path, help="the released folder")
    p.add_argument("--out", type=Path, required=True, help="the set folder to create")
    p.add_argument("--channel", choices=sorted(CHANNELS), default="moshi")
    p.add_argument("--order", choices=ORDERS, default="random")
    p.add_argument("--seed", type=int, default=0, help="seed of --order random")
    p.add_argument("--max-duration", type=float, default=None)
    p.add_argument("--sep", default="_", help="separator after the integer in `indexed` names (sBLIMP kits: +)")
    p.add_argument("--annotate", action="store_true", help="alignments through annotate.py instead of empty")
    p.add_argument("--annotate-options", default="", help="options passed on to annotate.py (one string)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    source, pairs = read_source(args.format, args.source, args.sep)
    source["provenance"] = provenance(datasets=[args.source])
    options = BuildOptions(channel=args.channel, order=args.order, seed=args.seed, max_duration=args.max_duration,
                           write_alignments=not args.annotate)
    finalize = annotator(args.channel, args.annotate_options, args.out) if args.annotate else None
    rows = build_pair_set(pairs, args.out, options, args.source, source, overwrite=args.overwrite,
                          progress=not args.no_progress, finalize=finalize)
    print(f"build_eval_set: {len(pairs)} pairs ({len(rows)} items) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
