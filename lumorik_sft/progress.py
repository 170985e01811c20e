"""One rule for progress bars: shown when asked for, quiet under CI, TQDM_DISABLE or fast mode.

Needed because an explicit ``tqdm(disable=False)`` overrides ``TQDM_DISABLE``, so every caller
that takes a ``progress=`` argument must ask here rather than pass it straight to tqdm.
"""

from __future__ import annotations

import os

_FALSE = ("", "0", "false", "no")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in _FALSE


def progress_quiet(requested: bool = True) -> bool:
    """True when a progress bar must not be drawn (the value for tqdm's ``disable``)."""
    return not requested or _env_on("CI") or _env_on("TQDM_DISABLE") or _env_on("LUMORIK_FAST")


def progress_enabled() -> bool:
    """Whether a notebook or script should ask APIs for progress bars."""
    return not progress_quiet(True)
