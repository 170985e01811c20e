"""The live widgets' behaviour without a browser: where they turn on, busy state, errors, latest result."""

from __future__ import annotations

import sys
import types

import pytest

from lumorik_sft.course import widgets as W

ipywidgets = pytest.importorskip("ipywidgets")


class FakeHandle:
    """Stands in for IPython's DisplayHandle: records every update."""

    def __init__(self, obj):
        self.shown = [obj]

    def update(self, obj):
        self.shown.append(obj)


@pytest.fixture()
def shown(monkeypatch):
    """Everything displayed, and the display-id handles, instead of a real front end."""
    record: dict[str, list] = {"objs": [], "handles": []}

    def fake_display(*objs, display_id=None, **kw):
        if display_id:
            handle = FakeHandle(objs[0])
            record["handles"].append(handle)
            return handle
        record["objs"].extend(objs)
        return None

    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.instance()  # captures what fn prints and displays, as a kernel would
    monkeypatch.setattr("IPython.display.display", fake_display)
    monkeypatch.setenv(W.WIDGETS_ENV, "1")
    yield record
    InteractiveShell.clear_instance()


# --------------------------------------------------------------------------- where widgets turn on


@pytest.mark.parametrize(
    ("env", "fast", "ci", "frontend", "expected"),
    [
        ("", False, "", True, True),  # JupyterLab, Notebook 7, VS Code, Colab
        ("", False, "", False, False),  # plain Python shell
        ("", True, "", True, False),  # fast mode: nbval runs, nobody clicks
        ("", False, "true", True, False),  # CI
        ("0", False, "", True, False),  # asked for plain output
        ("1", True, "true", False, True),  # asked for widgets (the browser tests)
    ],
)
def test_widgets_enabled_decision(monkeypatch, env, fast, ci, frontend, expected):
    monkeypatch.setenv(W.WIDGETS_ENV, env)
    monkeypatch.setenv("LUMORIK_FAST", "1" if fast else "0")
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(W, "frontend_can_show_widgets", lambda: frontend)
    assert W.widgets_enabled() is expected


def test_colab_counts_as_a_widget_frontend(monkeypatch):
    assert not W.frontend_can_show_widgets()  # pytest: no IPython shell
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert W.frontend_can_show_widgets()


def test_a_shell_with_a_kernel_counts_as_a_widget_frontend(monkeypatch):
    class Shell:  # not a ZMQInteractiveShell, as in Colab or other kernels
        kernel = object()

    monkeypatch.setattr("IPython.get_ipython", lambda: Shell())
    assert W.frontend_can_show_widgets()
    Shell.kernel = None  # a terminal IPython has no kernel
    assert not W.frontend_can_show_widgets()


# --------------------------------------------------------------------------- the live path


def _controls(shown) -> ipywidgets.VBox:
    return next(o for o in shown["objs"] if isinstance(o, ipywidgets.VBox))


def test_live_widget_shows_controls_note_and_latest_result(shown):
    def fn(noise):
        print(f"noise is {noise}")
        return noise * 2

    result = W.interactive_or_static(fn, noise=W.slider(0.5, 0.0, 1.0, 0.1), manual=True, show=False)
    assert result == 1.0
    box = _controls(shown)
    kinds = [type(c).__name__ for c in box.children]
    assert kinds == ["FloatSlider", "Button", "HTML", "Output", "HTML"]
    assert W.DEFAULTS_NOTE in box.children[-1].value
    (handle,) = shown["handles"]
    latest = handle.shown[-1]
    assert isinstance(latest, W.LatestResult)
    assert "noise=0.5" in latest.text() and "noise is 0.5" in latest.text()
    bundle = latest._repr_mimebundle_()
    assert "noise is 0.5" in bundle["text/html"] and "noise is 0.5" in bundle["text/plain"]

    slider_, button = box.children[0], box.children[1]
    slider_.value = 0.8
    button.click()
    assert "noise is 0.8" in handle.shown[-1].text()  # the same plain output, updated
    assert box.children[2].value == "done (run 2)"
    assert not button.disabled and not slider_.disabled


def test_controls_are_disabled_and_say_running_while_fn_runs(shown):
    seen = []

    def fn(n):
        box = _controls(shown) if shown["objs"] else None
        if box is not None:
            seen.append((box.children[1].disabled, box.children[0].disabled, box.children[2].value))
        return n

    W.interactive_or_static(fn, n=W.slider(2, 1, 5), manual=True, show=False)
    _controls(shown).children[1].click()
    assert seen and all(b and s and W.RUNNING in status for b, s, status in seen)


def test_first_render_error_reaches_the_cell_and_is_shown(shown):
    def broken(n):
        raise KeyError("no such column")

    with pytest.raises(KeyError, match="no such column"):
        W.interactive_or_static(broken, n=W.slider(2, 1, 5), manual=True)
    box = _controls(shown)
    errors = box.children[3]
    assert any("KeyError" in o.get("text", "") for o in errors.outputs)
    assert "failed" in box.children[2].value
    assert not box.children[1].disabled  # usable again after the exception
    assert "KeyError" in shown["handles"][0].shown[-1].text()


def test_click_error_is_shown_and_controls_recover(shown):
    def fn(n):
        if n == 3:
            raise ValueError("three is broken")
        return n

    assert W.interactive_or_static(fn, n=W.slider(2, 1, 5), manual=True) == 2
    box = _controls(shown)
    box.children[0].value = 3
    box.children[1].click()  # must not raise out of the callback
    assert any("three is broken" in o.get("text", "") for o in box.children[3].outputs)
    assert not box.children[0].disabled and not box.children[1].disabled
    box.children[0].value = 4
    box.children[1].click()
    assert box.children[3].outputs == ()  # the old error is cleared by a good run
    assert "n=4" in shown["handles"][0].shown[-1].text()


def test_without_button_a_change_reruns(shown):
    W.interactive_or_static(lambda t: print(f"t={t}"), t=W.choice("a", ["a", "b"]))
    box = _controls(shown)
    assert [type(c).__name__ for c in box.children] == ["Dropdown", "HTML", "Output", "HTML"]
    box.children[0].value = "b"
    assert "t=b" in shown["handles"][0].shown[-1].text()
    assert box.children[0].disabled is False


def test_latest_result_keeps_figures_as_images(shown):
    import base64

    class Png:  # what a matplotlib figure becomes in a kernel
        def _repr_png_(self):
            return b"\x89PNG fake"

    def fig_fn(k):
        return Png()

    W.interactive_or_static(fig_fn, k=W.slider(1, 0, 3), manual=True)
    html = shown["handles"][0].shown[-1]._repr_mimebundle_()["text/html"]
    encoded = base64.b64encode(b"\x89PNG fake").decode()
    assert f'src="data:image/png;base64,{encoded}' in html


@pytest.mark.parametrize(
    ("env", "ci"),
    [("0", ""), ("", "true")],  # asked for plain output; CI (with no setting)
)
def test_plain_output_where_widgets_are_off(monkeypatch, capsys, env, ci):
    """No controls: fn runs once on the defaults, its result is printed (plain Python shell)."""
    monkeypatch.setenv(W.WIDGETS_ENV, env)
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(W, "LiveControls", None)  # any live path would fail
    result = W.interactive_or_static(lambda noise: f"noise {noise}", noise=W.slider(0.5, 0.0, 1.0, 0.1))
    assert result == "noise 0.5"
    assert capsys.readouterr().out == "noise 0.5\n"
