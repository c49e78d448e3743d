"""Fill the Mimi codes cache ahead of training.

    python -m finetune.data.precompute CONFIG.yaml [--device auto|cpu|cuda] [--eval/--no-eval]
    torchrun --nproc-per-node 8 -m finetune.data.precompute CONFIG.yaml

Encodes every audio file of `data.train_data` (and `data.eval_data`) once into
`data.cache_dir`, several files per Mimi call. Under torchrun, rank r takes files
r, r+W, ... (no communication is needed: entries are written atomically, each rank its
own). A tqdm bar shows files, audio seconds per second and the ETA. Files already in
the cache are skipped, so an interrupted run just starts again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Sequence

import torch

from finetune.args import ConfigError, TrainArgs
from finetune.cli import run_main
from finetune.data.audio import AudioReadError
from finetune.data.codes_cache import AudioCodec, CodesStore
from finetune.data.dataset import DataError, all_entries, load_sources, scan_options
from finetune.data.manifest import ManifestEntry
from finetune.logging_utils import get_logger, setup_logging

logger = get_logger(__name__)


def precompute(entries: Sequence[ManifestEntry], store: CodesStore, rank: int = 0, world_size: int = 1,
               progress: bool = True) -> dict[str, Any]:
    """Encodes this rank's share (`entries[rank::world_size]`) of the files not yet cached.

    A file that fails to decode does not stop the others: its group is retried file by file.
    Returns counts: files (this rank's), cached_before, encoded, audio_sec, seconds, and
    `failed`, the `manifest:line: why` of each file that could not be encoded.
    """
    from tqdm import tqdm

    if store.entry_dir is None:
        raise ValueError("data.cache_dir is not set: nothing to precompute into")
    mine = list(entries)[rank::world_size]
    todo = [e for e in mine if not store.is_cached(e)]
    total_sec = sum(e.duration for e in todo)
    bar = tqdm(total=len(todo), unit="file", disable=not progress, desc=f"rank {rank} encoding",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    done_sec = 0.0
    budget = store.codec.batch_samples / store.codec.sample_rate / 2  # both channels share the batch
    group: list[ManifestEntry] = []

    failed: list[str] = []

    def flush() -> None:
        nonlocal done_sec
        if not group:
            return
        try:
            store.get_many(group)
        except AudioReadError:
            for e in group:
                try:
                    store.get(e)
                except AudioReadError as err:
                    failed.append(f"{e.where}: {err}")
        done_sec += sum(e.duration for e in group)
        rate = done_sec / max(1e-9, time.perf_counter() - t0)
        bar.set_postfix_str(f"{rate:.0f} audio-s/s, {done_sec / 3600:.2f}/{total_sec / 3600:.2f} h")
        bar.update(len(group))
        group.clear()

    for e in todo:
        if group and sum(g.duration for g in group) + e.duration > budget:
            flush()
        group.append(e)
    flush()
    bar.close()
    # keep memory flat for the next stage of a long job: the codes are on disk now
    store.clear_memory()
    return {"files": len(mine), "cached_before": len(mine) - len(todo), "encoded": len(todo) - len(failed),
            "audio_sec": done_sec, "seconds": time.perf_counter() - t0, "failed": failed}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
    return torch.device(name)


def main(config: str, device: str = "auto", eval: bool = True) -> None:
    """Precomputes the codes of a config's data into `data.cache_dir`.

    Files the data scan finds unusable (missing, unreadable, not stereo, ...) are left out; the good
    ones are cached, then the bad ones are reported in one `DataError`.
    """
    setup_logging()
    args = TrainArgs.load(config)
    if args.data.cache_dir is None:
        raise ConfigError(["data.cache_dir is not set; set it to the folder for the codes cache"], source=config)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = _device(device)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    from moshi.models import loaders

    mp = args.moshi_paths
    info = loaders.CheckpointInfo.from_hf_repo(mp.hf_repo_id, moshi_weights=mp.moshi_path,
                                               mimi_weights=mp.mimi_path, tokenizer=mp.tokenizer_path,
                                               config_path=mp.config_path)
    mimi = loaders.get_mimi(info.mimi_weights, mimi_config=info.mimi_config, device=dev,
                            num_codebooks=loaders.mimi_codebooks_for_lm(info.lm_config))
    mimi.eval()
    store = CodesStore(AudioCodec(mimi, device=dev), args.data.cache_dir)
    fr = store.codec.frame_rate
    scan = dataclasses.replace(scan_options(args), skip_bad_files=True)
    sources = load_sources(args.data.train_data, "data.train_data", args.duration_sec, fr, scan)
    if eval and args.data.eval_data.strip():
        sources += load_sources(args.data.eval_data, "data.eval_data", args.eval_duration_sec, fr, scan)
    entries = all_entries(sources)
    logger.info("rank %d/%d: %d files in total, cache %s, device %s", rank, world, len(entries),
                store.entry_dir, dev)
    res = precompute(entries, store, rank, world, progress=True)
    logger.info("rank %d: %d files (%d were cached), encoded %.1f h of audio in %.0f s (%d Mimi calls)", rank,
                res["files"], res["cached_before"], res["audio_sec"] / 3600, res["seconds"], store.codec.calls)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    bad = sorted({str(p) for s in sources for p in s.skipped} | set(res["failed"]))
    if bad:
        raise DataError(f"{len(bad)} manifest line(s) could not be cached (the others were):\n"
                        + "\n".join(f"  - {b}" for b in bad))


if __name__ == "__main__":
    import sys

    import fire

    logging.captureWarnings(True)
    sys.exit(run_main(lambda: fire.Fire(main)))
