"""Which tests share an xdist worker (tests/conftest.py's scheduler; tested in test_xdist_groups.py)."""

from __future__ import annotations

import re


def xdist_group(nodeid: str) -> str:
    """The tests that must share one xdist worker: a file's, or a notebook's in the browser.

    A module's fixtures (a graded class, a trained model) are then built once, not once per
    worker, and a notebook's nbval cells run in order in one kernel. A notebook's browser tests
    (its Run All and the widget tests on its open tab: ``[06_....ipynb]`` or ``test_06_...``)
    form one group across files.
    """
    path, _, name = nodeid.partition("::")
    number = re.search(r"\[(\d\d)_[^\]]*\.ipynb\]$", name) or re.match(r"test_(\d\d)_", name)
    if path.startswith("tests/browser/") and number:
        return f"browser notebook {number.group(1)}"
    return path
