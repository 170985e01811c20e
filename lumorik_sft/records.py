"""Reading prompt/completion pairs and chats from JSONL and CSV files, and naming every bad row.

Raw files are messy: byte-order marks, CRLF line endings, invalid UTF-8, broken JSON, a CSV quote
never closed, a chat whose turns do not alternate. `read_records` returns every good row, a pair as
``{"prompt", "completion", "line"}`` or a whole chat as ``{"messages": [...], "line"}`` (``messages``
records, or Alpaca and ShareGPT ones converted by `lumorik_sft.conversations`), and either stops at
the first bad one with a :class:`DataError` whose message is ``path:line: problem`` (field and turn
named where they are at fault), or, with ``skip_invalid``, lists it in ``.rejects`` with a reason
code and goes on, so that ``n_read == len(records) + len(rejects)``.

`lumorik_sft.data` cleans, de-duplicates, filters and splits what this module reads.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lumorik_sft.conversations import (
    INPUT_FORMATS,
    alpaca_to_messages,
    detect_format,
    messages_to_prompt_completion,
    sharegpt_to_messages,
    validate_messages,
)

__all__ = [
    "DataError",
    "ReadResult",
    "messages_to_prompt_completion",
    "read_prompts",
    "read_records",
]
JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson", ".json")
CSV_SUFFIXES = (".csv",)
_BOM = b"\xef\xbb\xbf"
# What JSON and CSV treat as blank; str.strip() would also eat U+001C-U+001F and U+3000.
_JSON_SPACE = " \t\r\n"


class DataError(ValueError):
    """A malformed input: the message is one line, ``path:line: problem``, so editors can jump to it."""

    def __init__(self, path: str, line: int | None, reason: str, code: str = "malformed") -> None:
        self.path, self.line, self.reason, self.code = path, line, reason, code
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


class _RowError(Exception):
    """Internal: one bad line/row; becomes a DataError or a reject depending on skip_invalid."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class ReadResult:
    """What :func:`read_records` found: good records, rejected rows, and how many data rows it read."""

    source: str
    records: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    n_read: int = 0
    format: str | None = None  # "pairs", "messages", "alpaca" or "sharegpt"; None: no record recognised


# ----------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class _Fields:
    """The field names a file's records use (pairs and the ``messages`` chat format)."""

    prompt: str = "prompt"
    completion: str | None = "completion"  # None: prompts only (`read_prompts`)
    messages: str = "messages"


def _pair_record(obj: Any, fields: _Fields) -> dict[str, Any]:
    """``{"prompt", "completion"}`` (only ``{"prompt"}`` when there is no completion field)."""
    names = {"prompt": fields.prompt, "completion": fields.completion}
    names = {key: name for key, name in names.items() if name is not None}
    return _check_unicode({key: _string_field(obj, name) for key, name in names.items()}, names)


# What a chat's turns are counted in, for the reason of a bad one ("messages" names its own field).
_CHAT_FIELDS = {"alpaca": "", "sharegpt": "field 'conversations': "}


def _convert(obj: dict[str, Any], input_format: str, fields: _Fields) -> list[dict[str, str]]:
    """The row's chat, by its format's converter; the ValueError names the field and the turn."""
    if input_format == "alpaca":
        return alpaca_to_messages(obj)
    if input_format == "sharegpt":
        return sharegpt_to_messages(obj)
    try:
        return validate_messages(obj[fields.messages])
    except ValueError as err:
        raise ValueError(f"field '{fields.messages}': {err}") from None


def _chat_record(obj: dict[str, Any], input_format: str, fields: _Fields) -> dict[str, Any]:
    """``{"messages": [...]}``, validated; a bad chat is a reject with the turn and the problem."""
    if input_format == "messages" and fields.messages not in obj:
        raise _RowError("missing_field", f"missing field '{fields.messages}'")
    try:
        messages = _convert(obj, input_format, fields)
    except ValueError as err:
        raise _RowError(f"malformed_{input_format}", str(err)) from None
    where = _CHAT_FIELDS.get(input_format, f"field '{fields.messages}': ")
    for turn, message in enumerate(messages, start=1):
        problem = _lone_surrogate(message["content"])
        if problem:
            raise _RowError(
                "invalid_unicode", f"{where}turn {turn} ({message['role']}) content holds {problem}"
            )
    return {"messages": messages}


class _RowFormat:
    """The format of each row of one file: the one asked for, or under ``auto`` the first record's.

    One file holds one format: under ``auto`` a row whose fields say another format than the first
    recognised record's is rejected (``mixed_formats``), naming that first record's line, so a chat
    file never silently turns some of its rows into pairs or the reverse.
    """

    def __init__(self, input_format: str, fields: _Fields) -> None:
        self.fields, self.requested = fields, input_format
        self.format = None if input_format == "auto" else input_format
        self.first_line: int | None = None

    def record(self, line: int, obj: Any) -> dict[str, Any]:
        """Validate one parsed row and return its record; raise _RowError if bad."""
        if isinstance(obj, _RowError):  # what `_jsonl_rows` yields for a line it could not parse
            raise obj
        if not isinstance(obj, dict):
            raise _RowError("not_object", f"expected a JSON object, got {type(obj).__name__}")
        input_format = self._format_of(line, obj)
        if input_format == "pairs":
            return _pair_record(obj, self.fields)
        return _chat_record(obj, input_format, self.fields)

    def _format_of(self, line: int, obj: dict[str, Any]) -> str:
        if self.requested != "auto":
            return self.requested
        f = self.fields
        try:
            found = detect_format(
                obj,
                prompt_field=f.prompt,
                completion_field=f.completion or f.prompt,
                messages_field=f.messages,
            )
        except ValueError as err:  # no known field: the file's format says what is missing
            if self.format is None:
                raise _RowError("missing_field", str(err)) from None
            return self.format
        if self.format is None:
            self.format, self.first_line = found, line
        elif found != self.format:
            raise _RowError(
                "mixed_formats",
                f"a {_FORMAT_NAMES[found]} record in a file of {_FORMAT_NAMES[self.format]} records "
                f"(the first record, line {self.first_line}, is one); one file holds one format",
            )
        return found


_FORMAT_NAMES = {
    "pairs": "prompt/completion",
    "messages": "chat ('messages')",
    "alpaca": "Alpaca",
    "sharegpt": "ShareGPT",
}


def _string_field(obj: dict[str, Any], name: str) -> str:
    if name not in obj:
        raise _RowError("missing_field", f"missing field '{name}'")
    if not isinstance(obj[name], str):
        raise _RowError("wrong_type", f"field '{name}' must be a string, got {type(obj[name]).__name__}")
    return obj[name]


def _lone_surrogate(text: str) -> str | None:
    """What makes text unwritable as UTF-8 (JSON's escapes allow a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"a lone surrogate U+{ord(text[err.start]):04X} at character {err.start + 1}, "
            "which UTF-8 cannot encode"
        )
    return None


def _check_unicode(record: dict[str, str], names: dict[str, str]) -> dict[str, str]:
    """Reject a record with a field that cannot be written back as UTF-8."""
    for key, text in record.items():
        problem = _lone_surrogate(text)
        if problem:
            raise _RowError("invalid_unicode", f"field '{names.get(key, key)}' holds {problem}")
    return record


# ----------------------------------------------------------------------------------------- reading


def _decode_line(raw: bytes) -> tuple[str, _RowError | None]:
    """Decode one physical line; on bad bytes return a readable stand-in plus the error."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 1].hex()
        reason = f"invalid UTF-8: byte 0x{bad} at column {err.start + 1} ({err.reason})"
        return raw.decode("utf-8", "backslashreplace"), _RowError("invalid_utf8", reason)


def _physical_lines(data: bytes) -> list[bytes]:
    """Split on LF only (CRLF keeps its CR for now): U+2028 and friends are not line ends here."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line + b"\n" for line in lines]


class _Collector:
    """Collects records and rejects; raises at the first bad row unless skip_invalid."""

    def __init__(self, path: str, skip_invalid: bool) -> None:
        self.result = ReadResult(source=path)
        self.path, self.skip_invalid = path, skip_invalid

    def add(self, line: int, record: dict[str, Any]) -> None:
        self.result.n_read += 1
        self.result.records.append({**record, "line": line})

    def reject(self, line: int, err: _RowError, raw: str) -> None:
        if not self.skip_invalid:
            raise DataError(self.path, line, err.reason, err.code)
        self.result.n_read += 1
        reject = {"line": line, "code": err.code, "reason": err.reason, "raw": raw.rstrip("\r\n")}
        self.result.rejects.append(reject)


def _jsonl_rows(data: bytes) -> Iterator[tuple[int, str, Any]]:
    """(line number, text, parsed object or the _RowError that stopped it) per non-blank line."""
    for lineno, raw in enumerate(_physical_lines(data), start=1):
        text, utf8_error = _decode_line(raw.rstrip(b"\r\n"))
        if not text.strip(_JSON_SPACE):
            continue  # blank lines are layout, not data: not counted as read
        if utf8_error is not None:
            yield lineno, text, utf8_error
            continue
        try:
            yield lineno, text, json.loads(text)
        except json.JSONDecodeError as err:
            yield lineno, text, _RowError("invalid_json", f"invalid JSON: {err.msg} (column {err.colno})")


def _read_jsonl(data: bytes, rows: _RowFormat, out: _Collector) -> None:
    for lineno, text, obj in _jsonl_rows(data):
        try:
            out.add(lineno, rows.record(lineno, obj))
        except _RowError as err:
            out.reject(lineno, err, text)
    out.result.format = rows.format


def read_prompts(path: str | os.PathLike, *, prompt_field: str = "prompt") -> list[str]:
    """The prompts of a JSONL file (other fields ignored); a bad line raises DataError with its line."""
    name = os.fspath(path)
    prompts = []
    for lineno, _, obj in _jsonl_rows(Path(name).read_bytes()):
        try:
            prompts.append(_RowFormat("pairs", _Fields(prompt_field, None)).record(lineno, obj)["prompt"])
        except _RowError as err:
            raise DataError(name, lineno, err.reason, err.code) from None
    return prompts


def _is_blank_row(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip(_JSON_SPACE))


def _read_csv(path: str, data: bytes, fields: _Fields, out: _Collector) -> None:
    """Read CSV with the csv module, reporting the physical line where each row *starts*.

    Lines are decoded one by one (a bad byte rejects only its row) and fed to ``csv.reader``;
    ``reader.line_num`` counts lines consumed, so a row starts at the previous line_num + 1 even when
    an earlier quoted field spanned several lines.
    """
    prompt_field, completion_field = fields.prompt, fields.completion
    out.result.format = "pairs"
    lines, utf8_errors = [], {}
    for lineno, raw in enumerate(_physical_lines(data), start=1):
        text, err = _decode_line(raw)
        lines.append(text)
        if err is not None:
            utf8_errors[lineno] = err
    reader = csv.reader(lines)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            if header is None:
                raise DataError(path, start, f"invalid CSV header: {err}", "invalid_csv") from None
            out.reject(start, _RowError("invalid_csv", f"invalid CSV: {err}"), lines[start - 1])
            continue
        end = reader.line_num
        raw_row = "".join(lines[start - 1 : end])
        if _is_blank_row(row):
            continue
        bad = [(n, utf8_errors[n]) for n in range(start, end + 1) if n in utf8_errors]
        if header is None:
            if bad:
                raise DataError(path, bad[0][0], bad[0][1].reason, bad[0][1].code)
            header = _check_header(path, start, row, (prompt_field, completion_field))
        elif bad:  # report the physical line with the bad bytes, which may be inside the row
            out.reject(bad[0][0], bad[0][1], raw_row)
        elif len(row) != len(header):
            reason = f"expected {len(header)} columns, got {len(row)}"
            if raw_row.count('"') % 2:
                reason += f'; a quote (") opened here is never closed, so the row runs to line {end}'
            out.reject(start, _RowError("wrong_columns", reason), raw_row)
        else:
            # CSV cells are always strings: CSV holds pairs only, never chats.
            row_dict = dict(zip(header, row, strict=True))  # lengths checked above
            try:
                out.add(start, _pair_record(row_dict, fields))
            except _RowError as err:
                out.reject(start, err, raw_row)
    if header is None:
        raise DataError(
            path,
            None,
            "no CSV header: the file has no rows; the first line must "
            f"name the columns '{prompt_field}' and '{completion_field}'",
            "missing_column",
        )


def _check_header(path: str, line: int, header: list[str], required: Sequence[str]) -> list[str]:
    """A header without the needed columns makes the whole file unusable: always an error."""
    for name in required:
        if name not in header:
            columns = ", ".join(repr(h) for h in header)
            raise DataError(
                path, line, f"CSV header has no column '{name}' (columns: {columns})", "missing_column"
            )
    return header


def read_records(
    path: str | os.PathLike,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    input_format: str = "auto",
    skip_invalid: bool = False,
) -> ReadResult:
    """Read prompt/completion pairs or whole chats from a ``.jsonl`` (JSON Lines) or ``.csv`` file.

    UTF-8 with or without BOM, LF or CRLF. A pair comes back as ``{"prompt", "completion", "line"}``
    (the 1-based physical line where it starts), a chat as ``{"messages": [...], "line"}``, checked
    by :func:`~lumorik_sft.conversations.validate_messages` and never flattened (for that, call
    :func:`messages_to_prompt_completion`). ``input_format`` is ``"pairs"``, ``"messages"`` (a chat
    in ``messages_field``), ``"alpaca"`` or ``"sharegpt"`` (converted per row to a chat), or
    ``"auto"``: each row's fields say its format, and the first recognised record fixes the file's
    (``.format``); rows in another format are rejected as ``mixed_formats``. CSV holds pairs only.
    Malformed rows (bad UTF-8, bad JSON, missing or non-string fields, a malformed chat, wrong CSV
    column count) raise :class:`DataError` unless ``skip_invalid``, in which case they are listed in
    ``.rejects`` and reading goes on. ``.n_read`` counts data rows (blank lines and the CSV header
    excluded), rejected ones included.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {input_format!r}: use one of {', '.join(INPUT_FORMATS)}")
    name = os.fspath(path)
    suffix = Path(name).suffix.lower()
    if suffix not in JSONL_SUFFIXES + CSV_SUFFIXES:
        raise DataError(
            name, None, f"unsupported file type {suffix!r}: use .jsonl or .csv", "unsupported_format"
        )
    if suffix in CSV_SUFFIXES and input_format not in ("auto", "pairs"):
        raise DataError(
            name,
            None,
            f"CSV holds prompt/completion pairs only; input format {input_format!r} needs a .jsonl file",
            "unsupported_format",
        )
    data = Path(name).read_bytes()
    out = _Collector(name, skip_invalid)
    fields = _Fields(prompt_field, completion_field, messages_field)
    if suffix in CSV_SUFFIXES:
        _read_csv(name, data, fields, out)
    else:
        _read_jsonl(data, _RowFormat(input_format, fields), out)
    return out.result
