"""Controls for students to play with, that degrade to plain output where widgets cannot render.

`interactive_or_static(fn, **controls)` shows ipywidgets controls in a live Jupyter frontend;
everywhere else (nbval and CI, fast mode, plain Python, or ``LUMORIK_WIDGETS=0``) it calls
``fn`` once with the controls' default values and displays the result. Either way it returns
the result of that default call, so the next cell can ``assert`` on it.

    result = interactive_or_static(run, noise=slider(0.5, 0.0, 1.0, 0.1), manual=True)

`LiveLossPlot` is a `train(..., callback=...)` callback that redraws the loss curve in place
while a run trains, and draws it once at the end where nothing can update live.

Set ``LUMORIK_WIDGETS=0`` when executing notebooks for committing: their outputs then hold
the default results as plain images and text, which read well on GitHub.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

WIDGETS_ENV = "LUMORIK_WIDGETS"
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


# --------------------------------------------------------------------------- where we run


def in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel (a frontend may be attached), False in plain Python."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _ipywidgets_available() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def widgets_enabled() -> bool:
    """Whether to show live controls: ``LUMORIK_WIDGETS`` if set, else a heuristic.

    The heuristic says yes only in a Jupyter kernel with ipywidgets installed, outside fast mode
    and CI (where nbval runs the notebooks and nobody can click).
    """
    from lumorik_sft.defaults import fast_mode

    setting = os.environ.get(WIDGETS_ENV, "").strip().lower()
    if setting in _OFF:
        return False
    if setting in _ON:
        return _ipywidgets_available()
    if setting:
        raise ValueError(f"{WIDGETS_ENV}={setting!r}: use 1 (widgets) or 0 (plain output)")
    if fast_mode() or os.environ.get("CI"):
        return False
    return in_jupyter_kernel() and _ipywidgets_available()


def _display(obj: Any) -> None:
    """Display in IPython (figures as images), else print; None shows nothing."""
    if obj is None:
        return
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        print(obj)
        return
    if get_ipython() is None:
        print(obj)
    else:
        display(obj)


# --------------------------------------------------------------------------- controls


@dataclass
class Control:
    """One control: its default value and how to build the ipywidget (only when shown)."""

    kind: str
    default: Any
    options: dict[str, Any] = field(default_factory=dict)
    description: str | None = None

    def widget(self, name: str) -> Any:
        import ipywidgets as w

        label = self.description or name.replace("_", " ")
        style = {"description_width": "initial"}
        if self.kind == "float":
            return w.FloatSlider(
                value=self.default, description=label, style=style, continuous_update=False, **self.options
            )
        if self.kind == "log":
            return w.FloatLogSlider(
                value=self.default, description=label, style=style, continuous_update=False, **self.options
            )
        if self.kind == "int":
            return w.IntSlider(
                value=self.default, description=label, style=style, continuous_update=False, **self.options
            )
        if self.kind == "choice":
            return w.Dropdown(value=self.default, description=label, style=style, **self.options)
        if self.kind == "text":
            return w.Textarea(
                value=self.default, description=label, style=style, layout=w.Layout(width="90%", height="7em")
            )
        if self.kind == "bool":
            return w.Checkbox(value=self.default, description=label, style=style)
        raise ValueError(f"unknown control kind {self.kind!r}")


def slider(
    default: float, min: float, max: float, step: float | None = None, *, description: str | None = None
) -> Control:
    """A slider: integer if all of default, min and max are ints, else float."""
    if not min <= default <= max:
        raise ValueError(f"slider default {default} is outside [{min}, {max}]")
    ints = all(isinstance(v, int) for v in (default, min, max)) and (step is None or isinstance(step, int))
    options: dict[str, Any] = {"min": min, "max": max}
    if step is not None:
        options["step"] = step
    return Control("int" if ints else "float", default, options, description)


def log_slider(
    default: float, min_exp: float, max_exp: float, step: float = 0.5, *, description: str | None = None
) -> Control:
    """A log-scale float slider from 10**min_exp to 10**max_exp (for learning rates)."""
    if not 10**min_exp <= default <= 10**max_exp:
        raise ValueError(f"log_slider default {default} is outside [1e{min_exp}, 1e{max_exp}]")
    return Control("log", default, {"min": min_exp, "max": max_exp, "step": step, "base": 10}, description)


def choice(default: Any, options: Sequence[Any], *, description: str | None = None) -> Control:
    """A dropdown of options."""
    if default not in options:
        raise ValueError(f"choice default {default!r} is not one of {list(options)}")
    return Control("choice", default, {"options": list(options)}, description)


def text(default: str, *, description: str | None = None) -> Control:
    """A multi-line text box."""
    return Control("text", default, {}, description)


def checkbox(default: bool, *, description: str | None = None) -> Control:
    """A checkbox."""
    return Control("bool", bool(default), {}, description)


def defaults(controls: Mapping[str, Any]) -> dict[str, Any]:
    """The value each control starts at (plain values are fixed arguments, passed as they are)."""
    return {k: v.default if isinstance(v, Control) else v for k, v in controls.items()}


def interactive_or_static(
    fn: Callable[..., Any], *, manual: bool = False, show: bool = True, **controls: Any
) -> Any:
    """Call ``fn`` with the controls' defaults, display and return the result; add controls live.

    ``controls`` map fn's keyword arguments to `slider`, `log_slider`, `choice`, `text` or
    `checkbox` (or plain values, passed unchanged). Where `widgets_enabled` is true, the
    controls appear above an output area that ``fn`` re-renders whenever a value changes, or
    when the Run button is pressed with ``manual=True`` (use that when fn trains a model).
    Whatever ``fn`` prints or returns (a figure, a table) appears in that area. Elsewhere
    the default call is all there is, shown as plain output. Returns the default call's result.
    """
    values = defaults(controls)
    if not widgets_enabled():
        result = fn(**values)
        if show:
            _display(result)
        return result

    import ipywidgets as w
    from IPython.display import display

    live = {k: c.widget(k) for k, c in controls.items() if isinstance(c, Control)}
    out = w.Output()
    first: dict[str, Any] = {}

    def render(**changed: Any) -> None:
        with out:
            out.clear_output(wait=True)
            result = fn(**{**values, **changed})
            if show and result is not None:
                display(result)
        first.setdefault("result", result)

    if manual:
        button = w.Button(description="Run", button_style="primary")
        button.on_click(lambda _: render(**{k: c.value for k, c in live.items()}))
        display(w.VBox([*live.values(), button, out]))
    else:

        def on_change(_: Any) -> None:
            render(**{k: c.value for k, c in live.items()})

        for c in live.values():
            c.observe(on_change, names="value")
        display(w.VBox([*live.values(), out]))
    render()
    return first["result"]


# --------------------------------------------------------------------------- live loss curve


class LiveLossPlot:
    """A `train` callback that redraws the loss curve in place every ``every`` steps.

    Live updates need a Jupyter frontend (`widgets_enabled`); elsewhere the callback only
    watches, and `finish` draws the final figure once. Use::

        live = LiveLossPlot(every=5)
        result = train(model, tokenizer, train_ex, val_ex, config, callback=live)
        fig = live.finish()          # the final figure (displayed where nothing was live)
    """

    def __init__(self, every: int = 5, *, live: bool | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.live = widgets_enabled() if live is None else live
        self.result: Any = None
        self.updates = 0
        self._handle: Any = None
        self._figure: Any = None

    def _draw(self) -> Any:
        from matplotlib.figure import Figure

        from lumorik_sft.course.plots import plot_loss_curves

        fig = Figure(figsize=(7, 4), layout="constrained")
        plot_loss_curves(self.result, ax=fig.add_subplot())
        self._figure = fig
        return fig

    def __call__(self, event: Mapping[str, Any]) -> None:
        self.result = event["result"]
        due = event["event"] == "epoch" or event.get("step", 0) % self.every == 0
        if not (self.live and due):
            return
        from IPython.display import display

        fig = self._draw()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        self.updates += 1

    def finish(self) -> Any:
        """Draw the final curve: update the live plot, or display it once. Returns the Figure."""
        if self.result is None:
            raise RuntimeError(
                "no training event received yet: pass this object as "
                "train(..., callback=live) before calling finish()"
            )
        fig = self._draw()
        if self._handle is not None:
            self._handle.update(fig)
        else:
            _display(fig)
        return fig
