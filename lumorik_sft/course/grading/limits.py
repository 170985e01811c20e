"""Per-student resource limits: one control group per student where the machine allows it, else a watcher.

Why per student: limits set on a process (``RLIMIT_AS``) multiply with every fork, so four forks
of a student under a 4 GB limit held 10 GB of the host. So each student gets:

* a **cgroup** of their own, which every process of theirs joins before it starts (the shell that
  launches the sandbox writes its pid into ``cgroup.procs``, then ``exec``\\ s): ``memory.max`` and
  ``pids.max`` on cgroup v2, ``memory.limit_in_bytes`` and ``pids.max`` on v1 (hybrid hosts and many
  containers). The kernel enforces them for the whole group; the grader reads the group's OOM-kill
  counter to tell "out of memory" from another death. :func:`detect` probes which works, once;
* where no cgroup can be made (no write access to ``/sys/fs/cgroup``), a **fallback**: the
  per-process limits :func:`rlimits` (``RLIMIT_NPROC`` under the student's own user id, so it
  counts only their processes, ``RLIMIT_FSIZE``, ``RLIMIT_AS``, no core files), and
  :class:`Watch`, which the supervisor polls while it waits: it sums the resident anonymous memory
  of every process below the sandbox and reports when the total passes the limit (the supervisor
  then kills the student's whole namespace). Sampling cannot stop a burst between two samples; the
  cgroup can.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cgroup", "Limits", "Watch", "detect", "rlimits"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TORCH_MAPS_MB = 3072  # address space that importing torch maps without using it


@dataclass(frozen=True)
class Limits:
    """What one student's processes may use, all together."""

    memory_mb: int = 4096  # resident memory of all the student's processes
    max_processes: int = 64  # processes and threads of the student (pids.max / RLIMIT_NPROC)
    file_mb: int = 64  # the largest file one process may write (RLIMIT_FSIZE)
    cpu_s: int = 3600  # CPU seconds per process: a backstop; the supervisor's deadlines come first


def rlimits(limits: Limits, *, own_uid: bool) -> dict[str, int]:
    """The child's per-process limits, by ``resource`` name, set before it imports anything.

    ``RLIMIT_NPROC`` counts every process of the user id, so it is set only when the student runs
    under a user id of their own (`own_uid`); it does nothing for root.
    """
    out = {
        "RLIMIT_AS": (limits.memory_mb + _TORCH_MAPS_MB) * 1024 * 1024,
        "RLIMIT_FSIZE": limits.file_mb * 1024 * 1024,
        "RLIMIT_CORE": 0,
        "RLIMIT_CPU": limits.cpu_s,
    }
    if own_uid:
        out["RLIMIT_NPROC"] = limits.max_processes
    return out


# ---- cgroups ---------------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fs type, options) of each cgroup filesystem, from mountinfo."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and tail and tail[0] in ("cgroup", "cgroup2"):
            options = set(tail[2].split(",")) if len(tail) > 2 else set()
            out.append((fields[3], fields[4].replace("\\040", " "), tail[0], options))
    return out


def _own_paths() -> dict[str, str]:
    """This process's cgroup per hierarchy: ``{"": v2 path, "memory": ..., "pids": ...}``."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


def _under(mount_root: str, point: str, path: str) -> Path:
    rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path.lstrip("/")
    return Path(point) / ("" if rel == "." else rel)


def _v2_parent() -> Path | None:
    """Where this process may make a v2 child group with memory and pids, or None."""
    own = _own_paths().get("")
    for root, point, kind, _ in _mounts():
        if kind != "cgroup2" or own is None:
            continue
        parent = _under(root, point, own)
        try:
            enabled = (parent / "cgroup.subtree_control").read_text().split()
            if not {"memory", "pids"} <= set(enabled):
                (parent / "cgroup.subtree_control").write_text("+memory +pids")
        except OSError:
            continue
        return parent
    return None


def _v1_parents() -> dict[str, Path] | None:
    """The v1 memory and pids hierarchies' folders of this process, or None."""
    own, found = _own_paths(), {}
    for root, point, kind, options in _mounts():
        for controller in ("memory", "pids"):
            if kind == "cgroup" and controller in options and controller in own:
                found[controller] = _under(root, point, own[controller])
    return found if set(found) == {"memory", "pids"} else None


class Cgroup:
    """One student's control group (v2: one folder; v1: one in the memory and one in the pids tree)."""

    def __init__(self, folders: dict[str, Path], version: int) -> None:
        self.folders, self.version = folders, version
        self._oom_at_start = 0

    @classmethod
    def create(cls, version: int, name: str, limits: Limits) -> Cgroup:
        """Make the group and set its limits; raises OSError where the machine refuses."""
        if version == 2:
            parent = _v2_parent()
            if parent is None:
                raise OSError("no cgroup v2 hierarchy with memory and pids to write to")
            folders = {"memory": parent / name, "pids": parent / name}
        else:
            parents = _v1_parents()
            if parents is None:
                raise OSError("no cgroup v1 memory and pids hierarchies")
            folders = {c: p / name for c, p in parents.items()}
        group = cls(folders, version)
        try:
            for folder in set(folders.values()):
                folder.mkdir()
            group._set_limits(limits)
        except OSError:
            group.remove()
            raise
        return group

    def _set_limits(self, limits: Limits) -> None:
        memory = str(limits.memory_mb * 1024 * 1024)
        if self.version == 2:
            (self.folders["memory"] / "memory.max").write_text(memory)
            with contextlib.suppress(OSError):
                (self.folders["memory"] / "memory.swap.max").write_text("0")
        else:
            (self.folders["memory"] / "memory.limit_in_bytes").write_text(memory)
            with contextlib.suppress(OSError):  # only where swap accounting is on
                (self.folders["memory"] / "memory.memsw.limit_in_bytes").write_text(memory)
        (self.folders["pids"] / "pids.max").write_text(str(limits.max_processes))

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a new process must join (one per hierarchy)."""
        return sorted({str(folder / "cgroup.procs") for folder in self.folders.values()})

    def join_prefix(self) -> list[str]:
        """A command prefix: the shell joins the group, then ``exec``\\ s the rest of the command."""
        script = 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; '
        script += 'shift; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *self.procs_files(), "--"]

    def oom_kills(self) -> int:
        """How many processes of the group the kernel killed for memory so far."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (self.folders["memory"] / name).read_text()
        except OSError:
            return 0
        match = re.search(r"^oom_kill (\d+)", text, re.M)
        if match:
            return int(match.group(1))
        if self.version == 1:  # older kernels: no counter; a hit limit is the best evidence
            with contextlib.suppress(OSError, ValueError):
                return int((self.folders["memory"] / "memory.failcnt").read_text())
        return 0

    def pids(self) -> list[int]:
        out: set[int] = set()
        for procs in self.procs_files():
            with contextlib.suppress(OSError, ValueError):
                out.update(int(p) for p in Path(procs).read_text().split())
        return sorted(out)

    def kill(self) -> None:
        """SIGKILL every process in the group, until none is left (a fork flood included)."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                (self.folders["memory"] / "cgroup.kill").write_text("1")
        for _ in range(200):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self) -> None:
        """Kill what is left and delete the group's folders (empty groups only can go)."""
        self.kill()
        for folder in set(self.folders.values()):
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)  # zombies still being reaped


def detect() -> int | None:
    """The cgroup version this process can make per-student groups with (2, then 1), or None.

    Also removes the empty groups that a grader killed outright left behind.
    """
    name = f"lumorik-probe-{os.getpid()}"
    for version in (2, 1):
        try:
            group = Cgroup.create(version, name, Limits())
        except OSError:
            continue
        group.remove()
        for folder in {f.parent for f in group.folders.values()}:
            _remove_stale(folder)
        return version
    return None


def _remove_stale(parent: Path) -> None:
    """rmdir ``lumorik-<pid>-...`` groups of graders that no longer run (only empty ones can go)."""
    for folder in parent.glob("lumorik-*"):
        match = re.match(r"lumorik-(?:probe-)?(\d+)", folder.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            with contextlib.suppress(OSError):
                folder.rmdir()


# ---- the fallback: watching memory -----------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(root: int) -> list[int]:
    """`root` and every process below it (a PID namespace's orphans stay below its init)."""
    children, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def anon_rss_mb(pids: list[int]) -> float:
    """Resident memory of `pids` that is their own (not file-backed), summed, in MB."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        total += max(0, int(fields[1]) - int(fields[2]))
    return total * _PAGE / (1024 * 1024)


class Watch:
    """Polled by the supervisor: has the student's process tree passed its memory limit?"""

    def __init__(self, root_pid: int, limits: Limits, every_s: float = 0.2) -> None:
        self.root_pid, self.limits, self.every_s = root_pid, limits, every_s
        self._next = 0.0
        self.peak_mb = 0.0

    def over(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.every_s
        used = anon_rss_mb(descendants(self.root_pid))
        self.peak_mb = max(self.peak_mb, used)
        return used > self.limits.memory_mb
