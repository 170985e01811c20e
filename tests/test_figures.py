"""Every figure helper of the course draws a readable figure: labelled axes, a title, tick labels
that do not overlap, and a legend that covers no marked data point (`plots.figure_problems`)."""

from __future__ import annotations

import math

import pytest
from matplotlib.figure import Figure

from lumorik_sft.course import experiments as E
from lumorik_sft.course.plots import figure_problems, plot_loss_curves

RUNS = [
    {"label": "lr 5e-05", "step_losses": [5.7, 5.5, 5.2, 4.9], "diverged": False,
     "val_loss_before": 5.7, "val_loss_after": 4.4},
    {"label": "lr 0.001", "step_losses": [5.7, 3.9, 2.1, 1.4], "diverged": False,
     "val_loss_before": 5.7, "val_loss_after": 1.28},
    {"label": "lr 0.1", "step_losses": [5.7, 9.0, 12.0, 10.5], "diverged": True,
     "val_loss_before": 5.7, "val_loss_after": math.inf},
]  # fmt: skip
EPOCHS = [
    {"epoch": 0, "train_loss": None, "val_loss": 5.0},
    {"epoch": 1, "train_loss": 3.0, "val_loss": 2.5},
    {"epoch": 2, "train_loss": 1.9, "val_loss": 2.2},
    {"epoch": 3, "train_loss": 1.2, "val_loss": 2.4},
]
HISTORY = {
    "steps": [{"step": s, "loss": 5.0 / s} for s in range(1, 31)],
    "epochs": [{"epoch": 0, "step": 0, "val_loss": 5.7}]
    + [{"epoch": e, "step": 10 * e, "train_loss": 3.0 / e, "val_loss": 2.0 / e} for e in (1, 2, 3)],
}

HELPERS = {
    "plot_step_losses": lambda: E.plot_step_losses(RUNS),
    "plot_val_losses": lambda: E.plot_val_losses(RUNS),
    "plot_epochs_curve": lambda: E.plot_epochs_curve(EPOCHS),
    "plot_loss_curves": lambda: plot_loss_curves(HISTORY),
}


@pytest.mark.parametrize("name", list(HELPERS))
def test_figure_helpers_draw_readable_figures(name):
    fig = HELPERS[name]()
    assert isinstance(fig, Figure)
    assert figure_problems(fig) == []


def test_figure_problems_finds_each_problem():
    fig = Figure(figsize=(3, 2))
    ax = fig.add_subplot()
    ax.plot(range(10), range(10), "o", label="points under the legend")
    ax.legend(loc="center")
    ax.set_xticks(range(10), [f"a long tick label {i}" for i in range(10)])
    problems = figure_problems(fig)
    assert "axes 0 (untitled): no title" in problems
    assert "axes 0 (untitled): no x label" in problems and "axes 0 (untitled): no y label" in problems
    assert "axes 0 (untitled): x tick labels overlap" in problems
    assert any("the legend covers" in p for p in problems), problems
