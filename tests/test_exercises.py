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


def test_reset_restores_one_exercise_and_keeps_the_students_copy(tmp_path, capsys):
    out = tmp_path / "exercises"
    shutil.copytree(EXERCISES, out)
    path = out / "01_data_curation.ipynb"
    edited = path.read_text().replace("raise NotImplementedError", "return []  # my attempt")
    path.write_text(edited, encoding="utf-8")
    other = out / "02_tokenization.ipynb"
    other.write_text(other.read_text() + " ", encoding="utf-8")  # another exercise: left alone

    assert exercises.run_from_args(_args(action="reset", name="01_data_curation", out=str(out))) == 0
    assert path.read_bytes() == (EXERCISES / "01_data_curation.ipynb").read_bytes()
    assert (out / "01_data_curation.ipynb.bak").read_text() == edited
    assert other.read_text().endswith(" ")
    assert "your version is kept as" in capsys.readouterr().out
    assert exercises.run_from_args(_args(action="reset", name="99_nope", out=str(out))) == 2
    assert "no exercise named '99_nope'" in capsys.readouterr().out
    assert exercises.run_from_args(_args(action="reset", name=None, out=str(out))) == 2


def _without_hint_cells(nb):
    """The exercise's cells minus the hint cells the generator inserts after a hinted code cell."""
    return [c for c in nb.cells if not str(c.get("id", "")).endswith("-hints")]


def test_exercises_have_no_outputs_no_solution_code_and_no_hint_in_code():
    for path in sorted(EXERCISES.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        sol = nbformat.read(SOLUTIONS / path.name, as_version=4)
        cells = _without_hint_cells(nb)
        assert len(cells) == len(sol.cells)
        for cell, sol_cell in zip(cells, sol.cells, strict=True):
            assert cell.cell_type == sol_cell.cell_type
            if cell.cell_type != "code":
                assert "<!-- SOLUTION -->" not in cell.source
                if "<!-- SOLUTION -->" not in sol_cell.source:  # a solution region is cut out
                    assert cell.source == sol_cell.source
                continue
            assert cell.outputs == [] and cell.execution_count is None
            assert "# SOLUTION" not in cell.source and "# END SOLUTION" not in cell.source
            assert "HINT" not in cell.source  # hints live only in the collapsed cell below
            if "# SOLUTION" not in sol_cell.source:
                assert cell.source == sol_cell.source  # everything else is identical


def test_every_hinted_exercise_has_progressive_collapsed_hints():
    """Each solution's hints reach the exercise as a markdown cell right after its code, one
    collapsed block per hint, in order; at least two, so the first can be a nudge."""
    n_hinted = 0
    for path in sorted(EXERCISES.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for before, cell in zip(nb.cells[:-1], nb.cells[1:], strict=True):
            if not str(cell.get("id", "")).endswith("-hints"):
                continue
            n_hinted += 1
            assert before.cell_type == "code" and cell.id == f"{before.id}-hints"[:64]
            assert cell.cell_type == "markdown" and "NotImplementedError" in before.source
            blocks = cell.source.count("<details>")
            assert blocks >= 2, f"{path.name}: {cell.id} has {blocks} hint(s); give a nudge first"
            assert blocks == cell.source.count("</details>")
            summaries = [f"<summary>Hint {n} of {blocks}</summary>" for n in range(1, blocks + 1)]
            positions = [cell.source.index(s) for s in summaries]
            assert positions == sorted(positions)
    assert n_hinted >= 10  # every function exercise of notebooks 01-05 has hints


def test_hints_leave_the_stub_for_a_collapsed_markdown_cell():
    src = '''def f(x):
    """Doc."""
    # SOLUTION
    # HINT 1: what is one more than x?
    # HINT 2: add one
    # HINT 2: with +
    y = x + 1
    return y
    # END SOLUTION

print(f)'''
    stub, hints, name = exercises.split_hints(src)
    assert (
        stub
        == '''def f(x):
    """Doc."""
    raise NotImplementedError("f: write the body (hints below, one at a time)")

print(f)'''
    )
    assert stub_source(src) == stub
    assert hints == ["what is one more than x?", "add one\nwith +"] and name == "f"
    md = exercises.hints_markdown(hints, name)
    assert md.index("<summary>Hint 1 of 2</summary>") < md.index("<summary>Hint 2 of 2</summary>")
    assert "what is one more than x?" in md.split("</details>")[0]  # hint 1 in the first block
    assert "add one" not in md.split("</details>")[0] and md.count("<details>") == 2


def _region(*hints: str) -> str:
    """A one-function solution cell whose region holds the given hint lines."""
    body = [f"    {h}" for h in hints]
    return "\n".join(["def g():", "    # SOLUTION", *body, "    return 1", "    # END SOLUTION"])


def test_generated_notebook_places_hints_after_their_code_cell():
    code = nbformat.v4.new_code_cell(_region("# HINT 1: nudge"))
    code.id = "abc"
    nb = nbformat.v4.new_notebook(cells=[code, nbformat.v4.new_markdown_cell("after")])
    out = exercises.generate_notebook(nb)
    assert [c.cell_type for c in out.cells] == ["code", "markdown", "markdown"]
    assert out.cells[1].id == "abc-hints" and "nudge" in out.cells[1].source
    assert "nudge" not in out.cells[0].source and out.cells[2].source == "after"
    assert len(nb.cells) == 2  # the solution notebook is not modified


@pytest.mark.parametrize(
    "src,message",
    [
        (_region("# HINT: old style"), "number the hint"),
        (_region("# HINT 2: skipped one"), "follows hint 0"),
        (_region("# HINT 1: a", "# HINT 3: c"), "hint 3 follows hint 1"),
        ("# HINT 1: outside\nx = 1", "outside"),
    ],
)
def test_badly_numbered_or_placed_hints_are_errors(src, message):
    with pytest.raises(ExerciseSourceError, match=message):
        stub_source(src, "nb: cell 3")


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
