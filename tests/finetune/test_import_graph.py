"""`finetune/` imports downward only: no cycle between its modules, and nothing from the entry points above it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {"train", "setup_new_model", "annotate", "modules", "scripts", "benchmarks", "tests"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every module of `modules` that `path` imports, at top level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            # `a.b.c` imports `a.b.c` if it is a module, else the longest module prefix.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (REPO / "finetune").rglob("*.py")}
    return {m: _imports(p, set(files)) - {m} for m, p in files.items()}


def test_finetune_modules_import_each_other_without_a_cycle():
    graph = _graph()
    assert "finetune.trainer" in graph and "finetune.loss" in graph["finetune.trainer"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if dep.startswith("finetune") and not _is_package_of(dep, m):
                assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [m, dep])
                if dep not in state:
                    visit(dep, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def _is_package_of(package: str, module: str) -> bool:
    # `from finetune.data import x` inside `finetune.data.y` resolves to the package, which Python loads first.
    return module.startswith(package + ".")


def test_finetune_imports_no_entry_point():
    for path in (REPO / "finetune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops = {node.module.split(".")[0]}
            else:
                continue
            assert not tops & ENTRY_POINTS, f"{path.relative_to(REPO)} imports {tops & ENTRY_POINTS}"
