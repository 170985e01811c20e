"""What the grader writes: feedback markdown, file names, ``gradebook.csv``, the skip report.

Everything here treats a student's text (the folder name, exception messages, anything the child
sent back) as data that must not act on whoever reads the output:

* control and format characters (ANSI escapes, carriage returns, bidi overrides, lone surrogates)
  are shown as escapes such as ``\\x1b`` (:func:`visible`), in every file and on the terminal;
* in markdown, a student's text is either inline with every character markdown could act on
  backslash-escaped (:func:`md_inline`) or inside a fenced code block whose fence is longer than
  any backtick run in it (:func:`md_block`), so it cannot forge a heading, a link, a table cell or
  the ``**Total**`` line;
* in ``gradebook.csv`` no cell starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return
  (OWASP's CSV-injection rule: such a cell gets a leading ``'``), :func:`csv_cell`;
* each student's feedback file name is unique in the class even on a case-insensitive disk: a plain
  lowercase-safe name is kept, any other gets a readable slug plus a hash of the exact folder name
  (:func:`feedback_files`);
* every entry of the submissions folder that was not graded is listed with its reason in
  ``skipped.txt`` (:func:`write_skipped`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lumorik_sft.course.grading.submissions import Skipped
    from lumorik_sft.course.grading.supervisor import StudentGrade

__all__ = [
    "SKIPPED_FILE",
    "csv_cell",
    "feedback_files",
    "feedback_markdown",
    "feedback_stem",
    "md_block",
    "md_inline",
    "skipped_text",
    "visible",
    "write_outputs",
    "write_skipped",
]

SKIPPED_FILE = "skipped.txt"
_HIDDEN = ("Cc", "Cf", "Cs", "Zl", "Zp")  # control, format (bidi, zero-width), surrogate, line separators
_MD_SPECIAL = set("\\`*[]<>&|~!#:@$")  # acts anywhere in a line (links, emphasis, HTML, autolinks, math)
_CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"{d}{i}" for d in ("com", "lpt") for i in range(10))}


def _escape(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str, keep: str = "") -> str:
    """`text` with control and format characters shown as escapes (``\\x1b``, ``\\u202e``).

    Why: a student's text reaches terminals, editors and spreadsheets; an escape code or a bidi
    override in it must be seen, not obeyed. Characters in `keep` (say newline, tab) stay.
    """
    out = []
    for ch in str(text):
        if ch in keep or unicodedata.category(ch) not in _HIDDEN:
            out.append(ch)
            continue
        out.append(_escape(ord(ch)))
    return "".join(out)


def md_inline(text: str) -> str:
    """A student's text inside a markdown line (a heading, a table cell): shown as typed, acting as nothing.

    Every character that acts inside a line is backslash-escaped (CommonMark allows it for any
    ASCII punctuation); ``_`` only where it could start emphasis, ``.`` after ``www`` so no autolink
    forms. Newlines are escapes (:func:`visible`), so the text cannot start a block of its own.
    """
    out = []
    text = visible(text)
    for i, ch in enumerate(text):
        if ch in _MD_SPECIAL or (ch == "." and text[max(0, i - 3) : i].lower() == "www"):
            out.append("\\" + ch)
        elif ch == "_":
            inner = 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
            out.append("_" if inner else "\\_")
        else:
            out.append(ch)
    return "".join(out)


def md_block(lines: Iterable[str]) -> str:
    """Lines of a student's text as one fenced code block that nothing inside can close."""
    body = "\n".join(visible(line, keep="\n\t") for line in lines)
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{body}\n{fence}"


def csv_cell(value: Any) -> str:
    """A spreadsheet cell that is never a formula (OWASP: a leading ``'`` before ``= + - @``, tab, CR)."""
    text = visible(str(value))
    if text.startswith(_CSV_FORMULA) or text.lstrip().startswith(_CSV_FORMULA):
        return "'" + text
    return text


def feedback_stem(name: str) -> str:
    """A file name (without ``.md``) for one student: the folder name when it is plain ASCII, else a
    readable slug plus a hash of the exact name, so "Zoë O'Brien" and "Zoë_O_Brien" differ."""
    if _PLAIN_NAME.fullmatch(name) and name.split(".")[0].lower() not in _WINDOWS_RESERVED:
        return name
    return _hashed_stem(name, 12)


def _hashed_stem(name: str, digits: int) -> str:
    slug = re.sub(r"[^\w.-]+", "_", name).lstrip(".-")[:60] or "student"
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:digits]
    return f"{slug}~{digest}"  # "~" never occurs in a plain name


def feedback_files(names: Sequence[str]) -> dict[str, str]:
    """Each student's feedback file name (``<stem>.md``), distinct even ignoring case.

    Plain names that differ only in case ("Alice", "alice") take the hashed form; a hash clash
    (a crafted folder name) gets a counter. No two students ever share a file.
    """
    stems = {n: feedback_stem(n) for n in names}
    by_key: dict[str, list[str]] = {}
    for name, stem in stems.items():
        by_key.setdefault(stem.casefold(), []).append(name)
    for group in by_key.values():
        if len(group) > 1:
            for name in group:
                stems[name] = _hashed_stem(name, 16)
    files, taken = {}, set()
    for name in names:
        stem, n = stems[name], 1
        while f"{stem}.md".casefold() in taken:
            n += 1
            stem = f"{stems[name]}~{n}"
        taken.add(f"{stem}.md".casefold())
        files[name] = f"{stem}.md"
    return files


def feedback_markdown(student: StudentGrade, max_total: float, reviews: Mapping[str, str]) -> str:
    """One student's feedback: grader text as markdown, the student's text escaped or fenced."""
    lines = [
        f"# Feedback for {md_inline(student.student)}",
        "",
        f"**Total: {student.total:g} / {max_total:g}**",
        "",
        "| exercise | notebook | status | score | cases passed |",
        "|---|---|---|---|---|",
    ]
    for g in student.exercises.values():
        lines.append(
            f"| {md_inline(g.name)} | {md_inline(g.notebook)} | {md_inline(g.status)} | "
            f"{g.score:g} / {g.points:g} | {g.passed_cases}/{g.n_cases} |"
        )
    details = [g for g in student.exercises.values() if g.status != "passed"]
    if details:
        lines += ["", "## What to fix"]
        for g in details:
            lines += ["", f"### {md_inline(g.name)} ({md_inline(g.status)})", ""]
            lines.append(md_block(g.feedback or ["(no details)"]))
    reviewed = [g for g in student.exercises.values() if reviews.get(g.name)]
    if reviewed:
        lines += ["", "## Read by hand", ""]
        lines += [f"- {g.name}: {reviews[g.name]}" for g in reviewed]  # the course's text, not a student's
    if student.notes:
        lines += ["", "## Notes", "", md_block(student.notes)]
    return "\n".join(lines) + "\n"


def _gradebook_rows(students: Sequence[StudentGrade], names: Sequence[str]) -> list[list[str]]:
    rows = [["student", *names, "total"]]
    for s in students:
        rows.append([s.student, *(f"{s.exercises[n].score:g}" for n in names), f"{s.total:g}"])
    return [[csv_cell(cell) for cell in row] for row in rows]


def _write_text(path: Path, text: str) -> None:
    """UTF-8, with anything unencodable (a lone surrogate from a child's JSON) as a visible escape."""
    path.write_bytes(text.encode("utf-8", "backslashreplace"))


def write_outputs(
    out: Path,
    students: Sequence[StudentGrade],
    points: Mapping[str, float],
    reviews: Mapping[str, str],
    seed_note: str,
    isolation: str,
) -> None:
    """``gradebook.csv``, ``feedback/<file>.md`` per student and ``results.json`` under `out`."""
    names = list(points)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feedback").mkdir(exist_ok=True)
    max_total = sum(points.values())
    with open(out / "gradebook.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(_gradebook_rows(students, names))
    files = feedback_files([s.student for s in students])
    for s in students:
        _write_text(out / "feedback" / files[s.student], feedback_markdown(s, max_total, reviews))
    summary = {
        "max_total": max_total,
        "seed": seed_note,
        "isolation": isolation,
        "points": dict(points),
        "review": {n: r for n, r in reviews.items() if r},
        "students": [
            {
                "student": s.student,
                "feedback": f"feedback/{files[s.student]}",
                "total": s.total,
                "seconds": s.seconds,
                "notes": s.notes,
                "exercises": {n: asdict(g) for n, g in s.exercises.items()},
            }
            for s in students
        ],
    }
    _write_text(out / "results.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")


def skipped_text(skipped: Sequence[Skipped], root: str | Path) -> str:
    """The skip report: one line per entry of the submissions folder that was not graded."""
    head = f"{len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} of {visible(str(root))} not graded"
    return "\n".join([head + (":" if skipped else ""), *(f"- {s.name!r}: {s.reason}" for s in skipped)])


def write_skipped(out: str | Path, skipped: Sequence[Skipped], root: str | Path) -> str:
    """Write ``skipped.txt`` under `out` (before grading starts, so an interrupted run has it too)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = skipped_text(skipped, root)
    _write_text(out / SKIPPED_FILE, text + "\n")
    return text
