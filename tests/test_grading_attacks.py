"""The grader under attack (issue #16): each test is one attack a determined student tried, bounded in time.

One grading run (module fixture) holds a small class of attackers, graded on a few exercises with tiny
timeouts and budgets; a second run forces the fallback limits (no cgroup); a third is a real
``python -m lumorik_sft.course.grading`` process stopped with SIGTERM. Every attack ends by itself
within a minute even on a grader without the defences (so the file also runs, and fails, on the code
before them), and the machine is never held: the sandboxes die with the run.
"""
# ruff: noqa: E501  (attacks are written as source snippets)

from __future__ import annotations

import contextlib
import csv
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat
import pytest
from test_grading import _notebook, _student

from lumorik_sft.course import grading, sandbox
from lumorik_sft.course.grading import GradingConfig, supervisor

try:
    from lumorik_sft.course.grading import limits
except ImportError:  # the grader before per-student limits
    limits = None

ROOT = Path(__file__).resolve().parent.parent
NB1, NB2, NB3 = "01_data_curation.ipynb", "02_tokenization.ipynb", "03_training_loop.ipynb"
EXERCISES = ["clean_and_dedupe", "leak_free_split", "encode_example", "masked_nll_sum"]
ISOLATED = sandbox.detect().isolated
FLOOD_MB = 200
NOTEBOOK_BUDGET, STUDENT_BUDGET, MAX_PROCESSES, MEMORY_MB = 25.0, 40.0, 32, 1200
CGROUPS = limits.detect() is not None if limits else True  # a grader without limits.py must fail, not skip


def _config(**wanted) -> GradingConfig:
    """A config with the fields this version of the grader has (so the file runs on older code too)."""
    fields = getattr(GradingConfig, "__dataclass_fields__", {})
    return GradingConfig(**{k: v for k, v in wanted.items() if k in fields})


def _marker() -> str:
    """A `sleep` argument no other process on the machine has: how the tests find a student's processes."""
    return f"29.{random.randrange(10**8, 10**9)}"


def _marked(marker: str) -> list[int]:
    """The ids of the processes whose command line holds `marker`."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
            except OSError:
                pass
    return out


def _count(marker: str) -> int:
    return len(_marked(marker))


def _tree_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class _Sampler(threading.Thread):
    """Peaks, sampled every 0.1 s while a grading run goes: processes with each marker, bytes under a folder."""

    def __init__(self, markers: list[str], folder: Path) -> None:
        super().__init__(daemon=True)
        self.markers, self.folder = markers, folder
        self.peaks = dict.fromkeys(markers, 0)
        self.disk_peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            for m in self.markers:
                self.peaks[m] = max(self.peaks[m], _count(m))
            self.disk_peak = max(self.disk_peak, _tree_bytes(self.folder))


class _Listener(threading.Thread):
    """A TCP and a UDP socket on the host's loopback that record whatever reaches them."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.tcp.getsockname()[1]))
        self.port, self.received = self.tcp.getsockname()[1], []
        self.tcp.settimeout(0.2)
        self.udp.settimeout(0.2)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.tcp.accept()
                self.received.append(("tcp", conn.recv(100)))
                conn.close()
            except OSError:
                pass
            with contextlib.suppress(OSError):
                self.received.append(("udp", self.udp.recv(100)))

    def close(self) -> None:
        self.done.set()
        self.join(5)
        self.tcp.close()
        self.udp.close()


# ---- the attacks, as notebook cells -------------------------------------------------------------------

# The forger: the result channel's fd from argv, the hidden cases from the caller's frame (`job`),
# the package's own reference answers, result records and "done", an atexit record, a claimed status.
# Reached through an alias (`import ... as ck`) so no statement filter on `checks.` drops it.
FORGE = """
import atexit, json, os, sys
import lumorik_sft.course.checks as ck

def _forge():
    fds = set()
    try:
        fds.add(int(sys.argv[3]))
    except (IndexError, ValueError):
        pass
    fds |= {int(f) for f in os.listdir('/proc/self/fd') if int(f) > 2}
    job, frame = None, sys._getframe()
    while frame is not None:
        if isinstance(frame.f_locals.get('job'), dict):
            job = frame.f_locals['job']
        frame = frame.f_back
    lines = []
    for item in (job or {}).get('exercises', []):
        if item['name'] == 'leak_free_split':
            outs = [{'oom': True}] * len(item['cases'])  # a claimed status
        else:
            outs = [ck.to_data(ck.EXERCISES[item['name']].reference(c)) for c in item['cases']]
        lines.append({'event': 'result', 'exercise': item['name'], 'outputs': outs})
    lines.append({'event': 'done'})
    data = ''.join(json.dumps(x) + '\\n' for x in lines).encode()
    for fd in fds:
        try:
            os.write(fd, data)
        except OSError:
            pass
    extra = b'{"event": "result", "exercise": "clean_and_dedupe", "outputs": []}\\n'
    atexit.register(lambda: [os.write(fd, extra) for fd in fds])
    os._exit(0)

_forge()
"""

DEFAULT_ARG = """
def clean_and_dedupe(records, _curate=data.curate):
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in _curate(records).kept]
"""

# the answer kept where no name refers to it (a holder object), and one under another module's name
ALIAS = """
import types
_held = types.SimpleNamespace(split=data.split_records)
def leak_free_split(records, val_fraction=0.1, seed=0):
    return _held.split(records, val_fraction=val_fraction, seed=seed)
"""

FUSED = """
import torch
from types import SimpleNamespace
from lumorik_sft import fused_loss as _fl
class _Logits:
    def __init__(self, logits):
        self.logits = logits
    def __call__(self, **kwargs):
        return SimpleNamespace(logits=self.logits)
def masked_nll_sum(logits, labels):
    return _fl.completion_nll(_Logits(logits), {"input_ids": labels.clamp(min=0), "labels": labels})
"""

# ignores the alarm and, where the channel's fd is in argv (the old grader), says "ready" every second
KEEP_ALIVE = """
import os, signal, sys, time
signal.signal(signal.SIGALRM, signal.SIG_IGN)
try:
    _fd = int(sys.argv[3])
except (IndexError, ValueError):
    _fd = None
_end = time.monotonic() + 40
while time.monotonic() < _end:
    if _fd is not None:
        try:
            os.write(_fd, b'{"event": "ready"}\\n')
        except OSError:
            pass
    time.sleep(1)
"""

STDERR_FLOOD = f"""
import os
_chunk = b"x" * (1 << 20)
for _ in range({FLOOD_MB}):
    os.write(2, _chunk)
"""


def _fork_flood(marker: str, n: int = 150) -> str:
    return f"""
import os
for _ in range({n}):
    try:
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep", "{marker}"])
    except OSError:
        break
"""


def _connect(port: int) -> str:
    return f"""
import socket
for _ in range(3):
    try:
        with socket.create_connection(("127.0.0.1", {port}), timeout=1) as s:
            s.sendall(b"leak")
    except OSError:
        pass
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(b"leak", ("127.0.0.1", {port}))
        u.close()
    except OSError:
        pass
"""


STATE_PATCH = """
import math, os, signal, sys
os.environ["LUMORIK_LEAK"] = "1"
os.chdir("/")
math.isclose = lambda *a, **k: True
sys.excepthook = lambda *a: None
signal.setitimer = lambda *a, **k: (0.0, 0.0)
"""

STATE_CHECK = """
import math, os, sys
_clean = (
    "LUMORIK_LEAK" not in os.environ
    and os.getcwd() != "/"
    and math.isclose(1.0, 2.0) is False
    and sys.excepthook is sys.__excepthook__
)
_real_encode = encode_example
def encode_example(tokenizer, prompt, completion, max_length=64):
    if not _clean:
        return {"state": "leaked from the previous notebook"}
    return _real_encode(tokenizer, prompt, completion, max_length=max_length)
"""

# real memory (pages written), in four processes at once: only a per-student limit sees the sum
MEMORY_HOG = """
def leak_free_split(records, val_fraction=0.1, seed=0):
    import os, time
    for _ in range(3):
        if os.fork() == 0:
            hold = b"x" * (300 * 2**20)
            time.sleep(30)
            os._exit(0)
    blocks = []
    for _ in range(80):
        blocks.append(b"x" * (50 * 2**20))
        time.sleep(0.05)
    return [], []
"""


def _nb(*cells: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """One grading run of a class of attackers; the host's loopback listened to, processes and disk sampled."""
    root = tmp_path_factory.mktemp("submissions")
    scratch_root = tmp_path_factory.mktemp("scratch")
    listener = _Listener()
    listener.start()
    flood_marker = _marker()
    _student(root, "blank", {NB1: _notebook("exercises", NB1)})
    _student(root, "forger", {NB1: _notebook("exercises", NB1, append=(FORGE,))})
    _student(root, "default_arg", {NB1: _notebook("solutions", NB1, append=(DEFAULT_ARG,))})
    _student(root, "alias", {NB1: _notebook("solutions", NB1, append=(ALIAS,)), NB3: _nb(FUSED)})
    _student(root, "keep_alive", {NB1: _notebook("exercises", NB1, prepend=(KEEP_ALIVE,))})
    _student(root, "stderr_flood", {NB1: _notebook("solutions", NB1, prepend=(STDERR_FLOOD,))})
    _student(root, "fork_flood", {NB1: _notebook("solutions", NB1, append=(_fork_flood(flood_marker),))})
    _student(root, "network", {NB1: _notebook("solutions", NB1, append=(_connect(listener.port),))})
    _student(root, "memory", {NB1: _notebook("solutions", NB1, append=(MEMORY_HOG,))})
    _student(
        root,
        "state",
        {
            NB1: _notebook("solutions", NB1, append=(STATE_PATCH,)),
            NB2: _notebook("solutions", NB2, append=(STATE_CHECK,)),
        },
    )
    config = _config(
        timeout=4.0,
        notebook_budget=NOTEBOOK_BUDGET,
        student_budget=STUDENT_BUDGET,
        max_processes=MAX_PROCESSES,
        max_restarts=2,
        memory_mb=MEMORY_MB,
    )
    sampler = _Sampler([flood_marker], scratch_root)
    sampler.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tempfile, "tempdir", str(scratch_root))  # the grader's scratch folders go here
            students = grading.grade(
                root,
                tmp_path_factory.mktemp("out"),
                workers=2,
                config=config,
                exercises=EXERCISES,
                progress=False,
            )
    finally:
        sampler.done.set()
        sampler.join(5)
        listener.close()
    return {s.student: s for s in students}, sampler, listener, flood_marker, config


def _grade(attacked, student):
    return attacked[0][student]


def test_a_forging_student_scores_no_more_than_a_blank_one(attacked):
    forger, blank = _grade(attacked, "forger"), _grade(attacked, "blank")
    assert forger.total <= blank.total, {n: (g.status, g.score) for n, g in forger.exercises.items()}
    claimed = [n for n, g in forger.exercises.items() if g.status in ("out of memory", "timeout")]
    assert not claimed, claimed  # statuses come from what the grader saw, never from the child


def test_a_default_argument_does_not_reach_the_reference(attacked):
    g = _grade(attacked, "default_arg").exercises["clean_and_dedupe"]
    assert g.score == 0, (g.status, g.feedback)
    assert any("the package's reference" in line for line in g.feedback), g.feedback
    assert _grade(attacked, "default_arg").exercises["leak_free_split"].status == "passed"


def test_an_alias_or_another_module_does_not_reach_the_reference(attacked):
    student = _grade(attacked, "alias")
    for name in ("leak_free_split", "masked_nll_sum"):
        g = student.exercises[name]
        assert g.score == 0, (name, g.status, g.feedback)
        assert any("the package's reference" in line for line in g.feedback), (name, g.feedback)
    assert student.exercises["clean_and_dedupe"].status == "passed"  # the helpers the exercise allows work


def test_a_keep_alive_student_is_cut_at_the_budget(attacked):
    student = _grade(attacked, "keep_alive")
    assert student.seconds <= NOTEBOOK_BUDGET + 10, student.seconds
    assert {g.status for n, g in student.exercises.items() if g.notebook == NB1} == {"timeout"}


def test_a_stderr_flood_leaves_the_host_disk_untouched(attacked):
    sampler = attacked[1]
    assert sampler.disk_peak < 5 * 2**20, (
        f"{sampler.disk_peak / 2**20:.0f} MB written under the grader's scratch"
    )
    assert _grade(attacked, "stderr_flood").exercises["clean_and_dedupe"].status == "passed"


def test_a_fork_flood_is_capped(attacked):
    sampler, marker = attacked[1], attacked[3]
    assert 0 < sampler.peaks[marker] <= MAX_PROCESSES, sampler.peaks[marker]
    assert _count(marker) == 0  # none outlives the run
    assert _grade(attacked, "fork_flood").exercises["leak_free_split"].status == "passed"


@pytest.mark.skipif(not ISOLATED, reason="no namespaces on this machine: a network namespace cannot be made")
def test_a_listener_on_the_host_loopback_receives_nothing(attacked):
    listener = attacked[2]
    assert listener.received == []
    assert _grade(attacked, "network").exercises["clean_and_dedupe"].status == "passed"


@pytest.mark.skipif(
    not CGROUPS,
    reason="/sys/fs/cgroup is not writable here: no per-student cgroup (the fallback is tested below)",
)
def test_a_students_memory_is_capped_across_forks(attacked):
    g = _grade(attacked, "memory").exercises["leak_free_split"]
    assert g.status == "out of memory", (g.status, g.feedback)
    # seen by the grader (the cgroup's OOM kill), not claimed by a MemoryError in the child
    assert f"processes together used more than {MEMORY_MB} MB" in g.feedback[0], g.feedback
    assert _grade(attacked, "memory").exercises["clean_and_dedupe"].status == "passed"


def test_state_does_not_leak_between_a_students_notebooks(attacked):
    g = _grade(attacked, "state").exercises["encode_example"]
    assert g.status == "passed", (g.status, g.feedback)


# ---- the fallback limits, forced (no cgroup), tested on every machine --------------------------------


@pytest.fixture(scope="module")
def fallback(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback")
    marker = _marker()
    _student(root, "forks", {NB1: _notebook("solutions", NB1, append=(_fork_flood(marker),))})
    _student(root, "memory", {NB1: _notebook("solutions", NB1, append=(MEMORY_HOG,))})
    config = _config(
        timeout=4.0,
        notebook_budget=NOTEBOOK_BUDGET,
        student_budget=STUDENT_BUDGET,
        max_processes=MAX_PROCESSES,
        memory_mb=MEMORY_MB,
        cgroups=False,
    )
    sampler = _Sampler([marker], tmp_path_factory.mktemp("unused"))
    sampler.start()
    try:
        students = grading.grade(
            root,
            tmp_path_factory.mktemp("out"),
            workers=2,
            config=config,
            exercises=EXERCISES[:2],
            progress=False,
        )
    finally:
        sampler.done.set()
        sampler.join(5)
    return {s.student: s for s in students}, sampler.peaks[marker], config, marker


def test_fallback_memory_watch_stops_a_student_over_the_limit_across_forks(fallback):
    g = fallback[0]["memory"].exercises["leak_free_split"]
    assert g.status == "out of memory", (g.status, g.feedback)
    # seen by the grader (the sum over the student's processes), not claimed by a MemoryError in the child
    assert f"processes together used more than {MEMORY_MB} MB" in g.feedback[0], g.feedback


@pytest.mark.skipif(
    not (ISOLATED and sandbox.detect().kind == "nobody"),
    reason="RLIMIT_NPROC caps one student only under a user id of its own (needs root and namespaces)",
)
def test_fallback_process_limit_caps_a_fork_flood(fallback):
    students, peak, _, marker = fallback
    assert 0 < peak <= MAX_PROCESSES, peak
    assert _count(marker) == 0
    assert students["forks"].exercises["leak_free_split"].status == "passed"


# ---- stopping the grader ------------------------------------------------------------------------------


def _wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="") as fh:
            return list(csv.reader(fh))
    except OSError:
        return []


def test_sigterm_kills_every_student_deletes_scratch_and_writes_a_partial_gradebook(tmp_path):
    marker = _marker()
    hide = f"""
import os, signal, time
signal.signal(signal.SIGALRM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.execv("/bin/sleep", ["sleep", "{marker}"])
time.sleep(50)
"""
    root, out, tmp = tmp_path / "subs", tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    _student(root, "a_quick", {NB1: _notebook("solutions", NB1)})
    _student(root, "b_hiding", {NB1: _notebook("solutions", NB1, append=(hide,))})
    command = [sys.executable, "-m", "lumorik_sft.course.grading", str(root), "--out", str(out)]
    command += ["--workers", "1", "--timeout", "3", "--exercise", "clean_and_dedupe", "--no-progress"]
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _count(marker) > 0, 60)  # the second student is running, its child hidden
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert _wait_for(lambda: _count(marker) == 0, 5), "a student's process outlived the grader"
        assert [p.name for p in tmp.iterdir() if p.name.startswith("lumorik-grade-")] == []
        rows = _rows(out / "gradebook.csv")
        assert [r[0] for r in rows[1:]] == ["a_quick"], rows
        assert "b_hiding" in (out / supervisor.INCOMPLETE_FILE).read_text()
        assert proc.returncode == 128 + signal.SIGTERM, proc.stdout.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _marked(marker):  # left behind only by a grader that failed this test
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the protocol and the verdicts, without a sandbox -------------------------------------------------


def test_the_channel_accepts_exactly_one_answer_to_the_request_it_made():
    from lumorik_sft.course.grading.channel import End, Tail, receive

    def answer(*lines: bytes, deadline: float = 2.0):
        r, w = os.pipe()
        os.write(w, b"".join(lines))
        try:
            return receive(r, "result", "id1", time.monotonic() + deadline, Tail(None), lambda: None)
        finally:
            os.close(r)
            os.close(w)

    assert answer(b'{"event": "result", "id": "id1", "outputs": []}\n')["outputs"] == []
    for forged in (
        b'{"event": "result", "exercise": "clean_and_dedupe", "outputs": []}\n',  # no id
        b'{"event": "result", "id": "guess", "outputs": []}\n',  # another id
        b'{"event": "ready"}\n',  # a keep-alive
        b"not json\n",
        b'{"event": "result", "id": "id1", "outputs": []}\n{"event": "done"}\n',  # something after it
    ):
        with pytest.raises(End) as ended:
            answer(forged)
        assert ended.value.kind == "violation", forged
    start = time.monotonic()
    with pytest.raises(End) as ended:
        answer(b"", deadline=0.3)
    assert ended.value.kind == "deadline" and time.monotonic() - start < 2


def test_a_child_cannot_claim_a_status():
    from lumorik_sft.course import checks
    from lumorik_sft.course.grading.session import JobOutcome

    ex = checks.EXERCISES["clean_and_dedupe"]
    cases = ex.make_cases(1)
    expected = [ex.reference(c) for c in cases]
    for claim in ({"oom": True}, {"raised": "MemoryError", "message": ""}, {"timeout": True}):
        g = supervisor.ExerciseGrade(ex.name, ex.notebook, ex.points)
        outcome = JobOutcome(outputs=[claim] * len(cases), seconds=0.1)  # answered at once: no timeout seen
        supervisor._judge_exercise(g, ex, cases, expected, outcome, 4.0)
        assert g.status not in ("out of memory", "timeout") and g.score == 0, (claim, g.status)


def test_every_way_of_reaching_a_reference_is_caught_in_the_check_too():
    """The notebook's own check disables the references the same way (in place), so students learn early."""
    import functools

    from lumorik_sft import data
    from lumorik_sft.course import checks

    keep = "[{'prompt': r['prompt'], 'completion': r['completion']} for r in "
    sources = {
        "default argument": f"def f(records, _c=data.curate):\n    return {keep}_c(records).kept]",
        "closure": f"def make(c):\n    def f(records):\n        return {keep}c(records).kept]\n    return f\nf = make(data.curate)",
        "partial": f"_p = functools.partial(data.curate)\ndef f(records):\n    return {keep}_p(records).kept]",
        "package caller": (
            "def f(records):\n    import tempfile\n    d = tempfile.mkdtemp()\n"
            "    data.write_jsonl(d + '/in.jsonl', records)\n"
            "    data.run_curation(d + '/in.jsonl', d + '/out', val_fraction=0.0)\n"
            "    return data.read_jsonl(d + '/out/train.jsonl')"
        ),
    }
    for how, source in sources.items():
        ns = {"data": data, "functools": functools}
        exec(source, ns)
        got = checks.framework.run_case(
            checks.EXERCISES["clean_and_dedupe"],
            ns["f"],
            checks.EXERCISES["clean_and_dedupe"].make_cases(0)[0],
        )
        assert isinstance(got, dict) and "used_reference" in got, (how, got)
    assert data.curate([{"prompt": "a", "completion": "b"}]).kept  # restored after the check


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv (util-linux) on this machine")
def test_a_killed_grader_takes_its_sandboxes_along(tmp_path):
    marker = _marker()  # in the sandbox's command line only (the grader reads it from its environment)
    (tmp_path / "root").mkdir()
    grader = (
        "import os, subprocess, time\n"
        "from pathlib import Path\n"
        "from lumorik_sft.course import sandbox\n"
        "argv = sandbox.detect().command(['/bin/sleep', os.environ['MARKER']], Path(os.environ['ROOT']))\n"
        "subprocess.Popen(argv, start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "MARKER": marker, "ROOT": str(tmp_path / "root")}
    proc = subprocess.Popen([sys.executable, "-c", grader], env=env)
    try:
        assert _wait_for(lambda: _count(marker) > 0, 60), "the sandbox did not start"
        time.sleep(0.5)
        proc.kill()  # no handler runs: only the kernel can take the sandbox along
        proc.wait(10)
        assert _wait_for(lambda: _count(marker) == 0, 5), "the sandbox outlived the grader"
    finally:
        proc.kill()
        for pid in _marked(marker):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_cgroup_files_of_both_versions(tmp_path):
    """The per-student limits as the kernel's files say them (v2 cannot be made on every machine)."""
    from lumorik_sft.course.grading.limits import Cgroup, Limits

    v2 = Cgroup({"memory": tmp_path, "pids": tmp_path}, 2)
    v2._set_limits(Limits(memory_mb=100, max_processes=7))
    assert (tmp_path / "memory.max").read_text() == str(100 * 2**20)
    assert (tmp_path / "pids.max").read_text() == "7"
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    assert v2.oom_kills() == 2
    v1_memory, v1_pids = tmp_path / "memory", tmp_path / "pids"
    v1_memory.mkdir()
    v1_pids.mkdir()
    v1 = Cgroup({"memory": v1_memory, "pids": v1_pids}, 1)
    v1._set_limits(Limits(memory_mb=100, max_processes=7))
    assert (v1_memory / "memory.limit_in_bytes").read_text() == str(100 * 2**20)
    (v1_memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    assert v1.oom_kills() == 5
    prefix = v1.join_prefix()
    done = subprocess.run([*prefix, "/bin/true"], capture_output=True)  # joins both "groups", then runs
    assert done.returncode == 0 and (v1_memory / "cgroup.procs").read_text().strip().isdigit()
