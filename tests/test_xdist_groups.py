"""The suite's xdist groups: what must share a worker does, what need not is spread."""

from __future__ import annotations

from xdist_groups import xdist_group

RUN_ALL = "tests/browser/test_notebooks_run.py::test_notebook_runs_in_jupyterlab_without_errors"


def test_a_notebooks_run_all_and_its_widget_tests_share_a_group():
    run_all = xdist_group(f"{RUN_ALL}[06_pitfalls_lab.ipynb]")
    assert run_all == xdist_group("tests/browser/test_widgets_browser.py::test_06_noise_slider_reruns")
    assert run_all != xdist_group(f"{RUN_ALL}[07_applications.ipynb]")
    assert run_all != xdist_group("tests/browser/test_widgets_browser.py::test_07_playground_answers")


def test_a_files_tests_and_a_notebooks_cells_share_a_group():
    assert xdist_group("tests/test_grading.py::test_a[x]") == xdist_group("tests/test_grading.py::test_b")
    assert xdist_group("tests/test_grading.py::test_a") != xdist_group("tests/test_cli.py::test_a")
    cell = "notebooks/03_training_loop.ipynb::Cell {}"
    assert xdist_group(cell.format(0)) == xdist_group(cell.format(12))
    assert xdist_group(cell.format(0)) != xdist_group(RUN_ALL + "[03_training_loop.ipynb]")
    # a browser test about no numbered notebook is its file's
    broken = "tests/browser/test_widgets_browser.py::test_the_suite_catches_a_broken_widget"
    assert xdist_group(broken) == "tests/browser/test_widgets_browser.py"
