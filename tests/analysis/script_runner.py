"""Runs a `scripts/*.py` entry point in this process (scripts/ is not a package), as its command line would."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from finetune.cli import run_main

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_script(name: str, *argv: str) -> int:
    """``python scripts/<name>.py *argv`` in-process: its exit status (user errors print ``error: ...``)."""
    module_name = f"scripts_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return run_main(lambda: sys.modules[module_name].main(list(argv)))
