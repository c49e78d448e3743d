"""What the benchmark scripts share: load each checkpoint, score the sets, write one results file per checkpoint.

Codes depend only on Mimi and the audio, so one codes store serves every checkpoint of a config (each file is
encoded once per call, or read from `data.cache_dir`).
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from finetune.args import ConfigError, TrainArgs, evaluation_key_errors
from finetune.data.codes_cache import AudioCodec, CodesStore
from finetune.data.interleaver import Interleaver
from finetune.data.text_tokenizer import HFTextTokenizer, SentencePieceTextTokenizer, TextTokenizer
from finetune.evaluation.benchmarks import BenchmarkSet, run_set
from finetune.evaluation.items import ItemCoder, model_max_frames
from finetune.evaluation.results import results_document, set_result
from finetune.evaluation.scoring import score_spec
from finetune.evaluation.text_mmlu import LLM, score_text_mmlu
from finetune.model_loading import load_from_config
from finetune.reporting import folder_digest, provenance, pyplot, save_figure, write_csv, write_json
from moshi.models.model_loading import LoadedModel

logger = logging.getLogger(__name__)

BASE = "base"
EVAL_SET_DATA_KEYS = ("swuggy_data", "sblimp_data", "ssc_data", "cd_data", "mmlu_data", "eval_loss_data", "eval_data")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG``, ``--checkpoint`` (repeatable) and overrides of the config's `evaluation:` keys."""
    parser.add_argument("config", type=Path, help="the training YAML (model paths, data.*_data, evaluation keys)")
    parser.add_argument("--checkpoint", action="append", default=None, metavar="CKPT",
                        help="a run's checkpoints/checkpoint_N, its consolidated/ folder, a DSAA checkpoint or a "
                             "weights file; repeat for several; 'base' = the config's base model (default: base)")
    parser.add_argument("--set", dest="evaluation_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an evaluation key, e.g. --set text_row=pad --set codebooks=[0], or name a "
                             "set folder, e.g. --set data.cd_data=eval/cd_mine")


def load_config(path: Path, overrides: Sequence[str]) -> TrainArgs:
    """The config with `evaluation.KEY=VALUE` overrides (YAML values) and `data.<set>_data=PATH` set folders;
    only the `evaluation:` keys are checked (the training data need not exist where the benchmarks run)."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None
    if not isinstance(raw, dict):
        raise FileNotFoundError(f"config file not found or not a mapping: {path}")
    section = raw.setdefault("evaluation", {}) or {}
    raw["evaluation"] = section
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE (an evaluation key), got {item!r}")
        key = key.strip()
        if key.startswith("data."):
            name = key.removeprefix("data.")
            if name not in EVAL_SET_DATA_KEYS:
                raise ValueError(f"--set {key}: only the evaluation set folders can be set here "
                                 f"({', '.join('data.' + k for k in EVAL_SET_DATA_KEYS)})")
            data = raw.get("data") or {}
            raw["data"] = data
            data[name] = value
            continue
        section[key] = yaml.safe_load(value)
    args = TrainArgs.from_dict(raw, validate=False, source=str(path))
    errors = evaluation_key_errors(args.evaluation)
    if errors:
        raise ConfigError(errors, source=f"{path} with --set {' '.join(overrides)}" if overrides else str(path))
    return args


def checkpoint_labels(checkpoints: Sequence[str]) -> list[str]:
    """File-name labels: `base`, else the checkpoint folder's name (`checkpoint_000100`), made unique."""
    labels: list[str] = []
    for c in checkpoints:
        if c == BASE:
            label = BASE
        else:
            p = Path(c)
            label = p.parent.name if p.name in ("consolidated",) else p.stem if p.is_file() else p.name
        label = re.sub(r"[^A-Za-z0-9._-]+", "_", label) or "model"
        unique, k = label, 2
        while unique in labels:
            unique, k = f"{label}-{k}", k + 1
        labels.append(unique)
    return labels


def eval_text_tokenizer(args: TrainArgs, loaded: LoadedModel) -> TextTokenizer:
    """The text-row tokenizer (PAD, EPAD, words) of a loaded model."""
    if loaded.kind == "dsaa":
        t = args.text_llm
        return HFTextTokenizer(loaded.text_tokenizer, pad_token=t.pad_token, epad_token=t.epad_token,
                               bos_token=t.bos_token)
    return SentencePieceTextTokenizer(loaded.sources["tokenizer"])


class CheckpointRunner:
    """Loads each checkpoint of a config in turn and scores the given sets with it."""

    def __init__(self, args: TrainArgs, config_path: Path, sets: list[BenchmarkSet], device: str,
                 dtype: str | None, progress: bool = True, text_mmlu: bool = False) -> None:
        self.args, self.config_path, self.sets, self.text_mmlu = args, config_path, sets, text_mmlu
        self.device, self.dtype, self.progress = device, dtype, progress
        self.store: CodesStore | None = None
        self.digests = {s.metric_prefix: folder_digest([s.path]) for s in sets}

    def _text_mmlu(self, loaded: LoadedModel, s: BenchmarkSet, label: str) -> dict[str, Any]:
        start = time.perf_counter()
        n = len(s.data.questions[: self.args.evaluation.mmlu_max_questions])  # type: ignore[union-attr]
        with tqdm(total=n, desc=f"{label} mmlu_text", unit="item", disable=not self.progress) as bar:
            records = score_text_mmlu(loaded.lm.text_llm, loaded.text_tokenizer, s.data,  # type: ignore[arg-type]
                                      self.args.evaluation, loaded.device, progress=bar.update)
        result = set_result("mmlu", str(s.path), self.digests[s.metric_prefix], records,
                            time.perf_counter() - start, protocols=(LLM,))
        t = result["totals"][LLM]
        if t["accuracy"] is not None:
            print(f"{label} mmlu_text (LLM branch): {100 * t['accuracy']:.1f}% ({result['items_per_s']:.2f} items/s)")
        return result

    def load(self, checkpoint: str) -> LoadedModel:
        return load_from_config(self.args, None if checkpoint == BASE else checkpoint, self.device,
                                None if self.dtype in (None, "auto") else self.dtype)

    def evaluate(self, checkpoint: str, label: str, kind: str = "slm") -> dict[str, Any]:
        loaded = self.load(checkpoint)
        if self.store is None:
            self.store = CodesStore(AudioCodec(loaded.mimi, device=loaded.device), self.args.data.cache_dir)
        tokenizer = eval_text_tokenizer(self.args, loaded)
        coder = ItemCoder(self.store, Interleaver(tokenizer, self.store.codec.frame_rate),
                          model_max_frames(loaded.lm))
        settings = self.args.evaluation
        spec = score_spec(loaded.lm, settings, self.args.first_codebook_weight_multiplier)
        sets: dict[str, Any] = {}
        for s in self.sets:
            n = len(s.data.pairs[: settings.max_pairs]) if s.kind == "pairs" else \
                len(s.data.questions[: settings.mmlu_max_questions])  # type: ignore[union-attr]
            with tqdm(total=n, desc=f"{label} {s.metric_prefix}", unit="item", disable=not self.progress) as bar:
                result = run_set(loaded.lm, s, coder, spec, settings, loaded.device, self.digests[s.metric_prefix],
                                 progress=bar.update)
            sets[s.name] = result
            accs = ", ".join(f"{p} {100 * t['accuracy']:.1f}%" for p, t in result["totals"].items()
                             if t["accuracy"] is not None)
            print(f"{label} {s.metric_prefix}: {accs} ({result['n_items']} items, {result['n_errors']} errors, "
                  f"{result['items_per_s']:.2f} items/s)")
        if self.text_mmlu and loaded.kind == "dsaa":
            for s in self.sets:
                if s.kind == "mmlu":
                    sets["mmlu_text"] = self._text_mmlu(loaded, s, label)
        extra = {"config": str(self.config_path),
                 "model_sources": loaded.sources, "protocols": spec.describe(), "device": str(loaded.device),
                 "dtype": str(loaded.dtype).replace("torch.", "")}
        checkpoints = [checkpoint] if checkpoint != BASE else [loaded.sources["weights"]]
        prov = provenance(checkpoints=[c for c in checkpoints if Path(c).exists()],
                          datasets=[s.path for s in self.sets], extra=extra)
        doc = results_document(kind, {"label": label, "path": None if checkpoint == BASE else str(checkpoint),
                                      "model_kind": loaded.kind}, prov, spec.describe(), asdict(settings), sets)
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return doc


def write_outputs(out: Path, docs: dict[str, dict[str, Any]], title: str) -> list[Path]:
    """`OUT/<label>.json` per checkpoint, `OUT/summary.csv` and `OUT/accuracy.png` (sets x protocols)."""
    written = [write_json(out / f"{label}.json", doc) for label, doc in docs.items()]
    rows = []
    for label, doc in docs.items():
        for name, result in doc["sets"].items():
            for p, t in result["totals"].items():
                rows.append({"checkpoint": label, "set": name, "protocol": p, "accuracy": t["accuracy"],
                             "n": t["n"], "ties": t["ties"], "errors": result["n_errors"],
                             "items_per_s": result["items_per_s"]})
    written.append(write_csv(out / "summary.csv", rows))
    plt = pyplot()
    keys = sorted({(r["set"], r["protocol"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(keys) * len(docs)), 4.0))
    width = 0.8 / max(1, len(docs))
    for i, label in enumerate(docs):
        vals = {(r["set"], r["protocol"]): r["accuracy"] for r in rows if r["checkpoint"] == label}
        ax.bar([k + i * width for k in range(len(keys))], [100 * (vals.get(k) or 0.0) for k in keys], width,
               label=label)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))])
    ax.set_xticklabels([f"{s}\n{p}" for s, p in keys], fontsize=7)
    ax.axhline(50 if title == "slm" else 25, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}: accuracy per set and protocol")
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out / "accuracy.png"))
    return written
