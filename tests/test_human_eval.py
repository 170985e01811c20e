"""Human evaluation statistics: known values from the literature, invariants, blind order, JSONL."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lumorik_sft.human_eval import (
    RUBRIC,
    Agreement,
    Rating,
    agreement,
    blind_pairs,
    cohen_kappa,
    load_ratings,
    match_ratings,
    paired_labels,
    save_ratings,
    wilson_interval,
    win_rate,
)
from lumorik_sft.records import DataError

ITEMS = [
    {"id": f"item-{i}", "prompt": f"prompt {i}", "base": f"base {i}", "sft": f"sft {i}"} for i in range(40)
]


def _rate(pair, winner: str, rater: str = "r1") -> Rating:
    """A rating whose un-blinded winner is `winner` (a system name or "tie")."""
    verdict = "tie" if winner == "tie" else "A" if pair.system_a == winner else "B"
    return Rating.of(pair, rater, verdict, rubric_a={"fluent": True}, rubric_b={"fluent": False})


# ------------------------------------------------------------------------------------ Wilson interval


@pytest.mark.parametrize(
    "successes,n,low,high",
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3.
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_newcombe(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_width_follows_confidence_and_n():
    assert wilson_interval(8, 10, 0.99)[0] < wilson_interval(8, 10, 0.95)[0] < wilson_interval(8, 10, 0.5)[0]
    assert wilson_interval(80, 100)[1] - wilson_interval(80, 100)[0] < wilson_interval(8, 10)[1] - 0.49
    for bad in [(1, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=95)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_contains_the_estimate_and_is_symmetric(case):
    k, n = case
    low, high = wilson_interval(k, n)
    assert 0 <= low <= k / n <= high <= 1
    mirror = wilson_interval(n - k, n)  # failures are successes of the opposite event
    assert mirror == pytest.approx((1 - high, 1 - low), abs=1e-12)


# ------------------------------------------------------------------------------------------ win rate


def test_win_rate_counts_unblinded_winners_and_leaves_ties_out():
    pairs = blind_pairs(ITEMS[:10], "base", "sft", seed=3)
    winners = ["sft"] * 6 + ["base"] * 2 + ["tie"] * 2
    ratings = [_rate(p, w) for p, w in zip(pairs, winners, strict=True)]
    assert {p.system_a for p in pairs} == {"base", "sft"}  # both orders occur: un-blinding matters
    sft = win_rate(ratings, "sft")
    assert (sft.wins, sft.losses, sft.ties) == (6, 2, 2)
    assert sft.rate == 0.75 and (sft.low, sft.high) == wilson_interval(6, 8)
    base = win_rate(ratings, "base")
    assert (base.wins, base.losses, base.ties, base.rate) == (2, 6, 2, 0.25)
    assert "6 wins, 2 losses, 2 ties; win rate 0.75" in str(sft)


def test_win_rate_refuses_what_it_cannot_count():
    pairs = blind_pairs(ITEMS[:3], "base", "sft")
    with pytest.raises(ValueError, match="rated twice"):
        win_rate([_rate(pairs[0], "sft"), _rate(pairs[0], "sft", rater="r2")], "sft")
    with pytest.raises(ValueError, match="not gpt2"):
        win_rate([_rate(pairs[0], "sft")], "gpt2")
    with pytest.raises(ValueError, match="no decisive comparison"):
        win_rate([_rate(p, "tie") for p in pairs], "sft")


# ------------------------------------------------------------------------------------- Cohen's kappa


def test_kappa_known_values():
    # Wikipedia's worked example: 50 proposals, 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> 0.4.
    r1 = ["yes"] * 25 + ["no"] * 25
    r2 = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(r1, r2) == pytest.approx(0.4)
    # Three labels by hand: p_o = 7/10; rater 1 uses sft/base/tie 4/3/3 times, rater 2 4/4/2, so
    # p_e = (4*4 + 3*4 + 3*2) / 100 = 0.34 and kappa = (0.7 - 0.34) / (1 - 0.34).
    a = ["sft", "sft", "sft", "sft", "base", "base", "base", "tie", "tie", "tie"]
    b = ["sft", "sft", "sft", "base", "base", "base", "sft", "tie", "tie", "base"]
    assert cohen_kappa(a, b) == pytest.approx(0.36 / 0.66)
    assert cohen_kappa(["x", "y"], ["y", "x"]) == pytest.approx(-1.0)  # perfect disagreement
    assert cohen_kappa(["x"] * 4, ["y"] * 4) == 0.0  # both constant, different labels: defined


def test_kappa_degenerate_and_bad_input():
    with pytest.raises(ValueError, match="undefined: both raters gave every item the label 'sft'"):
        cohen_kappa(["sft"] * 5, ["sft"] * 5)
    with pytest.raises(ValueError, match="3 and 2 items"):
        cohen_kappa(["a"] * 3, ["a"] * 2)
    with pytest.raises(ValueError, match="no items"):
        cohen_kappa([], [])


labels = st.lists(st.tuples(st.sampled_from("ABC"), st.sampled_from("ABC")), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(labels)
def test_kappa_invariants(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    if len(set(a) | set(b)) == 1:  # both constant with one label: undefined
        with pytest.raises(ValueError):
            cohen_kappa(a, b)
        return
    k = cohen_kappa(a, b)
    assert -1 - 1e-12 <= k <= 1 + 1e-12
    assert k == pytest.approx(cohen_kappa(b, a))  # symmetric
    if len(set(a)) > 1:
        assert cohen_kappa(a, a) == pytest.approx(1.0)
    renamed = {"A": "z", "B": "y", "C": "x"}
    assert k == pytest.approx(cohen_kappa([renamed[x] for x in a], [renamed[x] for x in b]))
    if all(x == y for x, y in zip(a, b, strict=True)):
        assert k == pytest.approx(1.0)


def test_paired_verdicts_unblind_before_comparing():
    """Two raters who saw an item in opposite orders and both chose SFT agree, though one said A, one B."""
    r1_pairs = blind_pairs(ITEMS[:12], "base", "sft", seed=1)
    r2_pairs = blind_pairs(ITEMS[:12], "base", "sft", seed=2)
    flipped = [p.system_a != q.system_a for p, q in zip(r1_pairs, r2_pairs, strict=True)]
    assert any(flipped)
    ratings = [_rate(p, "sft", "r1") for p in r1_pairs] + [_rate(p, "sft", "r2") for p in r2_pairs[:10]]
    one, two = paired_labels(ratings, "r1", "r2")
    assert one == two == ["sft"] * 10  # only the items both rated
    raw_1 = [r.verdict for r in ratings[:10]]
    raw_2 = [r.verdict for r in ratings[12:]]
    assert raw_1 != raw_2  # the blind letters differ where the order did


# ------------------------------------------------------------------------------------- blind order


def test_blind_pairs_are_seeded_per_item_and_balanced():
    pairs = blind_pairs(ITEMS, "base", "sft", seed=0)
    assert pairs == blind_pairs(ITEMS, "base", "sft", seed=0)
    assert pairs != blind_pairs(ITEMS, "base", "sft", seed=1)
    for pair, item in zip(pairs, ITEMS, strict=True):
        assert {pair.output_a, pair.output_b} == {item["base"], item["sft"]}
        assert pair.output_a == item[pair.system_a] and pair.output_b == item[pair.system_b]
    assert 10 <= sum(p.system_a == "sft" for p in pairs) <= 30
    # an item keeps its order when others are added or removed
    assert blind_pairs(ITEMS[5:9], "base", "sft", seed=0) == pairs[5:9]
    with pytest.raises(ValueError, match="appears twice"):
        blind_pairs(ITEMS[:2] * 2, "base", "sft")
    with pytest.raises(ValueError, match="must differ"):
        blind_pairs(ITEMS, "sft", "sft")


# --------------------------------------------------------------------------------------------- JSONL


def test_ratings_round_trip_and_append(tmp_path):
    pairs = blind_pairs(ITEMS[:4], "base", "sft")
    ratings = [_rate(p, w) for p, w in zip(pairs, ["sft", "base", "tie", "sft"], strict=True)]
    path = tmp_path / "sub" / "ratings.jsonl"
    save_ratings(path, ratings[:2])
    save_ratings(path, ratings[2:3], append=True)
    save_ratings(path, ratings[3:], append=True)
    assert load_ratings(path) == ratings
    save_ratings(path, ratings[:1])  # without append it starts over
    assert load_ratings(path) == ratings[:1]
    assert all(r.rubric_a == {"fluent": True} for r in ratings)


def test_match_ratings_refuses_ratings_of_other_outputs():
    pairs = blind_pairs(ITEMS[:3], "base", "sft")
    ratings = [_rate(p, "sft") for p in pairs]
    assert match_ratings(iter(ratings), pairs) == ratings
    # another rater's order of the same outputs matches: the fingerprint ignores the order shown
    other_order = blind_pairs(ITEMS[:3], "base", "sft", seed=5)
    assert any(p.system_a != q.system_a for p, q in zip(pairs, other_order, strict=True))
    assert match_ratings(ratings, other_order) == ratings
    changed = [{**item, "sft": item["sft"] + " (regenerated)"} for item in ITEMS[:3]]
    with pytest.raises(ValueError, match="item 'item-0' was made for other outputs"):
        match_ratings(ratings, blind_pairs(changed, "base", "sft"))
    swapped = [{**item, "sft": item["base"], "base": item["sft"]} for item in ITEMS[:3]]
    with pytest.raises(ValueError, match="other outputs"):  # same two texts, systems swapped
        match_ratings(ratings, blind_pairs(swapped, "base", "sft"))
    reprompted = [{**item, "prompt": "another prompt"} for item in ITEMS[:3]]
    with pytest.raises(ValueError, match="other prompt"):
        match_ratings(ratings, blind_pairs(reprompted, "base", "sft"))
    with pytest.raises(ValueError, match="no such item"):
        match_ratings(ratings, pairs[:2])


def test_rubric_passes_and_agreement_on_a_criterion():
    pairs = blind_pairs(ITEMS[:4], "base", "sft", seed=1)
    ratings = []
    for rater, facts in (("r1", [True, True, False, True]), ("r2", [True, False, False, True])):
        for pair, ok in zip(pairs, facts, strict=True):
            rubric = {"correct_facts": ok, "fluent": True}
            side = {"rubric_a": rubric} if pair.system_a == "sft" else {"rubric_b": rubric}
            ratings.append(Rating.of(pair, rater, "tie", **side))
    assert [r.passes("sft", "correct_facts") for r in ratings[:4]] == [True, True, False, True]
    assert not ratings[0].passes("base", "fluent")  # unticked counts as failed
    with pytest.raises(ValueError, match="unknown criterion"):
        ratings[0].passes("sft", "funny")
    with pytest.raises(ValueError, match="not gpt2"):
        ratings[0].passes("gpt2", "safe")
    one, two = paired_labels(ratings, "r1", "r2", label=lambda r: r.passes("sft", "correct_facts"))
    assert (one, two) == ([True, True, False, True], [True, False, False, True])
    got = agreement(one, two)
    assert got == Agreement(4, 0.75, cohen_kappa(one, two)) and got.kappa == pytest.approx(0.5)
    assert "raw agreement 0.75, Cohen's kappa 0.50" in str(got)
    constant = agreement(*paired_labels(ratings, "r1", "r2"))  # every verdict a tie: undefined
    assert constant == Agreement(4, 1.0, None) and "undefined" in str(constant)
    with pytest.raises(ValueError):
        agreement([], [])


def _good_row() -> dict:
    pair = blind_pairs(ITEMS[:1], "base", "sft")[0]
    return json.loads(json.dumps(_rate(pair, "sft").__dict__))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"verdict": "C"}, "field 'verdict': must be one of A, B, tie"),
        ({"rater": ""}, "field 'rater': must be a non-empty string"),
        ({"system_b": "base", "system_a": "base"}, "field 'system_b': must differ"),
        ({"rubric_a": {"funny": True}}, "field 'rubric_a': 'funny'"),
        ({"rubric_b": {"safe": "yes"}}, "field 'rubric_b': 'safe'"),
        ({"colour": "red"}, "field 'colour': not a rating field"),
        ({"prompt": None}, "field 'prompt'"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path, change, message):
    path = tmp_path / "ratings.jsonl"
    good = json.dumps(_good_row())
    bad = {**_good_row(), **change}
    path.write_text(f"{good}\n\n{json.dumps(bad)}\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_ratings(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)
    assert err.value.line == 3


def test_bad_json_and_missing_field_name_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_good_row()) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"r\.jsonl:2: invalid JSON"):
        load_ratings(path)
    row = _good_row()
    del row["verdict"]
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'verdict': missing"):
        load_ratings(path)
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON object"):
        load_ratings(path)


def test_rubric_is_the_four_criteria_of_the_issue():
    assert RUBRIC == ("correct_facts", "follows_instruction", "fluent", "safe")
    assert not math.isnan(wilson_interval(1, 1)[0])


# ------------------------------------------------------------------------ the exercise's check (04)

KAPPA_WRONG = [
    (
        "def cohen_kappa(labels_1, labels_2):  # raw agreement\n"
        "    return sum(a == b for a, b in zip(labels_1, labels_2)) / len(labels_1)",
        "you returned the raw agreement p_o",
    ),
    (
        "def cohen_kappa(labels_1, labels_2):  # Scott's pi\n"
        "    n = len(labels_1)\n"
        "    p_o = sum(a == b for a, b in zip(labels_1, labels_2)) / n\n"
        "    both = labels_1 + labels_2\n"
        "    p_e = sum((both.count(c) / (2 * n)) ** 2 for c in set(both))\n"
        "    if p_e == 1:\n"
        "        raise ValueError('undefined')\n"
        "    return (p_o - p_e) / (1 - p_e)",
        "that is Scott's pi",
    ),
    (
        "def cohen_kappa(labels_1, labels_2):  # no ValueError when p_e == 1\n"
        "    n = len(labels_1)\n"
        "    p_o = sum(a == b for a, b in zip(labels_1, labels_2)) / n\n"
        "    p_e = sum(labels_1.count(c) * labels_2.count(c) for c in set(labels_1)) / n**2\n"
        "    return (p_o - p_e) / (1 - p_e)",
        "should raise ValueError, but raised ZeroDivisionError",
    ),
]


@pytest.mark.parametrize("source,feedback", KAPPA_WRONG, ids=["raw", "scott", "undefined"])
def test_the_kappa_check_catches_wrong_versions(source, feedback, capsys):
    from lumorik_sft.course import checks

    ns: dict = {}
    exec(source, ns)
    assert not checks.run_check("cohen_kappa", ns["cohen_kappa"])
    assert feedback in capsys.readouterr().out


def test_the_kappa_check_passes_the_package_function_and_a_plain_one(capsys):
    from lumorik_sft.course import checks

    def plain(labels_1, labels_2):
        n = len(labels_1)
        p_o = sum(a == b for a, b in zip(labels_1, labels_2, strict=True)) / n
        p_e = sum(labels_1.count(c) * labels_2.count(c) for c in set(labels_1)) / n**2
        if p_e == 1:
            raise ValueError("undefined")
        return (p_o - p_e) / (1 - p_e)

    assert checks.run_check("cohen_kappa", plain)
    assert not checks.run_check("cohen_kappa", cohen_kappa)  # the reference is disabled while checked
    assert "calls lumorik_sft.human_eval.cohen_kappa, the package's reference" in capsys.readouterr().out
