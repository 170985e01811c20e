"""Grade a class's exercise notebooks so that no student's code can change a verdict.

    python -m lumorik_sft.course.grading SUBMISSIONS --out OUT [--workers 2] [--timeout 20] [--memory-mb 4096]

(or `lumorik-sft grade ...`). ``SUBMISSIONS`` holds
one folder per student with their copies of the exercise notebooks, under the same file names; a
missing notebook scores 0 for its exercises. Writes ``OUT/gradebook.csv`` (a row per student, a column
per exercise, a total), ``OUT/feedback/<student>.md``, ``OUT/results.json`` and ``OUT/skipped.txt``
(every entry of SUBMISSIONS that was not graded, and why).

The modules, on the two sides of a trust boundary:

* :mod:`~lumorik_sft.course.grading.supervisor`, the instructor's side: the hidden cases, the
  class in parallel, judging, and the files written; :mod:`~lumorik_sft.course.grading.session`
  (one student's sandbox, jobs, deadlines and budgets), :mod:`~lumorik_sft.course.grading.channel`
  (one request, one answer) and :mod:`~lumorik_sft.course.grading.limits` (cgroups, rlimits, the
  memory watch) under it;
* :mod:`~lumorik_sft.course.grading.submissions` (finding students, reading notebooks without
  following links, cell magics) and :mod:`~lumorik_sft.course.grading.report` (escaped feedback,
  unique file names, a formula-free CSV, the skip report), the supervisor's input and output;
* :mod:`~lumorik_sft.course.grading.child`, the only code that runs beside a student's code (its
  docstring says what it trusts and what it sends back); it imports neither of the others. Where
  the grader is root it also runs the *template* (:mod:`~lumorik_sft.course.grading.template`): one
  process per run that imports torch and the package once and forks each student's sandbox, which
  builds itself (the same namespaces, root, user id and cgroup as the ``unshare`` command) before
  becoming that student's zygote, so a student costs no interpreter start;
* :mod:`~lumorik_sft.course.grading.cli`, the command line.

This package imports them only when one of its names is used, so that the child's process loads
the child module and nothing of the supervisor.

Threat model. The student is an adversary who controls every byte of their notebooks and
therefore everything that runs in the child's processes: they may read ``sys.argv``, the stack and
every descriptor, patch any module, fork, sleep, flood stdout/stderr, exhaust memory, write to the
grader's pipes, or call ``os._exit``. The instructor's machine and the other students must not
suffer, and no grade may move without the work being done. What the grader guarantees (each claim
is tested in ``tests/test_grading_attacks.py`` and ``tests/test_grading.py``):

1. **Verdicts are the grader's.** The hidden cases come from a secret seed per run; the expected
   outputs are computed in the grader, with the package's references, never in the child; the
   child returns plain JSON data that is judged in the grader (``checks.judge``).
2. **The channel cannot be forged** (:mod:`.channel`, :mod:`.session`). Each exercise is a job in a
   fresh process with pipes of its own; the grader sends the notebook's code, then, only once the
   cells have run, that exercise's hidden cases, each request with a fresh random id, and accepts
   exactly one answer per request, in order, before its own deadline. A record nobody asked for, a
   second record, garbage or an oversized record ends the student's run with ``error``. Writing a
   record yourself therefore gains nothing your function could not have returned.
3. **Statuses are observed, not claimed.** ``timeout`` means the grader's clock ran out (or the
   child's alarm fired after the grader saw that much time pass); ``out of memory`` means the
   kernel killed one of the student's processes for memory while the exercise ran (their cgroup's
   OOM-kill counter; the answer, if any, is void) or the grader's memory watch fired; a
   ``{"oom": true}`` or a MemoryError from the child is an ordinary failed case.
4. **The package's answers are disabled where they would answer.** Before any student code runs
   in a job, the functions an exercise forbids (``forbidden=`` in ``checks/ch*.py``) and every
   exercise's reference are given new code in place (``checks.framework.disable``), so every way of
   reaching them raises: a module attribute, an alias, a default argument bound earlier, a closure,
   a holder object, a subclass, a package function that calls them. Other jobs keep them, so a
   later exercise may use an earlier one's answer as a helper (``build_batches`` uses ``curate``).
5. **Time is bounded** by the grader: a timeout per exercise and per cell, a wall-clock budget per
   notebook and per student that no message from the child moves; when a budget runs out the
   student's whole sandbox is killed, so a class of N students on W workers takes at most about
   N x ``student_budget`` / W plus one budget.
6. **Resources are bounded per student** (:mod:`.limits`): one cgroup per student (memory and
   process count for all their processes together) where ``/sys/fs/cgroup`` is writable, else
   ``RLIMIT_NPROC`` under a user id of the student's own, ``RLIMIT_FSIZE``, ``RLIMIT_AS`` per
   process and a watch of the total resident memory; stdout is discarded and stderr is read into a
   few kilobytes of memory, never onto the disk; a network namespace with no route out
   (:mod:`lumorik_sft.course.sandbox`); the solutions, the checkout, other students and the
   gradebook are not in the child's filesystem.
7. **State does not cross jobs.** Each job's process is forked from a zygote that never ran
   student code (itself started fresh, or forked from the template, which never runs student code
   either), after the previous job's processes are killed and its files removed: environment
   variables, the working directory, hooks and patches of one notebook cannot reach the next.
8. **Stopping is clean.** SIGINT/SIGTERM kills every sandbox (and a killed grader takes them along,
   ``--pdeathsig``), deletes the scratch folder and writes the gradebook of the students finished
   so far with ``INCOMPLETE.txt``; the gradebook is rewritten as each student finishes.

What it cannot do, and does not claim: it cannot tell who wrote a correct answer. A student who
copies the answer's source (from the package, which students have, or from a classmate), or who
digs the original function out of the interpreter (``gc``, reloading or ``exec``-ing the package's
source) to get around the disabled copy, has reproduced the answer: that is plagiarism, visible in
the submission, not something a sandbox decides. The answers of the question exercises (``q1``...)
are constants in the checks, which students can read. Without namespaces (macOS, some containers)
the solutions may be readable and students graded at the same time could reach each other, and
without cgroups the memory limit is sampled, so a burst between two samples can pass it (the
grader warns, and ``results.json`` records ``isolation`` and ``limits``).

Statuses: passed, failed, error, timeout, out of memory, missing, symlink (a notebook or folder
that is a link, never followed: see :mod:`.submissions`). Each exercise earns
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
        GradingStopped,
        StudentGrade,
        grade,
        grade_student,
    )

__all__ = [
    "ExerciseGrade",
    "GradingConfig",
    "GradingStopped",
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
    "GradingStopped": "supervisor",
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
