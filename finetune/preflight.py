"""Pre-flight: everything about a run that can be checked without training, checked before `run_dir` is touched.

A wrong model path, an unknown LLM repo or a bad manifest line found after the run folder was
created leaves a stale folder behind (and, with `resume: true`, a stale `args.yaml`). So the
trainer calls :func:`preflight` first: a resumed run's config must be one its checkpoint accepts;
the Moshi files (`moshi_paths.*`) must resolve; the LLM of a DSAA run (`text_llm.hf_repo_id`) must
have a config; wandb must be installed when `wandb.project` is set; every manifest line of the
train (and, with `do_eval`, eval) data must pass the up-front scan. The problems of the last four
are reported together.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from finetune.args import TrainArgs
from finetune.checkpointing import check_resume_compatible, latest_resumable
from finetune.data.dataset import DataError, load_sources, scan_options
from finetune.data.manifest import ManifestError
from finetune.data.sources import SourceError
from finetune.model_build import resolve_checkpoint_info

logger = logging.getLogger(__name__)


class PreflightError(ValueError):
    """The run cannot start; the message lists every problem found before anything was written."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"the run cannot start ({len(problems)} problem(s); nothing was written):\n"
                         + "\n".join(f"  - {p}" for p in problems))


def check_model_files(args: TrainArgs) -> tuple[Any, list[str]]:
    """(checkpoint info or None, problems) for `moshi_paths` and, for DSAA, `text_llm.hf_repo_id`."""
    problems: list[str] = []
    info = None
    try:
        info = resolve_checkpoint_info(args)
    except Exception as e:  # noqa: BLE001 - hub, filesystem and format errors all mean "cannot load"
        p = args.moshi_paths
        problems.append(f"model files of moshi_paths (hf_repo_id={p.hf_repo_id!r}, moshi_path={p.moshi_path!r}, "
                        f"mimi_path={p.mimi_path!r}, tokenizer_path={p.tokenizer_path!r}, "
                        f"config_path={p.config_path!r}) cannot be found: {type(e).__name__}: {e}")
    if info is not None:
        for key, path in (("moshi_path", info.moshi_weights), ("mimi_path", info.mimi_weights),
                          ("tokenizer_path", info.tokenizer)):
            if path is not None and not Path(path).exists():
                problems.append(f"moshi_paths.{key}: {path} does not exist")
    if args.text_llm.enable:
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(args.text_llm.hf_repo_id, revision=args.text_llm.revision,
                                       trust_remote_code=args.text_llm.trust_remote_code)
        except Exception as e:  # noqa: BLE001
            problems.append(f"text_llm.hf_repo_id={args.text_llm.hf_repo_id!r} (revision {args.text_llm.revision!r}) "
                            f"is neither a local model folder nor a reachable hub repo: {type(e).__name__}: {e}")
    return info, problems


def check_logging(args: TrainArgs) -> list[str]:
    """wandb must be importable when `wandb.project` is set."""
    if args.wandb.project is not None and importlib.util.find_spec("wandb") is None:
        return [f"wandb.project is set ({args.wandb.project!r}) but the wandb package is not installed "
                "(pip install wandb, or remove wandb.project)"]
    return []


def check_data(args: TrainArgs) -> list[str]:
    """Problems of the train data (and eval data with `do_eval`): manifests parse, every line scans clean."""
    problems: list[str] = []
    spans = [("data.train_data", args.data.train_data, args.duration_sec)]
    if args.do_eval and args.data.eval_data.strip():
        spans.append(("data.eval_data", args.data.eval_data, args.eval_duration_sec))
    for key, spec, chunk_sec in spans:
        try:
            load_sources(spec, key, chunk_sec, scan=scan_options(args))
        except (DataError, ManifestError, SourceError, FileNotFoundError) as e:
            problems.append(f"{key}: {e}")
    return problems


def check_resume(args: TrainArgs) -> None:
    """With `resume: true`, the latest complete checkpoint must accept this config (raises `ResumeMismatchError`)."""
    if not args.resume:
        return
    folder = latest_resumable(args.run_dir)
    if folder is not None:
        check_resume_compatible(folder, args.resume_fingerprint())


def preflight(args: TrainArgs) -> Any:
    """Checks a resume's config, the model files and the data; returns the resolved checkpoint info.

    Raises:
        ResumeMismatchError: the run to resume was made with other values of keys that matter.
        PreflightError: listing every other problem; nothing has been written.
    """
    check_resume(args)
    info, problems = check_model_files(args)
    problems += check_logging(args)
    problems += check_data(args)
    if problems:
        raise PreflightError(problems)
    return info
