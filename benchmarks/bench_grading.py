"""Grade 30 synthetic students with 2 workers and print the wall time (target: under 3 minutes on 2 cores).

    python benchmarks/bench_grading.py [--students 30] [--workers 2] [--keep DIR]

The class mixes copies of solutions/ (full marks), fresh exercises/ (zero), students whose every function
is a plausible wrong version, and hostile students (sys.exit/os._exit, infinite loops, huge allocations,
printing "passed", monkeypatching, reading the solutions), built from tests/test_checks.py and
tests/test_grading.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TQDM_DISABLE", "0")

import nbformat  # noqa: E402
from test_checks import WRONG, WRONG_ANSWERS  # noqa: E402
from test_grading import HOSTILE, _notebook  # noqa: E402

from lumorik_sft.course import checks, grading  # noqa: E402


def _write(folder: Path, notebooks: dict) -> None:
    folder.mkdir(parents=True)
    for name, nb in notebooks.items():
        nbformat.write(nb, folder / name)


def build_class(root: Path, n: int) -> Counter:
    kinds = Counter()
    hostile = list(HOSTILE.items())
    for i in range(n):
        kind = ("solution", "stub", "wrong", "hostile", "solution")[i % 5]
        if kind == "solution":
            notebooks = {nb: _notebook("solutions", nb) for nb in checks.NOTEBOOKS}
        elif kind == "stub":
            notebooks = {nb: _notebook("exercises", nb) for nb in checks.NOTEBOOKS}
        elif kind == "wrong":
            notebooks = {}
            for nb in checks.NOTEBOOKS:
                exs = [e for e in checks.EXERCISES.values() if e.notebook == nb]
                extra = [WRONG[e.name][i % len(WRONG[e.name])][0] for e in exs if e.kind == "function"]
                extra += [f"{e.symbol} = {WRONG_ANSWERS[e.name][0][0]!r}" for e in exs if e.kind == "answer"]
                notebooks[nb] = _notebook("solutions", nb, append=tuple(extra))
        else:
            name, hostile_nbs = hostile[i // 5 % len(hostile)]
            kind = f"hostile:{name}"
            notebooks = {nb: _notebook("solutions", nb) for nb in checks.NOTEBOOKS} | hostile_nbs
        _write(root / f"student{i:02d}", notebooks)
        kinds[kind] += 1
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--students", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=grading.GradingConfig.timeout)
    parser.add_argument("--keep", default=None, help="write the class and the gradebook here")
    args = parser.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-grading-"))
    try:
        kinds = build_class(base / "submissions", args.students)
        print(f"{args.students} students: {dict(kinds)}; {os.cpu_count()} CPUs, {args.workers} workers")
        start = time.perf_counter()
        students = grading.grade(
            base / "submissions",
            base / "out",
            workers=args.workers,
            config=grading.GradingConfig(timeout=args.timeout),
        )
        wall = time.perf_counter() - start
        statuses = Counter(g.status for s in students for g in s.exercises.values())
        print(f"statuses: {dict(statuses)}")
        print(
            f"per student: mean {sum(s.seconds for s in students) / len(students):.1f} s, "
            f"max {max(s.seconds for s in students):.1f} s"
        )
        verdict = "under" if wall < 180 else "OVER"
        print(
            f"graded {len(students)} students with {args.workers} workers in {wall:.1f} s "
            f"({verdict} the 3-minute target)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
