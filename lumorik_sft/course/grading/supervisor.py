"""The grader's side: find the submissions, run each student in a sandboxed child, judge, write results.

For each student folder, :func:`grade_student` reads the notebooks' code cells, starts a child
(:mod:`lumorik_sft.course.grading.child`) in a fresh interpreter inside the sandbox
(:mod:`lumorik_sft.course.sandbox`), with the hidden cases on its stdin, follows the records on its
result pipe with a per-phase watchdog (a hang or a crash fails only the exercise in progress, and a
fresh child goes on with the rest), and judges the returned outputs against expected outputs
computed here, never in the child. :func:`grade` does this for a whole class in parallel and writes
``gradebook.csv``, ``feedback/<student>.md`` and ``results.json``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lumorik_sft.course import sandbox
from lumorik_sft.course.grading.child import MAX_RECORD_BYTES, is_oom
from lumorik_sft.course.sandbox import Sandbox

__all__ = ["ExerciseGrade", "GradingConfig", "StudentGrade", "grade", "grade_student"]

_GRACE_S = 5.0  # the parent's watchdog allows this much beyond the child's own alarm


@dataclass(frozen=True)
class GradingConfig:
    """Limits for one student's child process."""

    timeout: float = 20.0  # seconds per exercise (all its cases) and per notebook cell
    memory_mb: int = 4096  # address space; importing torch alone maps ~2.2 GB
    startup_timeout: float = 180.0  # interpreter start and imports, under load
    max_restarts: int = 8  # fresh children after a crash/hang, per student
    isolate: bool = True  # namespaces that hide the solutions (course.sandbox), where available


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


def _child_env(home: Path) -> dict[str, str]:
    """Only what the interpreter needs: no PYTHONPATH, no path to solutions or submissions."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "TQDM_DISABLE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


_BOOTSTRAP = """
import resource, sys
limit = int(sys.argv[1]) * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
cpu = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
from lumorik_sft.course.grading.child import _child_main
_child_main(int(sys.argv[3]))
"""


@dataclass
class _ChildRun:
    records: list[dict[str, Any]]
    finished: bool
    phase: dict[str, Any] | None  # what was running when the child died
    death: str  # "", "timeout", "out of memory", "error"
    detail: str


def _read_stderr_tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - n))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
        proc.wait(timeout=10)


def _run_child(job: dict[str, Any], config: GradingConfig, scratch: Path, box: Sandbox) -> _ChildRun:
    """Start one child on `job`, follow its records with per-phase deadlines, classify its end."""
    private = Path(tempfile.mkdtemp(dir=scratch, prefix="run-"))
    root = private / "root"  # the child's root filesystem when isolated (see lumorik_sft.course.sandbox)
    if box.isolated:
        root.mkdir()
        home = sandbox.HOME  # as the child sees it; the sandbox's shell changes into HOME / "work"
        work = Path("/")
    else:
        home = private / "home"
        work = home / "work"
        work.mkdir(parents=True)
    job_path = private / "job.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    stderr_path = private / "stderr.txt"
    n_cells = sum(len(cells) for cells in job["notebooks"].values())
    cpu_budget = int(config.startup_timeout + config.timeout * (len(job["exercises"]) + n_cells + 2) + 30)
    read_fd, write_fd = os.pipe()
    with open(job_path, "rb") as stdin, open(stderr_path, "wb") as stderr:
        argv = [sys.executable, "-I", "-c", _BOOTSTRAP, str(config.memory_mb), str(cpu_budget), str(write_fd)]
        proc = subprocess.Popen(
            box.command(argv, root),
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=work,
            env=_child_env(home),
            pass_fds=(write_fd,),
            start_new_session=True,
            close_fds=True,
        )
    os.close(write_fd)
    records: list[dict[str, Any]] = []
    phase: dict[str, Any] | None = {"phase": "startup"}
    deadline = time.monotonic() + config.startup_timeout
    buffer = b""
    killed_for_time = False
    finished = False
    received = 0
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_for_time = True
                _kill(proc)
                break
            ready, _, _ = select.select([read_fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            received += len(chunk)
            if received > MAX_RECORD_BYTES * 4:
                _kill(proc)
                phase = phase or {}
                phase["overflow"] = True
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # not ours (or garbled): ignored
                if not isinstance(record, dict):
                    continue
                event = record.get("event")
                if event == "begin":
                    phase = record
                    limit = (
                        config.timeout * (record.get("n_cells", 0) + 1)
                        if record.get("phase") == "load"
                        else config.timeout
                    )
                    deadline = time.monotonic() + limit + _GRACE_S
                elif event in ("loaded", "result"):
                    records.append(record)
                    phase = None
                    deadline = time.monotonic() + config.timeout + _GRACE_S
                elif event == "ready":
                    phase = None
                    deadline = time.monotonic() + config.timeout + _GRACE_S
                elif event == "done":
                    finished = True
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            try:
                proc.wait(timeout=10 if finished else 0.5)
            except subprocess.TimeoutExpired:
                _kill(proc)
        tail = _read_stderr_tail(stderr_path)
        shutil.rmtree(private, ignore_errors=True)
    if finished:
        return _ChildRun(records, True, None, "", "")
    code = box.exit_code(proc.returncode)
    if killed_for_time or code in (-signal.SIGXCPU, -signal.SIGALRM):
        death, detail = "timeout", "did not finish in time (the process was stopped)"
    elif phase and phase.get("overflow"):
        death, detail = "error", "wrote too much data to the grader's channel"
    elif (
        "MemoryError" in tail
        or "Cannot allocate memory" in tail
        or "bad_alloc" in tail
        or code == -signal.SIGKILL
    ):
        death, detail = "out of memory", f"the process ran out of memory (limit {config.memory_mb} MB)"
    elif code is not None and code < 0:
        death, detail = "error", f"the process crashed (signal {-code})"
    else:
        death, detail = (
            "error",
            (
                f"the process ended (exit code {code}) before finishing: "
                "did the code call os._exit() or exit the interpreter?"
            ),
        )
    if phase and phase.get("phase") == "startup":
        detail += f"\n{tail.strip()[-600:]}"
    return _ChildRun(records, False, phase, death, detail)


def _read_notebooks(folder: Path, names: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Code cells of each present notebook, and why each other one is missing or unreadable."""
    import nbformat

    cells, problems = {}, {}
    for name in names:
        path = folder / name
        if not path.is_file():
            problems[name] = "missing"
            continue
        try:
            if path.stat().st_size > 20 * 1024 * 1024:
                raise ValueError("larger than 20 MB")
            nb = nbformat.read(path, as_version=4)
            cells[name] = [c.source for c in nb.cells if c.cell_type == "code"]
        except Exception as err:  # malformed JSON, wrong format: that notebook scores 0
            problems[name] = f"could not read the notebook: {type(err).__name__}: {str(err)[:200]}"
    return cells, problems


def _judge_exercise(grade: ExerciseGrade, ex: Any, cases: list, expected: list, outputs: list) -> None:
    from lumorik_sft.course import checks

    grade.n_cases = len(cases)
    feedback, passed, timeouts, ooms, raised = [], 0, 0, 0, 0
    for i, case in enumerate(cases):
        got = outputs[i] if i < len(outputs) else {"timeout": True}
        if isinstance(got, dict) and got.get("timeout"):
            timeouts += 1
            feedback.append(f"case {i}: timed out")
            continue
        if is_oom(got):
            ooms += 1
            feedback.append(f"case {i}: ran out of memory")
            continue
        line = checks.judge(ex, case, expected[i], got)
        if line is None:
            passed += 1
        else:
            raised += int(isinstance(got, dict) and ("raised" in got or "used_reference" in got))
            feedback.append(f"case {i}: {line}")
    grade.passed_cases = passed
    grade.score = round(ex.points * passed / len(cases), 4) if cases else 0.0
    if timeouts:
        grade.status = "timeout"
    elif ooms:
        grade.status = "out of memory"
    elif passed == len(cases):
        grade.status = "passed"
    elif passed == 0 and raised == len(cases):
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
) -> StudentGrade:
    """Grade one student's folder; never raises for anything the student's code does."""
    from lumorik_sft.course import checks

    start = time.monotonic()
    folder = Path(folder)
    exercises = {n: checks.EXERCISES[n] for n in plan.names}
    grades = {n: ExerciseGrade(n, ex.notebook, ex.points) for n, ex in exercises.items()}
    result = StudentGrade(folder.name, grades)
    notebooks = list(dict.fromkeys(ex.notebook for ex in exercises.values()))
    cells, problems = _read_notebooks(folder, notebooks)
    for name, problem in problems.items():
        for g in grades.values():
            if g.notebook == name:
                g.status = "missing" if problem == "missing" else "error"
                g.feedback = [f"{name} is missing from the submission" if problem == "missing" else problem]
                g.n_cases = len(plan.cases[g.name])
    remaining = [n for n in plan.names if exercises[n].notebook in cells]
    outputs: dict[str, list] = {}
    attempts = 0
    while remaining and attempts <= config.max_restarts:
        attempts += 1
        job = {
            "timeout": config.timeout,
            "notebooks": {nb: cells[nb] for nb in dict.fromkeys(exercises[n].notebook for n in remaining)},
            "exercises": [
                {
                    "name": n,
                    "notebook": exercises[n].notebook,
                    "symbol": exercises[n].symbol,
                    "kind": exercises[n].kind,
                    "cases": plan.cases[n],
                }
                for n in remaining
            ],
        }
        run = _run_child(job, config, Path(scratch), box or Sandbox("none"))
        for record in run.records:
            if record.get("event") == "result" and record.get("exercise") in grades:
                outputs[record["exercise"]] = record.get("outputs", [])
            elif record.get("event") == "loaded" and record.get("errors"):
                shown = "; ".join(record["errors"][:3])
                result.notes.append(f"{record.get('notebook')}: cells that raised while loading: {shown}")
        done = set(outputs)
        if not run.finished:
            culprit = run.phase or {}
            if culprit.get("phase") == "exercise" and culprit.get("exercise") in grades:
                victims = [culprit["exercise"]]
            elif culprit.get("phase") == "load":
                victims = [
                    n for n in remaining if exercises[n].notebook == culprit.get("notebook") and n not in done
                ]
            else:  # startup failed, or the end came between phases: give up on what is left
                victims = [n for n in remaining if n not in done]
            for n in victims:
                g = grades[n]
                g.status, g.n_cases, g.score = run.death, len(plan.cases[n]), 0.0
                where = "while loading its notebook" if culprit.get("phase") == "load" else "while running it"
                g.feedback = [f"{where}: {run.detail}"]
                done.add(n)
        remaining = [n for n in remaining if n not in done]
    for n in remaining:  # restarts exhausted
        grades[n].status, grades[n].feedback = (
            "error",
            ["not graded: too many crashes of the grading process"],
        )
    for n, outs in outputs.items():
        _judge_exercise(grades[n], exercises[n], plan.cases[n], plan.expected[n], outs)
    result.seconds = round(time.monotonic() - start, 2)
    return result


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name) or "_"


def _feedback_markdown(student: StudentGrade, max_total: float) -> str:
    from lumorik_sft.course import checks

    lines = [
        f"# Feedback for {student.student}",
        "",
        f"**Total: {student.total:g} / {max_total:g}**",
        "",
        "| exercise | notebook | status | score | cases passed |",
        "|---|---|---|---|---|",
    ]
    for g in student.exercises.values():
        lines.append(
            f"| {g.name} | {g.notebook} | {g.status} | {g.score:g} / {g.points:g} | "
            f"{g.passed_cases}/{g.n_cases} |"
        )
    details = [g for g in student.exercises.values() if g.status != "passed"]
    if details:
        lines += ["", "## What to fix", ""]
        for g in details:
            lines.append(f"### {g.name} ({g.status})")
            lines += [f"- {f}" for f in g.feedback] or ["- (no details)"]
            lines.append("")
    reviewed = [g for g in student.exercises.values() if checks.EXERCISES[g.name].review]
    if reviewed:
        lines += ["## Read by hand", ""]
        lines += [f"- {g.name}: {checks.EXERCISES[g.name].review}" for g in reviewed]
        lines.append("")
    if student.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in student.notes]
    return "\n".join(lines).rstrip() + "\n"


def _write_outputs(
    out: Path, plan: _Plan, students: list[StudentGrade], seed_note: str, isolation: str
) -> None:
    from lumorik_sft.course import checks

    out.mkdir(parents=True, exist_ok=True)
    (out / "feedback").mkdir(exist_ok=True)
    max_total = sum(checks.EXERCISES[n].points for n in plan.names)
    with open(out / "gradebook.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["student", *plan.names, "total"])
        for s in students:
            writer.writerow([s.student, *(f"{s.exercises[n].score:g}" for n in plan.names), f"{s.total:g}"])
    for s in students:
        (out / "feedback" / f"{_safe_name(s.student)}.md").write_text(
            _feedback_markdown(s, max_total), encoding="utf-8"
        )
    summary = {
        "max_total": max_total,
        "seed": seed_note,
        "isolation": isolation,
        "points": {n: checks.EXERCISES[n].points for n in plan.names},
        "review": {n: checks.EXERCISES[n].review for n in plan.names if checks.EXERCISES[n].review},
        "students": [
            {
                "student": s.student,
                "total": s.total,
                "seconds": s.seconds,
                "notes": s.notes,
                "exercises": {n: asdict(g) for n, g in s.exercises.items()},
            }
            for s in students
        ],
    }
    (out / "results.json").write_text(
        json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )


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
    """Grade every student folder under `submissions` in parallel; write the gradebook and feedback."""
    from tqdm.auto import tqdm

    config = config or GradingConfig()
    root = Path(submissions)
    if not root.is_dir():
        raise FileNotFoundError(f"submissions folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"no student folders in {root} (expected one folder per student)")
    seed_note = "fixed (--seed)" if seed is not None else "secret"
    seed = secrets.randbits(63) if seed is None else seed
    plan = _make_plan(seed, exercises)
    results: dict[str, StudentGrade] = {}
    scratch = Path(tempfile.mkdtemp(prefix="lumorik-grade-"))
    box = sandbox.detect() if config.isolate else Sandbox("none")
    if not box.isolated:
        why = "turned off" if not config.isolate else "namespaces are not available on this machine"
        print(f"warning: {box.description} ({why})", file=sys.stderr)
    try:
        with (
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
            tqdm(total=len(folders), desc="grading", unit="student", disable=not progress) as bar,
        ):
            futures = {pool.submit(grade_student, f, plan, config, scratch, box): f for f in folders}
            for future in as_completed(futures):
                folder = futures[future]
                try:
                    results[folder.name] = future.result()
                except Exception as err:  # a grader bug for one student must not stop the class
                    from lumorik_sft.course import checks

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
                bar.update(1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ordered = [results[f.name] for f in folders]
    _write_outputs(Path(out), plan, ordered, seed_note, box.description)
    return ordered
