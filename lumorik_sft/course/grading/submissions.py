"""Finding a class's submissions and reading them without trusting them (the grader's side only).

A submission is data a student controls, on the instructor's disk, read by a grader that may run
as root; archives unpacked from a course platform keep their symbolic links. So this module:

* grades only real folders directly under SUBMISSIONS; every other entry (a link, a file, an
  archive, a hidden ``.folder``, the run's own output folder) is listed with the reason it was not
  graded (:func:`find_students`), never dropped without a word;
* opens every path relative to the student's folder, one component at a time, with ``O_NOFOLLOW``:
  a symbolic link (the folder or a notebook) is refused with the status ``symlink``; a file with
  other hard links, a FIFO or a device is refused too. So nothing outside the student's folder is
  ever read, whatever the folder holds;
* describes a problem in the grader's words only: a parse error says where (line, column), never
  what the file holds;
* drops the outputs while it parses (:data:`MAX_FILE_BYTES` bounds the file, outputs included) and
  applies the code limit (:data:`MAX_CODE_BYTES`) to the code cells' sources, so a correct notebook
  with large outputs is graded;
* turns each code cell into the Python Jupyter would run (:func:`cell_code`): ``%%time`` and
  ``%%capture`` cells run their body; another cell magic becomes a cell that raises an error naming
  it, which the student's feedback reports; line magics and ``!`` commands are skipped.

It imports the standard library only, so reading a class loads neither nbformat nor torch.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_CODE_BYTES",
    "MAX_FILE_BYTES",
    "Problem",
    "Skipped",
    "cell_code",
    "find_students",
    "parse_notebook",
    "read_notebooks",
]

MAX_FILE_BYTES = 256 * 1024 * 1024  # one notebook file, outputs included (read into the grader's memory)
MAX_CODE_BYTES = 20 * 1024 * 1024  # one notebook's code cells, what the child receives
CELL_MAGICS_RUN = ("time", "capture")  # cell magics whose body runs in the notebook's namespace
LINE_MAGICS_RUN = ("time",)  # `%time STATEMENT` runs STATEMENT
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class Skipped:
    """An entry of the submissions folder that is not graded, and why (for the skip report)."""

    name: str
    reason: str


@dataclass(frozen=True)
class Problem:
    """Why a notebook was not read: a status for its exercises and a line for the feedback."""

    status: str  # "missing", "symlink" or "error"
    message: str  # in the grader's words: never a byte of the file


def _is_output_folder(path: Path, output: Path | None) -> bool:
    return output is not None and path.resolve() == output


def _skip_reason(entry: os.DirEntry, output: Path | None) -> str | None:
    """None for a student's folder; otherwise why the entry is not graded. Never follows a link."""
    if entry.is_symlink():
        return "a symbolic link: links are never followed (a student's work must be a real folder)"
    if entry.is_dir(follow_symlinks=False):
        if entry.name.startswith("."):
            return "a hidden folder (its name starts with '.'): rename it if it holds a student's work"
        if _is_output_folder(Path(entry.path), output):
            return "the output folder of this grading run"
        return None
    if entry.is_file(follow_symlinks=False):
        if entry.name.lower().endswith(ARCHIVES):
            return "an archive: archives are not unpacked; extract it into a folder named after the student"
        return "a file, not a folder: each student's notebooks go in a folder of their own"
    return "not a folder (a FIFO, socket or device)"


def find_students(root: str | Path, output: str | Path | None = None) -> tuple[list[Path], list[Skipped]]:
    """The student folders under `root` (sorted by name), and every other entry with its reason.

    `output` is the run's output folder: when it lies inside `root` it is skipped, not graded.
    """
    root = Path(root)
    out = Path(output).resolve() if output is not None else None
    students, skipped = [], []
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            reason = _skip_reason(entry, out)
            if reason is None:
                students.append(root / entry.name)
            else:
                skipped.append(Skipped(entry.name, reason))
    return students, skipped


# ---- opening without following links --------------------------------------------------------------


def _errno(err: OSError) -> str:
    return errno.errorcode.get(err.errno or 0, "?")


def _kind(name: str, dir_fd: int) -> str:
    """What `name` is in `dir_fd`, from lstat (which reads no content and follows no link)."""
    try:
        mode = os.lstat(name, dir_fd=dir_fd).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unknown"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "folder" if stat.S_ISDIR(mode) else "other"


def _open_folder(folder: Path) -> int | Problem:
    """A descriptor of the student's folder, opened without following a link at its last component.

    Its parent (the class folder the instructor named) is opened as given.
    """
    if folder.name in ("", ".", ".."):
        return Problem("error", "the student folder has no name of its own")
    try:
        parent = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        return Problem("error", f"the class folder could not be opened ({_errno(err)})")
    try:
        return os.open(folder.name, _DIR_FLAGS, dir_fd=parent)
    except OSError as err:
        kind = _kind(folder.name, parent)
        if kind == "symlink":
            return Problem("symlink", "the student folder is a symlink, which the grader never follows")
        if kind == "missing":
            return Problem("missing", "the student folder does not exist")
        return Problem("error", f"the student folder could not be opened ({_errno(err)})")
    finally:
        os.close(parent)


def _read_capped(fd: int, cap: int) -> bytes | None:
    """The whole file, or None when it is larger than `cap` bytes (it is never read further)."""
    chunks, size = [], 0
    while True:
        chunk = os.read(fd, min(1 << 20, cap + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return None


def _read_file(folder_fd: int, name: str) -> bytes | Problem:
    """The bytes of the regular file `name` in the folder, never through a link (symbolic or hard)."""
    if not name or "/" in name or name in (".", ".."):
        return Problem("error", f"{name!r} is not a file name")
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=folder_fd)
    except OSError as err:
        kind = _kind(name, folder_fd)
        if kind == "symlink":
            return Problem(
                "symlink", f"{name} is a symlink, which the grader never follows: submit the notebook itself"
            )
        if kind == "missing":
            return Problem("missing", f"{name} is missing from the submission")
        why = "it is a folder" if kind == "folder" else _errno(err)
        return Problem("error", f"could not read the notebook: {name} could not be opened ({why})")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Problem("error", f"could not read the notebook: {name} is not a regular file")
        if info.st_nlink > 1:
            return Problem(
                "error",
                f"could not read the notebook: {name} has {info.st_nlink} hard links, and the grader "
                "reads only files that belong to one submission: submit a copy, not a link",
            )
        data = _read_capped(fd, MAX_FILE_BYTES)
    except OSError as err:
        return Problem("error", f"could not read the notebook: {name} ({_errno(err)})")
    finally:
        os.close(fd)
    if data is None:
        mb = MAX_FILE_BYTES >> 20
        return Problem(
            "error", f"could not read the notebook: {name} is over {mb} MB with its outputs; clear them"
        )
    return data


# ---- parsing: code cells only, in the grader's words ----------------------------------------------


def _cells_without_outputs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a cell keeps its type and source only, so outputs are freed as they are parsed."""
    obj = dict(pairs)
    if "cell_type" in obj:
        return {k: obj[k] for k in ("cell_type", "source") if k in obj}
    return obj


def _source(cell: dict[str, Any]) -> str | None:
    source = cell.get("source", "")
    if isinstance(source, list) and all(isinstance(s, str) for s in source):
        return "".join(source)
    return source if isinstance(source, str) else None


def parse_notebook(data: bytes, name: str) -> list[str] | Problem:
    """The code cells' sources of a notebook file's bytes (format 4); never echoes the file."""
    bad = f"could not read the notebook: {name}"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return Problem("error", f"{bad} is not UTF-8 text (byte {err.start})")
    try:
        nb = json.loads(text, object_pairs_hook=_cells_without_outputs)
    except json.JSONDecodeError as err:
        return Problem("error", f"{bad} is not valid JSON (line {err.lineno}, column {err.colno})")
    except (ValueError, RecursionError):  # a number too long, nesting too deep
        return Problem("error", f"{bad} is not valid notebook JSON")
    version = nb.get("nbformat") if isinstance(nb, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        return Problem("error", f"{bad} is not a Jupyter notebook (no format number)")
    if version != 4:
        return Problem("error", f"{bad} is in notebook format {version}; save it from a current Jupyter (4)")
    cells = nb.get("cells")
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        return Problem("error", f"{bad} is not a Jupyter notebook (no list of cells)")
    sources: list[str] = []
    size = 0
    for index, cell in enumerate(cells):
        if cell.get("cell_type") != "code":
            continue
        source = _source(cell)
        if source is None:
            return Problem("error", f"{bad}: cell {index} has no text as its source")
        size += len(source.encode("utf-8", "surrogatepass"))
        if size > MAX_CODE_BYTES:
            return Problem("error", f"{bad}: its code cells hold more than {MAX_CODE_BYTES >> 20} MB of code")
        sources.append(source)
    return sources


def read_notebooks(
    folder: str | Path, names: Sequence[str]
) -> tuple[dict[str, list[str]], dict[str, Problem]]:
    """Each notebook's code cells as Python (:func:`cell_code`), and a :class:`Problem` for each other one."""
    folder_fd = _open_folder(Path(folder))
    if isinstance(folder_fd, Problem):
        return {}, {name: folder_fd for name in names}
    cells: dict[str, list[str]] = {}
    problems: dict[str, Problem] = {}
    try:
        for name in names:
            data = _read_file(folder_fd, name)
            sources = parse_notebook(data, name) if isinstance(data, bytes) else data
            if isinstance(sources, Problem):
                problems[name] = sources
            else:
                cells[name] = [cell_code(s) for s in sources]
    finally:
        os.close(folder_fd)
    return cells, problems


# ---- magics --------------------------------------------------------------------------------------


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def _magic_name(line: str) -> str:
    """The name after ``%`` or ``%%`` in a stripped line (word characters only, so safe to show)."""
    match = re.match(r"%%?(\w{1,40})", line)
    return match.group(1) if match else "?"


def _unsupported(name: str) -> str:
    message = f"%%{name} is not run by the grader, so this cell was skipped (only %%time and %%capture run)"
    return f"raise type('UnsupportedCellMagic', (Exception,), {{}})({message!r})"


def _line_magics(source: str) -> str:
    """Line magics and ``!`` commands become ``pass`` (``%time STATEMENT`` runs STATEMENT)."""
    if _parses(source):
        return source  # plain Python: a `%` or `!` at a line start is inside a string or an expression
    lines = []
    for line in source.split("\n"):
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if stripped.startswith("%") and not stripped.startswith("%%"):
            name = _magic_name(stripped)
            statement = stripped[1 + len(name) :].strip()
            run = name in LINE_MAGICS_RUN and statement
            lines.append(indent + (statement if run else "pass"))
        elif stripped.startswith(("!", "%%")):
            lines.append(indent + "pass")
        else:
            lines.append(line)
    return "\n".join(lines)


def cell_code(source: str) -> str:
    """The Python a code cell stands for, as the grader runs it.

    Cell magics in :data:`CELL_MAGICS_RUN` (possibly stacked) run their body; any other cell magic
    becomes a ``raise`` naming it, so the feedback says why the cell's names are not defined. The
    magic's line becomes a blank line, so line numbers in errors match the notebook.
    """
    if _parses(source):
        return source
    lines = source.split("\n")
    while True:
        first = next((i for i, line in enumerate(lines) if line.strip()), None)
        if first is None or not lines[first].lstrip().startswith("%%"):
            break
        name = _magic_name(lines[first].lstrip())
        if name not in CELL_MAGICS_RUN:
            return _unsupported(name)
        lines[first] = ""
    return _line_magics("\n".join(lines))
