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


def _preload() -> None:  # pragma: no cover - runs in the child process
    """Import what the exercises need, once, before any student code runs."""
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


def _zygote_main(spec: dict[str, Any], *, preloaded: bool = False) -> None:  # pragma: no cover
    """Import once (unless the template did), then fork one exercise child per job, one after another."""
    if not preloaded:
        _preload()
    _non_dumpable()  # again: a change of user id resets it
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


# ---- the template (a fork server) ------------------------------------------------------------------
#
# Importing torch and the package costs seconds per student. Where the grader is root (sandbox kind
# ``nobody``), it starts one *template* per grading run: a process outside any sandbox that imports
# everything once (:func:`_preload`), runs no student code, and for each student forks a process that
# builds that student's sandbox itself, exactly as the ``unshare``/``chroot``/``setpriv`` command
# would (new mount, PID, network, IPC and UTS namespaces, the same mount script, the same user id),
# then becomes that student's zygote. The template holds no secret: the grader sends it only the
# mount script, the user id, the cgroup and the student's pipes.

_CLONE = {"NEWNS": 0x00020000, "NEWUTS": 0x04000000, "NEWIPC": 0x08000000, "NEWPID": 0x20000000}
_CLONE_NEWNET = 0x40000000
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
MAX_FDS = 253  # descriptors in one message (SCM_MAX_FD): a student with more jobs starts as a command


def _fail(step: str, err: BaseException | None = None) -> None:  # pragma: no cover
    """End a sandbox that could not be built (status 125), saying why on its stderr (the grader's tail)."""
    with contextlib.suppress(BaseException):
        os.write(2, f"sandbox: {step} failed: {err!r}\n".encode())
    os._exit(125)


def _template_main(sock_fd: int) -> None:  # pragma: no cover - runs in the template process
    """Import once; then, per request, fork a student's sandbox and send back a pidfd of it."""
    import socket

    _preload()
    sock = socket.socket(fileno=sock_fd)
    parent = os.getpid()
    while True:
        with contextlib.suppress(ChildProcessError):  # reap the sandboxes that ended
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 20, MAX_FDS)
        except OSError:
            os._exit(0)
        if not message:  # the grader hung up
            os._exit(0)
        request = json.loads(message)
        if len(fds) != request.get("fds"):  # cut short: refuse (the grader starts a command instead)
            for fd in fds:
                os.close(fd)
            socket.send_fds(sock, [b"{}"], [])
            continue
        pid = os.fork()
        if pid == 0:
            sock.close()
            _enter_sandbox(request, fds, parent)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [pidfd])
        os.close(pidfd)


def _enter_sandbox(request: dict[str, Any], fds: list[int], parent: int) -> None:  # pragma: no cover
    """In a fork of the template: the student's cgroup, namespaces, root and user id; then the zygote.

    Any step that fails ends the process (status 125) before student code could run.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        os.setsid()
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the template
        if os.getppid() != parent:
            _fail("pdeathsig")
        keep = set(fds)
        for name in os.listdir("/proc/self/fd"):  # nothing of the template's but the student's pipes
            with contextlib.suppress(OSError, ValueError):
                if int(name) > 2 and int(name) not in keep:
                    os.close(int(name))
        spec = request["spec"]
        fd = fds.__getitem__
        spec["jobs"] = [[fd(a), fd(b)] for a, b in spec["jobs"]]
        spec["status"] = fd(spec["status"])
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(fd(request["stderr"]), 2)
        for extra in {null, fd(request["stderr"])} - {0, 1, 2}:
            os.close(extra)
        for procs in request["cgroup"]:  # before anything of the student runs, as join_prefix does
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        flags = sum(_CLONE.values()) | _CLONE_NEWNET
        if libc.unshare(flags) != 0:
            _fail("unshare", OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno())))
        if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            _fail("mount --make-rprivate /", OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno())))
    except BaseException as err:
        _fail("entering the namespaces", err)
    pid = os.fork()  # the first process of the new PID namespace: the zygote
    if pid:  # like `unshare --fork --kill-child`: wait, and take the namespace along when killed
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                if int(name) > 2:
                    os.close(int(name))
        # a small waiter instead of a copy of everything imported (the memory watch sums both)
        with contextlib.suppress(BaseException):
            os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", _WAITER, str(pid)])
        os._exit(125)
    _namespace_init(request, spec, libc)


_WAITER = """
import os, sys
status = os.waitpid(int(sys.argv[1]), 0)[1]
os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def _namespace_init(request: dict[str, Any], spec: dict[str, Any], libc: Any) -> None:  # pragma: no cover
    """PID 1 of the student's namespace: mount their root, chroot, drop privileges, become the zygote.

    As the namespace's init the zygote cannot be killed from inside it; when it ends, every
    process in the namespace ends with it.
    """
    import subprocess

    try:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        done = subprocess.run(["/bin/sh", "-c", request["setup"]], stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            _fail("the mount script", ChildProcessError(done.returncode))
        os.chroot(request["root"])
        os.chdir("/")
    except BaseException as err:
        _fail("chroot", err)
    try:
        uid = int(request["uid"])
        if uid <= 0:
            _fail("the user id", ValueError(uid))
        os.chdir(spec["work"])
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
            _fail("dropping privileges")
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            _fail("no_new_privs")
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a new user id cleared it
        import resource

        for name, value in spec["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
    except BaseException as err:
        _fail("dropping privileges", err)
    _zygote_main(spec, preloaded=True)


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
