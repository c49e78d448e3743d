"""Builds a manifest (`.jsonl`) of every audio file under a folder, with durations.

Usage:
    python scripts/create_jsonl.py DIR -o data.jsonl [--ext wav,flac] [--strict]

Files are found recursively and listed in sorted path order (the same manifest on every
machine); durations come from sphn (file headers where the format has them). Paths are
written relative to the output's folder, which is how training and annotate.py resolve
them. A file sphn cannot read is left out, counted and named in the log (exit status 1
with `--strict`). The manifest is written atomically.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from finetune.cli import run_main
from finetune.data.manifest import write_manifest

logger = logging.getLogger("create_jsonl")

DEFAULT_EXTENSIONS = ("wav",)
KNOWN_EXTENSIONS = ("wav", "flac", "mp3", "ogg", "opus", "m4a")
BATCH = 256  # files per sphn.durations call (one progress step)


def parse_extensions(text: str) -> tuple[str, ...]:
    exts = tuple(dict.fromkeys(e.strip().lower().lstrip(".") for e in text.split(",") if e.strip()))
    if not exts:
        raise ValueError(f"--ext: no extension in {text!r}")
    return exts


def find_audio_files(root: Path, extensions: Sequence[str]) -> list[Path]:
    """Every file under `root` whose extension (case-insensitive) is in `extensions`, sorted."""
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    wanted = {"." + e.lower() for e in extensions}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in wanted)


def read_durations(paths: Sequence[Path], progress: bool = True) -> list[float | None]:
    """Duration of each file in seconds, None where sphn cannot read it."""
    import sphn
    from tqdm import tqdm

    out: list[float | None] = []
    with tqdm(total=len(paths), desc="durations", unit="file", disable=not progress) as bar:
        for i in range(0, len(paths), BATCH):
            batch = paths[i : i + BATCH]
            out += [None if d is None else float(d) for d in sphn.durations([str(p) for p in batch])]
            bar.update(len(batch))
    return out


def build_manifest(root: Path, output: Path, extensions: Sequence[str] = DEFAULT_EXTENSIONS,
                   progress: bool = True) -> tuple[int, list[Path]]:
    """Writes the manifest; returns (lines written, unreadable files)."""
    paths = find_audio_files(root, extensions)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(extensions)} file under {root} (--ext sets the extensions); "
                                "nothing written")
    durations = read_durations(paths, progress)
    good = [(p, d) for p, d in zip(paths, durations) if d is not None and d > 0]
    bad = [p for p, d in zip(paths, durations) if d is None or d <= 0]
    n = write_manifest(output, good, relative=True)
    return n, bad


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="folder searched recursively")
    p.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.jsonl)")
    p.add_argument("--ext", default=",".join(DEFAULT_EXTENSIONS),
                   help=f"comma-separated extensions (default wav; e.g. {','.join(KNOWN_EXTENSIONS)})")
    p.add_argument("--strict", action="store_true", help="exit 1 if any file is unreadable")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    n, bad = build_manifest(args.root, args.output, parse_extensions(args.ext), progress=not args.no_progress)
    for path in bad:
        logger.warning("unreadable, left out: %s", path)
    total = n + len(bad)
    print(f"create_jsonl: {n} of {total} files written to {args.output}; {len(bad)} unreadable")
    return 1 if bad and args.strict else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
