"""Stage 1 of the SFT pipeline: clean, de-duplicate, filter and split pairs and whole chats.

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
Reading and its errors live in `lumorik_sft.records`; this module re-exports `read_records`,
`read_prompts`, `DataError` and `ReadResult`, so ``data.read_records(...)`` keeps working.

A chat (``{"messages": [...]}``, see `lumorik_sft.conversations`) goes through every step whole:
each message cleaned, the conversation dropped or kept as one, split by its opening. Chats are not
length-filtered here: the chat encoder drops whole earlier turns to fit and counts them, which keeps
a long conversation's later turns instead of losing it all.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumorik_sft.conversations import CHAT_FORMATS, chat_counts, is_chat
from lumorik_sft.records import (
    DataError,
    ReadResult,
    messages_to_prompt_completion,
    read_prompts,
    read_records,
)

if TYPE_CHECKING:  # the HF library is slow to import; only the round-trip helpers need it
    import datasets

__all__ = [
    "CHAT_DROP_REASONS",
    "DROP_REASONS",
    "CurationReport",
    "CurationResult",
    "DataError",
    "ReadResult",
    "clean_text",
    "curate",
    "from_hf_dataset",
    "messages_to_prompt_completion",
    "read_prompts",
    "read_jsonl",
    "read_records",
    "run_curation",
    "split_records",
    "to_hf_dataset",
    "write_csv",
    "write_jsonl",
]

DROP_REASONS = ("empty_prompt", "empty_completion", "duplicate", "too_long")  # pairs
CHAT_DROP_REASONS = ("empty_message", "duplicate")  # chats: no too_long (see the module docstring)


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


# ---------------------------------------------------------------------------------------- curation


def curate(
    records: Iterable[dict[str, Any]],
    *,
    max_tokens: int | None = None,
    length_fn: Callable[[dict[str, Any]], int] | None = None,
) -> CurationResult:
    """Clean every text, then drop empty, duplicate and over-long records, in that order.

    ``duplicate`` means the same record *after cleaning* as an earlier one (the same prompt and
    completion, or the same whole conversation), so copies that differ in whitespace or Unicode form
    are caught; the first occurrence is the one considered for keeping (a duplicate of an over-long
    record is still counted as a duplicate). ``too_long`` means ``length_fn(cleaned_record) >
    max_tokens``: the caller supplies the length, e.g. the token count of prompt + completion + EOS,
    because only it knows the tokenizer; it applies to pairs only (chats are cut by the encoder).
    A chat's system message left empty by cleaning is removed (it says nothing); any other empty
    message drops the chat as ``empty_message``. ``counts`` has a key per reason that applies to
    the records given: :data:`DROP_REASONS` for pairs, :data:`CHAT_DROP_REASONS` for chats.
    """
    if (max_tokens is None) != (length_fn is None):
        raise ValueError("give both max_tokens and length_fn (to drop over-long rows) or neither")
    kept, dropped = [], []
    reasons: Counter[str] = Counter()
    seen: set[tuple] = set()
    kinds: set[bool] = set()  # is_chat of each record: which drop reasons apply
    for record in records:
        kinds.add(is_chat(record))
        cleaned = _clean_record(record)
        reason = _drop_reason(cleaned, seen, max_tokens, length_fn)
        line = record.get("line")
        if reason is None:
            kept.append({**cleaned, "line": line} if line is not None else cleaned)
        else:
            reasons[reason] += 1
            dropped.append({"line": line, "reason": reason, **cleaned})
    counts = {reason: reasons[reason] for reason in _reasons_for(kinds)}
    return CurationResult(kept=kept, dropped=dropped, counts=counts)


def _reasons_for(kinds: set[bool]) -> tuple[str, ...]:
    """The drop reasons that apply: pairs' (also when there are no records), chats', or both."""
    applies = set(CHAT_DROP_REASONS) if True in kinds else set()
    if False in kinds or not kinds:
        applies |= set(DROP_REASONS)
    order = ("empty_prompt", "empty_completion", "empty_message", "duplicate", "too_long")
    return tuple(reason for reason in order if reason in applies)


def _clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record's texts cleaned (only its text fields: ``line`` and other keys are left behind)."""
    if not is_chat(record):
        return {"prompt": clean_text(record["prompt"]), "completion": clean_text(record["completion"])}
    messages = [{"role": m["role"], "content": clean_text(m["content"])} for m in record["messages"]]
    if messages and messages[0]["role"] == "system" and not messages[0]["content"]:
        messages = messages[1:]
    return {"messages": messages}


def _drop_reason(
    record: dict[str, Any],
    seen: set[tuple],
    max_tokens: int | None,
    length_fn: Callable[[dict[str, Any]], int] | None,
) -> str | None:
    if is_chat(record):
        if not all(m["content"] for m in record["messages"]):
            return "empty_message"
        key: tuple = ("messages", *((m["role"], m["content"]) for m in record["messages"]))
    elif not record["prompt"]:
        return "empty_prompt"
    elif not record["completion"]:
        return "empty_completion"
    else:
        key = (record["prompt"], record["completion"])
    if key in seen:
        return "duplicate"
    seen.add(key)
    if is_chat(record) or max_tokens is None or length_fn is None:
        return None
    return "too_long" if length_fn(record) > max_tokens else None


def _opening(record: dict[str, Any]) -> str | tuple[str, str]:
    """What a split must not share: a pair's prompt; a chat's system message and first user turn.

    For a chat that is the prompt of its first exchange, as a pair's prompt is: a validation chat
    opening with a question seen in training (under the same instructions) would leak its answer.
    """
    if not is_chat(record):
        return clean_text(record["prompt"])
    messages = record["messages"]
    system = clean_text(messages[0]["content"]) if messages[0]["role"] == "system" else ""
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    return (system, clean_text(first_user))


def split_records(
    records: Sequence[dict[str, Any]], *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split into (train, val) so that no prompt appears in both: a shared prompt would leak answers.

    Records are grouped by cleaned prompt (a chat by its cleaned system message and first user
    message); groups are shuffled with ``random.Random(seed)`` and added to validation greedily
    whenever that brings its size closer to ``round(n * val_fraction)``. With unique prompts the
    size is exact (1,000 at 10% -> 900/100). Both splits keep input order.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    groups: dict[str | tuple[str, str], list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(_opening(record), []).append(index)
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
    input_format: str | None = None  # what the records were read as; None: no record recognised
    chats: dict[str, int] | None = None  # conversations, turns, assistant turns kept; None for pairs

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
        settings = f"seed={self.seed}, val_fraction={self.val_fraction}"
        if self.chats is not None:
            rows += [(f"{name.replace('_', ' ')} kept", n) for name, n in self.chats.items()]
            settings += f", format={self.input_format}"
        width = max(len(label) for label, _ in rows)
        lines = [f"Curation of {self.source} ({settings})"]
        lines += [f"  {label:<{width}}  {n:>7,}" for label, n in rows]
        if self.chats is not None and self.max_tokens is not None:
            lines.append("  chats are not length-filtered: the chat encoder drops earlier turns to fit")
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
    input_format: str = "auto",
) -> CurationReport:
    """Read -> curate -> split, then write ``train.jsonl``, ``val.jsonl`` and ``report.json``.

    With ``skip_invalid`` a ``rejects.jsonl`` (``line``, ``code``, ``reason``, ``raw``) is always
    written, empty if nothing was rejected, so scripts can rely on it; without it any stale
    ``rejects.jsonl`` is removed. Everything is validated before anything is written, and files are
    renamed into place only once all are written: on a malformed input :class:`DataError` is raised
    and ``out_dir`` is left untouched (not even created). Kept files hold only prompt and
    completion, or for chats (``input_format`` "messages", "alpaca", "sharegpt", or "auto" finding
    one of them) only ``messages``; the report then counts the kept conversations and turns.
    """
    if (max_tokens is None) != (length_fn is None):
        raise ValueError("give both max_tokens and length_fn (to drop over-long rows) or neither")
    read = read_records(
        input_path,
        prompt_field=prompt_field,
        completion_field=completion_field,
        messages_field=messages_field,
        input_format=input_format,
        skip_invalid=skip_invalid,
    )
    curated = curate(read.records, max_tokens=max_tokens, length_fn=length_fn)
    train, val = split_records(curated.kept, val_fraction=val_fraction, seed=seed)
    report = CurationReport(
        source=os.fspath(input_path),
        read=read.n_read,
        kept=len(curated.kept),
        train=len(train),
        val=len(val),
        dropped=curated.counts,
        rejected=len(read.rejects),
        rejected_reasons=dict(Counter(r["code"] for r in read.rejects)),
        seed=seed,
        val_fraction=val_fraction,
        max_tokens=max_tokens,
        input_format=read.format,
        chats=chat_counts(curated.kept) if read.format in CHAT_FORMATS else None,
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


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """What a curated file holds: the texts, without ``line``."""
    if is_chat(record):
        return {"messages": record["messages"]}
    return {"prompt": record["prompt"], "completion": record["completion"]}


# ------------------------------------------------------------------------------ Hugging Face round trip


def to_hf_dataset(records: Sequence[dict[str, Any]]) -> datasets.Dataset:
    """Records -> ``datasets.Dataset`` with exactly the columns ``prompt`` and ``completion``, or for
    chats the one column ``messages`` (a list of ``{role, content}`` per row, as TRL reads it)."""
    import datasets

    kinds = {is_chat(r) for r in records}
    if len(kinds) > 1:
        raise ValueError("records mix chats and prompt/completion pairs: a dataset holds one kind")
    rows = [_public(r) for r in records]
    columns = ["messages"] if kinds == {True} else ["prompt", "completion"]
    return datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in columns})


def from_hf_dataset(ds: datasets.Dataset) -> list[dict[str, Any]]:
    """``datasets.Dataset`` (or any iterable of rows) -> prompt/completion dicts, or chats."""
    return [_public(row) for row in ds]
