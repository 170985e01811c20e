"""One student's sandbox, seen from the grader: jobs in, answers out, deadlines the student cannot move.

A *job* is one exercise: its notebook's code cells and its hidden cases. :func:`run_jobs` starts
a sandbox (:mod:`lumorik_sft.course.sandbox`) whose zygote (:mod:`.child`) forks a fresh process per
job, and talks to each job's process over that job's own pair of pipes (:mod:`.channel`): the
notebook's code first, the hidden cases only once the cells have run, then exactly one answer.

Time is the grader's: every wait ends at the earliest of the request's deadline (``timeout`` per
cell while loading, ``timeout`` for the cases, plus a grace), the notebook's budget and the
student's budget (:class:`Budget`), all measured on the grader's clock from when it sent the request
or started the notebook; nothing the child writes moves them. When a wait ends without an answer,
the whole sandbox is killed (every process of the student, through the PID namespace, the cgroup
and the process group) and a fresh one goes on with the jobs left, while budgets and restarts
allow. So a student holds a worker for at most their budget, and a class of N students on W
workers takes at most about N x budget / W, plus one budget.

Statuses come from what the grader saw: its deadline passed (``timeout``), the kernel killed one
of the student's processes for memory while the job ran (the cgroup's OOM-kill counter rose: the
job's answer, if any, is void) or the memory watch fired (``out of memory``), the job's process
ended before answering (``error``), or the child broke the protocol (``error``, and nothing more of
that student is run).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lumorik_sft.course import sandbox
from lumorik_sft.course.grading import limits
from lumorik_sft.course.grading.channel import End, Tail, new_id, receive, send
from lumorik_sft.course.grading.child import MAX_FDS
from lumorik_sft.course.grading.template import Forked, Template
from lumorik_sft.course.sandbox import Sandbox

__all__ = ["Budget", "Job", "JobOutcome", "Stopped", "run_jobs"]

GRACE_S = 5.0  # the grader's deadlines allow this much beyond the child's own alarm

_BOOTSTRAP = """
import json, resource, sys
spec = json.loads(sys.argv[1])
for name, value in spec["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
from lumorik_sft.course.grading.child import _zygote_main
_zygote_main(spec)
"""


class Stopped(Exception):
    """The grader was asked to stop (SIGINT/SIGTERM): this student's sandbox is already gone."""


@dataclass
class Job:
    """One exercise of one student: the notebook's code and the exercise's hidden cases."""

    name: str
    notebook: str
    cells: list[str]
    cases: list[Any]


@dataclass
class JobOutcome:
    """What the grader observed for one job."""

    outputs: list[Any] | None = None  # one item per case, when the child answered in time
    load_errors: list[str] = field(default_factory=list)
    death: str = ""  # "", "timeout", "out of memory" or "error"
    detail: str = ""
    phase: str = ""  # "load" or "run": where it ended without an answer
    seconds: float = 0.0  # from sending the cases to the answer, on the grader's clock
    ends_run: bool = False  # a protocol violation: nothing more of this student runs


@dataclass
class Budget:
    """The wall-clock budgets of one student and each of their notebooks, on the grader's clock."""

    student_s: float
    notebook_s: float
    start: float = field(default_factory=time.monotonic)
    notebooks: dict[str, float] = field(default_factory=dict)

    def cap(self, notebook: str, deadline: float) -> tuple[float, str]:
        """The earliest of `deadline` and the budgets, and which one it is ("", "notebook", "student")."""
        nb_end = self.notebooks.setdefault(notebook, time.monotonic() + self.notebook_s)
        options = [(deadline, ""), (nb_end, "notebook"), (self.start + self.student_s, "student")]
        return min(options, key=lambda o: o[0])

    def spent(self, notebook: str) -> str:
        """ "student" or "notebook" when that budget is used up, else ""."""
        now = time.monotonic()
        if now >= self.start + self.student_s:
            return "student"
        return "notebook" if now >= self.notebooks.get(notebook, float("inf")) else ""


def child_env(home: Path) -> dict[str, str]:
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


class _Sandbox:
    """One running sandbox: its process, its jobs' pipes (the grader's ends) and its stderr tail."""

    def __init__(
        self,
        jobs: Sequence[Job],
        config: Any,
        box: Sandbox,
        scratch: Path,
        uid: int,
        group: Any,
        template: Template | None = None,
    ):
        self.box, self.group = box, group
        self.private = Path(tempfile.mkdtemp(dir=scratch, prefix="run-"))
        if box.isolated:
            (self.private / "root").mkdir()
            home, cwd = sandbox.HOME, Path("/")
        else:
            home = self.private / "home"
            (home / "work").mkdir(parents=True)
            cwd = home / "work"
        self.requests, self.results, theirs = [], [], []
        for _ in jobs:
            request_r, request_w = os.pipe()
            result_r, result_w = os.pipe()
            self.requests.append(request_w)
            self.results.append(result_r)
            theirs += [request_r, result_w]
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe()
        own_uid = box.kind == "nobody"
        spec = {
            "jobs": [theirs[i : i + 2] for i in range(0, len(theirs), 2)],
            "status": status_w,
            "isolated": box.isolated,
            "home": str(home),
            "work": str(home / "work"),
            "rlimits": limits.rlimits(config.limits, own_uid=own_uid),
        }
        try:
            self.proc = self._forked(template, spec, theirs, status_w, err_w, uid)
            if self.proc is None:
                argv = [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(spec)]
                command = box.command(argv, self.private / "root", uid)
                if group is not None:
                    command = group.join_prefix() + command
                self.proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err_w,
                    cwd=cwd,
                    env=child_env(home),
                    pass_fds=[*theirs, status_w],
                    start_new_session=True,
                    close_fds=True,
                )
        finally:
            for fd in [*theirs, err_w, status_w]:
                os.close(fd)
        self.tail = Tail(err_r)
        self.status_fd, self.status_buffer, self.ended = status_r, b"", {}
        os.set_blocking(status_r, False)
        self.watch = limits.Watch(self.proc.pid, config.limits) if group is None else None
        self.oom_before = group.oom_kills() if group is not None else 0

    def _forked(
        self,
        template: Template | None,
        spec: dict[str, Any],
        theirs: list[int],
        status_w: int,
        err_w: int,
        uid: int,
    ) -> Forked | None:
        """The sandbox forked by the template, where there is one that works; else None (start a command)."""
        fds = [*theirs, status_w, err_w]
        if template is None or not self.box.isolated or len(fds) > MAX_FDS:
            return None
        index = {fd: i for i, fd in enumerate(fds)}
        request = {
            "spec": {
                **spec,
                "jobs": [[index[a], index[b]] for a, b in spec["jobs"]],
                "status": index[status_w],
            },
            "stderr": index[err_w],
            "setup": self.box.setup_script(self.private / "root", uid),
            "root": str(self.private / "root"),
            "uid": uid,
            "cgroup": self.group.procs_files() if self.group is not None else [],
            "fds": len(fds),
        }
        with contextlib.suppress(OSError):
            return template.spawn(request, fds)
        return None

    def job_status(self, k: int) -> int | None:
        """Job `k`'s wait status once the zygote reported its end (-2 when the sandbox itself ended)."""
        with contextlib.suppress(BlockingIOError, OSError):
            self.status_buffer += os.read(self.status_fd, 1 << 16)
        while b"\n" in self.status_buffer:
            line, self.status_buffer = self.status_buffer.split(b"\n", 1)
            with contextlib.suppress(ValueError, TypeError, KeyError):
                record = json.loads(line)
                self.ended[int(record["job"])] = int(record["status"])
        if k not in self.ended and self.proc.poll() is not None:
            self.ended[k] = -2
        return self.ended.get(k)

    def kill(self) -> None:
        """SIGKILL every process of the sandbox: the tree below it, its group, its cgroup."""
        forked = isinstance(self.proc, Forked)
        pids = limits.descendants(self.proc.pid) if forked or not self.box.isolated else []
        if forked:  # the namespace's PID 1 (the zygote) is below it: when it dies, everything in there does
            self.proc.kill()
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in pids:  # without a PID namespace, a child in a group of its own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.group is not None:
            self.group.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        if isinstance(self.proc, Forked):
            self.proc.close()
        for fd in [*self.requests, *self.results, self.tail.fd, self.status_fd]:
            with contextlib.suppress(OSError, TypeError):
                os.close(fd)
        self.requests, self.results = [], []
        self.tail.fd = None
        shutil.rmtree(self.private, ignore_errors=True)

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the student's cgroup for memory since :meth:`mark`."""
        return self.group is not None and self.group.oom_kills() > self.oom_before

    def mark(self) -> None:
        self.oom_before = self.group.oom_kills() if self.group is not None else 0


def _finish(box: _Sandbox, k: int) -> None:
    """After a job's answer: the grader hangs up on it, so nothing more is read from it."""
    for fds in (box.requests, box.results):
        with contextlib.suppress(OSError):
            os.close(fds[k])
        fds[k] = -1


def _run_one(
    box: _Sandbox, k: int, job: Job, config: Any, budget: Budget, first: bool, stop: threading.Event | None
) -> JobOutcome:
    """Send the job's code, then its cases; one answer each, before the grader's deadlines."""
    outcome, poll = JobOutcome(), _poll(stop, box, k)
    phase, binding = "load", ""
    box.mark()
    try:
        load_id = new_id()
        limit = config.timeout * (len(job.cells) + 1) + GRACE_S + (config.startup_timeout if first else 0)
        deadline, binding = budget.cap(job.notebook, time.monotonic() + limit)
        load = {
            "op": "load",
            "id": load_id,
            "exercise": job.name,
            "cells": job.cells,
            "timeout": config.timeout,
        }
        send(box.requests[k], load, deadline, box.tail, poll)
        loaded = receive(box.results[k], "loaded", load_id, deadline, box.tail, poll)
        errors = loaded.get("errors")
        outcome.load_errors = [str(e)[:300] for e in errors[:20]] if isinstance(errors, list) else []
        phase, cases_id, sent = "run", new_id(), time.monotonic()
        deadline, binding = budget.cap(job.notebook, sent + config.timeout + GRACE_S)
        send(box.requests[k], {"op": "cases", "id": cases_id, "cases": job.cases}, deadline, box.tail, poll)
        result = receive(box.results[k], "result", cases_id, deadline, box.tail, poll)
        outputs = result.get("outputs")
        if not isinstance(outputs, list) or len(outputs) != len(job.cases):
            raise End("violation", "an answer that does not have one output per case")
        outcome.outputs, outcome.seconds = outputs, time.monotonic() - sent
        _finish(box, k)
        if box.oom_killed():  # one of the student's processes was killed for memory: the answer is void
            raise End("memory")
    except End as end:
        _classify(outcome, end, phase, binding, box, config, first, _settled_status(box, k, end))
    return outcome


def _settled_status(box: _Sandbox, k: int, end: End, wait_s: float = 1.0) -> int | None:
    """Job `k`'s wait status; when its pipe closed, the zygote's report may be a moment behind the EOF."""
    status = box.job_status(k)
    deadline = time.monotonic() + wait_s
    while status is None and end.kind == "closed" and time.monotonic() < deadline:
        time.sleep(0.01)
        status = box.job_status(k)
    return status


def _classify(
    outcome: JobOutcome,
    end: End,
    phase: str,
    binding: str,
    box: _Sandbox,
    config: Any,
    first: bool,
    status: int | None,
) -> None:
    """The status of a job that ended without an answer, from what the grader observed."""
    if end.kind == "stopped":
        raise Stopped()
    outcome.phase = phase
    if end.kind == "violation":
        outcome.death, outcome.ends_run = "error", True
        outcome.detail = (
            f"the code wrote to the grader's channel out of turn ({end.detail}); grading stopped here"
        )
    elif end.kind == "memory" or box.oom_killed():  # the kernel's OOM kill explains a hang or a death
        outcome.outputs, outcome.death = None, "out of memory"
        outcome.detail = (
            f"the student's processes together used more than {config.limits.memory_mb} MB "
            "(the process was stopped)"
        )
    elif end.kind == "deadline":
        outcome.death = "timeout"
        if binding:
            seconds = config.student_budget if binding == "student" else config.notebook_budget
            outcome.detail = f"the {binding}'s time budget of {seconds:g} s ran out (the process was stopped)"
        else:
            outcome.detail = "did not finish in time (the process was stopped)"
    else:
        outcome.death, outcome.detail = "error", _ended(status)
        if first and phase == "load":
            box.kill()
            box.tail.drain()
            outcome.detail += f"\n{box.tail.text().strip()[-600:]}"


def _ended(status: int | None) -> str:
    """Feedback for a process that ended before answering, from the wait status the zygote saw."""
    if status is not None and status >= 0 and os.WIFSIGNALED(status):
        return f"the process was killed by signal {os.WTERMSIG(status)} before answering"
    code = f" (exit code {os.WEXITSTATUS(status)})" if status is not None and status >= 0 else ""
    return f"the process ended{code} before answering: did the code call os._exit() or exit the interpreter?"


def _poll(stop: threading.Event | None, box: _Sandbox, k: int) -> Any:
    """What `receive` asks between reads: stop requested, memory over the limit, job `k` ended."""

    def poll() -> str | None:
        if stop is not None and stop.is_set():
            return "stopped"
        if box.watch is not None and box.watch.over():
            return "memory"
        return "closed" if box.job_status(k) is not None else None

    return poll


def _gave_up(outcome: JobOutcome, death: str, detail: str) -> JobOutcome:
    outcome.death, outcome.detail = death, detail
    return outcome


def run_jobs(
    jobs: Sequence[Job],
    config: Any,
    box: Sandbox,
    scratch: Path,
    *,
    uid: int = sandbox.NOBODY,
    cgroup_version: int | None = None,
    stop: threading.Event | None = None,
    template: Template | None = None,
) -> dict[str, JobOutcome]:
    """Run a student's jobs in order, in as few sandboxes as crashes allow; an outcome per job.

    Raises :class:`Stopped` (after killing the sandbox) when `stop` is set.
    """
    budget = Budget(config.student_budget, config.notebook_budget)
    group = None
    if cgroup_version is not None:
        with contextlib.suppress(OSError):  # refused for this student: the memory watch takes over
            group = limits.Cgroup.create(cgroup_version, f"lumorik-{os.getpid()}-{new_id()}", config.limits)
    outcomes: dict[str, JobOutcome] = {}
    remaining, restarts = list(jobs), 0
    try:
        while remaining:
            _skip_spent(remaining, budget, config, outcomes)
            remaining = [j for j in remaining if j.name not in outcomes]
            if not remaining:
                break
            if restarts > config.max_restarts:
                for j in remaining:
                    outcomes[j.name] = _gave_up(
                        JobOutcome(), "error", "not graded: too many crashes of its process"
                    )
                break
            last = _one_sandbox(remaining, config, box, scratch, uid, group, budget, stop, outcomes, template)
            remaining = [j for j in remaining if j.name not in outcomes]
            if last is not None and last.ends_run:
                for j in remaining:
                    outcomes[j.name] = _gave_up(JobOutcome(), "error", "not graded: " + last.detail)
                break
            restarts += 1
    finally:
        if group is not None:
            group.remove()
    return outcomes


def _skip_spent(remaining: list[Job], budget: Budget, config: Any, outcomes: dict[str, JobOutcome]) -> None:
    """Jobs whose notebook's or student's budget is used up get ``timeout`` without running."""
    for j in remaining:
        which = budget.spent(j.notebook)
        if which:
            seconds = config.student_budget if which == "student" else config.notebook_budget
            detail = f"not run: the {which}'s time budget of {seconds:g} s ran out"
            outcomes[j.name] = _gave_up(JobOutcome(), "timeout", detail)


def _one_sandbox(
    remaining: list[Job],
    config: Any,
    box: Sandbox,
    scratch: Path,
    uid: int,
    group: Any,
    budget: Budget,
    stop: threading.Event | None,
    outcomes: dict[str, JobOutcome],
    template: Template | None = None,
) -> JobOutcome | None:
    """Run `remaining` in one fresh sandbox until one ends without an answer; that outcome, or None."""
    if stop is not None and stop.is_set():  # stopped before this sandbox started
        raise Stopped()
    running = _Sandbox(remaining, config, box, scratch, uid, group, template)
    try:
        for k, job in enumerate(remaining):
            if budget.spent(job.notebook):
                return None
            outcome = _run_one(running, k, job, config, budget, k == 0, stop)
            outcomes[job.name] = outcome
            if outcome.death:
                return outcome
        return None
    finally:
        running.close()
