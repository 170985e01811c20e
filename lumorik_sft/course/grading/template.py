"""The grader's end of the template, a fork server that saves every student the seconds of importing torch.

Without it each student's sandbox starts a fresh interpreter that imports torch and the package
(seconds per student, most of a solution's grading time). With it, one process per grading run
(:func:`.child._template_main`) imports them once and, for each student, forks a process that
builds that student's sandbox itself: the student's cgroup, fresh mount, PID, network, IPC and UTS
namespaces, the same mount script as :meth:`lumorik_sft.course.sandbox.Sandbox.command`, ``chroot``,
the student's user id without privileges, then the zygote. So every student still gets a sandbox
of their own, and every job a process forked from one that never ran student code.

Only where the grader is root (sandbox kind ``nobody``); elsewhere, or when the template cannot be
started or has died, each sandbox is started as a command as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from lumorik_sft.course import sandbox
from lumorik_sft.course.sandbox import Sandbox

__all__ = ["Forked", "Template"]

_BOOTSTRAP = """
import sys
from lumorik_sft.course.grading.child import _template_main
_template_main(int(sys.argv[1]))
"""


class Forked:
    """A student's sandbox forked by the template, watched through a pidfd (it is not our child)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid, self.pidfd = pid, pidfd

    def poll(self) -> int | None:
        """0 once the process has ended (its status is the template's to reap), else None."""
        if self.pidfd < 0:
            return 0
        return 0 if select.select([self.pidfd], [], [], 0)[0] else None

    def kill(self) -> None:
        """SIGKILL it; PID 1 of its namespace dies with it, and with PID 1 every process in there."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        if self.pidfd >= 0 and not select.select([self.pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return 0

    def close(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1


class Template:
    """One template process per grading run; :meth:`spawn` asks it for a student's sandbox."""

    def __init__(self, box: Sandbox, env: dict[str, str], timeout: float) -> None:
        """Start it (from the thread that lives for the whole run: it dies with that thread)."""
        self.box, self.timeout, self.lock, self.broken = box, timeout, threading.Lock(), False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-I", "-c", _BOOTSTRAP, str(theirs.fileno())]
        try:
            self.proc = subprocess.Popen(
                Sandbox("none").command(argv, Path("/")),  # --pdeathsig: it dies with the grader
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                env=env,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
                close_fds=True,
            )
        finally:
            theirs.close()
        self.sock = ours

    @classmethod
    def start(cls, box: Sandbox, config: Any) -> Template | None:
        """A template for `box`, or None where it does not apply (not root, not isolated) or cannot start."""
        if box.kind != "nobody" or os.geteuid() != 0 or not hasattr(socket, "send_fds"):
            return None
        from lumorik_sft.course.grading.session import child_env

        try:
            return cls(box, child_env(sandbox.HOME), config.startup_timeout)
        except OSError:
            return None

    def spawn(self, request: dict[str, Any], fds: list[int]) -> Forked:
        """Send one student's request and pipes; the forked sandbox. Raises OSError if the template fails."""
        with self.lock:
            if self.broken or self.proc.poll() is not None:
                raise OSError("the template is gone")
            try:
                socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
                if not select.select([self.sock], [], [], self.timeout)[0]:
                    raise OSError("the template did not answer in time")
                message, pidfds, _, _ = socket.recv_fds(self.sock, 4096, 1)
                if not message:
                    raise OSError("the template hung up")
                answer = json.loads(message)
                if "pid" not in answer or len(pidfds) != 1:  # refused: this student starts as a command
                    for fd in pidfds:
                        os.close(fd)
                    raise LookupError("refused")
                return Forked(int(answer["pid"]), pidfds[0])
            except LookupError as err:
                raise OSError("the template refused the request") from err
            except (OSError, ValueError, KeyError) as err:  # the sandboxes it forked go on
                self.broken = True
                raise OSError(f"the template failed: {err}") from err

    def close(self) -> None:
        """Stop the template; the sandboxes it forked are their graders' to kill."""
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
