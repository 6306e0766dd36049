"""The import rules of docs/design.md ("Layout"), checked on the source with ``ast``.

    pattern → config → ops → layers → model → parallel | plan | checkpoint → train | infer → cli

A module may import its own unit and any unit to its left; units joined by ``|`` do not import
each other. Imports inside functions and under ``TYPE_CHECKING`` count too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import hybridlm

SRC = Path(hybridlm.__file__).parent

#: Top-level module or folder -> its unit.
UNIT_OF = {
    "_errors_base": "base",
    "pattern": "pattern",
    "config": "config",
    "presets": "config",
    "errors": "config",
    "ops": "ops",
    "layers": "layers",
    "model": "model",
    "counting": "model",
    "parallel": "parallel",
    "plan": "plan",
    "checkpoint": "checkpoint",
    "train": "train",
    "infer": "infer",
    "cli": "cli",
    "__main__": "cli",  # ``python -m hybridlm``: runs the command line
}
#: Unit -> level; a unit imports only units of a lower level (siblings share a level).
LEVEL = {
    "base": 0,
    "pattern": 1,
    "config": 2,
    "ops": 3,
    "layers": 4,
    "model": 5,
    "parallel": 6,
    "plan": 6,
    "checkpoint": 6,
    "train": 7,
    "infer": 7,
    "cli": 8,
}
#: Units that import only the standard library (no torch): importing them stays instant.
PURE = {"base", "pattern", "config"}
#: Optional kernel packages: only ops/ may import them (ops/dispatch.py chooses the path).
KERNEL_PACKAGES = {"triton", "mamba_ssm", "fla", "causal_conv1d", "flash_attn", "grouped_gemm", "flashinfer", "torchao"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of everything ``source`` (the text of ``module``) imports, anywhere in it."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if node.module:
                found.add(prefix)
            else:  # from . import symbols
                found.update(f"{prefix}.{a.name}" for a in node.names)
    return found


def unit_of(name: str) -> str | None:
    """The unit of an absolute hybridlm module name (None for the package itself or outside it)."""
    parts = name.split(".")
    if parts[0] != "hybridlm" or len(parts) < 2:
        return None
    if parts[1] in UNIT_OF:
        return UNIT_OF[parts[1]]
    if parts[1] in hybridlm._LAZY:  # ``from hybridlm import HybridLM`` reaches into its module
        return unit_of(hybridlm._LAZY[parts[1]])
    return None  # another name of the package facade (``__version__``), which imports only pattern


def layering_violations(module: str, imported: set[str]) -> list[str]:
    own = unit_of(module)
    bad = []
    for name in sorted(imported):
        other = unit_of(name)
        if other is not None and other != own and LEVEL[other] >= LEVEL[own]:
            bad.append(f"{module} ({own}) imports {name} ({other})")
        top = name.split(".")[0]
        if own in PURE and top != "hybridlm" and top not in sys.stdlib_module_names:
            bad.append(f"{module} ({own}) must import only the standard library, imports {name}")
        if own != "ops" and top in KERNEL_PACKAGES:
            bad.append(f"{module} ({own}) imports the kernel package {name}: only ops/ may")
    return bad


MODULES = {
    _module_name(p): (p, p.name == "__init__.py")
    for p in sorted(SRC.rglob("*.py"))
    if p != SRC / "__init__.py"  # the package facade: imports pattern, the rest lazily by name
}


def test_every_module_has_a_unit():
    assert {name.split(".")[1] for name in MODULES} <= set(UNIT_OF), "place the new module in UNIT_OF and the docs"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_follow_the_layering(module):
    path, is_package = MODULES[module]
    assert layering_violations(module, imports_of(path.read_text(), module, is_package)) == []


def test_the_checker_sees_imports_and_flags_violations():
    model, _ = MODULES["hybridlm.model"]
    assert "hybridlm.layers" in imports_of(model.read_text(), "hybridlm.model", False)
    upward = "def f():\n    from ..train.trainer import Trainer\n    import torch\n"
    assert imports_of(upward, "hybridlm.layers.mlp", False) == {"hybridlm.train.trainer", "torch"}
    assert layering_violations("hybridlm.layers.mlp", {"hybridlm.train.trainer"}) != []
    assert layering_violations("hybridlm.checkpoint.weights", {"hybridlm.parallel.pipeline"}) != []  # siblings
    assert layering_violations("hybridlm.pattern.parser", {"torch"}) != []
    assert layering_violations("hybridlm.model", {"triton.language"}) != []
    assert imports_of("from . import symbols", "hybridlm.pattern", True) == {"hybridlm.pattern.symbols"}
    assert layering_violations(
        "hybridlm.layers.moe", imports_of("from .. import HybridLM", "hybridlm.layers.moe", False)
    )


def test_only_ops_dispatch_reads_the_kernel_switch():
    readers = sorted(name for name, (p, _) in MODULES.items() if "HYBRIDLM_KERNELS" in p.read_text())
    assert readers == ["hybridlm.ops.dispatch"]
