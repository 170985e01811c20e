"""The supervisor's end of a job's pipes: one request out, exactly one answer back, before a deadline.

Why a protocol and not a stream of records: whatever the child can write, the student's code in it
can write too (it runs in the same process, it can read ``sys.argv``, the stack and every
descriptor). So the channel trusts nothing the child says about itself; it accepts an answer only
when it asked for one:

* the supervisor sends a request (a fresh random id, the job's notebook code, later its hidden
  cases) and waits for exactly one line, which must be a JSON object with the expected event and
  that id; anything else (a record nobody asked for, another id, a second line, bytes after the
  answer, garbage, a record over :data:`MAX_RECORD_BYTES`) is a :class:`End` of kind
  ``"violation"``, and the student's run ends there;
* the deadline is the supervisor's own clock, set when the request is sent; no message from the
  child moves it. A missed deadline is ``"deadline"``, a closed pipe ``"closed"``, and
  :func:`receive` asks the caller's `poll` between reads: the memory watch, a stop request, and
  whether the job's process has ended (the zygote's report: the pipe itself may stay open in
  processes the student cannot reach);
* the child's stderr (shared by all its processes) is drained into a :class:`Tail` that keeps the
  last few kilobytes in memory: nothing a student prints reaches the host's disk.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import time
from collections.abc import Callable
from typing import Any

from lumorik_sft.course.grading.child import MAX_RECORD_BYTES

__all__ = ["End", "Tail", "new_id", "receive", "send"]

_POLL_S = 0.1


class End(Exception):
    """Why a wait for an answer ended without one: ``deadline``, ``closed``, ``violation``, or the
    kind the caller's `poll` returned (``memory``, ``stopped``)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


class Tail:
    """The last `cap` bytes written to a pipe; everything before is read and dropped."""

    def __init__(self, fd: int | None, cap: int = 8192) -> None:
        self.fd, self.cap, self.data, self.total = fd, cap, b"", 0
        if fd is not None:
            os.set_blocking(fd, False)

    def drain(self) -> None:
        """Read what is there now (at most a few MB per call, so a flood cannot hold the caller)."""
        for _ in range(64):
            if self.fd is None:
                return
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                os.close(self.fd)
                self.fd = None
                return
            self.total += len(chunk)
            self.data = (self.data + chunk)[-self.cap :]

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def new_id() -> str:
    """A request id the child cannot guess before the request is sent."""
    return secrets.token_hex(8)


def _fds(tail: Tail) -> list[int]:
    return [tail.fd] if tail.fd is not None else []


def send(
    fd: int, message: dict[str, Any], deadline: float, tail: Tail, poll: Callable[[], str | None]
) -> None:
    """Write one request line to `fd` (non-blocking) before `deadline`, draining stderr meanwhile."""
    data = (json.dumps(message) + "\n").encode("utf-8", "surrogatepass")
    os.set_blocking(fd, False)
    while data:
        _check(deadline, poll)
        writable = select.select(_fds(tail), [fd], [], _POLL_S)[1]
        tail.drain()
        if writable:
            try:
                data = data[os.write(fd, data[: 1 << 16]) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise End("closed", "the process stopped reading its requests") from None


def _check(deadline: float, poll: Callable[[], str | None]) -> None:
    kind = poll()
    if kind:
        raise End(kind)
    if time.monotonic() >= deadline:
        raise End("deadline")


def _parse(line: bytes, event: str, request_id: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        raise End("violation", "a line that is not JSON on the grader's channel") from None
    if not isinstance(record, dict) or record.get("event") != event or record.get("id") != request_id:
        raise End("violation", "a record the grader did not ask for on its channel")
    return record


def receive(
    fd: int, event: str, request_id: str, deadline: float, tail: Tail, poll: Callable[[], str | None]
) -> dict[str, Any]:
    """The one answer to request `request_id`: an object with ``event`` and that ``id``, nothing more.

    Raises :class:`End` on a deadline, a closed pipe, a violation or a `poll` kind. When `poll`
    says ``"closed"`` (the job's process has ended), what it wrote before ending is still read.
    """
    buffer = b""
    while True:
        kind = poll()
        if kind == "closed":
            buffer += _available(fd)
            if b"\n" not in buffer:
                raise End("closed")
        elif kind:
            raise End(kind)
        elif time.monotonic() >= deadline:
            raise End("deadline")
        else:
            ready = select.select([fd, *_fds(tail)], [], [], _POLL_S)[0]
            tail.drain()
            if fd not in ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk and b"\n" not in buffer:
                raise End("violation" if buffer else "closed", "an unfinished record" if buffer else "")
            buffer += chunk
        if len(buffer) > MAX_RECORD_BYTES and b"\n" not in buffer[: MAX_RECORD_BYTES + 1]:
            raise End("violation", "a record larger than the grader accepts")
        if b"\n" in buffer:
            line, rest = buffer.split(b"\n", 1)
            record = _parse(line, event, request_id)
            if rest or _more(fd):
                raise End("violation", "more than one answer to one request")
            return record


def _available(fd: int) -> bytes:
    """Whatever the pipe holds now, without waiting."""
    out = b""
    os.set_blocking(fd, False)
    try:
        while len(out) <= MAX_RECORD_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            out += chunk
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, True)
    return out


def _more(fd: int) -> bool:
    """Whether anything already follows the answer in the pipe (a second record written with it)."""
    return bool(select.select([fd], [], [], 0)[0]) and bool(_peek(fd))


def _peek(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1)
    except BlockingIOError:
        return b""
    finally:
        os.set_blocking(fd, True)
