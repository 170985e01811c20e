"""The grader's isolation: hidden folders stay hidden and the student's process cannot undo it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lumorik_sft.course import sandbox

BOX = sandbox.detect()
pytestmark = pytest.mark.skipif(not BOX.isolated, reason="no mount namespaces on this machine")

_PROBE = r"""
import ctypes, json, os, sys
from pathlib import Path
import lumorik_sft
secret = sys.argv[1]
package = Path(lumorik_sft.__file__).resolve().parent
checkout = package.parent
libc = ctypes.CDLL(None, use_errno=True)
try:
    (package / "planted.py").write_text("x = 1")  # the package is mounted read-only
    wrote_package = True
except OSError:
    wrote_package = False
report = {
    "secret": os.path.exists(secret),
    "solutions": os.path.exists(checkout / "solutions"),
    "git": os.path.exists(checkout / ".git"),
    "checkout": sorted(os.listdir(checkout)),
    "tmp": os.listdir("/tmp"),
    "umount": libc.umount2(str(package).encode(), 2),  # MNT_DETACH; needs privileges the child lacks
    "wrote_package": wrote_package,
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "cwd": os.getcwd(),
    "uid": os.getuid(),
}
with open("notes.txt", "w") as fh:  # a private, writable working directory
    fh.write("ok")
report["wrote"] = open("notes.txt").read()
print(json.dumps(report))
"""


@pytest.fixture
def place():
    """A folder with a secret in it, and an empty folder to become the child's root."""
    root = Path(tempfile.mkdtemp(prefix="lumorik-sandbox-test-"))
    (root / "secret.txt").write_text("the answer is 42")
    (root / "root").mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _run(argv: list[str], place: Path) -> subprocess.CompletedProcess:
    return subprocess.run(BOX.command(argv, place / "root"), capture_output=True, text=True, timeout=120)


def test_the_child_sees_python_and_the_package_only(place):
    import lumorik_sft

    package = Path(lumorik_sft.__file__).resolve().parent
    done = _run([sys.executable, "-I", "-c", _PROBE, str(place / "secret.txt")], place)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # the checkout around the package (solutions/, .git, tests...) and every other place are gone
    assert not report["secret"] and not report["solutions"] and not report["git"]
    # only what was bound: the package, and the virtual environment when it lives in the checkout
    bound = {p.name for p in sandbox.visible_paths() if p.parent == package.parent}
    assert set(report["checkout"]) == bound and package.name in bound
    # /tmp holds nothing but the way to what was bound there (a venv in a CI clone under /tmp)
    tmp = Path("/tmp")
    ways = {p.relative_to(tmp).parts[0] for p in sandbox.visible_paths() if tmp in p.parents}
    assert set(report["tmp"]) == ways
    # and the child cannot undo that or plant code for the next student
    assert report["umount"] != 0 and not report["wrote_package"]
    assert not (package / "planted.py").exists()
    assert report["cwd"] == str(sandbox.HOME / "work") and report["wrote"] == "ok"
    # a fresh /proc: the grader's processes (and their /proc/<pid>/root views) are out of sight
    assert 1 in report["pids"] and len(report["pids"]) <= 3  # our shell (PID 1) and the child
    if BOX.kind == "nobody":
        assert report["uid"] == sandbox.NOBODY
    # nothing leaked out of the namespace
    assert (place / "secret.txt").exists() and os.listdir(place / "root") == []


@pytest.mark.parametrize("signum", [9, 24])  # SIGKILL (the OOM killer), SIGXCPU (the CPU limit)
def test_death_by_signal_is_reported_as_such(place, signum):
    done = _run([sys.executable, "-I", "-c", f"import os; os.kill(os.getpid(), {signum})"], place)
    assert BOX.exit_code(done.returncode) == -signum


def test_ordinary_exit_codes_pass_through(place):
    done = _run([sys.executable, "-I", "-c", "raise SystemExit(3)"], place)
    assert BOX.exit_code(done.returncode) == 3


def test_visible_paths_hold_the_package_but_not_the_checkout():
    import lumorik_sft

    package = Path(lumorik_sft.__file__).resolve().parent
    paths = sandbox.visible_paths()
    assert any(p == package or p in package.parents for p in paths)
    assert package.parent not in paths and Path("/tmp") not in paths and Path("/") not in paths
