"""Fixtures for the browser tests: a JupyterLab on a copy of the course, and headless Chromium.

Skipped with the reason where Chromium is missing, except under ``CI=true``: there a missing
browser fails, so CI never passes without having run these tests.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jlab import CHROMIUM_ARGS, TIMES, LabServer, Notebook, chromium_path, need

from lumorik_sft.course import lab as course_lab

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("notebooks", "exercises", "solutions")


@pytest.fixture(scope="session")
def chromium() -> str:
    path = chromium_path()
    need(path is not None, "chromium is not installed (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        need(False, "playwright is not installed (pip install -e '.[dev]')")
    return path


@pytest.fixture(scope="session")
def lab(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """JupyterLab in a temporary copy of the course: autosave never touches committed files."""
    root = tmp_path_factory.mktemp("course")
    for name in COPIED:
        shutil.copytree(ROOT / name, root / name)
    server = LabServer(
        root=root,
        state=tmp_path_factory.mktemp("jupyter-state"),
        env={
            "LUMORIK_FAST": "1",
            "LUMORIK_WIDGETS": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        },
    )
    course_lab.install_settings()  # what `lumorik-sft lab` does: widget state saved in notebooks
    server.start()
    yield server
    server.shutdown_kernels()
    server.stop()


@pytest.fixture(scope="session")
def browser_app(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless system Chromium with a fresh profile (a persistent context owns the profile)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def shots(tmp_path: Path) -> Path:
    """Where this test's step screenshots go (pytest keeps the folder, also after a failure)."""
    path = tmp_path / "screenshots"
    path.mkdir()
    return path


@pytest.fixture()
def open_notebook(browser_app: Any, lab: LabServer, shots: Path) -> Iterator[Any]:
    """A function: open a notebook (path relative to the course copy) in a fresh browser tab."""
    contexts = []

    def _open(path: str, **kw: Any) -> Notebook:
        context = browser_app.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(30_000)
        contexts.append((context, path))
        return Notebook(context.new_page(), lab, path, shots).open(**kw)

    yield _open
    for context, path in contexts:
        context.close()
        lab.shutdown_kernels(path)


# --------------------------------------------------------------------------- notebooks run once


class RanNotebooks:
    """Notebooks opened and run through Run All Cells once per session, kept open for the widget tests."""

    def __init__(self, browser_app: Any, lab: LabServer, shots: Path) -> None:
        self.browser_app, self.lab, self.shots = browser_app, lab, shots
        self.open: dict[str, Notebook] = {}

    def __call__(self, path: str) -> Notebook:
        if path in self.open:
            return self.open[path]
        context = self.browser_app.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(30_000)
        nb = Notebook(context.new_page(), self.lab, path, self.shots).open()
        self.open[path] = nb
        TIMES[f"run all {path}"] = nb.run_all()
        return nb

    def release(self, path: str) -> None:
        """Close a notebook's tab and end its kernel (each kernel holds a torch process)."""
        nb = self.open.pop(path, None)
        if nb is not None:
            nb.page.context.close()
            self.lab.shutdown_kernels(path)

    def close(self) -> None:
        for path in list(self.open):
            self.release(path)


@pytest.fixture(scope="session")
def ran(browser_app: Any, lab: LabServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RanNotebooks]:
    """Run a notebook once (Run All Cells) and keep its tab; screenshots in a session folder."""
    notebooks = RanNotebooks(browser_app, lab, tmp_path_factory.mktemp("run-all-screenshots"))
    yield notebooks
    notebooks.close()


# --------------------------------------------------------------------------- one run per notebook

REPLACED: list[str] = []  # notebooks whose nbval items the browser's Run All replaces


def _browser_can_run() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return chromium_path() is not None


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run each course notebook once: where the browser runs it, drop nbval's run of it.

    The browser test checks what ``--nbval-lax`` does (no error, marked outputs equal the
    committed ones), so running both would only double CI's time. Where the browser cannot run
    (skipped here, failed under CI), nbval's items stay.
    """
    run_all = "test_notebook_runs_in_jupyterlab_without_errors"
    names = {
        item.callspec.params["name"]
        for item in items
        if getattr(item, "originalname", "") == run_all and hasattr(item, "callspec")
    }
    if not names or not _browser_can_run():
        return
    notebooks = ROOT / "notebooks"
    dropped = [
        i
        for i in items
        if type(i).__name__ == "IPyNbCell" and i.path.parent == notebooks and i.path.name in names
    ]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in set(dropped)]
        REPLACED.extend(sorted({i.path.name for i in dropped}))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Hand the browser steps' seconds (CI's time budget needs them) and the replaced nbval runs
    to tests/conftest.py's end-of-run summary, through the report: under xdist it is printed by
    the controller, which runs no test itself."""
    outcome = yield
    if call.when == "teardown" and (TIMES or REPLACED):
        summary = {
            "browser: run instead of nbval": {name: "" for name in REPLACED},
            "browser: seconds per step": {name: f"{s:7.1f} s" for name, s in TIMES.items()},
        }
        outcome.get_result().user_properties.append(("summary", summary))
        TIMES.clear()
        REPLACED.clear()
