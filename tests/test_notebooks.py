"""Committed notebooks are fit to read and to run: executed, error-free, small, and course-shaped.

nbval (configured in pyproject) re-runs every notebook in fast mode; these tests check the
committed files themselves, which were executed in full mode (`lumorik-sft notebooks --execute`).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from lumorik_sft.course.notebook_tools import check_notebook, notebook_paths, output_bytes

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = notebook_paths(NOTEBOOK_DIR) if NOTEBOOK_DIR.is_dir() else []
# The solutions are committed executed too (exercises/ is generated from them, without outputs).
SOLUTIONS = notebook_paths(NOTEBOOK_DIR.parent / "solutions")


def test_there_are_notebooks():
    """Fail, never skip, when the course has no notebooks: an empty parametrization is silent."""
    assert NOTEBOOKS, f"no .ipynb files found in {NOTEBOOK_DIR}"


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_is_fit_to_commit(path: Path):
    problems = check_notebook(path)
    assert not problems, "\n".join(problems) + "\nre-run: lumorik-sft notebooks --execute " + str(path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_learning_goals(path: Path):
    markdown = [c.source.lower() for c in _read(path).cells if c.cell_type == "markdown"]
    assert any("learning goals" in m for m in markdown), f"{path.name}: no 'Learning goals' markdown cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_checks_its_results(path: Path):
    code = _code(_read(path))
    assert any(line.lstrip().startswith("assert ") for src in code for line in src.splitlines()), (
        f"{path.name}: no assert statement in any code cell"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_the_package(path: Path):
    code = "\n".join(_code(_read(path)))
    assert "lumorik_sft" in code and "import" in code, f"{path.name}: does not import lumorik_sft"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_a_figure(path: Path):
    nb = _read(path)
    images = [
        out
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, f"{path.name}: no figure (image/png output); execute it in full mode"


# ------------------------------------------------------------------------- the checker itself


def _write(tmp_path: Path, cells, name="nb.ipynb") -> Path:
    nb = nbformat.v4.new_notebook(cells=cells)
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def test_check_notebook_finds_each_problem(tmp_path: Path):
    ok = nbformat.v4.new_code_cell("1 + 1", execution_count=1)
    unexecuted = nbformat.v4.new_code_cell("print('never ran')")
    empty = nbformat.v4.new_code_cell("")  # an empty cell without a count is fine
    failed = nbformat.v4.new_code_cell(
        "1 / 0",
        execution_count=2,
        outputs=[
            nbformat.v4.new_output(
                "error", ename="ZeroDivisionError", evalue="division by zero", traceback=[]
            )
        ],
    )
    assert check_notebook(_write(tmp_path, [ok, empty])) == []
    problems = check_notebook(_write(tmp_path, [ok, unexecuted, failed]))
    assert len(problems) == 2
    assert "cell 1: code cell was not executed" in problems[0]
    assert "cell 2: error output: ZeroDivisionError: division by zero" in problems[1]


def test_check_notebook_finds_stderr_warnings_and_printed_tracebacks(tmp_path: Path):
    def printed(text: str, name: str = "stdout"):
        out = nbformat.v4.new_output("stream", name=name, text=text)
        return nbformat.v4.new_code_cell("x", execution_count=1, outputs=[out])

    clean = printed("val loss 0.668, 8.7 s\nno warnings here: the word Warning alone is fine\n")
    assert check_notebook(_write(tmp_path, [clean])) == []
    cells = [
        printed("[transformers] `loss_type=None` was set\n", name="stderr"),
        printed("ok\n/x.py:3: UserWarning: bf16 is emulated\n"),
        printed("Traceback (most recent call last):\n  File ...\n"),
    ]
    problems = check_notebook(_write(tmp_path, cells))
    assert len(problems) == 3, problems
    assert "cell 0: stderr output: [transformers] `loss_type=None`" in problems[0]
    assert "cell 1: a warning or traceback in the output: UserWarning: bf16 is emulated" in problems[1]
    assert "cell 2: a warning or traceback in the output: Traceback" in problems[2]


def test_check_notebook_finds_a_machines_absolute_path(tmp_path: Path):
    def printed(text: str, result: str | None = None):
        outs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        if result is not None:
            outs.append(
                nbformat.v4.new_output("execute_result", data={"text/plain": result}, execution_count=1)
            )
        return nbformat.v4.new_code_cell("x", execution_count=1, outputs=outs)

    fine = printed("base model: embedded\nsaved to runs/demo/final and $TMPDIR/lumorik-03-x/checkpoint.pt\n")
    assert check_notebook(_write(tmp_path, [fine])) == []
    cells = [
        printed("tokenizer from: /work/main/lumorik_sft/assets/base-model | context 256\n"),
        printed("ok\n", result="PosixPath('/home/ada/course/runs/final')"),
        printed("checkpoint saved to /tmp/lumorik-03-luv2r6gl/interrupted/checkpoint.pt.\n"),
    ]
    problems = check_notebook(_write(tmp_path, cells))
    assert len(problems) == 3, problems
    assert (
        "cell 0: a machine's absolute path in the output: /work/main/lumorik_sft/assets/base-model"
        in problems[0]
    )
    assert problems[1].endswith("/home/ada/course/runs/final")
    assert "cell 2: a machine's absolute path" in problems[2]


def test_check_notebook_limits_output_size(tmp_path: Path):
    big = nbformat.v4.new_code_cell(
        "print('x' * 3_000_000)",
        execution_count=1,
        outputs=[nbformat.v4.new_output("stream", name="stdout", text="x" * 3_000_000)],
    )
    path = _write(tmp_path, [big])
    assert output_bytes(nbformat.read(path, as_version=4)) > 3_000_000
    problems = check_notebook(path)
    assert len(problems) == 1 and "MB" in problems[0]
    assert check_notebook(path, max_output_bytes=10_000_000) == []


def test_check_notebook_reports_unreadable_files(tmp_path: Path):
    path = tmp_path / "broken.ipynb"
    path.write_text(json.dumps({"not": "a notebook"})[:-3])
    problems = check_notebook(path)
    assert len(problems) == 1 and "cannot be read" in problems[0]


def test_notebook_paths_sorted_and_skip_checkpoints(tmp_path: Path):
    for name in ("01_b.ipynb", "00_a.ipynb", ".ipynb_checkpoints/00_a-checkpoint.ipynb"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nbformat.v4.new_notebook(), tmp_path / name)
    assert [p.name for p in notebook_paths(tmp_path)] == ["00_a.ipynb", "01_b.ipynb"]
    with pytest.raises(FileNotFoundError):
        notebook_paths(tmp_path / "missing")


def test_execute_notebook_sets_the_mode_and_writes_in_place(tmp_path: Path):
    """One tiny kernel run: the mode reaches the kernel, and outputs land in the file."""
    import argparse

    from lumorik_sft.course.notebook_tools import add_arguments, execute_notebook, run_from_args

    cell = nbformat.v4.new_code_cell(
        "import os\nfrom lumorik_sft.defaults import fast_mode\n"
        "print(os.environ['LUMORIK_FAST'], fast_mode())"
    )
    path = _write(tmp_path, [cell])
    assert check_notebook(path)  # not executed yet
    execute_notebook(path, fast=True, timeout=120)
    out = _read(path).cells[0].outputs[0]["text"]
    assert out.strip() == "1 True"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run_from_args(parser.parse_args(["--execute", str(path)])) == 0  # full mode
    assert _read(path).cells[0].outputs[0]["text"].strip() == "0 False"


def test_coalesce_streams_merges_consecutive_prints_of_one_stream():
    """A cell's printing saved as one output per stream run, whatever the kernel's flush timing."""
    from lumorik_sft.course.notebook_tools import coalesce_streams

    out = nbformat.v4.new_output
    cell = nbformat.v4.new_code_cell("print(1); print(2)")
    cell.outputs = [
        out("stream", name="stdout", text="a"),
        out("stream", name="stdout", text="\nb\n"),
        out("stream", name="stderr", text="warn\n"),
        out("stream", name="stdout", text="c\n"),
        out("display_data", data={"text/plain": "x"}),
        out("stream", name="stdout", text="d\n"),
    ]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell("text")])
    coalesce_streams(nb)
    assert [(o.output_type, o.get("name"), o.get("text")) for o in nb.cells[0].outputs] == [
        ("stream", "stdout", "a\nb\n"),
        ("stream", "stderr", "warn\n"),
        ("stream", "stdout", "c\n"),
        ("display_data", None, None),
        ("stream", "stdout", "d\n"),
    ]
