"""Drive JupyterLab 4 in headless Chromium: start a server, open notebooks, run cells, read the page.

The selectors are the ones verified in ../shared/browser-notes.md. Everything waits on what a
student would see (prompts, the execution indicator), never on fixed sleeps alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
P = ".jp-NotebookPanel:not(.lm-mod-hidden)"
ERROR_SELECTORS = (
    '[data-mime-type="application/vnd.jupyter.stderr"]',
    '[data-mime-type="application/vnd.jupyter.error"]',
)
WIDGET_ERROR = "Error displaying widget"
ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))  # the course notebooks
TIMES: dict[str, float] = {}  # seconds per step, printed at the end of the session


def free_port() -> int:
    """A localhost port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str | None:
    """The system Chromium (Debian's `chromium`); Playwright's own download fails offline."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def need(condition: bool, reason: str) -> None:
    """Skip where a browser test cannot run here, with the reason; fail instead under CI."""
    import pytest

    if condition:
        return
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"CI is set but the browser tests cannot run: {reason}")
    pytest.skip(reason)


# --------------------------------------------------------------------------- the server


@dataclass
class LabServer:
    """A token-free JupyterLab on a free port, serving ``root`` with throwaway settings."""

    root: Path
    state: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> LabServer:
        """Start the server and wait until its API answers."""
        self.port = self.port or free_port()
        settings = self.state / "settings"
        # No news toast and no update check: they would cover cells and try the network.
        notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notif.parent.mkdir(parents=True, exist_ok=True)
        notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        # Render every cell: JupyterLab 4 skips rendering cells out of view, whose text then
        # reads as empty to the tests.
        tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
        tracker.parent.mkdir(parents=True, exist_ok=True)
        tracker.write_text(json.dumps({"windowingMode": "none"}))
        env = {
            **os.environ,
            "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(self.state / "workspaces"),
            "JUPYTER_RUNTIME_DIR": str(self.state / "runtime"),
            **self.env,
        }
        cmd = [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            f"--port={self.port}",
            "--port-retries=0",
            "--ip=127.0.0.1",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            "--ServerApp.disable_check_xsrf=True",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.expose_app_in_browser=True",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # CI containers run as root
        log = (self.state / "server.log").open("w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {(self.state / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer on {self.url} within {timeout} s")

    def api(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(f"{self.url}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self, path: str | None = None) -> None:
        """End the sessions (and kernels) of one notebook, or all: each holds a torch process."""
        for s in self.api("/api/sessions"):
            if path is None or s["path"] == path:
                self.api(f"/api/sessions/{s['id']}", method="DELETE")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- one notebook in a page


class Notebook:
    """One open notebook in a Playwright page, with the steps a student takes."""

    def __init__(self, page: Any, server: LabServer, path: str, shots: Path) -> None:
        self.page, self.server, self.path, self.shots = page, server, path, shots
        self.step = 0

    # ----- opening, running, saving

    def open(self, timeout: float = 60) -> Notebook:
        # ?reset: a fresh workspace, or the page would also reopen (and start kernels for)
        # every notebook opened before in this server's workspace.
        self.page.goto(f"{self.server.url}/lab/tree/{self.path}?reset")
        self.page.wait_for_selector(f"{P} .jp-Cell", timeout=timeout * 1000)
        self.wait_idle(timeout, hold=1.0)  # the kernel has started
        self.shot("opened")
        return self

    def menu(self, top: str, item: str) -> None:
        """Click a main-menu entry by its text (works without window.jupyterapp)."""
        self.page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).first.click()

    def run_all(self, timeout: float = 600) -> float:
        """Run All Cells from the menu and wait until the kernel is idle; the seconds it took."""
        start = time.monotonic()
        for _ in range(3):  # on a loaded machine a click can land before the menu responds
            before = self.prompts()
            self.menu("Run", "Run All Cells")
            # Run All queues every cell ([*]) at once. The kernel's status alone is no proof: it
            # can read busy for a moment (a kernel_info or comm message) while the click was lost.
            if self.wait_prompts_change(before, 15):
                break
        else:
            self.shot("run-all-ignored")
            raise AssertionError(f"{self.path}: Run All Cells started nothing, three times")
        self.wait_idle(timeout, hold=1.5)
        seconds = time.monotonic() - start
        self.shot("ran-all")
        return seconds

    def prompts(self) -> list[str]:
        return self.page.locator(f"{P} .jp-InputArea-prompt").all_inner_texts()

    def wait_prompts_change(self, before: list[str], timeout: float) -> bool:
        """Whether a cell is queued ([*]) or a prompt changes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.prompts()
            if now != before or any("*" in p for p in now):
                return True
            self.page.wait_for_timeout(100)
        return False

    def busy(self) -> bool:
        status = self.page.locator(f"{P} .jp-Notebook-ExecutionIndicator").first.get_attribute("data-status")
        prompts = self.page.locator(f"{P} .jp-InputArea-prompt").all_inner_texts()
        return status not in ("idle", None) or any("*" in p for p in prompts)

    def wait_idle(self, timeout: float = 600, hold: float = 2.0) -> None:
        """Wait until the kernel is idle and no cell is queued, held for ``hold`` seconds."""
        deadline = time.monotonic() + timeout
        quiet_since = None
        while time.monotonic() < deadline:
            if self.busy():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= hold:
                return
            self.page.wait_for_timeout(250)
        self.shot("timeout")
        raise TimeoutError(f"{self.path}: still running after {timeout} s")

    def save(self, timeout: float = 30) -> Path:
        """Save with Control+S as a student would; the saved file, once written."""
        file = self.server.root / self.path
        before = file.stat().st_mtime_ns
        self.page.locator(f"{P} .jp-Notebook").first.click(position={"x": 5, "y": 5})
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("Control+s")
        deadline = time.monotonic() + timeout
        while file.stat().st_mtime_ns == before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path}: not saved within {timeout} s")
            self.page.wait_for_timeout(200)
        self.shot("saved")
        return file

    def close(self) -> None:
        """Close the notebook's tab (the kernel keeps running, as when a student closes it)."""
        self.menu("File", "Close Tab")
        dialog = self.page.locator(".jp-Dialog")
        if dialog.count():
            dialog.locator("button", has_text=re.compile("Discard|Close|Don't Save")).first.click()
        self.page.wait_for_timeout(500)

    # ----- cells

    def cell(self, text: str) -> Any:
        """The code cell whose text contains ``text``."""
        loc = self.page.locator(f"{P} .jp-CodeCell", has_text=text)
        if loc.count() != 1:
            raise AssertionError(f"{self.path}: {loc.count()} code cells contain {text!r}, expected 1")
        return loc.first

    def set_source(self, cell: Any, src: str) -> None:
        cell.locator(".cm-content").click()
        self.page.keyboard.press("Control+a")
        self.page.keyboard.press("Delete")
        self.page.keyboard.insert_text(src)
        self.page.keyboard.press("Escape")

    def run_cell(self, cell: Any, timeout: float = 120) -> None:
        cell.locator(".jp-InputPrompt").first.click()
        self.page.keyboard.press("Control+Enter")
        self.page.wait_for_timeout(500)
        self.wait_idle(timeout, hold=1.0)

    def output_text(self, cell: Any) -> str:
        return cell.locator(".jp-OutputArea").first.inner_text()

    # ----- errors and screenshots

    def errors(self) -> list[str]:
        """Error outputs and broken widgets on the page, as texts (empty when all is well)."""
        found = []
        for sel in ERROR_SELECTORS:
            found += self.page.locator(f"{P} {sel}").all_inner_texts()
        found += self.page.locator(f"{P} .jp-OutputArea-output", has_text=WIDGET_ERROR).all_inner_texts()
        return found

    def assert_no_errors(self) -> None:
        errors = self.errors()
        if errors:
            self.shot("errors")
            shown = "\n---\n".join(e[-1500:] for e in errors)
            raise AssertionError(f"{self.path}: {len(errors)} error output(s) on the page:\n{shown}")

    def shot(self, name: str, target: Any = None, path: Path | None = None) -> Path:
        """A numbered screenshot of the page (or of one element) under the test's folder."""
        self.step += 1
        stem = Path(self.path).stem
        path = path or self.shots / f"{stem}-{self.step:02d}-{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if target is None:
            self.page.screenshot(path=str(path))
        else:
            target.screenshot(path=str(path))
        return path


# --------------------------------------------------------------------------- widgets


class Widget:
    """The controls of one `interactive_or_static` cell, and the latest result under them."""

    def __init__(self, nb: Notebook, cell: Any) -> None:
        self.nb, self.cell = nb, cell

    def slider_right(self, index: int, steps: int) -> str:
        """Press ArrowRight ``steps`` times on a slider's handle; its readout after."""
        slider = self.cell.locator(".widget-slider").nth(index)
        handle = slider.locator(".noUi-handle")
        handle.focus()
        for _ in range(steps):
            handle.press("ArrowRight")
        return slider.locator(".widget-readout").inner_text()

    def select(self, index: int, value: str) -> None:
        self.cell.locator(".widget-dropdown select").nth(index).select_option(value)

    def fill(self, index: int, value: str) -> None:
        self.cell.locator(".widget-textarea textarea").nth(index).fill(value)

    def status(self) -> str:
        """The line under the controls: "running…", "done (run N)" or "failed: …"."""
        return self.cell.locator(
            ".widget-html", has_text=re.compile("running|done|failed")
        ).first.inner_text()

    def run(self, timeout: float = 300, expect_busy: bool = False) -> str:
        """Press Run and wait for the next "done"/"failed" status; the latest result after.

        With ``expect_busy`` (a slow callback), also check that the widget said "running…"
        and disabled its button while the callback ran.
        """
        before = self.status()
        button = self.cell.locator("button.jupyter-button", has_text="Run")
        button.click()
        if expect_busy:
            self.cell.get_by_text("running…").wait_for(timeout=10_000)
            self.nb.shot("running", target=self.cell)
            assert button.is_disabled(), "the Run button stays clickable while the callback runs"
        deadline = time.monotonic() + timeout
        while (now := self.status()) == before or "running" in now:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.nb.path}: the widget still says {now!r} after {timeout} s")
            self.nb.page.wait_for_timeout(250)
        self.nb.page.wait_for_timeout(500)
        self.nb.shot("clicked", target=self.cell)
        return self.latest()

    def latest(self) -> str:
        """The plain output holding the latest result (below the controls)."""
        return self.cell.locator(".jp-OutputArea-output", has_text="latest result").last.inner_text()

    def expect(self, *texts: str) -> str:
        """The latest result, which must show each of ``texts`` (what the package computes)."""
        latest = self.latest()
        missing = [t for t in texts if t not in latest]
        if missing:
            self.nb.shot("widget-wrong", target=self.cell)
            raise AssertionError(f"{self.nb.path}: the widget shows\n{latest[-1500:]}\nwithout {missing}")
        return latest

    def assert_ok(self) -> None:
        """The widget shows no error: no traceback in its error area, no 'failed' status."""
        failed = self.cell.locator(".widget-html", has_text="failed")
        errors = self.cell.locator(".widget-output").all_inner_texts()
        if failed.count() or any(e.strip() for e in errors):
            self.nb.shot("widget-error", target=self.cell)
            raise AssertionError(f"{self.nb.path}: the widget failed:\n{''.join(errors)[-1500:]}")
