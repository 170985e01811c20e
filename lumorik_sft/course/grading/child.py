"""The sandboxed child: the only grading code that runs in the same process as a student's code.

This module is the trust boundary, so it reads on its own and imports as little as it can: the
standard library at import time; the package modules the exercises need (``torch``,
``lumorik_sft.data``/``encoding``/``metrics``/``training``, ``lumorik_sft.course.checks``) only inside
:func:`_zygote_main`, before any student code runs; never the supervisor or the CLI. The supervisor
starts it as ``sys.executable -I -c <bootstrap>``, which sets the per-process limits and calls
``_zygote_main(spec)``.

Two kinds of process run this code:

* the **zygote** imports everything once, runs no student code, and makes itself non-dumpable
  (no process of the student can read its memory or descriptors). For each *job* (one exercise)
  it empties the student's home and ``/tmp``, kills whatever the previous job left running
  (``kill(-1)`` inside the sandbox's PID namespace), forks one **exercise child**, waits for it and
  reports its exit status on a pipe of its own (``{"job": k, "status": ...}``), which the child
  closes before any student code runs;
* the **exercise child** owns one pair of pipes, which the supervisor made for that job alone (the
  other pairs are closed before any student code runs). It first disables, in place, the package
  functions that answer its exercise and every exercise's reference (``checks.framework.disable``:
  every alias, default argument or closure that reaches them raises), then reads the *load*
  request (the notebook's code cells), runs the cells, answers ``loaded``, reads the *cases*
  request (the hidden inputs, sent only now), runs the student's function on them and answers
  ``result``, and exits with ``os._exit``.

So a job is graded in a fresh process forked from one in which no student code ever ran: the
environment, working directory, hooks and patches of one notebook (or exercise) cannot reach the
next. The hidden cases are never in a process before its student cells have run, and the
functions that would answer them are disabled there for the process's whole life.

What it sends back: one JSON object per line on the job's result pipe, each carrying the id of the
request it answers: ``{"event": "loaded", "id": ..., "errors": [...]}`` (cells that raised) and
``{"event": "result", "id": ..., "outputs": [...]}`` with one item per case (the plain data the
student's code returned, ``{"raised", "message", "traceback"}``, ``{"used_reference": [...]}`` or
``{"timeout": true}``). No record is larger than :data:`MAX_RECORD_BYTES`.

What it trusts: nothing the student's code does. Cells and functions may raise anything, loop
forever, swallow the alarm, exhaust memory, print, fork, patch any module (this one too), write to
any descriptor or call ``os._exit``. None of that can change a verdict: the supervisor sends each
request when it chooses, accepts exactly one answer per request, in order, before a deadline it
keeps itself, judges the data against expected outputs computed in its own process, and takes
statuses (timeout, out of memory) only from what it observed. A student's process can write
records itself, but only with what it could have returned anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from typing import Any

__all__ = ["MAX_RECORD_BYTES"]

MAX_RECORD_BYTES = 32 * 1024 * 1024  # one record on a job's channel; the supervisor refuses more
_MAX_REQUEST_BYTES = 64 * 1024 * 1024  # one request from the supervisor (a notebook's code, cases)


class _Timeout(BaseException):
    """Raised by SIGALRM in the child; a BaseException so `except Exception` cannot swallow it."""


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def _is_checks_call(node: Any) -> bool:
    """A top-level statement that calls ``checks.<...>`` or a ``check_*`` function: not run."""
    import ast

    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "checks":
                return True
            if isinstance(f, ast.Name) and f.id.startswith("check_"):
                return True
    return False


def _compile_cell(source: str, index: int) -> Any:
    """Compile a code cell without its ``checks.`` calls; raises SyntaxError.

    The grader has already turned magics into Python (``submissions.cell_code``), so the
    source is plain Python. Dropping the calls only saves time: in the child every ``check_*``
    function does nothing (:func:`_silence_checks`), however a cell reaches it.
    """
    import ast

    tree = ast.parse(source, filename=f"<cell {index}>")
    tree.body = [node for node in tree.body if not _is_checks_call(node)]
    return compile(tree, f"<cell {index}>", "exec")


# ---- the zygote ------------------------------------------------------------------------------------


def _non_dumpable() -> None:
    """PR_SET_DUMPABLE 0: processes of the same user can no longer ptrace this one or open its fds."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # 4 = PR_SET_DUMPABLE


def _kill_leftovers() -> None:
    """SIGKILL every other process of this PID namespace (init and this one excepted), until none is left."""
    for _ in range(100):
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        while True:  # reap what was ours
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid())]
        if not others:
            return


def _empty(folder: str) -> None:
    import shutil

    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _clean_slate(spec: dict[str, Any]) -> None:
    """Before each job: no process and no file of the previous one is left (inside the sandbox)."""
    if spec["isolated"]:
        _kill_leftovers()
        _empty("/tmp")
    _empty(spec["home"])
    os.makedirs(spec["work"], exist_ok=True)


def _wait(pid: int) -> int:
    """The child's wait status (as ``os.waitpid`` gives it); -1 if it cannot be known."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return -1


def _zygote_main(spec: dict[str, Any]) -> None:  # pragma: no cover - runs in the child process
    """Import once, then fork one exercise child per job, each after the previous one ended."""
    import io

    import torch

    torch.set_num_threads(1)
    from lumorik_sft import data, encoding, metrics, training  # noqa: F401  (imported before any student code)
    from lumorik_sft.course import checks

    checks.toy_tokenizer()  # built once, before any student code runs
    with contextlib.suppress(ImportError):  # metrics.load_metric's import (1 s), shared by every job
        import evaluate  # noqa: F401
    sys.stdin = io.StringIO("")
    _non_dumpable()
    import gc

    gc.freeze()  # what is imported stays put: the forks copy fewer pages (copy-on-write)
    jobs, status_fd = [tuple(pair) for pair in spec["jobs"]], spec["status"]
    for k, (request_fd, result_fd) in enumerate(jobs):
        _clean_slate(spec)
        pid = os.fork()
        if pid == 0:
            for fd in [status_fd, *(fd for pair in jobs[k + 1 :] for fd in pair)]:
                os.close(fd)
            _exercise_child(request_fd, result_fd, spec)
        os.close(request_fd)
        os.close(result_fd)
        status = _wait(pid)  # then tell the supervisor, on a pipe no student process holds
        os.write(status_fd, (json.dumps({"job": k, "status": status}) + "\n").encode())
    if spec["isolated"]:
        _kill_leftovers()
    os._exit(0)


# ---- the exercise child ----------------------------------------------------------------------------


class _Requests:
    """The job's request pipe, read line by line with functions bound before any student code runs."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer = fd, b""
        self._read, self._loads = os.read, json.loads

    def next(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            chunk = self._read(self.fd, 1 << 20)
            if not chunk or len(self.buffer) > _MAX_REQUEST_BYTES:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return self._loads(line.decode("utf-8"))


class _Answers:
    """The job's result pipe; ``dumps`` and ``write`` are bound before any student code runs."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._write, self._dumps = os.write, json.dumps

    def send(self, record: dict[str, Any]) -> None:
        try:
            text = self._dumps(record, allow_nan=True)
        except (TypeError, ValueError) as err:
            text = self._dumps({**record, "outputs": [{"raised": "NotData", "message": str(err)[:300]}]})
        if len(text) > MAX_RECORD_BYTES:
            message = "the output is far too large"
            text = self._dumps({**record, "outputs": [{"raised": "NotData", "message": message}]})
        data = (text + "\n").encode("utf-8", "surrogatepass")
        while data:
            data = data[self._write(self.fd, data) :]


def _silence_checks(checks: Any) -> None:
    """Every ``check_*`` function (and ``run_check``) does nothing here, however a cell reaches it."""
    from lumorik_sft.course.checks import framework

    quiet = [(f"check_{name}", getattr(checks, f"check_{name}")) for name in checks.EXERCISES]
    quiet += [("run_check", checks.run_check), ("check_exercise", framework.check_exercise)]
    framework.disable(quiet, None)


def _disable_answers(checks: Any, name: str) -> None:
    """The package functions that answer exercise `name`, and every exercise's reference, raise."""
    from lumorik_sft.course.checks import framework

    ex = checks.EXERCISES[name]
    targets = framework.forbidden_targets(ex)
    targets += [
        (f"checks.EXERCISES[{other.name!r}].reference", other.reference)
        for other in checks.EXERCISES.values()
    ]
    framework.disable(targets, name)


def _run_cells(cells: list[str], timeout: float) -> tuple[dict[str, Any], list[str]]:
    """Run a notebook's code cells in one namespace, each in its own try/except and alarm."""
    import builtins

    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins, "display": lambda *a, **k: None}
    errors = []
    for index, source in enumerate(cells):
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            code = _compile_cell(source, index)
            if code is not None:
                exec(code, ns)
        except _Timeout:
            errors.append(f"cell {index}: timed out after {timeout:g} s")
        except BaseException as err:  # SystemExit, KeyboardInterrupt, anything: next cell
            errors.append(f"cell {index}: {type(err).__name__}: {str(err)[:150]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return ns, errors


def _run_cases(
    ex: Any, obj: Any, ns: dict[str, Any], cases: list[Any], timeout: float, run_case: Any
) -> list:
    """Each case's output as data; after the alarm, the remaining cases are ``{"timeout": true}``."""
    from lumorik_sft.course.checks import framework

    outputs: list[Any] = []
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        for case in cases:
            try:
                outputs.append(run_case(ex, obj, case, fn_globals=ns))
            except _Timeout:
                raise
            except BaseException as err:  # MemoryError, SystemExit and friends: data, never a status
                outputs.append(framework.raised(err))
    except _Timeout:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return outputs + [{"timeout": True}] * (len(cases) - len(outputs))


def _exercise_child(request_fd: int, result_fd: int, spec: dict[str, Any]) -> None:  # pragma: no cover
    """One job: disable the answers, load the notebook, answer the cases request, exit."""
    _exit = os._exit
    try:
        os.setpgid(0, 0)  # without a PID namespace, the supervisor kills this group
        os.chdir(spec["work"])
        from lumorik_sft.course import checks

        requests, answers = _Requests(request_fd), _Answers(result_fd)
        load = requests.next()
        if not load or load.get("op") != "load":
            _exit(3)
        ex = checks.EXERCISES[load["exercise"]]
        run_case = checks.run_case
        _disable_answers(checks, ex.name)
        _silence_checks(checks)
        signal.signal(signal.SIGALRM, _alarm)
        timeout = float(load["timeout"])
    except BaseException:
        _exit(3)
    ns, errors = _run_cells(load["cells"], timeout)
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    answers.send({"event": "loaded", "id": load["id"], "errors": errors})
    request = requests.next()
    if not request or request.get("op") != "cases":
        _exit(0)
    outputs = _run_cases(ex, ns.get(ex.symbol), ns, request["cases"], timeout, run_case)
    answers.send({"event": "result", "id": request["id"], "outputs": outputs})
    _exit(0)  # skip interpreter teardown (and any atexit hook a student registered)
