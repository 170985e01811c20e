"""Shared offline fixtures: a toy tokenizer trained in-process and tiny models of three architectures.

Also how the suite shares the cores: pytest-xdist runs one worker per core (``-n auto`` in
pyproject.toml), each worker's torch (and every process it starts: Jupyter kernels, graders,
CLI runs) gets its share of the threads, and the tests are sent to the workers in groups that
share their expensive fixtures (see ``xdist_group``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # two torch pools on two cores would spin against each other
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))

import pytest  # noqa: E402
import torch  # noqa: E402
from xdist_groups import xdist_group  # noqa: E402

from lumorik_sft.course.checks import TOY_TEXTS  # noqa: E402  (one toy corpus for tests and checks)
from lumorik_sft.models import build_model, train_bpe_tokenizer  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "2")))))


@pytest.fixture(autouse=True, scope="session")
def auto_precision_is_fp32():
    """precision='auto' resolves to fp32 in tests, on every CPU.

    'auto' means bf16 where the CPU has native bf16 (`defaults.resolve_precision`), so the same
    test would compare bf16 numbers on one machine and fp32 numbers on another. Tests of the bf16
    path ask for precision='bf16' explicitly, or patch this back.
    """
    from lumorik_sft import defaults

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(defaults, "_native_bf16", lambda device: False)
        yield


@pytest.fixture(scope="session")
def toy_tokenizer():
    """A byte-level BPE tokenizer with distinct EOS and pad tokens, trained in a second."""
    return train_bpe_tokenizer(TOY_TEXTS, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="session", params=["gpt2", "llama", "qwen2"])
def arch(request) -> str:
    return request.param


@pytest.fixture()
def tiny_model(toy_tokenizer):
    """A tiny seeded GPT-2 model sized to the toy tokenizer."""
    return build_model("gpt2", toy_tokenizer, n_layer=2, width=32, n_head=2, context=128, seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train several times faster on one thread than on two busy cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- xdist


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` (pyproject.toml) with our groups.

    xdist's own loadgroup reads ``xdist_group`` marks through ``item._nodeid``, which pytest 9.2
    no longer uses for ``item.nodeid``: its groups silently fall apart into single tests.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return GroupScheduling(config, log)


SUMMARY: dict[str, dict[str, str]] = {}  # section -> line -> value, from the reports' user_properties


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, value in report.user_properties:
        if key == "summary":
            for section, lines in value.items():
                SUMMARY.setdefault(section, {}).update(lines)


def pytest_terminal_summary(terminalreporter) -> None:
    """Sections that tests hand over in their reports (tests/browser/conftest.py: its step times)."""
    for section, lines in SUMMARY.items():
        if lines:
            terminalreporter.section(section)
            for name, value in sorted(lines.items()):
                terminalreporter.write_line(f"{value}  {name}" if value else name)
