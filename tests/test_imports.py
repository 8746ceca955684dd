"""The house's import rules: no circles (lazy imports included), each module importable alone, the CLI's --help without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import raijac

PACKAGE = Path(raijac.__file__).parent
MODULES = sorted(f"raijac.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


def _imports(name: str) -> set[str]:
    """raijac modules that `name` imports, at the top or inside a function (a lazy import is
    still an edge: it only hides a circle until the function runs)."""
    tree = ast.parse((PACKAGE / f"{name.removeprefix('raijac.')}.py").read_text())
    for node in ast.walk(tree):  # annotations only: `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raijac"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != name}


def test_module_imports_form_no_circle():
    graph = {m: _imports(m) for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n] if n in path else [m, n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module):
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_help_does_not_import_torch():
    code = "import sys; from raijac.cli import cli; cli(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "False"


def test_public_names_resolve_lazily():
    for name in raijac.__all__:
        assert getattr(raijac, name) is not None
    assert callable(raijac.plan) and raijac.plan.__module__ == "raijac.api"
    assert callable(raijac.verify.verify)
