"""Writes pairs into the benchmark layout the spoken-LM readers read, with a side map back to the source ids.

Layout of the output folder::

    data.jsonl              {"path": "data_stereo/N.wav", "duration": seconds}, one line per item, N = 0, 1, ...
    data_stereo/N.wav       stereo, 24 kHz: the item on the chosen channel, digital silence on the other
    data_stereo/N.json      {"alignments": []} (audio-only scoring), unless alignments are produced later
    extra.txt               {"file_index": N, "number": 1 | 0}, one JSON line per item (1 = positive)
    side_map.csv            per file: file_index, pair_id, role, source (path in the release, no suffix) and
                            the release's groupings (id, voice, word, frequency, type, subtype)
    build.json              how the set was built: source layout and folder, channel, order, provenance

Pair i is items 2i and 2i+1. Which of the two holds the positive is set by ``order``: ``random`` (seeded)
by default, because a scorer that breaks ties by position would otherwise look skilled; ``positive-first``
and ``negative-first`` are there to reproduce a given layout. Silence rather than a copy on the other
channel: a copy would put both speakers talking at once. The side map and build record are neither
``.jsonl`` nor ``.txt``, so loaders that chain every ``*.jsonl`` or take the first ``*.txt`` of the folder
never see them. A pair's groupings (the word's frequency included) are written on both of its rows.

The whole folder is built under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.data.audio import AudioReadError, read_audio, resample, write_wav
from finetune.data.manifest import manifest_line
from finetune.eval_sets.sources import SourcePair
from finetune.evaluation.layout import EXTRA_NAME, MANIFEST_NAME, SIDE_MAP_NAME, EvalSetError
from finetune.reporting import write_csv, write_json
from moshi.utils.atomic import atomic_dir, atomic_write_json, atomic_write_text

SAMPLE_RATE = 24_000
CHANNELS = {"moshi": 0, "user": 1}  # left = the model's stream, right = the user's
ORDERS = ("random", "positive-first", "negative-first")
BUILD_NAME = "build.json"
SIDE_MAP_COLUMNS = ("file_index", "pair_id", "role", "source", "id", "voice", "word", "frequency", "type", "subtype")
AUDIO_DIR = "data_stereo"


@dataclass(frozen=True)
class BuildOptions:
    """How items are placed: ``channel`` (``moshi`` | ``user``), pair ``order``, ``seed`` of the random order,
    ``max_duration`` (seconds; a longer item is refused, naming it), ``write_alignments`` (empty ``N.json``)."""

    channel: str = "moshi"
    order: str = "random"
    seed: int = 0
    max_duration: float | None = None
    write_alignments: bool = True

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {sorted(CHANNELS)}, got {self.channel!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.max_duration is not None and self.max_duration <= 0:
            raise ValueError(f"max_duration must be > 0 seconds, got {self.max_duration}")


def positive_first(options: BuildOptions, n_pairs: int) -> list[bool]:
    """Per pair, whether the positive item takes the even stem (2i)."""
    if options.order == "positive-first":
        return [True] * n_pairs
    if options.order == "negative-first":
        return [False] * n_pairs
    rng = random.Random(options.seed)
    return [rng.random() < 0.5 for _ in range(n_pairs)]


def stereo_item(path: Path, channel: str, max_duration: float | None = None) -> torch.Tensor:
    """``[2, samples]`` float32 at 24 kHz: the mono file on ``channel``, zeros on the other."""
    try:
        data, sr = read_audio(path)
    except AudioReadError as e:
        raise EvalSetError(str(e)) from None
    if data.shape[0] != 1:
        raise EvalSetError(f"{path}: expected mono audio, got {data.shape[0]} channels")
    if data.shape[1] == 0:
        raise EvalSetError(f"{path}: empty audio")
    mono = resample(torch.from_numpy(np.ascontiguousarray(data[0])), sr, SAMPLE_RATE)
    seconds = mono.shape[-1] / SAMPLE_RATE
    if max_duration is not None and seconds > max_duration:
        raise EvalSetError(f"{path}: {seconds:.2f} s, longer than the {max_duration} s limit (--max-duration)")
    out = torch.zeros(2, mono.shape[-1], dtype=torch.float32)
    out[CHANNELS[channel]] = mono
    return out


def _source_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).with_suffix("").as_posix()
    except ValueError:
        return path.with_suffix("").as_posix()


def build_pair_set(
    pairs: Sequence[SourcePair],
    out_dir: str | os.PathLike,
    options: BuildOptions,
    source_root: str | os.PathLike,
    source: dict[str, Any],
    *,
    overwrite: bool = False,
    progress: bool = True,
    finalize: Callable[[Path], None] | None = None,
) -> list[dict[str, Any]]:
    """Writes ``pairs`` as a complete set in ``out_dir``; returns the side map's rows.

    Args:
        pairs: the pairs in the order they get their indices.
        out_dir: the set's folder; it appears only once everything (including ``finalize``) succeeded.
        options: channel, order, duration limit, alignments.
        source_root: the released folder; side-map ``source`` names are relative to it.
        source: what the pairs came from (format, task, provenance...), recorded in ``build.json``.
        overwrite: replace an existing ``out_dir`` instead of refusing.
        finalize: called with the temporary folder after every file is written (e.g. to add alignments).
    """
    from tqdm import tqdm

    root = Path(source_root)
    if not pairs:
        raise EvalSetError(f"{root}: no pairs to write")
    seen: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        if pair.pair_id in seen:
            first = pairs[seen[pair.pair_id]]
            raise EvalSetError(f"{pair.positive}: pair id {pair.pair_id!r} also names the pair of {first.positive}; "
                               "pair ids must be unique")
        seen[pair.pair_id] = i
    firsts = positive_first(options, len(pairs))
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / AUDIO_DIR).mkdir()
        manifest, extra, rows = [], [], []
        for i, (pair, pos_first) in enumerate(tqdm(list(zip(pairs, firsts)), desc="pairs", unit="pair",
                                                   disable=not progress)):
            pos_index = 2 * i if pos_first else 2 * i + 1
            members = [(pos_index, "positive", pair.positive, 0), (4 * i + 1 - pos_index, "negative", pair.negative, 1)]
            for index, role, path, side in sorted(members):
                wav = stereo_item(path, options.channel, options.max_duration)
                audio = tmp / AUDIO_DIR / f"{index}.wav"
                write_wav(audio, wav, SAMPLE_RATE)
                if options.write_alignments:
                    atomic_write_json(audio.with_suffix(".json"), {"alignments": []})
                manifest.append(manifest_line(audio, wav.shape[-1] / SAMPLE_RATE, tmp))
                extra.append(f'{{"file_index": {index}, "number": {int(role == "positive")}}}')
                row = {"file_index": index, "pair_id": pair.pair_id, "role": role, "source": _source_name(path, root)}
                row.update({k: v for k, v in pair.groups.items() if k in SIDE_MAP_COLUMNS})
                if pair.words is not None:
                    row["word"] = pair.words[side]
                rows.append(row)
        atomic_write_text(tmp / MANIFEST_NAME, "".join(line + "\n" for line in manifest))
        atomic_write_text(tmp / EXTRA_NAME, "".join(line + "\n" for line in extra))
        write_csv(tmp / SIDE_MAP_NAME, rows, columns=SIDE_MAP_COLUMNS)
        write_json(tmp / BUILD_NAME, {
            "source": source, "source_folder": str(root.resolve()), "pairs": len(pairs), "items": len(rows),
            "sample_rate": SAMPLE_RATE, "channel": options.channel, "order": options.order, "seed": options.seed,
            "max_duration": options.max_duration, "alignments": "empty" if options.write_alignments else "annotated",
        })
        if finalize is not None:
            finalize(tmp)
    return rows
