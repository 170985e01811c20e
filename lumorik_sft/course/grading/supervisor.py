"""The grader's side: find the submissions, run each student in a sandbox, judge, write results.

For each student folder, :func:`grade_student` reads the notebooks' code cells and hands one job
per exercise to :func:`.session.run_jobs`, which runs them in a sandbox of the student's own
(:mod:`lumorik_sft.course.sandbox`, :mod:`.limits`): a fresh process per job, forked from one in
which no student code ever ran (:mod:`.child`), the hidden cases sent only once the notebook's
cells have run, exactly one answer accepted per request before the grader's own deadline
(:mod:`.channel`). The outputs are judged here against expected outputs computed here, never in
the child. :func:`grade` does this for a whole class in parallel, writes the gradebook as each
student finishes, and on SIGINT/SIGTERM kills every sandbox, deletes its scratch folder and leaves
a partial gradebook marked incomplete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lumorik_sft.course import sandbox
from lumorik_sft.course.checks.framework import USED_REFERENCE
from lumorik_sft.course.grading import limits, report
from lumorik_sft.course.grading.session import Job, JobOutcome, Stopped, run_jobs
from lumorik_sft.course.grading.submissions import find_students, read_notebooks
from lumorik_sft.course.grading.template import Template
from lumorik_sft.course.sandbox import Sandbox

__all__ = ["ExerciseGrade", "GradingConfig", "GradingStopped", "StudentGrade", "grade", "grade_student"]

INCOMPLETE_FILE = "INCOMPLETE.txt"  # in the output folder while (or because) grading did not finish


@dataclass(frozen=True)
class GradingConfig:
    """Limits for one student: time per exercise, budgets, and resources shared by all their processes."""

    timeout: float = 20.0  # seconds per exercise (all its cases) and per notebook cell
    memory_mb: int = 4096  # resident memory of all of a student's processes together
    startup_timeout: float = 120.0  # interpreter start and imports, under load
    max_restarts: int = 8  # fresh sandboxes after a crash/hang, per student
    isolate: bool = True  # namespaces that hide the solutions (course.sandbox), where available
    notebook_budget: float = 180.0  # wall-clock seconds for all the jobs of one notebook
    student_budget: float = 600.0  # wall-clock seconds for one student, whatever happens
    max_processes: int = 64  # processes and threads of one student
    file_mb: int = 64  # the largest file one of the student's processes may write
    cgroups: bool = True  # per-student cgroups where the machine allows; else the fallback watch

    @property
    def limits(self) -> limits.Limits:
        cpu = int(self.student_budget) + 60  # a per-process backstop; the deadlines come first
        return limits.Limits(self.memory_mb, self.max_processes, self.file_mb, cpu)


class GradingStopped(Exception):
    """SIGINT or SIGTERM stopped :func:`grade`; the partial gradebook is written."""

    def __init__(self, signum: int, students: list[StudentGrade]) -> None:
        super().__init__(f"grading stopped by signal {signum} after {len(students)} student(s)")
        self.signum, self.students = signum, students


@dataclass
class ExerciseGrade:
    name: str
    notebook: str
    points: float
    score: float = 0.0
    status: str = "missing"
    passed_cases: int = 0
    n_cases: int = 0
    feedback: list[str] = field(default_factory=list)


@dataclass
class StudentGrade:
    student: str
    exercises: dict[str, ExerciseGrade]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> float:
        return round(sum(e.score for e in self.exercises.values()), 4)


def _exercise_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big")


@dataclass
class _Plan:
    """The hidden cases and expected outputs of one grading run, computed once in the grader."""

    names: list[str]
    cases: dict[str, list[dict[str, Any]]]
    expected: dict[str, list[Any]]


def _make_plan(seed: int, names: Sequence[str] | None = None) -> _Plan:
    from lumorik_sft.course import checks

    chosen = list(names) if names else list(checks.EXERCISES)
    cases, expected = {}, {}
    for name in chosen:
        ex = checks.EXERCISES[name]
        cases[name] = ex.make_cases(_exercise_seed(seed, name))
        expected[name] = [ex.reference(c) for c in cases[name]]
    return _Plan(chosen, cases, expected)


def _judge_exercise(
    grade: ExerciseGrade, ex: Any, cases: list, expected: list, outcome: JobOutcome, timeout: float
) -> None:
    """Verdicts from the child's outputs, judged here. Statuses come from what the grader saw:
    a case the child calls timed out counts as "timeout" only if the grader's clock saw the
    exercise's time pass; any other claim (``{"oom": true}``, a MemoryError) is just a failed case."""
    from lumorik_sft.course import checks

    grade.n_cases = len(cases)
    outputs = outcome.outputs or []
    feedback, passed, timeouts, raised = [], 0, 0, 0
    for i, case in enumerate(cases):
        got = outputs[i] if i < len(outputs) else {"timeout": True}
        if got == {"timeout": True}:
            timeouts += 1
            feedback.append(f"case {i}: did not finish in time")
            continue
        line = checks.judge(ex, case, expected[i], got)
        if line is None:
            passed += 1
        else:
            raised += int(isinstance(got, dict) and ("raised" in got or "used_reference" in got))
            feedback.append(f"case {i}: {line}")
    grade.passed_cases = passed
    grade.score = round(ex.points * passed / len(cases), 4) if cases else 0.0
    if timeouts and outcome.seconds >= timeout:
        grade.status = "timeout"
    elif passed == len(cases):
        grade.status = "passed"
    elif passed == 0 and raised + timeouts == len(cases):
        grade.status = "error"
    else:
        grade.status = "failed"
    grade.feedback = _dedupe_lines(feedback)


def _dedupe_lines(lines: list[str], limit: int = 4) -> list[str]:
    """Keep the first few distinct messages (ignoring the case number)."""
    seen, out = set(), []
    for line in lines:
        key = re.sub(r"^case \d+: ", "", line)
        if key not in seen:
            seen.add(key)
            out.append(line)
    if len(out) > limit:
        out = out[:limit] + [f"... {len(out) - limit} more distinct problem(s)"]
    return out


def grade_student(
    folder: str | Path,
    plan: _Plan,
    config: GradingConfig,
    scratch: str | Path,
    box: Sandbox | None = None,
    *,
    uid: int = sandbox.NOBODY,
    cgroup_version: int | None = None,
    stop: threading.Event | None = None,
    template: Template | None = None,
) -> StudentGrade:
    """Grade one student's folder; never raises for anything the student's code does.

    Raises :class:`.session.Stopped` when `stop` is set (the student's sandbox is gone by then).
    """
    from lumorik_sft.course import checks

    start = time.monotonic()
    folder = Path(folder)
    exercises = {n: checks.EXERCISES[n] for n in plan.names}
    grades = {n: ExerciseGrade(n, ex.notebook, ex.points) for n, ex in exercises.items()}
    result = StudentGrade(folder.name, grades)
    notebooks = list(dict.fromkeys(ex.notebook for ex in exercises.values()))
    # Read without following any link, magics turned into Python (see :mod:`.submissions`).
    cells, problems = read_notebooks(folder, notebooks)
    for name, problem in problems.items():
        for g in grades.values():
            if g.notebook == name:
                g.status = problem.status  # "missing", "symlink" or "error"
                missing = problem.status == "missing"
                g.feedback = [f"{name} is missing from the submission" if missing else problem.message]
                g.n_cases = len(plan.cases[g.name])
    jobs = [
        Job(n, exercises[n].notebook, cells[exercises[n].notebook], plan.cases[n])
        for n in plan.names
        if exercises[n].notebook in cells
    ]
    box = box or Sandbox("none")
    outcomes = run_jobs(
        jobs, config, box, Path(scratch), uid=uid, cgroup_version=cgroup_version, stop=stop, template=template
    )
    noted: set[tuple[str, str]] = set()
    for job in jobs:
        outcome, g = outcomes[job.name], grades[job.name]
        # once per notebook; a cell that failed only because this job's reference was disabled is no news
        errors = [
            e for e in outcome.load_errors if (job.notebook, e) not in noted and USED_REFERENCE not in e
        ]
        noted.update((job.notebook, e) for e in errors)
        if errors:
            result.notes.append(f"{job.notebook}: cells that raised while loading: {'; '.join(errors[:3])}")
        if outcome.outputs is not None:
            ex = exercises[job.name]
            _judge_exercise(g, ex, job.cases, plan.expected[job.name], outcome, config.timeout)
        else:
            g.status, g.n_cases, g.score = outcome.death, len(job.cases), 0.0
            where = {"load": "while loading its notebook: ", "run": "while running it: "}.get(
                outcome.phase, ""
            )
            g.feedback = [where + outcome.detail]
    result.seconds = round(time.monotonic() - start, 2)
    return result


def _write_outputs(
    out: Path, plan: _Plan, students: list[StudentGrade], seed_note: str, isolation: str
) -> None:
    """gradebook.csv (no formulas), unique feedback files, results.json: see :mod:`.report`."""
    from lumorik_sft.course import checks

    points = {n: checks.EXERCISES[n].points for n in plan.names}
    reviews = {n: checks.EXERCISES[n].review for n in plan.names if checks.EXERCISES[n].review}
    report.write_outputs(out, students, points, reviews, seed_note, isolation)


def grade(
    submissions: str | Path,
    out: str | Path,
    *,
    workers: int = 2,
    config: GradingConfig | None = None,
    seed: int | None = None,
    exercises: Sequence[str] | None = None,
    progress: bool = True,
) -> list[StudentGrade]:
    """Grade every student folder under `submissions` in parallel; write the gradebook and feedback.

    The gradebook is rewritten as each student finishes. SIGINT or SIGTERM (received in the main
    thread) stops it: every sandbox is killed, the scratch folder deleted, the gradebook of the
    students graded so far written with ``INCOMPLETE.txt``, and :class:`GradingStopped` raised.
    """
    config = config or GradingConfig()
    root = Path(submissions)
    if not root.is_dir():
        raise FileNotFoundError(f"submissions folder {root} does not exist")
    folders, skipped = find_students(root, output=out)  # real folders only; links are never followed
    report.write_skipped(out, skipped, root)  # before grading, so an interrupted run has it too
    if skipped:
        where = Path(out) / report.SKIPPED_FILE
        print(f"warning: {len(skipped)} entry(ies) of {root} not graded (see {where})", file=sys.stderr)
    if not folders:
        raise FileNotFoundError(f"no student folders in {root} (expected one folder per student)")
    seed_note = "fixed (--seed)" if seed is not None else "secret"
    seed = secrets.randbits(63) if seed is None else seed
    plan = _make_plan(seed, exercises)
    box = sandbox.detect() if config.isolate else Sandbox("none")
    if not box.isolated:
        why = "turned off" if not config.isolate else "namespaces are not available on this machine"
        print(f"warning: {box.description} ({why})", file=sys.stderr)
    cgroup_version = limits.detect() if config.cgroups else None
    note = _limits_note(cgroup_version, box, config.cgroups)
    if cgroup_version is None:
        print(f"warning: {note}", file=sys.stderr)
    writer = _Progress(Path(out), plan, folders, seed_note, box.description, note)
    writer.write({})  # an interrupted run leaves a gradebook marked incomplete from the start
    stop, caught = threading.Event(), []
    scratch = Path(tempfile.mkdtemp(prefix="lumorik-grade-"))
    template = Template.start(box, config)  # imports once for the whole class (root only)
    try:
        with _stop_on_signals(stop, caught):
            results = _grade_all(
                folders, plan, config, scratch, box, cgroup_version, stop, workers, progress, writer, template
            )
    finally:
        if template is not None:
            template.close()
        shutil.rmtree(scratch, ignore_errors=True)  # the sandboxes are gone by now
    ordered = writer.write(results)
    if len(ordered) < len(folders):
        raise GradingStopped(caught[0] if caught else signal.SIGINT, ordered)
    return ordered


def _limits_note(cgroup_version: int | None, box: Sandbox, wanted: bool = True) -> str:
    """How the per-student limits are enforced on this machine (results.json, warnings)."""
    if cgroup_version is not None:
        return f"per-student memory and process limits by cgroup v{cgroup_version}"
    why = "this machine's /sys/fs/cgroup is not writable for memory and pids" if wanted else "turned off"
    nproc = "RLIMIT_NPROC under the student's own user id" if box.kind == "nobody" else "no process limit"
    return (
        f"no per-student cgroup ({why}): the memory of all the student's processes is sampled and "
        f"the sandbox killed over the limit; {nproc}"
    )


class _Progress:
    """Writes the gradebook as students finish; ``INCOMPLETE.txt`` says who is not graded (yet)."""

    def __init__(
        self, out: Path, plan: _Plan, folders: list[Path], seed_note: str, isolation: str, note: str
    ):
        self.out, self.plan, self.folders = out, plan, folders
        self.seed_note, self.isolation, self.note = seed_note, isolation, note
        self.lock = threading.Lock()

    def write(self, results: dict[str, StudentGrade]) -> list[StudentGrade]:
        with self.lock:
            done = [results[f.name] for f in self.folders if f.name in results]
            missing = [f.name for f in self.folders if f.name not in results]
            _write_outputs(self.out, self.plan, done, self.seed_note, self.isolation)
            self._mark(missing)
            return done

    def _mark(self, missing: list[str]) -> None:
        path = self.out / "results.json"
        with contextlib.suppress(OSError, ValueError):
            summary = json.loads(path.read_text(encoding="utf-8"))
            summary.update(complete=not missing, not_graded=missing, limits=self.note)
            path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        marker = self.out / INCOMPLETE_FILE
        if not missing:
            marker.unlink(missing_ok=True)
            return
        lines = [f"Grading did not finish: {len(self.folders) - len(missing)} of {len(self.folders)} graded."]
        lines += ["Not graded (no row in gradebook.csv):", *(f"- {report.visible(name)}" for name in missing)]
        marker.write_text("\n".join(lines) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, caught: list[int]) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` (from the main thread only; elsewhere nothing is installed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        caught.append(signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _grade_all(
    folders: list[Path],
    plan: _Plan,
    config: GradingConfig,
    scratch: Path,
    box: Sandbox,
    cgroup_version: int | None,
    stop: threading.Event,
    workers: int,
    progress: bool,
    writer: _Progress,
    template: Template | None = None,
) -> dict[str, StudentGrade]:
    """Grade in parallel until done or `stop`; each worker slot has its own student user id."""
    from tqdm.auto import tqdm

    slots: queue.Queue[int] = queue.Queue()
    for slot in range(max(1, workers)):
        slots.put(slot)

    def one(folder: Path) -> StudentGrade:
        slot = slots.get()
        try:
            uid = sandbox.student_uid(slot)
            return grade_student(
                folder,
                plan,
                config,
                scratch,
                box,
                uid=uid,
                cgroup_version=cgroup_version,
                stop=stop,
                template=template,
            )
        finally:
            slots.put(slot)

    results: dict[str, StudentGrade] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    futures = {pool.submit(one, f): f for f in folders}
    pending: set[Future] = set(futures)
    try:
        with tqdm(total=len(folders), desc="grading", unit="student", disable=not progress) as bar:
            while pending and not stop.is_set():
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    _collect(future, futures[future], plan, results)
                    bar.update(1)
                    writer.write(results)
    finally:
        stop.set()  # workers still running kill their sandboxes and return
        pool.shutdown(wait=True, cancel_futures=True)
        for future in pending:
            if future.done() and not future.cancelled():
                _collect(future, futures[future], plan, results)
    return results


def _collect(future: Future, folder: Path, plan: _Plan, results: dict[str, StudentGrade]) -> None:
    """A finished student's grade; a grader bug becomes "error" for that student only."""
    from lumorik_sft.course import checks

    try:
        results[folder.name] = future.result()
    except Stopped:
        return
    except Exception as err:  # a grader bug for one student must not stop the class
        grades = {
            n: ExerciseGrade(
                n,
                checks.EXERCISES[n].notebook,
                checks.EXERCISES[n].points,
                status="error",
                feedback=[f"grader error: {err!r}"],
            )
            for n in plan.names
        }
        results[folder.name] = StudentGrade(folder.name, grades, [f"grader error: {err!r}"])
