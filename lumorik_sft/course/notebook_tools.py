"""Notebook upkeep: run the course notebooks in place and check that they are fit to commit.

The notebooks are committed *executed in full mode*, outputs included, so that they read well on
GitHub; CI then runs them again in fast mode under nbval. This module is the tooling for both::

    python -m lumorik_sft.course.notebook_tools --execute   # re-run every notebook, full mode, in place
    python -m lumorik_sft.course.notebook_tools --execute --fast notebooks/01_data_curation.ipynb
    python -m lumorik_sft.course.notebook_tools                      # only check the committed notebooks

(`lumorik-sft notebooks ...` is the same command.) A notebook is fit to commit when
`check_notebook` finds no problem: no error output, no unexecuted code cell, no more than 2 MB of
outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lumorik_sft.progress import progress_enabled

__all__ = [
    "MAX_OUTPUT_BYTES",
    "add_arguments",
    "check_notebook",
    "execute_all",
    "execute_notebook",
    "main",
    "notebook_paths",
    "output_bytes",
    "progress_enabled",
    "run_from_args",
]

MAX_OUTPUT_BYTES = 2 * 1024 * 1024  # a committed notebook's outputs must stay below this
KERNEL_NAME = "python3"  # jupyter_client runs a "python" kernelspec with sys.executable


def notebook_paths(root: str | os.PathLike = "notebooks") -> list[Path]:
    """The course notebooks under `root`, sorted by name (so 00_ runs before 01_).

    Checkpoint copies (``.ipynb_checkpoints``) are skipped.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"notebook folder {base} does not exist")
    return sorted(p for p in base.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _kernel_env(fast: bool, quiet_progress: bool) -> dict[str, str]:
    """The environment the kernel starts with: the mode is set explicitly, never inherited."""
    from lumorik_sft.defaults import FAST_ENV

    env = dict(os.environ)
    env[FAST_ENV] = "1" if fast else "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if quiet_progress:
        # tqdm.auto would otherwise commit ipywidgets progress bars into the outputs.
        env["TQDM_DISABLE"] = "1"
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # save_pretrained's shard bar, likewise
    # A committed notebook must read on GitHub, which cannot render live widgets: executed
    # notebooks take the widgets' plain-output fallback (lumorik_sft.course.widgets).
    env["LUMORIK_WIDGETS"] = "0"
    return env


def execute_notebook(
    path: str | os.PathLike,
    *,
    fast: bool = False,
    timeout: int = 900,
    quiet_progress: bool = True,
    kernel_name: str = KERNEL_NAME,
) -> float:
    """Execute the notebook at `path` top to bottom and write it back in place; returns seconds.

    The kernel is `kernel_name` from the current environment, started in the notebook's folder
    with ``LUMORIK_FAST=1`` when `fast` else ``LUMORIK_FAST=0`` (so a CI shell's setting cannot
    leak into a full-mode run). `timeout` bounds each cell. On a cell error the notebook is
    still written, with the traceback in that cell's output, and the error is re-raised (also on
    a cell timeout or a dead kernel), so a
    broken notebook is both visible and loud. Per-cell timing metadata is not recorded, so
    re-running an unchanged notebook changes only what its cells print.
    """
    import nbformat
    from nbclient import NotebookClient

    nb_path = Path(path)
    nb = nbformat.read(nb_path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        record_timing=False,
        resources={"metadata": {"path": str(nb_path.parent.resolve())}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env(fast, quiet_progress))
    except Exception:  # a cell error, a cell timeout, a dead kernel: keep what ran, then fail
        nbformat.write(coalesce_streams(nb), nb_path)
        raise
    seconds = time.perf_counter() - start
    nbformat.write(coalesce_streams(nb), nb_path)
    return seconds


def coalesce_streams(nb: Any) -> Any:
    """Merge each cell's consecutive stdout (or stderr) outputs into one, in place.

    How a kernel splits a cell's printing into stream messages depends on flush timing, so
    the same cell can be saved as one output or several; merged, a re-run changes only what
    the cell prints.
    """
    for cell in nb.get("cells", []):
        merged: list[Any] = []
        for out in cell.get("outputs", []):
            last = merged[-1] if merged else None
            if (
                out.get("output_type") == "stream"
                and last is not None
                and last.get("output_type") == "stream"
                and last.get("name") == out.get("name")
            ):
                last["text"] = "".join(last["text"]) + "".join(out["text"])
            else:
                merged.append(out)
        if "outputs" in cell:
            cell["outputs"] = merged
    return nb


def execute_all(
    paths: Iterable[str | os.PathLike] | None = None,
    *,
    root: str | os.PathLike = "notebooks",
    fast: bool = False,
    timeout: int = 900,
    quiet_progress: bool = True,
    echo: Any = print,
) -> dict[str, float]:
    """Execute the given notebooks (default: all of `root`) in place; returns path -> seconds.

    Stops at the first notebook that fails (its error is re-raised after it is written).
    """
    chosen = [Path(p) for p in paths] if paths else notebook_paths(root)
    if not chosen:
        raise FileNotFoundError(f"no notebooks to execute under {root}")
    times: dict[str, float] = {}
    for nb_path in chosen:
        mode = "fast" if fast else "full"
        echo(f"executing {nb_path} ({mode} mode) ...")
        times[str(nb_path)] = execute_notebook(
            nb_path, fast=fast, timeout=timeout, quiet_progress=quiet_progress
        )
        echo(f"  done in {times[str(nb_path)]:.1f} s")
    return times


def output_bytes(nb: Any) -> int:
    """Size of all cell outputs, as the JSON that nbformat writes (images included)."""
    return sum(
        len(json.dumps(cell.get("outputs", []), ensure_ascii=False).encode("utf-8")) for cell in nb.cells
    )


def check_notebook(path: str | os.PathLike, *, max_output_bytes: int = MAX_OUTPUT_BYTES) -> list[str]:
    """Problems that make a committed notebook unfit: an empty list means it is fine.

    - a code cell with an error output (a traceback was committed);
    - a code cell that wrote to stderr, or printed a traceback or a Python warning
      (``UserWarning: ...``): a student should never meet noise we shipped;
    - a code cell with source but no execution count (never run, or run out of order and
      cleared);
    - an output that prints a machine's absolute path (``/home/...``, ``/tmp/...``): students
      see paths relative to the course (`lumorik_sft.models.shown_path`);
    - more than `max_output_bytes` of outputs in total (2 MB by default).

    Each problem is one line naming the notebook and cell (0-based index), e.g.
    ``notebooks/01.ipynb: cell 7: error output: ValueError: ...``.
    """
    import nbformat

    nb_path = Path(path)
    try:
        nb = nbformat.read(nb_path, as_version=4)
    except Exception as exc:  # unreadable JSON is a problem to report, not a crash
        return [f"{nb_path}: cannot be read as a notebook: {exc}"]
    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.source.strip() and cell.get("execution_count") is None:
            problems.append(f"{nb_path}: cell {index}: code cell was not executed")
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                message = f"{out.get('ename', 'Error')}: {out.get('evalue', '')}".strip()
                problems.append(f"{nb_path}: cell {index}: error output: {message}")
            elif (noise := _noise(out)) is not None:
                problems.append(f"{nb_path}: cell {index}: {noise}")
    size = output_bytes(nb)
    if size > max_output_bytes:
        problems.append(
            f"{nb_path}: outputs take {size / 1e6:.2f} MB, more than the "
            f"{max_output_bytes / 1e6:.2f} MB allowed; shrink figures or printed tables"
        )
    return problems


_WARNING = re.compile(r"\b[A-Z]\w*Warning: |^Traceback \(most recent call last\)", re.MULTILINE)


def _noise(out: dict[str, Any]) -> str | None:
    """What is wrong with one output: stderr, or a traceback or warning printed to stdout."""
    text = out.get("text", "")
    text = "".join(text) if isinstance(text, list) else str(text)
    first = text.strip().splitlines()[0][:120] if text.strip() else ""
    if out.get("output_type") == "stream" and out.get("name") == "stderr":
        return f"stderr output: {first}"
    if match := _WARNING.search(text):
        return f"a warning or traceback in the output: {text[match.start() :].splitlines()[0][:120]}"
    data = out.get("data", {})
    plain = data.get("text/plain", "")
    text += "".join(plain) if isinstance(plain, list) else str(plain)
    if match := _MACHINE_PATH.search(text):
        return f"a machine's absolute path in the output: {match.group(0)[:120]}"
    return None


# The usual roots of users' and temporary folders on Linux and macOS (not /usr or /opt: those
# name the system's Python, which no course output prints either).
_MACHINE_PATH = re.compile(r"(?<![\w.~$/])/(?:home|Users|work|tmp|root|private|var/folders)/[^\s'\")]*")


# ------------------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lumorik-sft notebooks`: check, or with --execute re-run and then check."""
    parser.add_argument("paths", nargs="*", help="notebooks (default: every notebook in --root)")
    parser.add_argument("--root", default="notebooks", help="notebook folder (default: notebooks)")
    parser.add_argument(
        "--execute",
        action="store_true",
        help="re-execute the notebooks in place before checking them (full mode unless --fast)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="with --execute: run in fast mode (LUMORIK_FAST=1), as CI does"
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default: 900)")


def run_from_args(args: argparse.Namespace) -> int:
    """Execute (if asked) and check; exit status 1 when any notebook has a problem."""
    paths = [Path(p) for p in args.paths] or notebook_paths(args.root)
    if not paths:
        print(f"no notebooks found under {args.root}", file=sys.stderr)
        return 1
    failed = []
    if args.execute:
        for nb_path in paths:  # go on after a failure: the check below names the broken cell
            print(f"executing {nb_path} ({'fast' if args.fast else 'full'} mode) ...", flush=True)
            try:
                seconds = execute_notebook(nb_path, fast=args.fast, timeout=args.timeout)
            except Exception as exc:  # CellExecutionError, CellTimeoutError, DeadKernelError
                failed.append(nb_path)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(f"  FAILED: {type(exc).__name__} {first}", flush=True)
            else:
                print(f"  done in {seconds:.1f} s", flush=True)
    problems = [problem for p in paths for problem in check_notebook(p)]
    if failed and not problems:  # e.g. a timeout, which leaves no error output behind
        problems = [f"{p}: execution failed" for p in failed]
    for problem in problems:
        print(problem)
    print(
        f"checked {len(paths)} notebook(s): "
        f"{'no problems' if not problems else f'{len(problems)} problem(s)'}"
    )
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lumorik_sft.course.notebook_tools",
        description="Execute and check the course notebooks.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
