"""An exercise in the browser: type a solution into the stub, run its check, read the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jlab import Notebook

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
EXERCISE = "exercises/01_data_curation.ipynb"
SCREENSHOTS = ROOT / "notebooks" / "screenshots"
WRONG = '''def clean_and_dedupe(records: list[dict]) -> list[dict]:
    """Drops empty prompts only: no cleaning, no de-duplication."""
    return [r for r in records if r["prompt"].strip()]'''


def solution_source(name: str, function: str) -> str:
    """The solution cell of ``function`` from solutions/, without its hint comments."""
    cells = json.loads((ROOT / "solutions" / name).read_text())["cells"]
    src = next("".join(c["source"]) for c in cells if f"def {function}(" in "".join(c["source"]))
    keep = [
        line for line in src.splitlines() if not line.strip().startswith(("# HINT", "# SOLUTION", "# END"))
    ]
    return "\n".join(keep)


def crop(nb: Notebook, cells: list, path: Path) -> Path:
    """A screenshot of just these cells (stub and check), small enough for the README."""
    boxes = [c.bounding_box() for c in cells]
    x, y = min(b["x"] for b in boxes), min(b["y"] for b in boxes)
    width = max(b["x"] + b["width"] for b in boxes) - x
    height = max(b["y"] + b["height"] for b in boxes) - y
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.page.screenshot(path=str(path), clip={"x": x, "y": y, "width": min(width, 1100), "height": height})
    return path


def test_exercise_check_passes_then_gives_specific_feedback(open_notebook, shots):
    nb = open_notebook(EXERCISE)
    nb.run_cell(nb.cell("import math"))
    stub = nb.cell("def clean_and_dedupe(")
    check = nb.cell("checks.check_clean_and_dedupe(clean_and_dedupe)")

    nb.set_source(stub, solution_source("01_data_curation.ipynb", "clean_and_dedupe"))
    nb.run_cell(stub)
    nb.run_cell(check)
    verdict = nb.output_text(check)
    assert "check_clean_and_dedupe: all 6 cases passed" in verdict
    check.scroll_into_view_if_needed()
    crop(nb, [stub, check], SCREENSHOTS / "check-passed.png")
    nb.shot("passed")

    nb.set_source(stub, WRONG)
    nb.run_cell(stub)
    nb.run_cell(check)
    feedback = nb.output_text(check)
    assert "0/6 cases passed, not yet" in feedback
    assert "is not cleaned" in feedback and "(clean both fields with data.clean_text)" in feedback
    assert "the same after cleaning" in feedback and ": keep only the first" in feedback
    check.scroll_into_view_if_needed()
    crop(nb, [stub, check], SCREENSHOTS / "check-failed.png")
    nb.shot("failed")
    nb.assert_no_errors()
