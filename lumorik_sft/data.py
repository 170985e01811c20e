"""Stage 1 of the SFT pipeline: clean, de-duplicate, filter and split prompt/completion data.

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

DROP_REASONS = ("empty_prompt", "empty_completion", "duplicate", "too_long")


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
        cleaned = {"prompt": clean_text(record["prompt"]), "completion": clean_text(record["completion"])}
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
    read = read_records(
        input_path,
        prompt_field=prompt_field,
        completion_field=completion_field,
        messages_field=messages_field,
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

    return datasets.Dataset.from_dict(
        {
            "prompt": [r["prompt"] for r in records],
            "completion": [r["completion"] for r in records],
        }
    )


def from_hf_dataset(ds: datasets.Dataset) -> list[dict[str, str]]:
    """``datasets.Dataset`` (or any iterable of rows) -> list of prompt/completion dicts."""
    return [{"prompt": row["prompt"], "completion": row["completion"]} for row in ds]
