"""The notebooks' evaluation helpers: fact checks of generated text and readable metric bars."""

from __future__ import annotations

import pytest

from lumorik_sft.course import evaluation_lab, synthetic
from lumorik_sft.course.plots import figure_problems

ROWS = [
    {"label": "100 clean", "val_loss": 1.603, "fidelity": 0.91, "foreign": 0.004},
    {"label": "100, 50% noisy", "val_loss": 1.669, "fidelity": 0.62, "foreign": 0.8},
    {"label": "200, 50% noisy", "val_loss": 0.673, "fidelity": 0.0, "foreign": 1.2},
]
PANELS = [
    ("val_loss", "validation loss", "lower"),
    ("fidelity", "fact fidelity", "higher"),
    ("foreign", "foreign facts per output", "lower"),
]


def test_metric_bars_are_labelled_readable_and_show_every_value():
    fig = evaluation_lab.plot_metric_bars(ROWS, PANELS, title="noise")
    assert figure_problems(fig) == []
    for ax, (key, label, better) in zip(fig.axes, PANELS, strict=True):
        assert ax.get_ylabel() == f"{label} ({better} is better)"
        shown = [t.get_text() for t in ax.texts]  # bar_label's annotations
        assert shown == [evaluation_lab._short(r[key]) for r in ROWS]  # a zero-height bar still says 0.00
        assert [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()] == [r["label"] for r in ROWS]


def test_four_candidates_in_four_panels_stay_readable():
    names = ["reference", "wrong facts", "paraphrase", "other product"]
    rows = [{"name": n, "a": i + 0.5, "b": 1.0, "c": 0.01, "d": 0.0} for i, n in enumerate(names)]
    panels = [(k, k, "higher") for k in "abcd"]
    assert (
        figure_problems(evaluation_lab.plot_metric_bars(rows, panels, name="name", xlabel="candidate")) == []
    )


def test_generate_and_check_scores_what_the_model_wrote(tiny_model, toy_tokenizer):
    records = synthetic.product_descriptions(6, seed=0)
    out = evaluation_lab.generate_and_check(tiny_model, toy_tokenizer, records, max_new_tokens=4)
    assert len(out["texts"]) == 6 and 0 <= out["fidelity"] <= 1 and 0 <= out["stop_rate"] <= 1
    # the numbers are those of the fact checker on exactly these texts
    assert out["fidelity"] == out["fact_check"].score
    assert [o.score for o in out["fact_check"].per_output] == [
        evaluation_lab.metrics.fact_fidelity(
            [r["prompt"]],
            [t],
            [r["completion"]],
            aliases=synthetic.FEATURE_ALIASES,
            vocabulary_from=[x["prompt"] for x in records],
        ).score
        for r, t in zip(records, out["texts"], strict=True)
    ]


def test_check_runs_needs_kept_models(toy_tokenizer):
    with pytest.raises(ValueError, match="keep_model=True"):
        evaluation_lab.check_runs([{"label": "a"}], toy_tokenizer, [], max_new_tokens=4)
