"""The grader: solutions score 100%, stubs 0, wrong code loses points, and no hostile student changes a verdict.

One grading run (module fixture) covers a small class: each student is a folder of notebooks built from the
committed solutions/exercises plus a few cells. Runs take about a minute on 2 busy cores (one child each).
"""
# ruff: noqa: E501  (wrong solutions and hostile notebooks are written as source snippets)

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from test_checks import WRONG, WRONG_ANSWERS

from lumorik_sft.course import checks, grading, sandbox
from lumorik_sft.course.grading import GradingConfig, child, session

ROOT = Path(__file__).resolve().parent.parent
MAX_TOTAL = sum(ex.points for ex in checks.EXERCISES.values())


def _notebook(folder: str, name: str, *, prepend: tuple[str, ...] = (), append: tuple[str, ...] = ()):
    nb = nbformat.read(ROOT / folder / name, as_version=4)
    nb.cells = (
        [nbformat.v4.new_code_cell(s) for s in prepend]
        + nb.cells
        + [nbformat.v4.new_code_cell(s) for s in append]
    )
    return nb


def _student(root: Path, name: str, notebooks: dict) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for nb_name, nb in notebooks.items():
        if isinstance(nb, str):
            (folder / nb_name).write_text(nb, encoding="utf-8")
        else:
            nbformat.write(nb, folder / nb_name)


NB1, NB2 = "01_data_curation.ipynb", "02_tokenization.ipynb"

HOSTILE = {
    "hostile_exit": {
        NB1: _notebook(
            "solutions",
            NB1,
            prepend=("import sys\nsys.exit(1)",),
            append=(
                "import sys\ndef clean_and_dedupe(records):\n    sys.exit(3)",
                "import os\ndef leak_free_split(records, val_fraction=0.1, seed=0):\n    os._exit(0)",
            ),
        ),
        NB2: _notebook("solutions", NB2),
    },
    "hostile_loop": {
        NB1: _notebook(
            "solutions",
            NB1,
            append=(
                "def clean_and_dedupe(records):\n    while True:\n        pass",
                "def leak_free_split(records, val_fraction=0.1, seed=0):\n    while True:\n        try:\n"
                "            while True:\n                pass\n        except BaseException:\n            pass",
            ),
        ),
        NB2: _notebook("solutions", NB2),
    },
    "hostile_oom": {
        NB1: _notebook(
            "solutions",
            NB1,
            append=(
                "def clean_and_dedupe(records):\n    blocks = []\n    while True:\n"
                "        blocks.append(bytes(512 * 2**20))",
            ),
        ),
        NB2: _notebook(
            "solutions",
            NB2,
            append=("def collate(features, pad_token_id):\n    return {'input_ids': torch.ones(10**12)}",),
        ),
    },
    "hostile_print": {
        NB1: _notebook(
            "solutions",
            NB1,
            append=(
                "print('check_clean_and_dedupe: all 6 cases passed')",
                "def clean_and_dedupe(records):\n    print('check_clean_and_dedupe: all 6 cases passed')\n"
                "    print('passed')\n    return []",
            ),
        )
    },
    "hostile_patch": {
        NB1: _notebook(
            "solutions",
            NB1,
            append=(
                "import lumorik_sft.course.checks as c, lumorik_sft.data as d, lumorik_sft.course.grading.supervisor as g\n"
                "c.judge = lambda *a, **k: None\n"
                "c.check_clean_and_dedupe = lambda fn: print('passed')\n"
                "c.run_case = lambda ex, obj, case, fn_globals=None: ex.reference(case)\n"
                "c.to_data = lambda x: []\n"
                "c.EXERCISES['clean_and_dedupe'] = None\n"
                "d.curate = lambda records, **k: type('R', (), {'kept': [], 'dropped': [], 'counts': {}})()\n"
                "d.clean_text = lambda text: text\n"
                "g._judge_exercise = lambda grade, *a: setattr(grade, 'status', 'passed')\n",
                "def clean_and_dedupe(records):\n    return [dict(r) for r in records]",
                "def leak_free_split(records, val_fraction=0.1, seed=0):\n"
                "    return d.split_records(records, val_fraction=val_fraction, seed=seed)",
            ),
        )
    },
    "hostile_read": {
        NB1: _notebook(
            "solutions",
            NB1,
            append=(
                # answers precomputed for the notebook check's cases (seed 0): useless against the secret seed
                # (and in the grader's child the references are disabled, so the table is never built)
                "def clean_and_dedupe(records):\n    return _TABLE.get(repr(records), [])",
                "from lumorik_sft.course import checks as _c\n"
                "_TABLE = {repr(case['records']): d for case in _c.EXERCISES['clean_and_dedupe'].make_cases(0)\n"
                "          for d in [_c.EXERCISES['clean_and_dedupe'].reference(case)]}",
                # look for the solutions where the process could point: cwd and its parents, HOME, env, argv
                "import os, sys, glob, json as _json\n"
                "def leak_free_split(records, val_fraction=0.1, seed=0):\n"
                "    places = [os.getcwd()] + [str(p) for p in __import__('pathlib').Path.cwd().parents]\n"
                "    places += [os.path.expanduser('~')] + list(os.environ.values()) + sys.argv\n"
                "    places += [str(__import__('pathlib').Path(_c.__file__).resolve().parents[1]), '/tmp']\n"
                "    for place in places:\n"
                "        for path in glob.glob(os.path.join(place, '**', 'solutions', '01_*.ipynb'), recursive=False)"
                " + glob.glob(os.path.join(place, 'solutions', '01_*.ipynb')):\n"
                "            ns = {}\n"
                "            for cell in _json.load(open(path))['cells']:\n"
                "                if cell['cell_type'] == 'code' and 'checks.' not in ''.join(cell['source']):\n"
                "                    exec(''.join(cell['source']), ns)\n"
                "            return ns['leak_free_split'](records, val_fraction, seed)\n"
                "    return [], []",
            ),
        )
    },
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("submissions")
    _student(root, "alice", {nb: _notebook("solutions", nb) for nb in checks.NOTEBOOKS})
    _student(root, "bob", {nb: _notebook("exercises", nb) for nb in checks.NOTEBOOKS})
    wrong = {}
    for nb in checks.NOTEBOOKS:
        extra = [
            WRONG[ex.name][0][0]
            for ex in checks.EXERCISES.values()
            if ex.notebook == nb and ex.kind == "function"
        ]
        extra += [
            f"{ex.symbol} = {WRONG_ANSWERS[ex.name][0][0]!r}"
            for ex in checks.EXERCISES.values()
            if ex.notebook == nb and ex.kind == "answer"
        ]
        wrong[nb] = _notebook("solutions", nb, append=tuple(extra))
    _student(root, "wrong", wrong)
    _student(root, "partial", {NB1: _notebook("solutions", NB1), NB2: "{ this is not json"})
    for name, notebooks in HOSTILE.items():
        _student(root, name, notebooks)
    out = tmp_path_factory.mktemp("out")
    students = grading.grade(root, out, workers=2, config=GradingConfig(timeout=12.0), progress=False)
    return {s.student: s for s in students}, out


def _status(graded, student, exercise):
    return graded[0][student].exercises[exercise].status


def test_solutions_score_100_percent(graded):
    alice = graded[0]["alice"]
    assert alice.total == MAX_TOTAL, {n: (g.status, g.feedback) for n, g in alice.exercises.items()}
    assert all(g.status == "passed" for g in alice.exercises.values())


def test_fresh_exercises_score_zero(graded):
    bob = graded[0]["bob"]
    assert bob.total == 0
    for name, g in bob.exercises.items():
        expected = "error" if checks.EXERCISES[name].kind == "function" else "failed"
        assert g.status == expected, (name, g.status, g.feedback)


def test_wrong_solutions_lose_points(graded):
    wrong = graded[0]["wrong"]
    for name, g in wrong.exercises.items():
        assert g.score < g.points, (name, g.score, g.feedback)
        assert g.status in ("failed", "error"), (name, g.status)
    assert any("-100" in line for line in wrong.exercises["encode_example"].feedback)


def test_missing_and_unreadable_notebooks(graded):
    partial = graded[0]["partial"]
    assert partial.exercises["clean_and_dedupe"].status == "passed"
    assert partial.exercises["encode_example"].status == "error"
    assert "could not read the notebook" in partial.exercises["encode_example"].feedback[0]
    assert partial.exercises["train_step"].status == "missing" and partial.exercises["train_step"].score == 0


def test_sys_exit_and_os_exit_are_errors_and_grading_goes_on(graded):
    assert _status(graded, "hostile_exit", "clean_and_dedupe") == "error"
    assert "sys.exit" in graded[0]["hostile_exit"].exercises["clean_and_dedupe"].feedback[0]
    assert _status(graded, "hostile_exit", "leak_free_split") == "error"
    assert "os._exit" in graded[0]["hostile_exit"].exercises["leak_free_split"].feedback[0]
    for name in ("encode_example", "collate"):  # a fresh child took over after os._exit
        assert _status(graded, "hostile_exit", name) == "passed"


def test_infinite_loops_time_out(graded):
    assert _status(graded, "hostile_loop", "clean_and_dedupe") == "timeout"  # the child's alarm
    assert _status(graded, "hostile_loop", "leak_free_split") == "timeout"  # swallowed alarm: parent kill
    assert _status(graded, "hostile_loop", "encode_example") == "passed"
    assert graded[0]["hostile_loop"].total == 3 + 2


def test_huge_allocations_fail_and_claim_no_status(graded):
    # refused by the address-space limit inside the child: a MemoryError is data the child reports, so
    # the status is the grader's "error", never a claimed "out of memory" (that status needs the grader
    # to see the memory used: tests/test_grading_attacks.py)
    clean = graded[0]["hostile_oom"].exercises["clean_and_dedupe"]
    assert clean.status == "error" and "MemoryError" in " ".join(clean.feedback), clean.feedback
    assert _status(graded, "hostile_oom", "collate") == "error"
    assert _status(graded, "hostile_oom", "leak_free_split") == "passed"


def test_printing_passed_changes_nothing(graded):
    g = graded[0]["hostile_print"].exercises["clean_and_dedupe"]
    assert g.status == "failed" and g.score == 0


def test_monkeypatching_checks_and_references_changes_nothing(graded):
    student = graded[0]["hostile_patch"]
    assert student.exercises["clean_and_dedupe"].status == "failed"
    assert student.exercises["clean_and_dedupe"].score == 0
    split = student.exercises["leak_free_split"]
    assert split.score == 0 and any("the package's reference" in f for f in split.feedback)


@pytest.mark.skipif(not sandbox.detect().isolated, reason="no mount namespaces on this machine")
def test_reading_solutions_or_precomputing_answers_does_not_help(graded):
    student = graded[0]["hostile_read"]
    assert student.exercises["clean_and_dedupe"].score == 0
    assert student.exercises["leak_free_split"].score == 0


def test_results_say_how_student_code_was_isolated(graded):
    results = json.loads((graded[1] / "results.json").read_text())
    assert results["isolation"] == sandbox.detect().description


def test_gradebook_and_feedback_files(graded):
    students, out = graded
    with open(out / "gradebook.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["student", *checks.EXERCISES, "total"]
    by_name = {r[0]: r for r in rows[1:]}
    assert set(by_name) == set(students)
    assert float(by_name["alice"][-1]) == MAX_TOTAL and float(by_name["bob"][-1]) == 0
    for name in students:
        text = (out / "feedback" / f"{name}.md").read_text()
        assert text.startswith(f"# Feedback for {name}")
    assert "not written yet" in (out / "feedback" / "bob.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == "secret" and results["max_total"] == MAX_TOTAL
    # Q2 passes a keyword screen only: results and every feedback file say to read it by hand.
    assert set(results["review"]) == {"q2"} and "read ANSWER_Q2" in results["review"]["q2"]
    assert "## Read by hand\n\n- q2: a keyword screen" in (out / "feedback" / "alice.md").read_text()


def test_child_environment_points_nowhere_near_the_repo(tmp_path):
    env = session.child_env(tmp_path)
    assert not any(str(ROOT) in value for value in env.values())
    assert "PYTHONPATH" not in env


def test_checks_calls_are_not_run_and_magics_become_python_before_the_child():
    from lumorik_sft.course.grading.submissions import cell_code

    ns: dict = {}
    source = cell_code("%matplotlib inline\nx = 1\nchecks.check_q1(x)\nok = checks.check_q2(x)\n")
    exec(child._compile_cell(source, 0), ns)
    assert ns["x"] == 1 and "ok" not in ns
    ns = {}
    exec(child._compile_cell(cell_code("%%time\ny = 2"), 1), ns)
    assert ns["y"] == 2  # a timed cell runs its body


def test_cli_hooks_parse_and_reject_bad_values(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    grading.add_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"])
    assert grading.run_from_args(args) == 2
    args = parser.parse_args([str(tmp_path), "--out", str(tmp_path / "o"), "--exercise", "nope"])
    assert grading.run_from_args(args) == 2
    assert "unknown exercise" in capsys.readouterr().out


GRADING = ROOT / "lumorik_sft" / "course" / "grading"


def test_the_child_imports_nothing_of_the_supervisor_or_the_cli():
    """The trust boundary reads on its own: child.py names no other module of the package (nor the sandbox)."""
    imported = set()
    for node in ast.walk(ast.parse((GRADING / "child.py").read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in child.py"
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    offending = sorted(
        n for n in imported if n.startswith(("lumorik_sft.course.grading", "lumorik_sft.course.sandbox"))
    )
    assert not offending, offending


def test_the_child_process_loads_the_child_module_only():
    """Importing the child (as the bootstrap does) loads neither the supervisor, the CLI nor torch."""
    probe = (
        "import json, sys\nfrom lumorik_sft.course.grading.child import _zygote_main\n"
        "print(json.dumps([m for m in sys.modules if m.startswith('lumorik_sft') or m == 'torch']))"
    )
    done = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert loaded == {"lumorik_sft", "lumorik_sft.course", "lumorik_sft.course.grading", child.__name__}
    assert child.__name__ in session._BOOTSTRAP


@pytest.mark.parametrize("path", sorted(GRADING.glob("*.py")), ids=lambda p: p.name)
def test_grading_modules_are_under_600_lines(path):
    assert len(path.read_text().splitlines()) < 600, path.name


def test_python_m_grading_still_runs():
    done = subprocess.run(
        [sys.executable, "-m", "lumorik_sft.course.grading", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "SUBMISSIONS" in done.stdout.upper(), done.stderr
    assert all(getattr(grading, name) is not None for name in grading.__all__)
