"""Every course notebook, run through JupyterLab's Run All Cells in fast mode, shows no error.

In a session that also collects nbval's items (the README's test command), this run replaces
nbval's (see conftest.py): it checks what ``--nbval-lax`` checks, the marked outputs included.
"""

from __future__ import annotations

import re

import pytest
from jlab import NOTEBOOKS, ROOT, P
from nbval_outputs import marked_output_differences

pytestmark = pytest.mark.browser

# kept open for tests/browser/test_widgets_browser.py, which runs on the same xdist worker
# (tests/conftest.py groups a notebook's browser tests by its number)
WIDGET_NOTEBOOKS = {
    "04_evaluation.ipynb",
    "06_pitfalls_lab.ipynb",
    "07_applications.ipynb",
    "09_chat_sft.ipynb",
}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab_without_errors(ran, name):
    path = f"notebooks/{name}"
    nb = ran(path)
    try:
        nb.assert_no_errors()
        prompts = [p.strip() for p in nb.page.locator(f"{P} .jp-InputArea-prompt").all_inner_texts()]
        assert not [p for p in prompts if p in ("[ ]:", "[*]:")], f"cells that did not run: {prompts}"
        assert any(re.fullmatch(r"\[\d+\]:", p) for p in prompts), "no cell ran"
        differences = marked_output_differences(nb.save(), ROOT / path)
        assert not differences, "NBVAL_CHECK_OUTPUT cells differ:\n" + "\n".join(differences)
    finally:
        if name not in WIDGET_NOTEBOOKS:  # the widget tests go on in the open tab
            ran.release(path)
