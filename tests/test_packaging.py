"""The package as pip builds it from pyproject.toml (and MANIFEST.in): what the sdist holds, what the extras name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _pyproject() -> dict:
    path = ROOT / "pyproject.toml"
    if not path.is_file():
        pytest.skip("not a source tree (no pyproject.toml beside tests/)")
    return tomllib.loads(path.read_text())


def _source_files(folder: str) -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }


def test_the_sdist_holds_the_tests_and_the_files_they_read(tmp_path):
    """setuptools' default sdist took tests/test_*.py alone, without tests/conftest.py, tests/helpers.py and the
    test packages they import (5 of its 11 test files failed to import), and none of docs/ or benchmarks/."""
    _pyproject()
    pytest.importorskip("setuptools.build_meta")
    code = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    name = done.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        top = name.removesuffix(".tar.gz") + "/"
        held = {m.name.removeprefix(top) for m in tar.getmembers() if m.isfile()}
    for folder in ("src/hybridlm", "tests", "docs", "benchmarks"):
        missing = sorted(_source_files(folder) - held)
        assert not missing, f"{folder}: not in the sdist: {missing[:10]}"
    assert "src/hybridlm/py.typed" in held
    assert "LICENSE" in held  # pyproject's Apache-2.0 asks for its text to travel with the code
    assert not [n for n in held if "__pycache__" in n or n.endswith(".pyc")]


def _imported_top_names() -> set[str]:
    """Every module name (and its dotted prefixes) that src/hybridlm imports anywhere, functions included."""
    names = set()
    for path in (ROOT / "src" / "hybridlm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules = [node.module]
            for module in modules:
                parts = module.split(".")
                names |= set(parts)
    return names


@pytest.mark.parametrize("extra", ["gpu", "tokenizers", "logging", "float8", "data"], ids=lambda e: f"{e}-extra")
def test_each_package_of_an_optional_extra_is_imported_by_the_package(extra):
    """An extra installs what the code it guards imports, and nothing more: the gpu extra named einops, which no
    module imports."""
    requirements = _pyproject()["project"]["optional-dependencies"][extra]
    imported = _imported_top_names()
    for requirement in requirements:
        package = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("-", "_")
        assert package in imported, f"[project.optional-dependencies] {extra}: {requirement!r} is imported nowhere"


def test_type_checkers_see_every_lazy_public_name_and_the_annotations_say_what_is_taken_and_returned():
    """The package ships py.typed, but ``from hybridlm import HybridLM`` reached its names through ``__getattr__``
    alone, so type checkers saw every one of them (HybridLM, ModelConfig, load, generate, ...) as Any; ``load``
    was annotated to return a bare ``nn.Module`` (``load(...).config`` a type error); the annotations of
    ``HybridLM(dtype=...)`` and ``cast`` left out the dtype names they take, and ``generate``'s the tensors of ids."""
    import inspect

    import hybridlm
    from hybridlm.model import HybridLM

    tree = ast.parse(Path(hybridlm.__file__).read_text())
    typed: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in (n for n in ast.walk(node) if isinstance(n, ast.ImportFrom)):
                typed.update({a.asname or a.name: "hybridlm." + (imp.module or "") for a in imp.names})
    assert typed == hybridlm._LAZY, "each lazy name imported under TYPE_CHECKING from its module"
    assert inspect.signature(hybridlm.load).return_annotation == "HybridLM"
    for function in (HybridLM.__init__, HybridLM.cast):
        assert "str" in inspect.signature(function).parameters["dtype"].annotation
    assert "torch.Tensor" in inspect.signature(hybridlm.generate).parameters["prompts"].annotation
