"""`lumorik-sft lab`'s JupyterLab settings: widget state saved with the notebooks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lumorik_sft.course import lab


def test_the_settings_turn_on_a_setting_that_ipywidgets_declares():
    ours = json.loads(lab.SETTINGS.read_text())
    assert ours == {"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True}}
    schema = (
        Path(sys.prefix)
        / "share/jupyter/labextensions/@jupyter-widgets/jupyterlab-manager/schemas"
        / "@jupyter-widgets/jupyterlab-manager/plugin.json"
    )
    if not schema.exists():
        pytest.skip("ipywidgets' JupyterLab extension is not installed here")
    assert "saveState" in json.loads(schema.read_text())["properties"]


def test_install_settings_copies_once_where_jupyterlab_reads_package_defaults(tmp_path):
    target = lab.install_settings(tmp_path)
    assert target == tmp_path / "share/jupyter/lab/settings/overrides.d/lumorik-sft.json"
    assert target.read_bytes() == lab.SETTINGS.read_bytes()
    before = target.stat().st_mtime_ns
    assert lab.install_settings(tmp_path) == target and target.stat().st_mtime_ns == before


def test_install_settings_says_none_where_it_cannot_write(tmp_path):
    blocked = tmp_path / "prefix"
    blocked.write_text("a file, not a folder")  # nothing can be created below it
    assert lab.install_settings(blocked) is None


def test_jupyterlab_server_reads_our_file_as_defaults(tmp_path):
    pytest.importorskip("jupyterlab_server")
    from jupyterlab_server.settings_utils import _get_overrides

    lab.install_settings(tmp_path)
    overrides, error = _get_overrides(str(tmp_path / "share/jupyter/lab/settings"))
    assert not error
    assert overrides["@jupyter-widgets/jupyterlab-manager:plugin"] == {"saveState": True}
