"""The blind review widget: it builds, each click saves a valid rating, it never shows which system
wrote what, it degrades to text with the committed example ratings, and those match the notebooks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lumorik_sft.course import review
from lumorik_sft.course.plots import figure_problems
from lumorik_sft.human_eval import (
    RUBRIC,
    Rating,
    agreement,
    blind_pairs,
    load_ratings,
    paired_labels,
    save_ratings,
    win_rate,
)

SYSTEMS = ("zebra-base", "okapi-tuned")  # names that cannot appear in any output by chance
ITEMS = review.comparison_items(
    [f"Write a product description.\nCategory: item {i}" for i in range(3)],
    {SYSTEMS[0]: ["a", "b", "c"], SYSTEMS[1]: ["A bag.", "A scarf.", "A mug."]},
)


def _pairs(seed: int = 0):
    return blind_pairs(ITEMS, *SYSTEMS, seed=seed)


def _walk(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _walk(child)


def _text(box) -> str:
    return "\n".join(
        str(getattr(w, attr, "")) for w in _walk(box) for attr in ("value", "description", "tooltip")
    )


def _buttons(box) -> dict[str, object]:
    import ipywidgets as w

    return {b.description: b for b in _walk(box) if isinstance(b, w.Button)}


def test_comparison_items_line_up_outputs_with_prompts():
    assert ITEMS[1] == {
        "id": "val-1",
        "prompt": "Write a product description.\nCategory: item 1",
        "zebra-base": "b",
        "okapi-tuned": "A scarf.",
    }
    with pytest.raises(ValueError, match="2 outputs for 3 prompts"):
        review.comparison_items(["p"] * 3, {"x": ["a", "b"]})


def test_clicking_saves_one_valid_rating_per_click_and_advances(tmp_path):
    path = tmp_path / "ratings.jsonl"
    session = review.ReviewSession(_pairs(), path, rater="student")
    box = review.build_widget(session)
    assert "0 of 3 rated" in _text(box)
    boxes = [w for w in _walk(box) if type(w).__name__ == "Checkbox"]
    assert len(boxes) == 2 * len(RUBRIC)
    boxes[0].value = True  # Output 1: correct facts
    boxes[len(RUBRIC) + 2].value = True  # Output 2: fluent
    _buttons(box)["Output 1 is better"].click()
    assert "1 of 3 rated" in _text(box) and not any(b.value for b in boxes)  # fresh boxes for the next pair
    _buttons(box)["Tie"].click()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and all(json.loads(line)["rater"] == "student" for line in lines)
    first, second = load_ratings(path)
    pair = _pairs()[0]
    assert (first.item_id, first.verdict, first.winner()) == ("val-0", "A", pair.system_a)
    assert first.rubric_a["correct_facts"] and not first.rubric_a["fluent"]
    assert first.rubric_b["fluent"] and not first.rubric_b["correct_facts"]
    assert first.outputs == pair.fingerprint and first.timestamp
    assert (second.item_id, second.verdict, second.winner()) == ("val-1", "tie", "tie")
    _buttons(box)["Output 2 is better"].click()
    assert "3 of 3 rated" in _text(box) and "All pairs rated" in _text(box)
    assert all(b.disabled for b in _buttons(box).values())
    with pytest.raises(ValueError, match="every pair is rated"):
        session.rate("A")


def test_ratings_of_regenerated_outputs_are_set_aside_not_joined(tmp_path):
    path = tmp_path / "ratings.jsonl"
    session = review.ReviewSession(_pairs(), path, rater="you")
    session.rate("A")
    session.rate("B")
    changed = review.comparison_items(
        [item["prompt"] for item in ITEMS],
        {SYSTEMS[0]: ["a", "b", "c"], SYSTEMS[1]: ["A bag.", "A hat.", "A mug."]},
    )
    again = review.ReviewSession(blind_pairs(changed, *SYSTEMS, seed=0), path, rater="you")
    assert again.stale == 1 and [r.item_id for r in again.ratings] == ["val-0"]  # val-1's text changed
    assert again.progress() == "1 of 3 rated (1 earlier ratings were of other outputs)"
    assert again.current.item_id == "val-1"


def test_a_new_session_resumes_where_the_rater_stopped(tmp_path):
    path = tmp_path / "ratings.jsonl"
    session = review.ReviewSession(_pairs(), path, rater="student")
    session.rate("B")
    again = review.ReviewSession(_pairs(), path, rater="student")
    assert again.progress() == "1 of 3 rated" and again.current.item_id == "val-1"
    assert review.ReviewSession(_pairs(), path, rater="someone else").progress() == "0 of 3 rated"


def test_the_widget_and_the_text_view_never_name_the_systems(tmp_path):
    for seed in range(4):
        session = review.ReviewSession(_pairs(seed), tmp_path / f"{seed}.jsonl", rater="student")
        box = review.build_widget(session)
        for _ in range(3):
            shown = _text(box) + "".join(review.pair_text(p) for p in session.pairs)
            assert "Output 1" in shown and "Output 2" in shown
            assert not any(name in shown for name in SYSTEMS)
            _buttons(box)["Tie"].click()


def test_the_order_shown_follows_the_pair(tmp_path):
    pairs = _pairs(seed=3)
    box = review.build_widget(review.ReviewSession(pairs, tmp_path / "r.jsonl", rater="s"))
    text = _text(box)
    assert text.index(pairs[0].output_a) < text.index(pairs[0].output_b)


def test_start_review_shows_the_widget_where_widgets_render(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    monkeypatch.setenv("LUMORIK_WIDGETS", "1")
    session = review.start_review(_pairs(), tmp_path / "r.jsonl", rater="s")
    assert session.live and len(shown) == 1 and "Output 1" in _text(shown[0])


def test_static_fallback_prints_text_and_uses_the_example_ratings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUMORIK_WIDGETS", "0")
    pairs = _pairs()
    session = review.start_review(pairs, tmp_path / "mine.jsonl", rater="s", show_static=2)
    out = capsys.readouterr().out
    assert not session.live and "widgets off: 3 blind pairs" in out
    assert "[val-1] prompt" in out and "[val-2]" not in out
    assert not any(name in out for name in SYSTEMS)

    examples = [Rating.of(p, rater, "B") for rater in ("ex-1", "ex-2") for p in blind_pairs(ITEMS, *SYSTEMS)]
    save_ratings(tmp_path / "demo.jsonl", examples)
    got = review.example_ratings("demo", pairs, folder=tmp_path)
    assert got == examples
    session.rate("A")  # a rater's own ratings come beside the examples
    chosen = review.ratings_for_analysis(session, "demo", folder=tmp_path)
    assert chosen.examples_used and chosen.ratings == examples + session.ratings


def test_example_ratings_of_other_outputs_are_refused_loudly(tmp_path):

    save_ratings(tmp_path / "demo.jsonl", [Rating.of(p, "ex-1", "A") for p in _pairs()])
    regenerated = [{**item, SYSTEMS[1]: item[SYSTEMS[1]] + " Now in red."} for item in ITEMS]
    with pytest.raises(review.StaleExampleRatings, match="no rating by ex-1 of the outputs .* val-0"):
        review.example_ratings("demo", blind_pairs(regenerated, *SYSTEMS), folder=tmp_path)


# ------------------------------------------------------------------ which ratings, and the analysis


def _examples(pairs, raters=("ex-1", "ex-2"), verdicts=("BAB", "BAA")) -> list[Rating]:
    """Example ratings of `pairs`: one verdict per pair and rater, the SFT output passing facts."""
    ratings = []
    for rater, letters in zip(raters, verdicts, strict=True):
        for pair, verdict in zip(pairs, letters, strict=True):
            tuned = "a" if pair.system_a == SYSTEMS[1] else "b"
            passed = {f"rubric_{tuned}": {"correct_facts": verdict != "tie"}}
            ratings.append(Rating.of(pair, rater, verdict, **passed))
    return ratings


@pytest.fixture()
def stale_folder(tmp_path):
    """Example ratings of other outputs than `_pairs()` shows: what another CPU kind generates."""
    regenerated = [{**item, SYSTEMS[1]: item[SYSTEMS[1]] + " Now in red."} for item in ITEMS]
    save_ratings(tmp_path / "demo.jsonl", _examples(blind_pairs(regenerated, *SYSTEMS)))
    return tmp_path


def test_stale_examples_and_no_own_ratings_give_an_empty_analysis_that_says_why(tmp_path, stale_folder):
    session = review.ReviewSession(_pairs(), tmp_path / "mine.jsonl", rater="you")
    chosen = review.ratings_for_analysis(session, "demo", folder=stale_folder)  # no exception
    assert chosen.ratings == [] and not chosen.examples_used
    assert str(chosen).startswith("No ratings to analyse: the example ratings were left out")
    assert "differ from those they rated" in str(chosen) and "LUMORIK_WIDGETS=1" in str(chosen)
    analysis = review.analyse(chosen.ratings, system=SYSTEMS[1])
    assert analysis.items_rated == {} and analysis.win_rates == {} and analysis.agreements == []
    assert str(analysis).splitlines() == [
        "no ratings: no win rate to report",
        "no ratings: no agreement between raters to report",
    ]


def test_stale_examples_leave_only_your_own_ratings(tmp_path, stale_folder):
    session = review.ReviewSession(_pairs(), tmp_path / "mine.jsonl", rater="you")
    for verdict in ("A", "B"):
        session.rate(verdict)
    chosen = review.ratings_for_analysis(session, "demo", folder=stale_folder)
    assert chosen.ratings == session.ratings and {r.rater for r in chosen.ratings} == {"you"}
    assert str(chosen).startswith("Analysing your 2 ratings (you) only: the example ratings were left out")
    analysis = review.analyse(chosen.ratings, system=SYSTEMS[1])
    assert analysis.items_rated == {"you": 2} and list(analysis.win_rates) == ["you"]
    assert analysis.win_rates["you"] == win_rate(session.ratings, SYSTEMS[1])


def test_matching_examples_are_analysed_beside_your_ratings(tmp_path):
    pairs = _pairs()
    save_ratings(tmp_path / "demo.jsonl", _examples(blind_pairs(ITEMS, *SYSTEMS)))
    session = review.ReviewSession(pairs, tmp_path / "mine.jsonl", rater="you")
    alone = review.ratings_for_analysis(session, "demo", folder=tmp_path)
    assert alone.examples_used and "which match the outputs generated above" in str(alone)
    session.rate("tie")
    chosen = review.ratings_for_analysis(session, "demo", folder=tmp_path)
    assert len(chosen.examples) == 2 * len(pairs) and chosen.own == (session.ratings[0],)
    assert str(chosen).endswith("and your 1 (you).")
    analysis = review.analyse(chosen.ratings, system=SYSTEMS[1])
    assert analysis.items_rated == {"ex-1": 3, "ex-2": 3, "you": 1}
    assert "you" not in analysis.win_rates  # one tie: no decisive comparison, no rate
    assert "you | okapi-tuned: 1 ties, no decisive comparison" in str(analysis)
    assert [a.raters for a in analysis.agreements] == [("ex-1", "ex-2"), ("ex-1", "you"), ("ex-2", "you")]
    assert [a.verdicts.n for a in analysis.agreements] == [3, 1, 1]


def test_one_rater_has_win_rates_and_no_kappa():
    ratings = _examples(_pairs(), raters=("ex-1",), verdicts=("BAB",))
    analysis = review.analyse(ratings, system=SYSTEMS[1])
    assert analysis.agreements == []
    assert analysis.win_rates["ex-1"] == win_rate(ratings, SYSTEMS[1])
    assert "agreement: not computed, kappa needs two raters who rated the same items" in str(analysis)
    assert "Cohen's kappa" not in str(analysis)


def test_two_raters_agreement_equals_human_eval_agreement():
    ratings = _examples(_pairs())
    analysis = review.analyse(ratings, system=SYSTEMS[1])
    (pair,) = analysis.agreements

    def facts(r: Rating) -> bool:
        return r.passes(SYSTEMS[1], "correct_facts")

    assert pair.raters == ("ex-1", "ex-2")
    assert pair.verdicts == agreement(*paired_labels(ratings, "ex-1", "ex-2"))
    assert pair.facts == agreement(*paired_labels(ratings, "ex-1", "ex-2", label=facts))
    assert pair.verdicts.observed == pytest.approx(2 / 3) and pair.verdicts.kappa is not None
    for rater in ("ex-1", "ex-2"):
        assert analysis.win_rates[rater] == win_rate([r for r in ratings if r.rater == rater], SYSTEMS[1])
    lines = str(analysis).splitlines()  # what the notebooks printed before `analyse` existed
    assert lines[0] == f"{'ex-1':>16} | {analysis.win_rates['ex-1']}"
    assert lines[2] == f"verdict (zebra-base / okapi-tuned / tie): {pair.verdicts}"
    assert lines[3] == f"okapi-tuned output has correct facts: {pair.facts}"
    with pytest.raises(ValueError, match="unknown criterion"):
        review.analyse(ratings, system=SYSTEMS[1], fact_criterion="correct facts")


def test_plot_win_rates_is_readable(tmp_path):

    pairs = _pairs()
    ratings = [Rating.of(p, "ex-1", v) for p, v in zip(pairs, "ABA", strict=True)]
    rates = {"ex-1": win_rate(ratings, SYSTEMS[1]), "ex-2": win_rate(ratings[:2], SYSTEMS[1])}
    fig = review.plot_win_rates(rates, title="test")
    assert figure_problems(fig) == []
    assert fig.axes[0].get_ylim()[0] == 0


# ------------------------------------------------------------------------- the committed examples

EXAMPLE_FILES = sorted(review.EXAMPLES_DIR.glob("*.jsonl"))


def test_examples_are_committed_for_each_notebook():
    assert {p.stem for p in EXAMPLE_FILES} == {"04_evaluation", "05_worked_example"}


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_each_example_run_is_rated_by_both_example_raters(path: Path):
    """Every set of outputs rated (one per mode and precision) has one rating per item and rater."""
    ratings = load_ratings(path)
    assert {r.rater for r in ratings} == {"example-rater-1", "example-rater-2"}
    per_rater = Counter((r.rater, r.item_id, r.outputs) for r in ratings)
    assert max(per_rater.values()) == 1
    outputs = {(r.item_id, r.outputs) for r in ratings}
    assert {(i, o) for _, i, o in per_rater} == outputs
    assert len(per_rater) == 2 * len(outputs)
    for r in ratings:
        assert {r.system_a, r.system_b} == {"base", "SFT"}


def test_example_ratings_name_the_prompts_the_notebooks_rate(tmp_path):
    """The item ids are validation positions: val-i must be the notebook's i-th validation prompt."""
    from lumorik_sft import data
    from lumorik_sft.course import synthetic

    records = synthetic.product_descriptions(1000, seed=0)
    # 04: records[-N_VAL:], N_VAL 48 in full mode and 16 in fast mode
    nb04 = {f"val-{i}": {records[-48 + i]["prompt"], records[-16 + i]["prompt"]} for i in range(16)}
    data.write_jsonl(tmp_path / "pairs.jsonl", records)
    data.run_curation(tmp_path / "pairs.jsonl", tmp_path / "data", val_fraction=0.1, seed=0)
    val = data.read_jsonl(tmp_path / "data" / "val.jsonl")
    nb05 = {f"val-{i}": {r["prompt"]} for i, r in enumerate(val)}  # 05: the curated split, both modes
    for stem, prompts in (("04_evaluation", nb04), ("05_worked_example", nb05)):
        for r in load_ratings(review.EXAMPLES_DIR / f"{stem}.jsonl"):
            assert r.prompt in prompts[r.item_id], (stem, r.item_id)
