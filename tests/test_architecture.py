"""Imports point one way: load -> view -> probe -> checks -> report -> render. Read from the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bncheck"
FRAMEWORKS = ("onnx", "onnxruntime", "keras", "h5py", "tensorflow", "torch", "jax")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(*parts: str) -> list[Path]:
    base = PACKAGE.joinpath(*parts)
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


def _offending(paths: list[Path], forbidden) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in paths
        for name in sorted(_imports(path))
        if forbidden(name)
    ]


def _is_framework(name: str) -> bool:
    return name.split(".", maxsplit=1)[0] in FRAMEWORKS


def _is_single_check(name: str) -> bool:
    return name.startswith("bncheck.checks.bn0")


def test_only_backends_import_a_framework():
    outside = [p for p in _modules() if "backends" not in p.relative_to(PACKAGE).parts]
    assert _offending(outside, _is_framework) == []


@pytest.mark.parametrize("part", ["checks", "model", "findings", "verdicts", "report", "probe_plan", "probe_data"])
def test_neutral_modules_import_no_backend(part):
    assert _offending(_modules(part), lambda n: n.startswith("bncheck.backends") or _is_framework(n)) == []


@pytest.mark.parametrize("part", ["render", "report", "fixing", "backends"])
def test_consumers_of_verdicts_import_no_single_check(part):
    assert _offending(_modules(part), _is_single_check) == []


def test_checks_import_no_renderer_or_engine():
    forbidden = ("bncheck.render", "bncheck.report", "bncheck.engine", "bncheck.cli", "bncheck.fixing")
    assert _offending(_modules("checks"), lambda n: n.startswith(forbidden)) == []


def test_onnx_graph_does_not_import_the_loader():
    assert _offending(_modules("backends", "onnx", "graph"), lambda n: n.startswith("bncheck.backends.onnx.load")) == []


def test_lazy_imports_inside_functions_are_seen(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import onnx\n    from bncheck.checks import bn001_collapse\n")
    found = _imports(bad)
    assert any(_is_framework(n) for n in found)
    assert any(_is_single_check(n) for n in found)
