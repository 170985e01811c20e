"""The package's shape: three parts, and what may import what (see ARCHITECTURE.md).

The core library (`lumorik_sft/*.py`) is what a student reads; it must work without the course
(`lumorik_sft/course/`) and the base-model recipe (`lumorik_sft/basemodel/`), so it never imports
them, not even through `importlib` strings. Modules stay small enough to read in one sitting.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lumorik_sft"
OUTER_PARTS = ("lumorik_sft.course", "lumorik_sft.basemodel")
MAX_LINES = 600


def _modules(folder: Path, recursive: bool = False) -> list[Path]:
    return sorted(folder.rglob("*.py") if recursive else folder.glob("*.py"))


def _imported_names(path: Path) -> set[str]:
    """Every module an import statement names, and every string constant that looks like one."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


CORE = [p for p in _modules(PACKAGE) if p.name != "__init__.py"] + [PACKAGE / "__init__.py"]


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_never_imports_the_course_or_the_recipe(path):
    offending = sorted(
        n for n in _imported_names(path) if any(n == part or n.startswith(part + ".") for part in OUTER_PARTS)
    )
    assert not offending, f"{path.name} (core) imports {offending}; move that code to course/ or basemodel/"


def test_the_check_catches_an_outer_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import importlib\nimportlib.import_module('lumorik_sft.course.checks')\n"
        "def f():\n    from lumorik_sft.basemodel import pretrain\n"
    )
    assert {"lumorik_sft.course.checks", "lumorik_sft.basemodel"} <= _imported_names(bad)


def test_the_recipe_does_not_import_the_course():
    for path in _modules(PACKAGE / "basemodel", recursive=True):
        offending = sorted(n for n in _imported_names(path) if n.startswith("lumorik_sft.course"))
        assert not offending, f"{path} imports {offending}"


@pytest.mark.parametrize("path", _modules(PACKAGE, recursive=True), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_600_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {n} lines; split it by concern"
