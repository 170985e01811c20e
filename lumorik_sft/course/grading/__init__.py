"""Grade a class's exercise notebooks so that no student's code can change a verdict.

    python -m lumorik_sft.course.grading SUBMISSIONS --out OUT [--workers 2] [--timeout 20] [--memory-mb 4096]

(or `lumorik-sft grade ...`). ``SUBMISSIONS`` holds
one folder per student with their copies of the exercise notebooks, under the same file names; a
missing notebook scores 0 for its exercises. Writes ``OUT/gradebook.csv`` (a row per student, a column
per exercise, a total), ``OUT/feedback/<student>.md`` and ``OUT/results.json``.

Three modules, on the two sides of a trust boundary:

* :mod:`~lumorik_sft.course.grading.supervisor`, the instructor's side: the hidden cases, one
  sandboxed child per student, the watchdog, judging, and the files written;
* :mod:`~lumorik_sft.course.grading.child`, the only code that runs beside a student's code (its
  docstring says what it trusts and what it sends back); it imports neither of the others;
* :mod:`~lumorik_sft.course.grading.cli`, the command line.

This package imports them only when one of its names is used, so that the child's process loads
the child module and nothing of the supervisor.

How a verdict is made, and why student code cannot change it:

1. The grader draws a secret seed per run (``--seed`` only for reproducing a run) and builds every
   exercise's hidden cases with the same ``make_cases`` the notebook checks use
   (:mod:`lumorik_sft.course.checks`); answers precomputed for the check cases do not help.
2. Each student's code runs in ONE fresh interpreter (``sys.executable -I``), in an empty temporary
   working directory, with a scrubbed environment (no path to the solutions or the submissions), an
   address-space limit (``RLIMIT_AS``), a CPU-time limit, a per-exercise alarm inside the child, and a
   per-phase watchdog in the parent that kills the whole process group. On Linux it also runs in
   its own root filesystem and PID namespace (:mod:`lumorik_sft.course.sandbox`): only the system, Python
   and the ``lumorik_sft`` package directory are there, read-only, so ``solutions/``, ``.git``, other
   students' work and the gradebook do not exist for it; the student's code runs as ``nobody`` or
   without capabilities, so it cannot undo that. The child receives the
   notebooks' code and the hidden inputs on stdin; it runs the code cells (minus magics and the
   ``checks.`` calls, each cell in its own try/except), calls the student's functions on the inputs and
   writes their outputs back as JSON data on a dedicated pipe, one record per exercise. Nothing is
   unpickled, and stdout is discarded (printing "passed" is noise).
3. The grader computes the expected outputs with the package's reference functions and compares them
   with the returned data in its own process (``checks.judge``): monkeypatching
   ``lumorik_sft.course.checks`` or a reference inside the child changes nothing here. In the child,
   those modules are also restored from a snapshot before each exercise, and calling the reference
   an exercise mirrors fails it.
4. If the child dies (``os._exit``, a segfault, the OOM killer) or hangs, the exercise in progress gets
   ``error``, ``out of memory`` or ``timeout`` and a fresh child goes on with the remaining ones.

Statuses: passed, failed, error, timeout, out of memory, missing. Each exercise earns
``points * passed_cases / cases``. One student's failure never stops the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lumorik_sft.course.grading.cli import add_arguments, main, run_from_args
    from lumorik_sft.course.grading.supervisor import (
        ExerciseGrade,
        GradingConfig,
        StudentGrade,
        grade,
        grade_student,
    )

__all__ = [
    "ExerciseGrade",
    "GradingConfig",
    "StudentGrade",
    "add_arguments",
    "grade",
    "grade_student",
    "main",
    "run_from_args",
]

# name -> the module that defines it (_compile_cell: tests/test_checks.py reads it from here)
_WHERE = {
    "ExerciseGrade": "supervisor",
    "GradingConfig": "supervisor",
    "StudentGrade": "supervisor",
    "grade": "supervisor",
    "grade_student": "supervisor",
    "add_arguments": "cli",
    "main": "cli",
    "run_from_args": "cli",
    "_compile_cell": "child",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
