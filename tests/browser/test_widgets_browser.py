"""Widgets as a student uses them: move a control, press Run, read the result; break one on purpose."""

from __future__ import annotations

import json
import re
import time

import pytest
from jlab import TIMES, WIDGET_ERROR, Widget

pytestmark = pytest.mark.browser

LAB06 = "notebooks/06_pitfalls_lab.ipynb"
LAB07 = "notebooks/07_applications.ipynb"
LAB09 = "notebooks/09_chat_sft.ipynb"
LAB04 = "notebooks/04_evaluation.ipynb"


@pytest.fixture(scope="module", autouse=True)
def release_notebooks(ran):
    """End the widget notebooks' kernels after this module: the rest of the test run needs the CPU."""
    yield
    ran.close()


def timed(name: str, widget: Widget) -> str:
    """Press Run and record how long the result took."""
    start = time.monotonic()
    latest = widget.run(expect_busy=True)
    TIMES[f"widget {name}"] = time.monotonic() - start
    widget.assert_ok()
    return latest


def result_lines(latest: str, pattern: str) -> list[str]:
    return [line for line in latest.splitlines() if re.search(pattern, line)]


# --------------------------------------------------------------------------- 06 and 07


def test_06_noise_slider_reruns_with_the_chosen_noise(ran):
    nb = ran(LAB06)
    w = Widget(nb, nb.cell("def noise_lab"))
    default = w.latest()
    assert "latest result: noise=0.5" in default
    assert w.slider_right(0, 3) == "0.80"
    latest = timed("06 noise", w)
    assert "latest result: noise=0.8" in latest
    runs = result_lines(latest, r"corrupted, val loss")
    assert len(runs) == 3 and runs != result_lines(default, r"corrupted, val loss")
    # each run's corrupted labels are the ones the package's shuffle_completions picks at 0.8
    from lumorik_sft.course import experiments, synthetic

    records = synthetic.product_descriptions(1000, seed=0)  # as in the notebook
    for line in runs:
        label, rest = line.split(":", 1)
        n, noise = int(re.match(r"\s*(\d+)", label).group(1)), (0.8 if "noisy" in label else 0.0)
        chosen = experiments.shuffle_completions(records[:n], noise, seed=0)
        shown = int(re.search(r"(\d+) corrupted", rest).group(1))
        assert shown == sum(r.get("noisy") == "yes" for r in chosen), line
    assert [bool(re.search("80% noisy", line)) for line in runs] == [False, True, True]
    nb.assert_no_errors()


def test_06_epochs_slider_reruns_with_the_chosen_epochs(ran):
    nb = ran(LAB06)
    w = Widget(nb, nb.cell("def epochs_lab"))
    start = int(w.cell.locator(".widget-readout").first.inner_text())
    image = w.cell.locator(".jp-OutputArea-output", has_text="latest result").last.locator("img")
    before = image.get_attribute("src")
    assert w.slider_right(0, 1) == str(start + 1)
    latest = timed("06 epochs", w)
    assert f"latest result: epochs={start + 1}" in latest
    assert 'src="data' not in latest  # an image, not its source text
    assert image.count() == 1 and image.get_attribute("src") != before  # a new figure
    nb.assert_no_errors()


def test_06_batch_choice_reruns_with_the_chosen_scaling(ran):
    nb = ran(LAB06)
    w = Widget(nb, nb.cell("def batch_lab"))
    default = result_lines(w.latest(), r"^batch ")
    w.select(0, "sqrt")
    latest = timed("06 batch", w)
    assert "latest result: lr_scaling='sqrt'" in latest
    rows = result_lines(latest, r"^batch ")
    # sqrt scaling: the learning rate grows with the square root of the batch size
    lrs = [float(re.search(r"at lr ([0-9.e-]+)", r).group(1)) for r in rows]
    base = [float(re.search(r"at lr ([0-9.e-]+)", r).group(1)) for r in default]
    assert len(set(base)) == 1 and lrs[0] < lrs[1] < lrs[2]
    assert lrs[2] / lrs[0] == pytest.approx((32 / 2) ** 0.5, rel=0.05)
    nb.assert_no_errors()


def test_06_decoding_temperature_reruns(ran):
    nb = ran(LAB06)
    w = Widget(nb, nb.cell("def decoding_lab"))
    default = w.latest()
    assert "sampled, T=1.5" in default
    assert w.slider_right(0, 5) == "2.00"
    latest = timed("06 decoding", w)
    assert "latest result: temperature=2.0" in latest and "sampled, T=2.0" in latest
    # greedy decoding does not read the temperature: the package gives the same line again
    greedy = result_lines(latest, r"^\s*greedy: PPL")
    assert len(greedy) == 1 and greedy == result_lines(default, r"^\s*greedy: PPL")
    nb.assert_no_errors()


def test_07_playground_answers_the_chosen_task_and_temperature(ran):
    nb = ran(LAB07)
    w = Widget(nb, nb.cell("def playground"))
    options = w.cell.locator(".widget-dropdown select option").all_inner_texts()
    other = next(o for o in options if o != "health")
    w.select(0, other)
    assert w.slider_right(0, 5) == "0.50"
    w.fill(0, "Tell me something useful.")
    latest = timed("07 playground", w)
    assert f"[{other}, temperature 0.5, up to" in latest
    assert "Tell me something useful.\n->" in latest
    nb.assert_no_errors()


def test_09_chat_widget_answers_as_the_scripted_chat(ran):
    nb = ran(LAB09)
    cell = nb.cell("chat_lab.chat_widget(")
    # the cell printed chat_lab.scripted_chat on the same model: its first reply is what the
    # package computes for this first message in a new session
    first = "My kettle arrived broken."
    expected = nb.output_text(cell).split(f"you> {first}\n", 1)[1].splitlines()[0]
    assert expected.startswith("model> ")
    cell.locator(".widget-text input").fill(first)
    cell.locator("button.jupyter-button", has_text="Send").click()
    out = cell.locator(".widget-output")
    out.get_by_text("model>").wait_for(timeout=120_000)
    assert out.inner_text().strip().splitlines()[:2] == [f"you> {first}", expected]
    nb.shot("chat", target=cell)
    nb.assert_no_errors()


def test_04_review_widget_saves_the_clicked_verdicts_and_rubric(ran):
    """Blind pairwise rating: the verdict and the ticked boxes a student clicks are what gets saved."""
    nb = ran(LAB04)
    try:
        cell = nb.cell("review.start_review(")
        ratings = nb.server.root / "runs" / "ratings" / "04_evaluation.jsonl"
        before = ratings.read_text().splitlines() if ratings.exists() else []
        clicks = [
            ("Output 2 is better", "B", [0, 1]),
            ("Tie", "tie", []),
        ]  # (button, verdict, boxes of output 1)
        for button, verdict, boxes in clicks:
            shown = re.search(r"Prompt \((\S+)\)", cell.inner_text()).group(1)
            for i in boxes:
                cell.locator(".widget-checkbox input").nth(i).check()
            cell.locator("button.jupyter-button", has_text=button).click()
            cell.get_by_text(re.compile(r"Prompt \((?!" + re.escape(shown) + r"\))")).wait_for(timeout=30_000)
            saved = json.loads(ratings.read_text().splitlines()[-1])
            assert (saved["item_id"], saved["verdict"], saved["rater"]) == (shown, verdict, "you")
            passed = [c for c, ok in saved["rubric_a"].items() if ok]
            assert passed == ["correct_facts", "follows_instruction"][: len(boxes)]
            assert not any(saved["rubric_b"].values())
        assert len(ratings.read_text().splitlines()) == len(before) + 2
        nb.shot("rated", target=cell)
        nb.assert_no_errors()
    finally:
        ran.release(LAB04)


# --------------------------------------------------------------------------- save and reopen


def test_06_saved_and_reopened_shows_latest_results_not_widget_errors(ran):
    """The next day: saved, closed, its kernel gone, reopened; the widgets and results are there."""
    nb = ran(LAB06)
    w = Widget(nb, nb.cell("def noise_lab"))
    latest = w.latest()
    saved = json.loads(nb.save().read_text())
    # the course's JupyterLab settings (lumorik-sft lab) save the widgets' state in the notebook
    assert "application/vnd.jupyter.widget-state+json" in saved["metadata"].get("widgets", {})
    nb.close()
    nb.server.shutdown_kernels(LAB06)
    nb.open()
    assert not nb.page.get_by_text(WIDGET_ERROR).count(), "a widget output did not survive the reopen"
    reopened = Widget(nb, nb.cell("def noise_lab")).latest()
    assert reopened.splitlines()[0] == latest.splitlines()[0]
    nb.shot("reopened")
    nb.assert_no_errors()


# --------------------------------------------------------------------------- the suite bites


BROKEN = """from lumorik_sft.course.widgets import interactive_or_static, slider

def lab(n):
    if n == 3:
        raise RuntimeError("broken on purpose")
    print(f"n squared is {n * n + (1 if n == 4 else 0)}")  # wrong for n=4 on purpose
    return n

result = interactive_or_static(lab, n=slider(2, 1, 5), manual=True, show=False)"""
FIRST_BROKEN = """from lumorik_sft.course.widgets import interactive_or_static, slider

def lab(n):
    raise KeyError("no such column")

result = interactive_or_static(lab, n=slider(2, 1, 5), manual=True)"""


def notebook_of(*sources: str) -> str:
    cells = [
        {"cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None}
        for s in sources
    ]
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    return json.dumps({"cells": cells, "metadata": meta, "nbformat": 4, "nbformat_minor": 5})


def test_the_suite_catches_a_broken_widget(lab, open_notebook):
    (lab.root / "broken_widget.ipynb").write_text(notebook_of(BROKEN))
    (lab.root / "broken_first.ipynb").write_text(notebook_of(FIRST_BROKEN))

    nb = open_notebook("broken_widget.ipynb")
    nb.run_all(timeout=120)
    nb.assert_no_errors()
    w = Widget(nb, nb.cell("def lab"))
    w.expect("latest result: n=2", "n squared is 4")
    w.slider_right(0, 1)
    w.run()  # the callback raises: the widget says so and shows the traceback
    with pytest.raises(AssertionError, match="broken on purpose"):
        w.assert_ok()
    assert "RuntimeError: broken on purpose" in w.latest()
    assert not w.cell.locator("button.jupyter-button").is_disabled()  # usable again
    w.slider_right(0, 1)
    w.run()
    w.assert_ok()  # no exception this time, but the value is wrong: the expected text catches it
    with pytest.raises(AssertionError, match="without \\['n squared is 16'\\]"):
        w.expect("latest result: n=4", "n squared is 16")

    first = open_notebook("broken_first.ipynb")
    first.run_all(timeout=120)
    with pytest.raises(AssertionError, match="KeyError"):
        first.assert_no_errors()  # the first render's exception reaches the cell
    with pytest.raises(AssertionError, match="no such column"):
        Widget(first, first.cell("def lab")).assert_ok()  # and is shown in the widget
