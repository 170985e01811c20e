"""Generate the exercise notebooks from the solution notebooks, and check they are in sync.

``solutions/`` is the only source. In a solution's code cell, a region between a line
``# SOLUTION`` and a line ``# END SOLUTION`` (same indentation) is the part students write::

    def collate(features, pad_token_id):
        \"\"\"Right-pad ...\"\"\"                 <- kept
        # SOLUTION
        # HINT 1: every row must end up as long as the longest one    <- a nudge
        # HINT 2: width = max(len(f["input_ids"]) for f in features)  <- nearly the answer
        width = ...                          <- removed
        # END SOLUTION

becomes ``raise NotImplementedError("collate: ...")``. The hints leave the code: they become a
markdown cell right after it, one collapsed ``<details>`` block per hint, so a student opens
them one at a time, a nudge first and the near-solution last, instead of reading the answer in
the stub. Hints are numbered from 1 in each cell; lines with the same number make one hint. A
region with ``# STUB: ANSWER_Q1 = None`` lines (answers to questions) becomes those lines
instead. In markdown cells, text between ``<!-- SOLUTION -->`` and ``<!-- END SOLUTION -->`` is
removed. Outputs and execution counts are stripped; everything else is copied unchanged. Output
is deterministic (nbformat's stable JSON), so CI can compare::

    python -m lumorik_sft.course.exercises build            # write exercises/ from solutions/
    python -m lumorik_sft.course.exercises build --check    # exit 1 if exercises/ differ (CI)

(`lumorik-sft exercises build [--check]` is the same command.)
"""

from __future__ import annotations

import argparse
import ast
import copy
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_arguments",
    "build",
    "check",
    "generate_notebook",
    "hints_markdown",
    "main",
    "run_from_args",
    "split_hints",
    "stub_source",
]

_START = re.compile(r"^(?P<indent>[ \t]*)# SOLUTION[ \t]*$")
_END = re.compile(r"^[ \t]*# END SOLUTION[ \t]*$")
_HINT = re.compile(r"^[ \t]*# HINT(?:[ \t]+(?P<number>\d+))?[ \t]*:[ \t]?(?P<text>.*)$")
_STUB = re.compile(r"^[ \t]*# STUB:(?P<code>.*)$")
_DEF = re.compile(r"^(?P<indent>[ \t]*)(?:async[ \t]+)?def[ \t]+(?P<name>\w+)")
_MD_REGION = re.compile(r"<!--\s*SOLUTION\s*-->.*?<!--\s*END SOLUTION\s*-->\n?", re.DOTALL)


class ExerciseSourceError(ValueError):
    """A malformed solution region; the message names the notebook and cell."""


def _enclosing_function(lines: list[str], indent: str) -> str | None:
    for line in reversed(lines):
        m = _DEF.match(line)
        if m and len(m.group("indent")) < len(indent):
            return m.group("name")
    return None


def _collect_hints(region: list[str], hints: list[list[str]], where: str, first_line: int) -> None:
    """Add the region's ``# HINT n:`` lines to `hints` (one list of lines per hint), checking the numbers."""
    for offset, line in enumerate(region):
        m = _HINT.match(line)
        if not m:
            continue
        at = f"{where}: line {first_line + offset}"
        if m.group("number") is None:
            raise ExerciseSourceError(
                f"{at}: number the hint ('# HINT 1: ...'): hints are shown one at a time, a nudge first"
            )
        number = int(m.group("number"))
        if number == len(hints):  # the same number again: one more line of that hint
            hints[-1].append(m.group("text").strip())
        elif number == len(hints) + 1:
            hints.append([m.group("text").strip()])
        else:
            raise ExerciseSourceError(
                f"{at}: hint {number} follows hint {len(hints)}; number them 1, 2, 3, ..."
            )


def split_hints(source: str, where: str = "cell") -> tuple[str, list[str], str | None]:
    """A code cell's stub, its hints in order (hint 1 first) and the function they are for.

    Every ``# SOLUTION`` ... ``# END SOLUTION`` region becomes its stub; its ``# HINT n:`` lines
    leave the code (see `hints_markdown`).
    """
    lines = source.split("\n")
    out: list[str] = []
    hints: list[list[str]] = []
    hinted: str | None = None
    i = 0
    while i < len(lines):
        start = _START.match(lines[i])
        if not start:
            if _END.match(lines[i]):
                raise ExerciseSourceError(f"{where}: line {i + 1}: '# END SOLUTION' without '# SOLUTION'")
            if _HINT.match(lines[i]):
                raise ExerciseSourceError(f"{where}: line {i + 1}: a hint outside a '# SOLUTION' region")
            out.append(lines[i])
            i += 1
            continue
        indent = start.group("indent")
        j = i + 1
        while j < len(lines) and not _END.match(lines[j]):
            if _START.match(lines[j]):
                raise ExerciseSourceError(f"{where}: line {j + 1}: nested '# SOLUTION'")
            j += 1
        if j == len(lines):
            raise ExerciseSourceError(f"{where}: line {i + 1}: '# SOLUTION' without '# END SOLUTION'")
        region = lines[i + 1 : j]
        before = len(hints)
        _collect_hints(region, hints, where, i + 2)
        stubs = [indent + m.group("code").strip() for line in region if (m := _STUB.match(line))]
        name = _enclosing_function(out, indent)
        if len(hints) > before:
            hinted = hinted or name
        if stubs:
            out.extend(stubs)
        else:
            what = f"{name}: write the body" if name else "write this part"
            tail = " (hints below, one at a time)" if len(hints) > before else ""
            out.append(f'{indent}raise NotImplementedError("{what}{tail}")')
        i = j + 1
    result = "\n".join(out)
    try:
        ast.parse(result)
    except SyntaxError as err:
        raise ExerciseSourceError(f"{where}: the generated stub does not parse: {err}") from None
    return result, ["\n".join(h) for h in hints], hinted


def stub_source(source: str, where: str = "cell") -> str:
    """Replace every ``# SOLUTION`` ... ``# END SOLUTION`` region of a code cell by its stub."""
    return split_hints(source, where)[0]


def hints_markdown(hints: Sequence[str], name: str | None = None) -> str:
    """A markdown cell of collapsed hints: one ``<details>`` block each, opened one at a time.

    JupyterLab and VS Code render ``<details>`` collapsed; the blank lines around each hint's
    text let markdown (inline code) render inside it.
    """
    what = f" for `{name}`" if name else ""
    parts = [f"**Hints{what}.** Try without them first; open one at a time (the last is nearly the answer)."]
    for n, text in enumerate(hints, start=1):
        parts.append(f"<details><summary>Hint {n} of {len(hints)}</summary>\n\n{text}\n\n</details>")
    return "\n\n".join(parts)


def generate_notebook(nb: Any, name: str = "notebook") -> Any:
    """The exercise version of a solution notebook (a new nbformat object).

    A code cell with hints is followed by a new markdown cell holding them (`hints_markdown`).
    """
    import nbformat

    out = copy.deepcopy(nb)
    cells = []
    for index, cell in enumerate(out.cells):
        where = f"{name}: cell {index}"
        cells.append(cell)
        if cell.cell_type == "code":
            cell.source, hints, hinted = split_hints(cell.source, where)
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
            if hints:
                hint_cell = nbformat.v4.new_markdown_cell(hints_markdown(hints, hinted))
                if "id" in cell:  # deterministic, so `build --check` compares equal
                    hint_cell.id = f"{cell.id}-hints"[:64]
                else:
                    hint_cell.pop("id", None)
                cells.append(hint_cell)
        elif cell.cell_type == "markdown":
            cell.source = _MD_REGION.sub("", cell.source)
    out.cells = cells
    return out


def _render(nb: Any) -> str:
    import nbformat

    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def _expected(solutions: Path) -> dict[str, str]:
    import nbformat

    paths = sorted(p for p in solutions.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no solution notebooks in {solutions}")
    return {p.name: _render(generate_notebook(nbformat.read(p, as_version=4), p.name)) for p in paths}


def build(solutions: str | Path = "solutions", out: str | Path = "exercises") -> list[Path]:
    """Write the exercise notebooks; remove exercise notebooks with no solution. Returns written paths."""
    expected = _expected(Path(solutions))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.ipynb"):
        if stale.name not in expected:
            stale.unlink()
    written = []
    for name, text in expected.items():
        path = out_dir / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def check(solutions: str | Path = "solutions", out: str | Path = "exercises") -> list[str]:
    """Problems that make the committed exercises differ from what `build` would write (empty = in sync)."""
    expected = _expected(Path(solutions))
    out_dir = Path(out)
    problems = []
    for name, text in expected.items():
        path = out_dir / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path}: differs from what solutions/{name} generates")
    if out_dir.is_dir():
        problems += [
            f"{p}: has no solution notebook"
            for p in sorted(out_dir.glob("*.ipynb"))
            if p.name not in expected
        ]
    return problems


def reset(
    name: str, solutions: str | Path = "solutions", out: str | Path = "exercises"
) -> tuple[Path, Path | None]:
    """Restore one exercise notebook as it was generated; returns (notebook, backup or None).

    The student's edited copy is kept beside it as ``NAME.ipynb.bak`` (an earlier backup is
    replaced), so a reset never loses work; the ``.bak`` suffix keeps it out of `build`'s reach.
    """
    import nbformat

    file = Path(name).name if Path(name).suffix == ".ipynb" else Path(name).name + ".ipynb"
    source = Path(solutions) / file
    if not source.exists():
        known = ", ".join(sorted(p.name for p in Path(solutions).glob("*.ipynb"))) or "none"
        raise FileNotFoundError(f"no exercise named {name!r} (exercises: {known})")
    path = Path(out) / file
    backup = None
    if path.exists():
        backup = path.with_name(file + ".bak")
        backup.write_bytes(path.read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _render(generate_notebook(nbformat.read(source, as_version=4), file))
    path.write_text(text, encoding="utf-8", newline="\n")
    return path, backup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``lumorik-sft exercises build [--check]`` or ``reset NAME`` (with --solutions, --out)."""
    parser.add_argument(
        "action",
        choices=["build", "reset"],
        help="build: generate exercises/ from solutions/; reset NAME: restore one exercise notebook "
        "(your copy is kept as NAME.ipynb.bak)",
    )
    parser.add_argument("name", nargs="?", help="reset: the exercise notebook, e.g. 01_data_curation")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the committed exercises differ (for CI)",
    )
    parser.add_argument("--solutions", default="solutions", help="solution notebooks (default: solutions)")
    parser.add_argument("--out", default="exercises", help="exercise notebooks (default: exercises)")


def run_from_args(args: argparse.Namespace) -> int:
    if args.action == "reset":
        if not args.name:
            print("lumorik-sft exercises reset NAME: which notebook? e.g. 01_data_curation")
            return 2
        try:
            path, backup = reset(args.name, args.solutions, args.out)
        except FileNotFoundError as e:
            print(e)
            return 2
        kept = f"; your version is kept as {backup}" if backup else ""
        print(f"restored {path}{kept}. Reload it in JupyterLab (File > Reload Notebook from Disk).")
        return 0
    if args.check:
        problems = check(args.solutions, args.out)
        for p in problems:
            print(p)
        if problems:
            print(
                f"exercises are out of date: run `lumorik-sft exercises build` ({len(problems)} problem(s))"
            )
            return 1
        print(f"{args.out} is in sync with {args.solutions}")
        return 0
    written = build(args.solutions, args.out)
    print(f"wrote {len(written)} exercise notebook(s) to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lumorik_sft.course.exercises", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
