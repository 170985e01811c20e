"""`lumorik-sft lab`: JupyterLab on the course, with the course's JupyterLab settings installed.

JupyterLab reads every ``{prefix}/share/jupyter/lab/settings/overrides.d/*.json`` as default
settings (jupyterlab_server's `_get_overrides`). Ours (`SETTINGS`) turns on "Save Jupyter widget
state in notebooks": without it a notebook saved while its widgets ran, then reopened without its
kernel (the next day), shows "Error displaying widget: model not found" where the controls were.
`install_settings` copies the file once into the environment, so a plain ``jupyter lab`` gets it
too; a student's own settings still win over these defaults.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

SETTINGS = Path(__file__).resolve().parent / "jupyter" / "overrides.d" / "lumorik-sft.json"
"""The course's JupyterLab defaults (widget state saved with the notebook)."""


def settings_dir(prefix: str | os.PathLike[str] = sys.prefix) -> Path:
    """Where JupyterLab looks for packages' default settings in the environment at ``prefix``."""
    return Path(prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.d"


def install_settings(prefix: str | os.PathLike[str] = sys.prefix) -> Path | None:
    """Copy `SETTINGS` into ``prefix``'s JupyterLab settings; None where that folder is read-only."""
    target = settings_dir(prefix) / SETTINGS.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_bytes() != SETTINGS.read_bytes():
            shutil.copyfile(SETTINGS, target)
    except OSError:
        return None
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``lumorik-sft lab [--root DIR] [JUPYTER LAB OPTIONS...]``."""
    parser.add_argument("--root", default=".", help="the course folder to serve (default: here)")
    parser.add_argument("jupyter_args", nargs=argparse.REMAINDER, help="passed on to `jupyter lab`")


def run_from_args(args: argparse.Namespace) -> int:
    installed = install_settings()
    if installed is None:
        print(
            "lumorik-sft lab: cannot write JupyterLab's settings in this environment; turn on "
            "Settings > Settings Editor > Jupyter Widgets > 'Save Jupyter widget state in notebooks'"
        )
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={Path(args.root).resolve()}"]
    return subprocess.call([*cmd, *args.jupyter_args])
