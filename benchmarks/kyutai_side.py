"""Process plumbing shared by the ``*_vs_kyutai.py`` benchmarks: one timed side per fresh process.

Kyutai's package is also called ``moshi``, so it cannot share an interpreter with ours. Install it once in a
throwaway virtual environment (same torch as ours, so both sides run the same kernels):
    python -m venv /tmp/kvenv
    /tmp/kvenv/bin/pip install torch==2.13.0
    /tmp/kvenv/bin/pip install --no-deps moshi==0.2.13
    /tmp/kvenv/bin/pip install 'numpy<2.3' safetensors einops sentencepiece 'sphn<0.3' 'huggingface-hub<1' tqdm

Kyutai's worker runs as ``python -I`` from a temporary directory, so this repository is not on its
``sys.path``; ours runs with the repository root on ``PYTHONPATH``. Each worker reports ``moshi.__file__`` and
the parent refuses a result imported from the wrong side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "KYUTAI_SIDE_RESULT "
SIDES = ("ours", "kyutai")


def comparison_parser(description: str | None, rounds_help: str) -> argparse.ArgumentParser:
    """The options every comparison has: ``--kyutai-python``, ``--rounds``, ``--threads`` and the hidden
    ``--worker`` that a parent passes to the processes it starts."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kyutai-python", help="python of an environment with Kyutai's moshi installed")
    parser.add_argument("--rounds", type=int, default=3, help=rounds_help)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    return parser


def run_worker_or_parent(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    run_worker: Callable[[argparse.Namespace], None],
    run_parent: Callable[[argparse.Namespace], None],
    at_least_one: Sequence[str],
) -> None:
    """Runs this process's part: the worker it was started as, or the parent once ``--kyutai-python`` is given
    and every option named in ``at_least_one`` is at least 1 (``--warmup``, where present, at least 0)."""
    if args.worker:
        run_worker(args)
        return
    if not args.kyutai_python:
        parser.error("--kyutai-python is required (see benchmarks/kyutai_side.py)")
    if min(getattr(args, name) for name in at_least_one) < 1 or getattr(args, "warmup", 0) < 0:
        names = ", ".join(f"--{name}" for name in at_least_one)
        parser.error(f"{names} must be at least 1" + (", --warmup at least 0" if hasattr(args, "warmup") else ""))
    run_parent(args)


def emit(record: dict[str, Any]) -> None:
    """Prints a worker's result line (with the ``moshi`` it imported) for :func:`run_side` to read."""
    import torch

    import moshi

    record = {**record, "moshi_file": moshi.__file__, "torch": torch.__version__}
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def run_side(
    side: str, script: str, options: list[str], kyutai_python: str, threads: int, workdir: Path
) -> dict[str, Any]:
    """Runs ``script --worker SIDE options`` in a fresh process of ``side``'s interpreter; returns its record."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [str(Path(script).resolve()), "--worker", side, *options]
    if side == "kyutai":
        # -I: no script directory, no current directory, no PYTHONPATH, no user site on sys.path.
        command, cwd = [kyutai_python, "-I", *args], workdir
    else:
        env["PYTHONPATH"] = str(REPO_ROOT)
        command, cwd = [sys.executable, *args], REPO_ROOT
    proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    record = json.loads(lines[-1][len(RESULT_PREFIX) :])
    inside_repo = Path(record["moshi_file"]).resolve().is_relative_to(REPO_ROOT)
    if inside_repo != (side == "ours"):
        raise SystemExit(f"{side} worker imported the wrong moshi package: {record['moshi_file']}")
    return record
