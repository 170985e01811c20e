"""exercises/ is generated from solutions/ and CI fails when they drift; the stubs hide the solutions."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nbformat
import pytest

from lumorik_sft.course import exercises
from lumorik_sft.course.exercises import ExerciseSourceError, stub_source

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS, EXERCISES = ROOT / "solutions", ROOT / "exercises"


def _args(**kw):
    return argparse.Namespace(
        **{"action": "build", "check": False, "solutions": str(SOLUTIONS), "out": str(EXERCISES), **kw}
    )


def test_committed_exercises_are_in_sync():
    """The CI gate: `lumorik-sft exercises build --check` exits 0 only when nothing would change."""
    problems = exercises.check(SOLUTIONS, EXERCISES)
    assert not problems, "\n".join(problems) + "\nrun: lumorik-sft exercises build"
    assert exercises.run_from_args(_args(check=True)) == 0


def test_check_fails_on_drift(tmp_path, capsys):
    out = tmp_path / "exercises"
    shutil.copytree(EXERCISES, out)
    path = out / "01_data_curation.ipynb"
    path.write_text(path.read_text().replace("raise NotImplementedError", "return []  #"), encoding="utf-8")
    (out / "99_extra.ipynb").write_text(path.read_text(), encoding="utf-8")
    assert exercises.run_from_args(_args(check=True, out=str(out))) == 1
    printed = capsys.readouterr().out
    assert "01_data_curation.ipynb: differs" in printed and "99_extra.ipynb: has no solution" in printed
    assert exercises.run_from_args(_args(out=str(out))) == 0  # build repairs it, deterministically
    assert exercises.check(SOLUTIONS, out) == []
    assert (out / "01_data_curation.ipynb").read_bytes() == (
        EXERCISES / "01_data_curation.ipynb"
    ).read_bytes()


def test_exercises_have_no_outputs_and_no_solution_code():
    for path in sorted(EXERCISES.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        sol = nbformat.read(SOLUTIONS / path.name, as_version=4)
        assert len(nb.cells) == len(sol.cells)
        for cell, sol_cell in zip(nb.cells, sol.cells, strict=True):
            assert cell.cell_type == sol_cell.cell_type
            if cell.cell_type != "code":
                assert "<!-- SOLUTION -->" not in cell.source
                if "<!-- SOLUTION -->" not in sol_cell.source:  # a solution region is cut out
                    assert cell.source == sol_cell.source
                continue
            assert cell.outputs == [] and cell.execution_count is None
            assert "# SOLUTION" not in cell.source and "# END SOLUTION" not in cell.source
            if "# SOLUTION" not in sol_cell.source:
                assert cell.source == sol_cell.source  # everything else is identical


def test_stub_source_keeps_signature_docstring_and_hints():
    src = '''def f(x):
    """Doc."""
    # SOLUTION
    # HINT: add one
    y = x + 1
    return y
    # END SOLUTION

print(f)'''
    assert (
        stub_source(src)
        == '''def f(x):
    """Doc."""
    # HINT: add one
    raise NotImplementedError("f: write the body (see the hints above)")

print(f)'''
    )


def test_stub_lines_replace_answer_regions():
    src = "# SOLUTION\n# STUB: ANSWER_Q1 = None\nANSWER_Q1 = 'b'\n# END SOLUTION"
    assert stub_source(src) == "ANSWER_Q1 = None"


@pytest.mark.parametrize(
    "src,message",
    [
        ("# SOLUTION\nx = 1", "without '# END SOLUTION'"),
        ("x = 1\n# END SOLUTION", "without '# SOLUTION'"),
        ("# SOLUTION\n# SOLUTION\n# END SOLUTION", "nested"),
    ],
)
def test_malformed_regions_are_errors(src, message):
    with pytest.raises(ExerciseSourceError, match=message):
        stub_source(src, "nb: cell 3")


def test_markdown_solution_regions_are_removed(tmp_path):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell(
                "Q.\n<!-- SOLUTION -->\nThe answer is 42.\n<!-- END SOLUTION -->\nNext."
            ),
        ]
    )
    out = exercises.generate_notebook(nb)
    assert out.cells[0].source == "Q.\nNext."
