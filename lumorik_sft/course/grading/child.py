"""The sandboxed child: the only grading code that runs in the same process as a student's code.

This module is the trust boundary, so it reads on its own and imports as little as it can: the
standard library at import time; the package modules the exercises need (``torch``,
``lumorik_sft.data``/``encoding``/``metrics``/``training``, ``lumorik_sft.course.checks``) only inside
:func:`_child_main`, before any student code runs; never the supervisor or the CLI. The supervisor
(:mod:`lumorik_sft.course.grading.supervisor`) starts it as ``sys.executable -I -c <bootstrap>``,
which sets ``RLIMIT_AS`` and ``RLIMIT_CPU`` and then calls ``_child_main(fd)``.

What it trusts: the job on stdin, written by the supervisor (a timeout per cell and per exercise,
each notebook's code cells, and per exercise its name, notebook, symbol, kind and hidden input
cases), and the package code it imports before the first cell runs. It trusts nothing the student's
code does: cells and functions may raise anything (``SystemExit`` included), loop forever, swallow
the alarm, exhaust memory, print, patch any module (this one too) or call ``os._exit``. So each cell
runs without its magics and ``checks.`` calls, in its own try/except, under an alarm (``SIGALRM``
raised as :class:`_Timeout`, a ``BaseException``), as does each exercise; the modules the checks
rely on are restored from a snapshot before each exercise; ``run_case``, the exercises and the
channel's ``write`` and ``json.dumps`` are bound before any student code runs. Since student code
runs in this process it can still change what the process sends; hence the rule below.

What it sends back: stdout is discarded by the supervisor and stdin is emptied; the only output
is one JSON object per line on the inherited pipe ``result_fd``, in this order:

* ``{"event": "ready"}`` once the imports are done;
* per notebook, before its first exercise: ``{"event": "begin", "phase": "load", "notebook": NAME,
  "n_cells": N}``, then ``{"event": "loaded", "notebook": NAME, "errors": [...]}`` (cells that raised);
* per exercise: ``{"event": "begin", "phase": "exercise", "exercise": NAME}``, then
  ``{"event": "result", "exercise": NAME, "outputs": [...]}`` with one item per case: the plain data
  the student's code returned, ``{"raised", "message", "traceback"}``, ``{"used_reference": [...]}``,
  ``{"timeout": true}`` or ``{"oom": true}``;
* ``{"event": "done"}``, then ``os._exit(0)``.

No record is larger than :data:`MAX_RECORD_BYTES`. They are outputs only, never verdicts: the
supervisor computes the expected outputs and judges in its own process, and treats every record
as untrusted data (anything else on the pipe is ignored).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

__all__ = ["MAX_RECORD_BYTES", "is_oom"]

MAX_RECORD_BYTES = 32 * 1024 * 1024  # one record on the channel; the supervisor reads 4x this at most


def is_oom(out: Any) -> bool:
    """Whether one case's output says the student's code ran out of memory."""
    if not isinstance(out, dict):
        return False
    if out.get("oom"):
        return True
    raised, message = out.get("raised"), str(out.get("message", "")).lower()
    return raised == "MemoryError" or (
        raised == "RuntimeError" and ("alloc" in message or "out of memory" in message)
    )


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
    """Compile a code cell without its magics and its ``checks.`` calls; raises SyntaxError."""
    import ast

    if source.lstrip().startswith("%%"):
        return None
    lines = []
    for line in source.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith(("%", "!")):
            lines.append(line[: len(line) - len(stripped)] + "pass")
        else:
            lines.append(line)
    tree = ast.parse("\n".join(lines), filename=f"<cell {index}>")
    tree.body = [node for node in tree.body if not _is_checks_call(node)]
    return compile(tree, f"<cell {index}>", "exec")


class _Snapshot:
    """The dicts of the modules the grading relies on, restored before each exercise runs.

    Names added to our own modules are removed (a module global would shadow a builtin there);
    third-party modules keep added names, since importing a submodule adds one.
    """

    def __init__(self, own: list[Any], others: list[Any]) -> None:
        self.saved = [(m.__dict__, dict(m.__dict__), True) for m in own]
        self.saved += [(m.__dict__, dict(m.__dict__), False) for m in others]

    def restore(self) -> None:
        for d, saved, strict in self.saved:
            if strict:
                for key in [k for k in d if k not in saved]:
                    del d[key]
            d.update(saved)


def _child_main(result_fd: int) -> None:  # pragma: no cover - runs in the child process
    import builtins
    import copy
    import io

    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    sys.stdin = io.StringIO("")
    channel = os.fdopen(result_fd, "w", encoding="utf-8", buffering=1)
    write_line, dumps = channel.write, json.dumps  # bound now: a patched module cannot reach them

    def emit(record: dict[str, Any]) -> None:
        try:
            text = dumps(record, allow_nan=True)
        except (TypeError, ValueError) as err:
            text = dumps(
                {
                    **{k: v for k, v in record.items() if k != "outputs"},
                    "outputs": [{"raised": "NotData", "message": str(err)}],
                }
            )
        if len(text) > MAX_RECORD_BYTES:
            text = dumps(
                {
                    **{k: v for k, v in record.items() if k != "outputs"},
                    "outputs": [{"raised": "NotData", "message": "the output is far too large"}],
                }
            )
        write_line(text + "\n")

    import torch

    torch.set_num_threads(1)
    from lumorik_sft import data, encoding, metrics, training
    from lumorik_sft.course import checks

    exercises = {e["name"]: checks.EXERCISES[e["name"]] for e in job["exercises"]}
    run_case, raised_data = checks.run_case, checks._raised
    # the checks module, and its submodules once it is a package: run_case looks names up there
    own = [m for n, m in sys.modules.items() if n == checks.__name__ or n.startswith(checks.__name__ + ".")]
    snapshot = _Snapshot([*own, data, encoding, metrics, training], [builtins, json, copy, torch])
    checks.toy_tokenizer()  # built before any student code runs
    signal.signal(signal.SIGALRM, _alarm)
    timeout = float(job["timeout"])
    emit({"event": "ready"})
    namespaces: dict[str, dict[str, Any]] = {}
    for item in job["exercises"]:
        nb = item["notebook"]
        if nb not in namespaces:
            cells = job["notebooks"][nb]
            emit({"event": "begin", "phase": "load", "notebook": nb, "n_cells": len(cells)})
            ns: dict[str, Any] = {
                "__name__": "__main__",
                "__builtins__": builtins,
                "display": lambda *a, **k: None,
            }
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
            namespaces[nb] = ns
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            emit({"event": "loaded", "notebook": nb, "errors": errors})
        ns = namespaces[nb]
        snapshot.restore()
        emit({"event": "begin", "phase": "exercise", "exercise": item["name"]})
        ex = exercises[item["name"]]
        obj = ns.get(item["symbol"])
        outputs: list[Any] = []
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            for case in item["cases"]:
                try:
                    outputs.append(run_case(ex, obj, case, fn_globals=ns))
                except _Timeout:
                    raise
                except MemoryError:
                    outputs.append({"oom": True})
                except BaseException as err:  # SystemExit and friends
                    outputs.append(raised_data(err))
                if is_oom(outputs[-1]):  # the other cases would only exhaust memory again
                    outputs += [{"oom": True}] * (len(item["cases"]) - len(outputs))
                    break
        except _Timeout:
            outputs += [{"timeout": True}] * (len(item["cases"]) - len(outputs))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        emit({"event": "result", "exercise": item["name"], "outputs": outputs})
    emit({"event": "done"})
    channel.flush()
    os._exit(0)  # skip interpreter teardown (and any atexit hook a student registered)
