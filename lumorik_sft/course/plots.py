"""Plots for training runs: loss curves from a `TrainResult` or its saved history.json.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`), never through
pyplot's global state and never with `matplotlib.use`: that works headless (the Agg canvas
is used to save), leaves a notebook's inline backend alone, and Jupyter still displays a
returned Figure. Pass ``ax=`` to draw into a pyplot or subplot axes of your own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator


def _history(history: Any) -> dict[str, list[dict[str, Any]]]:
    """Accept a TrainResult, its `to_dict()`, or the path of a history.json."""
    if isinstance(history, (str, Path)):
        history = json.loads(Path(history).read_text())
    if not isinstance(history, Mapping):
        history = history.to_dict()
    if "steps" not in history or "epochs" not in history:
        raise ValueError(
            "history needs 'steps' and 'epochs' lists: pass the TrainResult "
            "returned by train(), its to_dict(), or a history.json path"
        )
    return {"steps": list(history["steps"]), "epochs": list(history["epochs"])}


def _epoch_midpoints(epochs: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(mid-epoch step, train loss) for each trained epoch."""
    points, previous = [], 0
    for e in epochs:
        if e.get("train_loss") is not None:
            points.append(((previous + e["step"]) / 2, e["train_loss"]))
        previous = e["step"]
    return points


def _exp(x: Any) -> Any:
    import numpy as np

    return np.exp(np.clip(x, -50, 50))


def _log(x: Any) -> Any:
    import numpy as np

    return np.log(np.clip(x, 1e-22, None))


def plot_loss_curves(history: Any, *, ax: Axes | None = None, path: str | Path | None = None) -> Figure:
    """Training loss per step (light), train and validation loss per epoch (markers).

    The x axis is optimizer steps. Validation markers sit at the step that ended their
    epoch (epoch 0, the base model before training, at step 0); an epoch's train loss is an
    average over its steps, so its marker sits mid-epoch. The right axis reads the loss axis
    as perplexity, exp(loss). Saves a PNG when `path` is given.
    """
    hist = _history(history)
    if ax is None:
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure  # type: ignore[assignment]
    steps = hist["steps"]
    if steps:
        ax.plot(
            [s["step"] for s in steps],
            [s["loss"] for s in steps],
            color="tab:blue",
            alpha=0.35,
            linewidth=1,
            label="train loss (per step)",
        )
    trained = _epoch_midpoints(hist["epochs"])
    if trained:
        ax.plot(
            [x for x, _ in trained],
            [y for _, y in trained],
            "o-",
            color="tab:blue",
            label="train loss (epoch)",
        )
    val = [e for e in hist["epochs"] if e.get("val_loss") is not None]
    if val:
        ax.plot(
            [e["step"] for e in val],
            [e["val_loss"] for e in val],
            "s--",
            color="tab:orange",
            label="validation loss",
        )
        right = ax.secondary_yaxis("right", functions=(_exp, _log))
        right.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        right.set_ylabel("perplexity = exp(loss)")
        last = val[-1]
        ppl = last.get("val_perplexity") or math.exp(min(last["val_loss"], 700))
        ax.set_title(f"val loss {last['val_loss']:.3f}, perplexity {ppl:.2f} (epoch {last['epoch']})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (NLL per completion token)")
    ax.grid(alpha=0.3)
    if steps or trained or val:
        ax.legend(loc="upper right")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig  # type: ignore[return-value]


def figure_problems(fig: Figure) -> list[str]:
    """What makes a figure hard to read: an axis without a label or title, tick labels that overlap,
    a legend drawn over data points. An empty list means none of these; tests run it on every
    figure helper of the course.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    problems = []
    for i, ax in enumerate(fig.axes):
        name = f"axes {i} ({ax.get_title() or 'untitled'})"
        if not ax.get_title() and not fig.get_suptitle():
            problems.append(f"{name}: no title")
        for axis, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())):
            if not label.strip():
                problems.append(f"{name}: no {axis} label")
        problems += [f"{name}: {p}" for p in _overlapping_ticks(ax, renderer)]
        legend = ax.get_legend()
        if legend is not None:
            box = legend.get_window_extent(renderer)
            covered = sum(
                box.contains(x, y)
                for line in ax.get_lines()
                for x, y in line.get_transform().transform(line.get_xydata())
                if line.get_visible() and line.get_marker() not in ("None", "", None)
            )
            if covered:
                problems.append(f"{name}: the legend covers {covered} marked data point(s)")
    return problems


def _overlapping_ticks(ax: Axes, renderer: Any) -> list[str]:
    out = []
    for axis_name, ticks in (("x", ax.get_xticklabels()), ("y", ax.get_yticklabels())):
        boxes = [t.get_window_extent(renderer) for t in ticks if t.get_visible() and t.get_text()]
        for a, b in zip(boxes, boxes[1:], strict=False):
            if a.overlaps(b):
                out.append(f"{axis_name} tick labels overlap")
                break
    return out


def plot_before_after(
    results: Mapping[str, tuple[Any, Any]],
    metrics: Sequence[tuple[str, Callable[[Any], float], str]],
    *,
    title: str = "before and after SFT",
) -> Figure:
    """One panel per metric; in each, a (before, after) pair of bars per application.

    ``results`` maps an application's name to its two `pipeline.EvalReport`s; ``metrics`` lists
    (panel title, value of a report, y-axis label). Every bar carries its value, so a loss of
    0.001 next to one of 6 is still read, and the legend sits below the panels, over no bar.
    """
    import numpy as np

    fig = Figure(figsize=(4 * len(metrics), 3.8), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    x = np.arange(len(results))
    for ax, (name, value, ylabel) in zip(axes, metrics, strict=True):
        for offset, (label, which, colour) in zip(
            (-0.2, 0.2), (("before SFT", 0, "lightgrey"), ("after SFT", 1, "tab:blue")), strict=True
        ):
            heights = [value(pair[which]) for pair in results.values()]
            bars = ax.bar(x + offset, heights, width=0.4, color=colour, edgecolor="dimgrey", label=label)
            ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
        ax.set_xticks(x, list(results))
        ax.set_xlabel("application")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.margins(y=0.15)  # room above the tallest bar for its value
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2)
    fig.suptitle(title)
    return fig
