"""What ``pytest --nbval-lax`` checks beyond errors, applied to a notebook run in the browser.

In a session that runs both, the browser's Run All replaces nbval's run of the course
notebooks (conftest.py), so each notebook runs once. This keeps nbval's other check: every
cell marked ``# NBVAL_CHECK_OUTPUT`` shows the committed outputs, compared as nbval compares
them (streams merged, the sanitize patterns applied, images, metadata and widget ids skipped).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import nbformat
from nbval.plugin import coalesce_streams, find_comment_markers, get_sanitize_patterns

ROOT = Path(__file__).resolve().parents[2]
SANITIZE = ROOT / "notebooks" / "sanitize.cfg"
SKIP = {
    "metadata",
    "traceback",
    "prompt_number",
    "output_type",
    "name",
    "execution_count",
    "application/vnd.jupyter.widget-view+json",
    "image/png",
    "image/jpeg",
}


def _flat(outputs: list[Any], patterns: list[tuple[str, str]]) -> dict[str, list[Any]]:
    """nbval's view of a cell's outputs: each key (MIME types flattened) to its sanitized values."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            for regex, replace in patterns:
                value = re.sub(regex, replace, value)
        return value

    flat: dict[str, list[Any]] = defaultdict(list)
    for out in coalesce_streams([nbformat.from_dict(o) for o in outputs]):
        if out.output_type == "stream":
            flat[out.name].append(clean(out.text))
            continue
        for key, value in out.items():
            if key == "data":
                for mime, data in value.items():
                    if mime not in SKIP:
                        flat[mime].append(clean(data))
            elif key not in SKIP:
                flat[key].append(clean(value))
    return dict(flat)


def marked_output_differences(saved: Path, committed: Path) -> list[str]:
    """The NBVAL_CHECK_OUTPUT cells whose outputs in ``saved`` differ from ``committed``'s."""
    patterns = get_sanitize_patterns(SANITIZE.read_text())
    reference = nbformat.read(committed, as_version=4).cells
    ran = nbformat.read(saved, as_version=4).cells
    problems = []
    for i, (ref, test) in enumerate(zip(reference, ran, strict=True)):
        if ref.cell_type != "code" or not dict(find_comment_markers(ref.source)).get("check"):
            continue
        assert test.source == ref.source, f"cell {i} changed while it ran"
        want, got = _flat(ref.outputs, patterns), _flat(test.outputs, patterns)
        if want != got:
            first = ref.source.splitlines()[1][:60]
            problems.append(f"cell {i} ({first!r}):\n  committed {want}\n  browser   {got}")
    return problems
