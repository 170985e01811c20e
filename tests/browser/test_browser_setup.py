"""The browser suite without a browser: it never passes silently, and it compares as nbval does."""

from __future__ import annotations

import pytest
from jlab import need


def test_missing_browser_skips_with_the_reason_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        need(False, "chromium is not installed")


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_browser_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI is set .*chromium is not installed"):
        need(False, "chromium is not installed")


def test_present_browser_neither_skips_nor_fails(monkeypatch):
    monkeypatch.setenv("CI", "true")
    need(True, "unused")


def test_marked_outputs_are_compared_as_nbval_does(tmp_path):
    import nbformat
    from jlab import ROOT
    from nbval_outputs import marked_output_differences

    committed = ROOT / "notebooks" / "00_overview.ipynb"
    nb = nbformat.read(committed, as_version=4)
    copy = tmp_path / "ran.ipynb"
    nbformat.write(nb, copy)
    assert marked_output_differences(copy, committed) == []
    marked = next(c for c in nb.cells if c.source.startswith("# NBVAL_CHECK_OUTPUT"))
    marked.outputs[0].text += "a line nbval would not expect\n"
    nbformat.write(nb, copy)
    (difference,) = marked_output_differences(copy, committed)
    assert "a line nbval would not expect" in difference
