"""`scripts/*.py` in the test process. scripts/ is not a package, so tests import each script by its path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from finetune.cli import run_main

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, executed once per test session (registered before it runs, so the
    dataclasses it defines can find their module)."""
    module_name = f"_script_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def run_script(name: str, *argv: str) -> int:
    """``python scripts/<name>.py *argv`` in-process: its exit status (user errors print ``error: ...``)."""
    return run_main(lambda: load_script(name).main(list(argv)))
