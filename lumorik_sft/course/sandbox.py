"""Run a student's process in a filesystem that holds Python and this package, and nothing else.

Why: an empty working directory and a scrubbed environment are not enough. The child imports
``lumorik_sft``, so ``lumorik_sft.__file__`` leads to the checkout, and with it to ``solutions/``
and to ``.git`` (whose history holds every solution); a scan of ``/tmp`` or ``/home`` finds other
copies, other students' submissions and the gradebook. Hiding a list of known places cannot be
complete, so on Linux the child gets a whitelist instead (``unshare`` and ``chroot``):

* a new root on an empty tmpfs, into which only what the interpreter needs is bind-mounted,
  read-only: the system directories (``/usr``, ``/lib``...), a few files of ``/etc``, the Python
  installation and its environment (``sys.prefix``, ``sys.base_prefix``), and the ``lumorik_sft``
  package directory itself (for an editable install, not the checkout around it);
* a private, writable home (``/home/student``) and ``/tmp`` inside that tmpfs (so writing files
  cannot fill the disk), a minimal ``/dev``, and a fresh ``/proc`` of a new PID namespace that
  shows only the child's own processes;
* a network namespace of its own (``--net``): no interface but a loopback that is down, so no
  route to the host's services, to the outside or to other students; and its own IPC and host name;
* the student's interpreter then runs without the privileges to undo any of this (or to write into
  the read-only mounts): as a user id of its own (just below ``nobody``, :func:`student_uid`) when
  the grader is root and ``nobody`` can run Python, otherwise with every capability dropped
  (``setpriv``);
* the whole namespace dies with the grader's thread that started it, even on SIGKILL
  (``setpriv --pdeathsig`` and ``unshare --kill-child``).

Where the grader is root, :mod:`lumorik_sft.course.grading.template` builds the same sandbox
without the commands: a fork of a process that already imported torch makes the same namespaces
(``unshare(2)``), runs :meth:`Sandbox.setup_script`, ``chroot`` into it and takes the same user id, so a
student costs no interpreter start.

Which kind works depends on the machine (containers may forbid namespaces), so :func:`detect`
probes them once, strongest first; ``"none"`` falls back to a plain child process, with a warning
that the solutions may be readable.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HOME", "NOBODY", "Sandbox", "detect", "student_uid", "visible_paths"]

NOBODY = 65534  # uid and gid of `nobody` on Linux
HOME = Path("/home/student")  # the child's home; its working directory is HOME / "work"
_TMPFS_MB = 256  # the child's root, home and /tmp live in a tmpfs this large
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "passwd",
    "group",
    "nsswitch.conf",
    "localtime",
    "fonts",
    "ssl",
    "mime.types",
)
_DEVICES = ("null", "zero", "full", "random", "urandom")
_TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_DESCRIPTIONS = {
    "nobody": "own root filesystem (Python and lumorik_sft only, read-only), PID and network "
    "namespaces; student code runs as an unprivileged user of its own",
    "no-capabilities": "own root filesystem (Python and lumorik_sft only, read-only), PID and "
    "network namespaces; student code runs without capabilities",
    "none": "no isolation: student code may be able to read the solutions",
}


def student_uid(slot: int) -> int:
    """The user id of the student graded in worker `slot`: ids just below ``nobody``, owned by no one."""
    return NOBODY - 1 - slot


def _tool(name: str) -> str:
    """Absolute path of a system tool (the child's PATH has no sbin)."""
    return shutil.which(name, path=_TOOL_PATH) or name


def visible_paths() -> list[Path]:
    """What the child's filesystem holds: the system, the interpreter, and the package directory."""
    import lumorik_sft

    candidates = [Path(p) for p in _SYSTEM_DIRS]
    candidates += [Path("/etc") / name for name in _ETC]
    candidates += [Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)]
    candidates += [Path(sys.executable).parent, Path(os.path.realpath(sys.executable)).parent]
    candidates.append(Path(lumorik_sft.__file__).resolve().parent)
    out: list[Path] = []
    for path in sorted({p for p in candidates if os.path.lexists(p)}, key=lambda p: (len(p.parts), str(p))):
        if not any(parent in out for parent in path.parents):  # already visible through a parent
            out.append(path)
    return out


@dataclass(frozen=True)
class Sandbox:
    """How student processes are isolated. ``kind`` is ``nobody``, ``no-capabilities`` or ``none``."""

    kind: str
    user_namespace: bool = False

    @property
    def isolated(self) -> bool:
        return self.kind != "none"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self.kind]

    def command(self, argv: Sequence[str], scratch: Path, uid: int = NOBODY) -> list[str]:
        """`argv` wrapped to run isolated; `scratch` (an empty folder) becomes the child's root.

        The student's process runs as `uid` (kind ``nobody``): one id per student graded at the same
        time, so a per-user limit (``RLIMIT_NPROC``) counts one student's processes only. The
        command dies with the thread that started it (``--pdeathsig``), and everything in the
        namespaces dies with it (``--kill-child``), even when the grader is killed outright.
        """
        die_with_parent = [_tool("setpriv"), "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        if not self.isolated:
            return [*die_with_parent, *argv]
        prefix = [*die_with_parent, _tool("unshare")]
        if self.user_namespace:
            prefix += ["--user", "--map-root-user"]
        prefix += ["--mount", "--propagation", "private", "--pid", "--net", "--ipc", "--uts"]
        prefix += ["--fork", "--kill-child", "--"]
        return [*prefix, "/bin/sh", "-c", self._script(argv, scratch, uid)]

    def exit_code(self, code: int | None) -> int | None:
        """The student's process's exit status: the shell reports death by signal N as 128 + N."""
        if self.isolated and code is not None and 128 < code < 128 + 65:
            return -(code - 128)
        return code

    def setup_script(self, scratch: Path, uid: int = NOBODY) -> str:
        """The shell lines that build the child's root in `scratch` (run as root in its new namespaces)."""
        q = shlex.quote
        root = q(str(scratch))
        mount = _tool("mount")
        lines = ["set -e", f"{mount} -t tmpfs -o size={_TMPFS_MB}m,mode=0755 lumorik-root {root}"]
        for path in visible_paths():
            target = q(str(scratch) + str(path))
            parent = q(str(scratch) + str(path.parent))
            if path.is_symlink() and path.parent == Path("/"):  # /bin -> usr/bin: the same link
                lines.append(f"ln -s {q(os.readlink(path))} {target}")
                continue
            if path.is_dir():
                lines.append(f"mkdir -p {target}")
            else:
                lines.append(f"mkdir -p {parent} && touch {target}")
            lines.append(f"{mount} --rbind {q(str(path))} {target}")
            lines.append(f"{mount} -o remount,bind,ro {target}")
        lines.append(f"mkdir -p {root}/dev {root}/proc {root}/tmp {q(str(scratch) + str(HOME / 'work'))}")
        for dev in _DEVICES:
            if os.path.exists(f"/dev/{dev}"):
                lines.append(f"touch {root}/dev/{dev} && {mount} --bind /dev/{dev} {root}/dev/{dev}")
        lines.append(f"mkdir -p {root}/dev/shm && {mount} -t tmpfs -o size=64m lumorik-shm {root}/dev/shm")
        lines.append(f"{mount} -t proc proc {root}/proc")
        lines.append(f"chmod 1777 {root}/tmp {root}/dev/shm")
        if self.kind == "nobody":
            lines.append(f"chown -R {uid}:{uid} {q(str(scratch) + str(HOME))}")
        return "\n".join(lines)

    def _script(self, argv: Sequence[str], scratch: Path, uid: int) -> str:
        q = shlex.quote
        chroot = _tool("chroot")
        lines = [self.setup_script(scratch, uid)]
        if self.kind == "nobody":
            drop = [_tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        else:
            drop = [_tool("setpriv"), "--inh-caps=-all", "--bounding-set=-all"]
        run = [
            chroot,
            str(scratch),
            _tool("env"),
            "-C",
            str(HOME / "work"),
            *drop,
            "--no-new-privs",
            "--",
            *argv,
        ]
        # not `exec`: the shell stays PID 1 of the namespace, so the student's process gets the
        # ordinary signal semantics (SIGXCPU, SIGALRM) that a namespace's init would not
        lines += ["set +e", " ".join(q(a) for a in run), "exit $?"]
        return "\n".join(lines)


def _works(box: Sandbox) -> bool:
    """Probe: can an isolated child start, import the package, and not see a file next to it?"""
    with tempfile.TemporaryDirectory(prefix="lumorik-probe-") as tmp:
        scratch, secret = Path(tmp) / "scratch", Path(tmp) / "secret.txt"
        scratch.mkdir()
        secret.write_text("42")
        probe = (
            "import os, sys, lumorik_sft; "
            f"sys.exit(3 if os.path.exists({str(secret)!r}) or os.path.exists({tmp!r}) else 0)"
        )
        argv = [sys.executable, "-I", "-c", probe]
        try:
            done = subprocess.run(
                box.command(argv, scratch),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=120,
                env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"},
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode == 0


@functools.cache
def detect() -> Sandbox:
    """The strongest isolation this machine allows (probed once per process)."""
    tools = ("unshare", "setpriv", "chroot", "env", "mount")
    if sys.platform != "linux" or not all(shutil.which(t, path=_TOOL_PATH) for t in tools):
        return Sandbox("none")
    candidates = (
        [Sandbox("nobody"), Sandbox("no-capabilities")]
        if os.geteuid() == 0
        else [Sandbox("no-capabilities", user_namespace=True)]
    )
    for box in candidates:
        if _works(box):
            return box
    return Sandbox("none")
