"""What every course data set shares: the record type, the notice that it is made up, a size check."""

from __future__ import annotations

SYNTHETIC_NOTICE = (
    "SYNTHETIC TEACHING DATA: every record in lumorik_sft.course.synthetic is generated from templates for "
    "this course. Products, people, companies and cases are made up; the health answers are "
    "simplified general information, not medical advice, and must not be used for real decisions."
)

Record = dict[str, str]


def check_size(name: str, n: int, available: int) -> None:
    """Fail at once where drawing until n distinct records would never end."""
    if n > available:
        raise ValueError(f"{name} has {available:,} distinct records; asked for n={n:,}")
