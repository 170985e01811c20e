"""Stage 1 of the SFT pipeline: read, clean, de-duplicate, filter and split prompt/completion data.

Raw data is messy: byte-order marks, CRLF line endings, invalid UTF-8, broken JSON, duplicates that
differ only in whitespace or Unicode form, empty answers, rows too long for the context window.
Every row that goes in is accounted for: it is *kept*, *dropped* (with a reason such as
``duplicate``) or *rejected* (malformed, with its line number), so that always

    read == kept + sum(dropped.values()) + rejected

Run from Python::

    from lumorik_sft.data import run_curation
    report = run_curation("raw.jsonl", "curated/", skip_invalid=True)
    print(report.summary())

Without ``skip_invalid`` the first malformed line raises :class:`DataError` (``raw.jsonl:17: invalid
JSON: ...``) and nothing is written. File paths in messages are shown as given by the caller.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the HF library is slow to import; only the round-trip helpers need it
    import datasets

__all__ = [
    "DROP_REASONS",
    "CurationReport",
    "CurationResult",
    "DataError",
    "ReadResult",
    "clean_text",
    "curate",
    "from_hf_dataset",
    "messages_to_prompt_completion",
    "read_jsonl",
    "read_records",
    "run_curation",
    "split_records",
    "to_hf_dataset",
    "write_csv",
    "write_jsonl",
]

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson", ".json")
CSV_SUFFIXES = (".csv",)
DROP_REASONS = ("empty_prompt", "empty_completion", "duplicate", "too_long")
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


@dataclass
class CurationResult:
    """Output of :func:`curate`: kept records, dropped ones with their reason, and counts per reason."""

    kept: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    counts: dict[str, int]


# --------------------------------------------------------------------------------------- cleaning

# Line breaks other than \n that would otherwise be deleted as controls and glue words together.
_LINE_BREAKS = str.maketrans({"\v": "\n", "\f": "\n", "\x85": "\n", "\u2028": "\n", "\u2029": "\n"})


def _keep_char(ch: str) -> str:
    """Map one character: tabs and Unicode spaces -> ' ', controls and invisible format chars -> ''."""
    if ch == "\n":
        return ch
    if ch == "\t":
        return " "
    category = unicodedata.category(ch)
    if category in ("Cc", "Cf"):  # Cf: zero-width space/joiner, BOM, bidi marks, soft hyphen
        return ""
    if category == "Zs":  # NBSP, thin space, ideographic space, ...
        return " "
    return ch


def clean_text(text: str) -> str:
    """Normalise text so that copies differing only in invisible ways become byte-identical.

    NFC normal form; control and format characters removed (``\\n`` kept); CRLF/CR -> ``\\n``;
    tabs and runs of any Unicode spaces -> one space; spaces around newlines removed; three or more
    newlines -> two (a paragraph break); single newlines kept, since they often carry structure
    (``Category: ...\\nTone: ...``). Idempotent: ``clean_text(clean_text(x)) == clean_text(x)``.

    >>> clean_text("  Caf\\u0065\\u0301 \\t au\\u200b lait \\r\\n\\r\\n\\r\\nmenu ")
    'Café au lait\\n\\nmenu'
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_LINE_BREAKS)
    text = "".join(_keep_char(ch) for ch in text)
    text = re.sub(r" {2,}", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    # NFC last: deleting a zero-width char can bring a letter and its accent together.
    return unicodedata.normalize("NFC", text.strip(" \n"))


# ------------------------------------------------------------------------------------ chat records


def messages_to_prompt_completion(messages: Any) -> tuple[str, str]:
    """Turn a chat (list of ``{role, content}``) into a prompt/completion pair.

    The completion is the final message, which must come from the assistant. The prompt renders the
    messages before it: their contents joined by a blank line. If an earlier assistant turn is among
    them (a multi-turn chat), every message is prefixed with its role (``User: ...``) so the turns
    stay distinguishable. Raises ValueError naming the problem.

    >>> messages_to_prompt_completion([{"role": "system", "content": "Be brief."},
    ...     {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}])
    ('Be brief.\\n\\nHi?', 'Hello.')
    """
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = type(message[key]).__name__ if key in message else "nothing"
                raise ValueError(f"message {i} field '{key}' must be a string, got {got}")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {message['role']!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("'messages' has no assistant message")
    if messages[-1]["role"] != "assistant":
        raise ValueError("'messages' must end with an assistant message (the completion)")
    context = messages[:-1]
    if any(m["role"] == "assistant" for m in context):
        parts = [f"{m['role'].capitalize()}: {m['content']}" for m in context]
    else:
        parts = [m["content"] for m in context]
    return "\n\n".join(parts), messages[-1]["content"]


def _to_record(
    obj: Any, prompt_field: str, completion_field: str | None, messages_field: str | None
) -> dict[str, Any]:
    """Validate one parsed row and return ``{"prompt", "completion"}`` (only ``{"prompt"}`` when
    ``completion_field`` is None); raise _RowError if bad."""
    if isinstance(obj, _RowError):  # what `_jsonl_rows` yields for a line it could not parse
        raise obj
    if not isinstance(obj, dict):
        raise _RowError("not_object", f"expected a JSON object, got {type(obj).__name__}")
    if messages_field is not None and messages_field in obj:
        try:
            prompt, completion = messages_to_prompt_completion(obj[messages_field])
        except ValueError as err:
            raise _RowError("malformed_messages", str(err)) from None
        return _check_unicode({"prompt": prompt, "completion": completion},
                              {"prompt": messages_field, "completion": messages_field})
    names = {"prompt": prompt_field, "completion": completion_field}
    names = {key: name for key, name in names.items() if name is not None}
    return _check_unicode({key: _string_field(obj, name) for key, name in names.items()}, names)


def _string_field(obj: dict[str, Any], name: str) -> str:
    if name not in obj:
        raise _RowError("missing_field", f"missing field '{name}'")
    if not isinstance(obj[name], str):
        raise _RowError("wrong_type", f"field '{name}' must be a string, got {type(obj[name]).__name__}")
    return obj[name]


def _check_unicode(record: dict[str, str], names: dict[str, str]) -> dict[str, str]:
    """Reject text that cannot be written back as UTF-8: JSON's escapes allow a lone surrogate."""
    for key, text in record.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _RowError("invalid_unicode", f"field '{names.get(key, key)}' holds a lone "
                            f"surrogate U+{ord(text[err.start]):04X} at character {err.start + 1}, "
                            "which UTF-8 cannot encode") from None
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


def _read_jsonl(path: str, data: bytes, fields: tuple, out: _Collector) -> None:
    for lineno, text, obj in _jsonl_rows(data):
        try:
            out.add(lineno, _to_record(obj, *fields))
        except _RowError as err:
            out.reject(lineno, err, text)


def read_prompts(path: str | os.PathLike, *, prompt_field: str = "prompt") -> list[str]:
    """The prompts of a JSONL file (other fields ignored); a bad line raises DataError with its line."""
    name = os.fspath(path)
    prompts = []
    for lineno, _, obj in _jsonl_rows(Path(name).read_bytes()):
        try:
            prompts.append(_to_record(obj, prompt_field, None, None)["prompt"])
        except _RowError as err:
            raise DataError(name, lineno, err.reason, err.code) from None
    return prompts


def _is_blank_row(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip(_JSON_SPACE))


def _read_csv(path: str, data: bytes, fields: tuple, out: _Collector) -> None:
    """Read CSV with the csv module, reporting the physical line where each row *starts*.

    Lines are decoded one by one (a bad byte rejects only its row) and fed to ``csv.reader``;
    ``reader.line_num`` counts lines consumed, so a row starts at the previous line_num + 1 even when
    an earlier quoted field spanned several lines.
    """
    prompt_field, completion_field, _ = fields
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
            # CSV cells are always strings; a chat 'messages' column is not supported in CSV.
            row_dict = dict(zip(header, row, strict=True))  # lengths checked above
            try:
                out.add(start, _to_record(row_dict, prompt_field, completion_field, None))
            except _RowError as err:
                out.reject(start, err, raw_row)
    if header is None:
        raise DataError(path, None, "no CSV header: the file has no rows; the first line must "
                        f"name the columns '{prompt_field}' and '{completion_field}'", "missing_column")


def _check_header(path: str, line: int, header: list[str], required: Sequence[str]) -> list[str]:
    """A header without the needed columns makes the whole file unusable: always an error."""
    for name in required:
        if name not in header:
            columns = ", ".join(repr(h) for h in header)
            raise DataError(path, line, f"CSV header has no column '{name}' (columns: {columns})",
                            "missing_column")
    return header


def read_records(
    path: str | os.PathLike,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    skip_invalid: bool = False,
) -> ReadResult:
    """Read prompt/completion records from a ``.jsonl`` (JSON Lines) or ``.csv`` file.

    UTF-8 with or without BOM, LF or CRLF. Each record comes back as ``{"prompt", "completion",
    "line"}`` (the 1-based physical line where it starts). JSONL records may instead carry a chat in
    ``messages_field`` (see :func:`messages_to_prompt_completion`). Malformed rows (bad UTF-8, bad
    JSON, missing or non-string fields, wrong CSV column count) raise :class:`DataError` unless
    ``skip_invalid``, in which case they are listed in ``.rejects`` and reading goes on.
    ``.n_read`` counts data rows (blank lines and the CSV header excluded), rejected ones included.
    """
    name = os.fspath(path)
    suffix = Path(name).suffix.lower()
    if suffix not in JSONL_SUFFIXES + CSV_SUFFIXES:
        raise DataError(name, None, f"unsupported file type {suffix!r}: use .jsonl or .csv",
                        "unsupported_format")
    data = Path(name).read_bytes()
    out = _Collector(name, skip_invalid)
    fields = (prompt_field, completion_field, messages_field)
    if suffix in CSV_SUFFIXES:
        _read_csv(name, data, fields, out)
    else:
        _read_jsonl(name, data, fields, out)
    return out.result


# ---------------------------------------------------------------------------------------- curation


def curate(
    records: Iterable[dict[str, Any]],
    *,
    max_tokens: int | None = None,
    length_fn: Callable[[dict[str, Any]], int] | None = None,
) -> CurationResult:
    """Clean both fields, then drop empty, duplicate and over-long records, in that order.

    ``duplicate`` means the same (prompt, completion) *after cleaning* as an earlier record, so copies
    that differ in whitespace or Unicode form are caught; the first occurrence is the one considered
    for keeping (a duplicate of an over-long record is still counted as a duplicate). ``too_long``
    means ``length_fn(cleaned_record) > max_tokens``: the caller supplies the length, e.g. the token
    count of prompt + completion + EOS, because only it knows the tokenizer.
    """
    if (max_tokens is None) != (length_fn is None):
        raise ValueError("give both max_tokens and length_fn (to drop over-long rows) or neither")
    kept, dropped = [], []
    counts = dict.fromkeys(DROP_REASONS, 0)
    seen: set[tuple[str, str]] = set()
    for record in records:
        cleaned = {"prompt": clean_text(record["prompt"]),
                   "completion": clean_text(record["completion"])}
        reason = _drop_reason(cleaned, seen, max_tokens, length_fn)
        line = record.get("line")
        if reason is None:
            kept.append({**cleaned, "line": line} if line is not None else cleaned)
        else:
            counts[reason] += 1
            dropped.append({"line": line, "reason": reason, **cleaned})
    return CurationResult(kept=kept, dropped=dropped, counts=counts)


def _drop_reason(
    record: dict[str, str],
    seen: set[tuple[str, str]],
    max_tokens: int | None,
    length_fn: Callable[[dict[str, Any]], int] | None,
) -> str | None:
    if not record["prompt"]:
        return "empty_prompt"
    if not record["completion"]:
        return "empty_completion"
    key = (record["prompt"], record["completion"])
    if key in seen:
        return "duplicate"
    seen.add(key)
    if max_tokens is not None and length_fn is not None and length_fn(record) > max_tokens:
        return "too_long"
    return None


def split_records(
    records: Sequence[dict[str, Any]], *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split into (train, val) so that no prompt appears in both: a shared prompt would leak answers.

    Records are grouped by cleaned prompt; groups are shuffled with ``random.Random(seed)`` and
    added to validation greedily whenever that brings its size closer to ``round(n * val_fraction)``.
    With unique prompts the size is exact (1,000 at 10% -> 900/100). Both splits keep input order.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(clean_text(record["prompt"]), []).append(index)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    target = round(len(records) * val_fraction)
    val_indices: set[int] = set()
    for group in order:
        if abs(len(val_indices) + len(group) - target) < abs(len(val_indices) - target):
            val_indices.update(group)
    train = [r for i, r in enumerate(records) if i not in val_indices]
    val = [r for i, r in enumerate(records) if i in val_indices]
    return train, val


# ------------------------------------------------------------------------------------ file helpers


def _jsonl_text(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, UTF-8, non-ASCII kept readable (``ensure_ascii=False``)."""
    Path(path).write_text(_jsonl_text(records), encoding="utf-8", newline="\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file we wrote (no validation; use :func:`read_records` for raw data)."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return [json.loads(line) for line in fh.read().split("\n") if line.strip()]


def write_csv(
    path: str | os.PathLike,
    records: Iterable[dict[str, Any]],
    *,
    fields: Sequence[str] = ("prompt", "completion"),
) -> None:
    """Write records as CSV with a header; fields with newlines are quoted (readable by read_records)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        for record in records:
            writer.writerow([record[f] for f in fields])


def _atomic_write_all(files: dict[Path, str]) -> None:
    """Write every file to a temp file first, then rename: a failure leaves no half-written output."""
    temps: dict[Path, str] = {}
    try:
        for target, text in files.items():
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            temps[target] = tmp
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
        for target, tmp in temps.items():
            os.replace(tmp, target)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


# ------------------------------------------------------------------------------------------ report


@dataclass
class CurationReport:
    """Counts from one :func:`run_curation` run; ``to_dict()`` is what ``report.json`` holds."""

    source: str
    read: int
    kept: int
    train: int
    val: int
    dropped: dict[str, int]
    rejected: int
    rejected_reasons: dict[str, int]
    seed: int
    val_fraction: float
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        accounted = self.kept + sum(self.dropped.values()) + self.rejected
        assert self.read == accounted, f"lost rows: read {self.read} != accounted {accounted}"
        assert self.kept == self.train + self.val, "train + val must equal kept"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A small text table for the CLI and notebooks."""
        rows = [("read", self.read), ("rejected (malformed)", self.rejected)]
        rows += [(f"  {code}", n) for code, n in sorted(self.rejected_reasons.items())]
        rows += [("dropped", sum(self.dropped.values()))]
        rows += [(f"  {reason}", n) for reason, n in self.dropped.items()]
        rows += [("kept", self.kept), ("  train", self.train), ("  val", self.val)]
        width = max(len(label) for label, _ in rows)
        lines = [f"Curation of {self.source} (seed={self.seed}, val_fraction={self.val_fraction})"]
        lines += [f"  {label:<{width}}  {n:>7,}" for label, n in rows]
        return "\n".join(lines)


def run_curation(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_invalid: bool = False,
    max_tokens: int | None = None,
    length_fn: Callable[[dict[str, Any]], int] | None = None,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
) -> CurationReport:
    """Read -> curate -> split, then write ``train.jsonl``, ``val.jsonl`` and ``report.json``.

    With ``skip_invalid`` a ``rejects.jsonl`` (``line``, ``code``, ``reason``, ``raw``) is always
    written, empty if nothing was rejected, so scripts can rely on it; without it any stale
    ``rejects.jsonl`` is removed. Everything is validated before anything is written, and files are
    renamed into place only once all are written: on a malformed input :class:`DataError` is raised
    and ``out_dir`` is left untouched (not even created). Kept files hold only prompt and completion.
    """
    if (max_tokens is None) != (length_fn is None):
        raise ValueError("give both max_tokens and length_fn (to drop over-long rows) or neither")
    read = read_records(input_path, prompt_field=prompt_field, completion_field=completion_field,
                        messages_field=messages_field, skip_invalid=skip_invalid)
    curated = curate(read.records, max_tokens=max_tokens, length_fn=length_fn)
    train, val = split_records(curated.kept, val_fraction=val_fraction, seed=seed)
    report = CurationReport(
        source=os.fspath(input_path), read=read.n_read, kept=len(curated.kept),
        train=len(train), val=len(val), dropped=curated.counts, rejected=len(read.rejects),
        rejected_reasons=dict(Counter(r["code"] for r in read.rejects)),
        seed=seed, val_fraction=val_fraction, max_tokens=max_tokens,
    )
    out = Path(out_dir)
    files = {
        out / "train.jsonl": _jsonl_text(_public(r) for r in train),
        out / "val.jsonl": _jsonl_text(_public(r) for r in val),
        out / "report.json": json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n",
    }
    if skip_invalid:
        files[out / "rejects.jsonl"] = _jsonl_text(read.rejects)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_all(files)
    if not skip_invalid:
        (out / "rejects.jsonl").unlink(missing_ok=True)
    return report


def _public(record: dict[str, Any]) -> dict[str, str]:
    return {"prompt": record["prompt"], "completion": record["completion"]}


# ------------------------------------------------------------------------------ Hugging Face round trip


def to_hf_dataset(records: Sequence[dict[str, Any]]) -> datasets.Dataset:
    """Records -> ``datasets.Dataset`` with exactly the columns ``prompt`` and ``completion``."""
    import datasets

    return datasets.Dataset.from_dict({
        "prompt": [r["prompt"] for r in records],
        "completion": [r["completion"] for r in records],
    })


def from_hf_dataset(ds: datasets.Dataset) -> list[dict[str, str]]:
    """``datasets.Dataset`` (or any iterable of rows) -> list of prompt/completion dicts."""
    return [{"prompt": row["prompt"], "completion": row["completion"]} for row in ds]
