"""Submissions read safely and outputs written cleanly (issue 16, points 4 and 7).

Attacks a student (or an archive unpacked from a course platform) can mount through the files
themselves: symlinked notebooks and folders, parse errors that echo a secret, outputs that push a
correct notebook over the size limit, cell magics, colliding or hostile folder names, ANSI codes and
markdown in exception messages, spreadsheet formulas. One small class is graded once through the
CLI (three students start a child; the rest are refused or empty); the rest are unit tests of
``grading.submissions`` and ``grading.report``.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import os
import re
from pathlib import Path

import nbformat
import pytest

from lumorik_sft.course import grading

ROOT = Path(__file__).resolve().parent.parent
NB1 = "01_data_curation.ipynb"
SECRET = "S3CRET-7f3a9c"  # the first bytes of a file no student may read
FORGED = "**Total: 27 / 27**"
HOSTILE_MESSAGE = "\\x1b[31mred\\x1b[0m\\n" + FORGED + "\\n# Forged heading\\n[click](http://evil.example)"


def _solution(*, time_magic: bool = False, append: tuple[str, ...] = (), output_mb: int = 0):
    nb = nbformat.read(ROOT / "solutions" / NB1, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith("def clean_and_dedupe"):
            if time_magic:
                cell.source = "%%time\n" + cell.source
            if output_mb:
                cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="x" * (output_mb << 20))]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in append]
    return nb


def _build_class(base: Path) -> Path:
    root = base / "class"
    root.mkdir()
    students = {
        "huge": _solution(output_mb=25),  # correct, with outputs larger than the old 20 MB limit
        "timed": _solution(time_magic=True, append=("%%bash\necho hello",)),
        "ansi": _solution(
            append=(f"def clean_and_dedupe(records):\n    raise ValueError('{HOSTILE_MESSAGE}')",)
        ),
    }
    for name, nb in students.items():
        (root / name).mkdir()
        nbformat.write(nb, root / name / NB1)
    secret = base / "secret.txt"
    secret.write_text(SECRET + " root:$6$not-json\n")
    (root / "linked_nb").mkdir()
    (root / "linked_nb" / NB1).symlink_to(ROOT / "solutions" / NB1)  # the solution, full marks on HEAD
    (root / "peeker").mkdir()
    (root / "peeker" / NB1).symlink_to(secret)
    (root / "copycat").symlink_to(root / "huge", target_is_directory=True)  # another student's folder
    for empty in ("Zoë O'Brien", "Zoë_O_Brien", ".hidden", "=1+2", "evil\x1b[2J"):
        (root / empty).mkdir()
    (root / "dave.zip").write_bytes(b"PK\x03\x04")
    return root


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade the class through the CLI: (students by name, output folder, what it printed)."""
    base = tmp_path_factory.mktemp("attacks")
    root, out = _build_class(base), base / "out"
    printed = io.StringIO()
    argv = [
        str(root),
        "--out",
        str(out),
        "--exercise",
        "clean_and_dedupe",
        "--timeout",
        "20",
        "--no-progress",
    ]
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        assert grading.main(argv) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {s["student"]: s for s in results["students"]}, out, printed.getvalue()


def _exercise(graded, student: str) -> dict:
    return graded[0][student]["exercises"]["clean_and_dedupe"]


def _feedback_file(graded, student: str) -> str:
    """Where results.json says the feedback is (older graders: the name with '_' for unsafe characters)."""
    return graded[0][student].get("feedback") or "feedback/" + re.sub(r"[^\w.-]", "_", student) + ".md"


def _feedback(graded, student: str) -> str:
    return (graded[1] / _feedback_file(graded, student)).read_text(encoding="utf-8")


def _outside_code_blocks(markdown: str) -> list[str]:
    lines, fence = [], None
    for line in markdown.split("\n"):
        if fence is None and line.startswith("```"):
            fence = line[: len(line) - len(line.lstrip("`"))]
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            lines.append(line)
    return lines


# ---- end to end: a class graded through the CLI ------------------------------------------------


def test_symlinked_notebook_to_a_solution_scores_nothing_and_says_symlink(graded):
    g = _exercise(graded, "linked_nb")
    assert g["score"] == 0 and g["status"] == "symlink"
    assert any("symlink" in line for line in g["feedback"]), g["feedback"]
    assert "symlink" in _feedback(graded, "linked_nb")


def test_symlink_to_a_secret_file_never_reaches_any_output(graded):
    assert _exercise(graded, "peeker")["score"] == 0
    for path in graded[1].rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path.name
    assert SECRET not in graded[2]


def test_a_student_folder_linking_to_another_students_folder_is_refused(graded):
    assert "copycat" not in graded[0]  # not graded as the other student's work
    skipped = (graded[1] / "skipped.txt").read_text(encoding="utf-8")
    assert "'copycat': a symbolic link" in skipped


def test_correct_notebook_with_huge_outputs_is_graded(graded):
    assert (ROOT / "solutions" / NB1).stat().st_size < 20 << 20
    g = _exercise(graded, "huge")
    assert g["status"] == "passed" and g["score"] == g["points"], g["feedback"]


def test_time_cell_magic_runs_its_body(graded):
    g = _exercise(graded, "timed")
    assert g["status"] == "passed", g["feedback"]


def test_unknown_cell_magic_is_reported_in_the_feedback(graded):
    notes = " ".join(graded[0]["timed"]["notes"])
    assert "%%bash is not run by the grader" in notes
    assert "%%bash is not run by the grader" in _feedback(graded, "timed")


def test_colliding_names_get_two_feedback_files(graded):
    files = {_feedback_file(graded, n) for n in ("Zoë O'Brien", "Zoë_O_Brien")}
    assert len(files) == 2
    assert "# Feedback for Zoë O'Brien" in _feedback(graded, "Zoë O'Brien")
    assert "# Feedback for Zoë_O_Brien" in _feedback(graded, "Zoë_O_Brien")
    assert len(list((graded[1] / "feedback").iterdir())) == len(graded[0])


def test_dot_folders_and_archives_are_reported_as_skipped(graded):
    assert ".hidden" not in graded[0] and "dave.zip" not in graded[0]
    skipped = (graded[1] / "skipped.txt").read_text(encoding="utf-8")
    assert "'.hidden': a hidden folder" in skipped
    assert "'dave.zip': an archive" in skipped
    assert "3 entries" in skipped and "'.hidden'" in graded[2]  # the CLI prints the report


def test_ansi_codes_and_forged_markdown_in_an_exception_are_neutralised(graded):
    g = _exercise(graded, "ansi")
    assert any(FORGED in line for line in g["feedback"])  # the message did reach the feedback...
    text = _feedback(graded, "ansi")
    assert "\x1b" not in text and "\\x1b[31m" in text  # ...with its escape codes shown, not obeyed
    outside = _outside_code_blocks(text)
    assert FORGED not in outside and "**Total: 0 / 2**" in outside
    assert not any(line.startswith("# Forged") or "](http" in line for line in outside)


def test_formula_folder_name_is_neutralised_in_the_csv(graded):
    with open(graded[1] / "gradebook.csv", newline="", encoding="utf-8") as fh:
        first = [row[0] for row in csv.reader(fh)]
    assert "'=1+2" in first and "=1+2" not in first
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in first)


def test_terminal_never_sees_a_students_escape_codes(graded):
    assert "evil\x1b" not in graded[2] and "evil\\x1b[2J: 0" in graded[2]
    assert "\x1b" not in (graded[1] / "gradebook.csv").read_text(encoding="utf-8")


# ---- reading submissions -----------------------------------------------------------------------
# (the modules are imported by fixtures, so that the end-to-end tests above also run on older code)


@pytest.fixture
def submissions():
    return importlib.import_module("lumorik_sft.course.grading.submissions")


@pytest.fixture
def report():
    return importlib.import_module("lumorik_sft.course.grading.report")


def test_find_students_lists_every_entry_it_does_not_grade(tmp_path, submissions):
    root = tmp_path / "class"
    for name in ("bob", ".git", "out"):
        (root / name).mkdir(parents=True)
    (root / "link").symlink_to(root / "bob")
    (root / "notes.txt").write_text("hi")
    os.mkfifo(root / "pipe")
    students, skipped = submissions.find_students(root, output=root / "out")
    assert students == [root / "bob"]
    reasons = {s.name: s.reason for s in skipped}
    assert set(reasons) == {".git", "out", "link", "notes.txt", "pipe"}
    assert "output folder" in reasons["out"] and "symbolic link" in reasons["link"]


def _nb_bytes(*sources: str) -> bytes:
    return nbformat.writes(
        nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    ).encode()


def test_links_fifos_and_hard_links_are_refused_without_reading_them(tmp_path, submissions):
    other = tmp_path / "class" / "alice"
    other.mkdir(parents=True)
    (other / NB1).write_bytes(_nb_bytes("x = 1"))
    folder = tmp_path / "class" / "bob"
    folder.mkdir()
    (folder / "sym.ipynb").symlink_to(other / NB1)
    os.link(other / NB1, folder / "hard.ipynb")
    os.mkfifo(folder / "fifo.ipynb")  # opening it for reading would wait forever
    (folder / "dir.ipynb").mkdir()
    names = ["sym.ipynb", "hard.ipynb", "fifo.ipynb", "dir.ipynb", "gone.ipynb"]
    cells, problems = submissions.read_notebooks(folder, names)
    assert cells == {}
    assert {n: p.status for n, p in problems.items()} == {
        "sym.ipynb": "symlink",
        "hard.ipynb": "error",
        "fifo.ipynb": "error",
        "dir.ipynb": "error",
        "gone.ipynb": "missing",
    }
    assert "hard links" in problems["hard.ipynb"].message
    linked = tmp_path / "class" / "carol"
    linked.symlink_to(other, target_is_directory=True)
    cells, problems = submissions.read_notebooks(linked, [NB1])
    assert cells == {} and problems[NB1].status == "symlink"


@pytest.mark.parametrize(
    "data",
    [
        SECRET.encode(),
        b'{"nbformat": 4, "cells": ' + SECRET.encode() + b"}",
        b"\xff" + SECRET.encode(),
        ("[" * 100_000).encode(),
        b'{"nbformat": 3, "worksheets": []}',
        b'{"nbformat": 4, "cells": [{"cell_type": "code", "source": 7}]}',
        json.dumps({"nbformat": 4, "cells": SECRET}).encode(),
        b'{"nbformat": 4, "cells": [], "n": ' + b"9" * 5000 + b"}",
    ],
)
def test_parse_errors_never_echo_the_file(data, submissions):
    problem = submissions.parse_notebook(data, NB1)
    assert isinstance(problem, submissions.Problem) and problem.status == "error"
    assert problem.message.startswith(f"could not read the notebook: {NB1}")
    assert SECRET not in problem.message and "9999" not in problem.message and len(problem.message) < 150


def test_the_size_limit_applies_to_the_code_not_the_outputs(monkeypatch, submissions):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="y" * 100_000)]
    monkeypatch.setattr(submissions, "MAX_CODE_BYTES", 1000)
    assert submissions.parse_notebook(nbformat.writes(nb).encode(), NB1) == ["x = 1"]
    too_much = _nb_bytes("z = 1\n" * 200)
    assert "more than" in submissions.parse_notebook(too_much, NB1).message


def test_cell_magics_run_their_body_and_line_magics_are_skipped(submissions):
    ns: dict = {}
    exec(submissions.cell_code("%%capture out\n%%time\n%matplotlib inline\n!ls\n%time y = 2\nx = y + 1"), ns)
    assert ns["x"] == 3 and "out" not in ns
    source = "%%time\n\ndef f():\n    return 1 +"
    with pytest.raises(SyntaxError) as err:
        exec(submissions.cell_code(source), {})
    assert err.value.lineno == 4  # line numbers still match the notebook's cell
    plain = 'text = """\n%d items\n!important\n"""'
    assert submissions.cell_code(plain) == plain  # valid Python is never rewritten


def test_an_unknown_cell_magic_raises_an_error_that_names_it(submissions):
    for source in ("%%bash\necho hi", "\n%%capture\n%%writefile x.py\nx = 1", "%%\nx = 1"):
        with pytest.raises(Exception) as err:
            exec(submissions.cell_code(source), {})
        assert type(err.value).__name__ == "UnsupportedCellMagic"
        assert "is not run by the grader" in str(err.value) and len(str(err.value)) < 150
    with pytest.raises(Exception, match="%%bash"):
        exec(submissions.cell_code("%%bash\necho hi"), {})


# ---- writing outputs ---------------------------------------------------------------------------


def test_visible_shows_control_and_format_characters(report):
    shown = report.visible("a\x1b[2Jb\r\u202e\udcff\n\t", keep="\n")
    assert shown == "a\\x1b[2Jb\\x0d\\u202e\\udcff\n\\x09"


def test_markdown_inline_text_cannot_forge_formatting(report):
    text = report.md_inline(f"{FORGED}\n# h [a](http://x) <b> | www.x.com a_b _c_")
    assert "\n" not in text and text.startswith("\\*\\*Total\\: 27 / 27\\*\\*\\\\x0a\\# h")
    assert "\\[a\\](http\\://x)" in text and "\\<b\\>" in text
    assert "\\|" in text and "a_b" in text and "\\_c\\_" in text and "www\\.x" in text


def test_a_fenced_block_cannot_be_closed_from_inside(report):
    block = report.md_block(["``````", "# not a heading", "\x1b[31m"])
    fence = block.split("\n")[0][: -len("text")]
    assert len(fence) == 7 and block.endswith("\n" + fence) and block.count(fence) == 2
    assert "\x1b" not in block


@pytest.mark.parametrize("cell", ["=1+2", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1", " =1+2"])
def test_csv_cells_never_start_a_formula(cell, report):
    assert report.csv_cell(cell).startswith(("'", "\\"))


def test_feedback_files_are_unique_even_ignoring_case(report):
    names = ["Zoë O'Brien", "Zoë_O_Brien", "alice", "Alice", "bob", "con", "x" * 300, "a\udcffb", "a/b"]
    files = report.feedback_files(names)
    assert len({f.casefold() for f in files.values()}) == len(names)
    assert files["bob"] == "bob.md" and all(len(f.encode()) < 100 and "/" not in f for f in files.values())
    assert report.feedback_stem("Zoë O'Brien") != report.feedback_stem("Zoë_O_Brien")
