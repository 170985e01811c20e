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


# ---- the student's process as the grader starts it: by a command, or forked by the template --------

_JOB_PROBE = r"""
import ctypes, os
from pathlib import Path

def clean_and_dedupe(records):
    import lumorik_sft
    package = Path(lumorik_sft.__file__).resolve().parent
    libc = ctypes.CDLL(None, use_errno=True)
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    escaped = []
    for fd in fds:  # a directory descriptor from outside the root would lead out of it
        try:
            os.fchdir(int(fd))
            escaped.append(sorted(os.listdir("..")))
        except OSError:
            pass
    return {
        "solutions": os.path.exists(package.parent / "solutions"),
        "git": os.path.exists(package.parent / ".git"),
        "checkout": sorted(os.listdir(package.parent)),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "fds": sorted(fds.values()),
        "escaped": escaped,
        "caps": [status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")],
        "no_new_privs": status["NoNewPrivs"].strip(),
        "ids": [os.getresuid(), os.getresgid(), os.getgroups()],
        "umount": libc.umount2(str(package).encode(), 2),
    }
"""


def _probe_job(forked: bool, tmp_path: Path, *, dead: bool = False) -> dict:
    """The probe's report from a sandbox started as a command, or forked by the grader's template
    (`dead`: a template that died before the student came, so the grader starts a command)."""
    from lumorik_sft.course import checks
    from lumorik_sft.course.grading import limits
    from lumorik_sft.course.grading.session import Job, run_jobs
    from lumorik_sft.course.grading.supervisor import GradingConfig
    from lumorik_sft.course.grading.template import Template

    config = GradingConfig(timeout=30.0)
    template = Template.start(BOX, config) if forked else None
    assert (template is not None) == forked
    if dead:
        template.close()
    cases = checks.EXERCISES["clean_and_dedupe"].make_cases(0)
    job = Job("clean_and_dedupe", "01_data_curation.ipynb", [_JOB_PROBE], cases)
    try:
        outcomes = run_jobs(
            [job],
            config,
            BOX,
            tmp_path,
            uid=sandbox.student_uid(0),
            cgroup_version=limits.detect(),
            template=template,
        )
    finally:
        if template is not None:
            template.close()
    outcome = outcomes["clean_and_dedupe"]
    assert outcome.outputs, (outcome.death, outcome.detail)
    return outcome.outputs[0]


@pytest.mark.parametrize(
    "forked",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                BOX.kind != "nobody", reason="the template runs where the grader is root"
            ),
        ),
    ],
    ids=["command", "template"],
)
def test_a_students_process_holds_nothing_of_the_grader(forked, tmp_path):
    """However it was started, the student's process sees the package only, holds only its own pipes,
    has no capability, cannot gain one, has a PID namespace of its own and cannot unmount."""
    import lumorik_sft

    report = _probe_job(forked, tmp_path)
    package = Path(lumorik_sft.__file__).resolve().parent
    assert not report["solutions"] and not report["git"]
    assert set(report["checkout"]) == {p.name for p in sandbox.visible_paths() if p.parent == package.parent}
    # pipes, /dev/null and the probe's own listing: no file or folder of the host, so no way out
    assert all(t.startswith(("pipe:", "/dev/null", "/proc/")) for t in report["fds"]), report["fds"]
    kinds = [t.split(":")[0] for t in report["fds"] if not t.startswith("/proc/")]
    assert sorted(kinds) == ["/dev/null"] * 2 + ["pipe"] * 3, report["fds"]  # stderr, request, answer
    assert report["escaped"] == [], report["escaped"]
    assert report["caps"] == ["0000000000000000"] * 4 and report["no_new_privs"] == "1"
    if BOX.kind == "nobody":
        uid = sandbox.student_uid(0)
        assert report["ids"] == [[uid] * 3, [uid] * 3, []]
    assert report["umount"] != 0
    assert 1 in report["pids"] and len(report["pids"]) <= 3  # PID 1, the zygote, this exercise's process
    # forked, the zygote is PID 1 itself; as a command, a shell is PID 1 and the zygote its child
    assert len(report["pids"]) == (2 if forked else 3), report["pids"]


@pytest.mark.skipif(BOX.kind != "nobody", reason="the template runs where the grader is root")
def test_a_dead_template_leaves_the_grader_starting_sandboxes_as_commands(tmp_path):
    report = _probe_job(True, tmp_path, dead=True)
    assert not report["solutions"] and report["no_new_privs"] == "1"
    assert len(report["pids"]) == 3, report["pids"]  # a shell as PID 1: the command started it
