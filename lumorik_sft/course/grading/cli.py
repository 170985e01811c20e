"""The command line: ``lumorik-sft grade`` and ``python -m lumorik_sft.course.grading``.

    python -m lumorik_sft.course.grading SUBMISSIONS --out OUT [--workers 2] [--timeout 20] [--memory-mb 4096]

:func:`add_arguments` and :func:`run_from_args` are the hooks ``lumorik_sft.cli`` registers; they check
the values and call :func:`lumorik_sft.course.grading.supervisor.grade`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from lumorik_sft.course.grading import report
from lumorik_sft.course.grading.supervisor import INCOMPLETE_FILE, GradingConfig, GradingStopped, grade

__all__ = ["add_arguments", "main", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lumorik-sft grade``."""
    parser.add_argument(
        "submissions", help="folder with one sub-folder per student (their exercise notebooks)"
    )
    parser.add_argument(
        "--out", required=True, help="where to write gradebook.csv, feedback/ and results.json"
    )
    parser.add_argument("--workers", type=int, default=2, help="students graded in parallel (default: 2)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=GradingConfig.timeout,
        help="seconds per exercise and per notebook cell (default: %(default)s)",
    )
    parser.add_argument(
        "--memory-mb",
        type=int,
        default=GradingConfig.memory_mb,
        help="memory of all of one student's processes together, in MB (default: %(default)s)",
    )
    parser.add_argument(
        "--notebook-budget",
        type=float,
        default=GradingConfig.notebook_budget,
        help="wall-clock seconds for all the exercises of one notebook (default: %(default)s)",
    )
    parser.add_argument(
        "--student-budget",
        type=float,
        default=GradingConfig.student_budget,
        help="wall-clock seconds for one student, whatever their code does; the class takes at most "
        "about students x this / workers (default: %(default)s)",
    )
    parser.add_argument(
        "--exercise",
        action="append",
        default=None,
        help="grade only this exercise (repeatable; default: all)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="fix the hidden cases' seed, to reproduce a run (default: a secret random seed)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-isolation",
        action="store_true",
        help="do not run student code in namespaces (only where they misbehave: the solutions may then "
        "be readable by student code)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    from lumorik_sft.course import checks

    unknown = [n for n in (args.exercise or []) if n not in checks.EXERCISES]
    if unknown:
        print(f"unknown exercise(s) {', '.join(unknown)}; choose from {', '.join(checks.EXERCISES)}")
        return 2
    budgets = (args.timeout, args.notebook_budget, args.student_budget)
    if args.workers < 1 or min(budgets) <= 0 or args.memory_mb < 512:
        print("--workers must be >= 1, --timeout and the budgets > 0 and --memory-mb >= 512")
        return 2
    config = GradingConfig(
        timeout=args.timeout,
        memory_mb=args.memory_mb,
        isolate=not args.no_isolation,
        notebook_budget=args.notebook_budget,
        student_budget=args.student_budget,
    )
    start = time.perf_counter()
    try:
        students = grade(
            args.submissions,
            args.out,
            workers=args.workers,
            config=config,
            seed=args.seed,
            exercises=args.exercise,
            progress=not args.no_progress,
        )
    except GradingStopped as stopped:  # SIGINT/SIGTERM: the partial gradebook is written
        print(f"{stopped}; partial gradebook in {args.out} (see {INCOMPLETE_FILE})")
        return 128 + stopped.signum
    seconds = time.perf_counter() - start
    for s in students:  # a folder name is student text: escapes shown, never sent to the terminal
        statuses = ", ".join(f"{g.name}={g.status}" for g in s.exercises.values() if g.status != "passed")
        print(f"{report.visible(s.student)}: {s.total:g}" + (f"  ({statuses})" if statuses else ""))
    print(f"graded {len(students)} student(s) in {seconds:.1f} s; wrote {args.out}/gradebook.csv")
    skipped = Path(args.out) / report.SKIPPED_FILE  # what was not graded, and why (escaped)
    if skipped.is_file():
        print(skipped.read_text(encoding="utf-8").rstrip())
    for name in args.exercise or checks.EXERCISES:
        if checks.EXERCISES[name].review:
            print(f"read by hand: {name}: {checks.EXERCISES[name].review}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lumorik_sft.course.grading",
        description="Grade a class's exercise notebooks so that no student's code can change a verdict.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
