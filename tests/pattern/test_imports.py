"""Every module of ``hybridlm.pattern`` imports on its own, without torch and without cycles."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hybridlm.pattern

PATTERN_DIR = Path(hybridlm.pattern.__file__).parent
MODULES = sorted(p.stem for p in PATTERN_DIR.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_alone_in_a_fresh_interpreter(name):
    code = (
        f"import importlib, sys; importlib.import_module('hybridlm.pattern.{name}');"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _sibling_imports(path: Path) -> set[str]:
    """Modules of the pattern package that ``path`` imports anywhere (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import symbols
                found.update(a.name for a in node.names)
    return found & set(MODULES)


def test_no_import_cycle_inside_the_package():
    graph = {m: _sibling_imports(PATTERN_DIR / f"{m}.py") for m in MODULES}
    assert "parser" in graph["table"] and "stage" in graph["parser"]  # the walk sees imports

    def visit(m, path):
        assert m not in path, f"import cycle: {' -> '.join([*path, m])}"
        for dep in graph[m]:
            visit(dep, [*path, m])

    for m in MODULES:
        visit(m, [])
