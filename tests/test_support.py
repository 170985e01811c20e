"""The customer-service data and its fact check: order number, product and the policy's remedy."""

from __future__ import annotations

import pytest

from lumorik_sft.course.synthetic import COURSE_DATASETS, load_course_dataset, support_replies
from lumorik_sft.course.synthetic.support import _MESSAGES, _PRODUCTS, support_record
from lumorik_sft.fidelity import SUPPORT_REMEDIES, detect_task, fact_fidelity, fact_sheets, prompt_fields


def _fields(record: dict[str, str]) -> dict[str, str]:
    return prompt_fields(record["prompt"])


def test_support_replies_are_seeded_distinct_and_registered() -> None:
    records = support_replies(300, seed=0)
    assert support_replies(300, seed=0) == records and support_replies(300, seed=1) != records
    assert len({_fields(r)["order"] for r in records}) == 300  # an order number is never reused
    assert COURSE_DATASETS["support"] is support_replies
    assert load_course_dataset("support", n=5, seed=2) == support_replies(5, seed=2)
    assert {_fields(r)["issue"] for r in records} == set(SUPPORT_REMEDIES) == set(_MESSAGES)
    with pytest.raises(ValueError, match="support_replies has 90,000 distinct records"):
        support_replies(90_001)


def test_each_reply_follows_the_policy_and_names_order_and_product() -> None:
    for r in support_replies(300, seed=3):
        f = _fields(r)
        assert detect_task(r["prompt"]) == "support"
        assert f["product"] in _PRODUCTS and f["product"] in f["message"]
        assert f"order {f['order']}" in r["completion"] and f["product"] in r["completion"]
        assert SUPPORT_REMEDIES[f["issue"]] in r["completion"]
        others = set(SUPPORT_REMEDIES.values()) - {SUPPORT_REMEDIES[f["issue"]]}
        assert not any(remedy in r["completion"] for remedy in others), r["completion"]


def test_the_reference_scores_full_and_a_wrong_remedy_or_order_does_not() -> None:
    records = support_replies(60, seed=0)
    prompts, refs = [r["prompt"] for r in records], [r["completion"] for r in records]
    assert fact_fidelity(prompts, refs, refs).summary() == {
        "fidelity": 1.0,
        "all_facts_right": 1.0,
        "foreign_per_output": 0.0,
        "parties_right": None,
        "dosing_flagged": 0,
        "unchecked_facts": 0,
    }
    # the same reply for another issue: fluent, near-identical words, the wrong remedy
    damaged = support_record("12345", "desk lamp", "damaged on arrival", "It arrived broken.")
    refund = support_record("12345", "desk lamp", "changed mind", "I changed my mind.")
    report = fact_fidelity(
        [damaged["prompt"]], [refund["completion"]], vocabulary_from=[r["prompt"] for r in records]
    )
    detail = report.per_output[0]
    assert detail.missing == ("remedy",) and detail.foreign == ("remedy:full refund",)
    # another customer's order number is foreign, the right one missing
    other = _fields(records[1])["order"]
    wrong_order = refs[0].replace(_fields(records[0])["order"], other)
    detail = fact_fidelity(prompts, [wrong_order, *refs[1:]], refs).per_output[0]
    assert detail.missing == ("order",) and detail.foreign == (f"order:{other}",)


def test_a_prompt_without_the_fields_is_refused() -> None:
    with pytest.raises(ValueError, match="not a course support prompt"):
        fact_sheets(["Reply to the customer message.\nMessage: where is my parcel?"])
    with pytest.raises(ValueError, match="not a course support prompt"):
        fact_sheets(["Reply to the customer message.\nOrder: 1\nProduct: kettle\nIssue: bored"])


def test_plot_before_after_labels_every_bar_and_covers_nothing() -> None:
    from lumorik_sft.course.plots import figure_problems, plot_before_after
    from lumorik_sft.pipeline import EvalReport

    def report(loss: float, fidelity: float) -> EvalReport:
        return EvalReport(loss=loss, perplexity=1.0, n_tokens=1, fidelity={"fidelity": fidelity})

    results = {
        "health": (report(5.6, 0.0), report(0.02, 0.9)),
        "support": (report(6.0, 0.1), report(0.003, 0.8)),
    }
    fig = plot_before_after(
        results,
        [
            ("loss", lambda r: r.loss, "NLL"),
            ("fact fidelity", lambda r: r.fidelity["fidelity"], "share named"),
        ],
    )
    assert figure_problems(fig) == []
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["health", "support"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["5.6", "6", "0.02", "0.003"])  # tiny bars read
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["before SFT", "after SFT"]
    assert ax.get_ylabel() == "NLL" and fig.axes[1].get_title() == "fact fidelity"
