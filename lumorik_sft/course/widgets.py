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

import contextlib
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


def frontend_can_show_widgets() -> bool:
    """Whether a front end that renders ipywidgets may be attached to this process.

    Any kernel with a front end (JupyterLab, Notebook 7, VS Code) has a ``kernel`` attribute on
    its shell; Colab's shell is not a ``ZMQInteractiveShell`` but Colab renders ipywidgets too.
    A plain Python or terminal IPython shell has neither.
    """
    import sys

    if "google.colab" in sys.modules:
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and (in_jupyter_kernel() or getattr(shell, "kernel", None) is not None)


def _ipywidgets_available() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def widgets_enabled() -> bool:
    """Whether to show live controls: ``LUMORIK_WIDGETS`` if set, else a heuristic.

    The heuristic says yes in any front end that renders widgets (`frontend_can_show_widgets`)
    with ipywidgets installed, outside fast mode and CI (where nbval runs the notebooks and
    nobody can click).
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
    return frontend_can_show_widgets() and _ipywidgets_available()


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


DEFAULTS_NOTE = "The checks (assert cells) below use the default values, not the ones you pick here."
RUNNING = "running…"


def interactive_or_static(
    fn: Callable[..., Any], *, manual: bool = False, show: bool = True, **controls: Any
) -> Any:
    """Call ``fn`` with the controls' defaults, display and return the result; add controls live.

    ``controls`` map fn's keyword arguments to `slider`, `log_slider`, `choice`, `text` or
    `checkbox` (or plain values, passed unchanged). Where `widgets_enabled` is true, the
    controls appear above a plain output that ``fn`` re-renders whenever a value changes, or
    when the Run button is pressed with ``manual=True`` (use that when fn trains a model).
    Whatever ``fn`` prints or returns (a figure, a table) appears there. Elsewhere the default
    call is all there is, shown as plain output. Returns the default call's result; an
    exception in that first call is shown under the widget and raised in the cell.
    """
    values = defaults(controls)
    if not widgets_enabled():
        result = fn(**values)
        if show:
            _display(result)
        return result
    return LiveControls(fn, values, controls, manual=manual, show=show).start()


def capture_call(fn: Callable[..., Any], values: Mapping[str, Any], show: bool) -> tuple[Any, Any]:
    """Run ``fn(**values)`` capturing what it prints and displays: (result, captured outputs)."""
    from IPython.core.display_functions import display
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        result = fn(**values)
        if show and result is not None:
            display(result)
    return result, captured


class LatestResult:
    """What one run printed and displayed, as one plain output (HTML with text and images).

    The result lives in an ordinary output with a display id, not inside the widget, so a
    notebook saved and reopened without its kernel still shows the latest result (a widget's
    own output would read "Error displaying widget: model not found").
    """

    def __init__(
        self, captured: Any = None, values: Mapping[str, Any] | None = None, error: str = ""
    ) -> None:
        self.captured = captured
        self.values = dict(values or {})
        self.error = error

    def _parts(self) -> list[tuple[str, str]]:
        """(kind, content) pieces in order: text, images (base64 PNG) and HTML."""
        parts: list[tuple[str, str]] = []
        cap = self.captured
        if cap is not None:
            for out in cap.outputs:
                data = out.data
                if "image/png" in data:
                    parts.append(("png", _base64(data["image/png"])))
                elif "text/html" in data:
                    parts.append(("html", data["text/html"]))
                elif "text/plain" in data:
                    parts.append(("text", data["text/plain"]))
            text = (cap.stdout or "") + (cap.stderr or "")
            if text:
                parts.append(("text", text))
        if self.error:
            parts.append(("error", self.error))
        return parts

    def text(self) -> str:
        """The plain-text view: the settings line, the printed text and the error."""
        lines = [settings_line(self.values)]
        lines += [c for kind, c in self._parts() if kind in ("text", "error")]
        return "\n".join(lines)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        import html

        chunks = [f"<p><b>{html.escape(settings_line(self.values))}</b></p>"]
        for kind, content in self._parts():
            if kind == "png":
                chunks.append(f'<img src="data:image/png;base64,{content}"/>')
            elif kind == "html":
                chunks.append(content)
            else:
                style = ' style="color:#b00"' if kind == "error" else ""
                chunks.append(f"<pre{style}>{html.escape(content)}</pre>")
        return {"text/plain": self.text(), "text/html": "\n".join(chunks)}


def _base64(png: str | bytes) -> str:
    """A kernel hands PNGs over base64-encoded, a plain IPython shell as bytes."""
    import base64

    return base64.b64encode(png).decode() if isinstance(png, bytes) else png


def settings_line(values: Mapping[str, Any]) -> str:
    """One line naming the values a result was computed with."""
    shown = ", ".join(f"{k}={v!r}" for k, v in values.items() if not isinstance(v, str) or len(v) < 40)
    return f"latest result: {shown}" if shown else "latest result"


class LiveControls:
    """Controls, a Run button (manual), a status line, an error area, and the latest result.

    While fn runs the status says "running…" and the controls are disabled, re-enabled after
    (also after an exception). An exception's traceback is shown under the controls.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        values: Mapping[str, Any],
        controls: Mapping[str, Any],
        *,
        manual: bool,
        show: bool,
    ) -> None:
        import ipywidgets as w

        self.fn, self.values, self.show, self.manual = fn, dict(values), show, manual
        self.live = {k: c.widget(k) for k, c in controls.items() if isinstance(c, Control)}
        self.button = w.Button(description="Run", button_style="primary") if manual else None
        self.status = w.HTML(value="")
        self.errors = w.Output()
        self.note = w.HTML(value=f"<i>{DEFAULTS_NOTE}</i>")
        self.handle: Any = None
        self.runs = 0

    def chosen(self) -> dict[str, Any]:
        """The values the controls show now, over the fixed arguments."""
        return {**self.values, **{k: c.value for k, c in self.live.items()}}

    def _busy(self, busy: bool, message: str) -> None:
        for c in [*self.live.values(), *([self.button] if self.button else [])]:
            c.disabled = busy
        self.status.value = message

    def render(self, values: Mapping[str, Any]) -> Any:
        """Run fn on ``values`` and publish its outputs; on error show the traceback and raise."""
        import traceback

        self._busy(True, f"<b>{RUNNING}</b>")
        self.errors.outputs = ()  # clear_output() only reaches a front end
        try:
            result, captured = capture_call(self.fn, values, self.show)
        except Exception:
            tb = traceback.format_exc()
            self.errors.append_stderr(tb)
            self._publish(LatestResult(None, values, error=tb))
            self._busy(False, "<b style='color:#b00'>failed: the error is shown below</b>")
            raise
        self.runs += 1
        self._publish(LatestResult(captured, values))
        self._busy(False, f"done (run {self.runs})")
        return result

    def _publish(self, latest: LatestResult) -> None:
        from IPython.display import display

        if self.handle is None:
            self.handle = display(latest, display_id=True)
        else:
            self.handle.update(latest)

    def _on_event(self, _: Any) -> None:
        """A click or a change: errors are already shown to the student, so swallow them here."""
        with contextlib.suppress(Exception):
            self.render(self.chosen())

    def start(self) -> Any:
        """Display the controls and run the default call; its exception reaches the cell."""
        import ipywidgets as w
        from IPython.display import display

        if self.button is not None:
            self.button.on_click(self._on_event)
        else:
            for c in self.live.values():
                c.observe(self._on_event, names="value")
        parts = [
            *self.live.values(),
            *([self.button] if self.button else []),
            self.status,
            self.errors,
            self.note,
        ]
        display(w.VBox(parts))
        return self.render(self.values)


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
