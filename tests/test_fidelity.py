"""Fact fidelity, chrF, stop rate and distinct-n: constructed outputs whose facts we know."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st

from lumorik_sft import fidelity, metrics
from lumorik_sft.course import experiments, synthetic

PRODUCTS = synthetic.product_descriptions(1000, seed=0)
PRODUCT_PROMPTS = [r["prompt"] for r in PRODUCTS]
CASES = synthetic.case_summaries(200, seed=0)
HEALTH = synthetic.health_qa(360, seed=0)


def _check(records, predictions, **kw):
    prompts = [r["prompt"] for r in records]
    return metrics.fact_fidelity(prompts, predictions, [r["completion"] for r in records], **kw)


# ------------------------------------------------------------------------ references are right


@pytest.mark.parametrize(
    ("records", "kw"),
    [(PRODUCTS, {"aliases": synthetic.FEATURE_ALIASES}), (CASES, {}), (HEALTH, {})],
    ids=["products", "cases", "health"],
)
def test_every_reference_states_all_its_facts_and_no_foreign_one(records, kw):
    report = _check(records, [r["completion"] for r in records], **kw)
    assert report.score == 1.0 and report.all_correct == 1.0 and report.foreign_per_output == 0.0
    assert report.unchecked == 0  # with the aliases, every product feature is checked
    assert report.dosing_flagged == 0


def test_without_aliases_paraphrased_features_are_unchecked_not_failed():
    report = _check(PRODUCTS, [r["completion"] for r in PRODUCTS])
    sheets = fidelity.fact_sheets(PRODUCT_PROMPTS, [r["completion"] for r in PRODUCTS])
    assert report.score == 1.0 and report.unchecked > 0
    assert {name for s in sheets for name in s.unchecked} <= {
        f"feature:{n}" for n in synthetic.FEATURE_ALIASES
    }


# ------------------------------------------------- the constructed candidates, many seeds


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_swapped_facts_fool_bleu_but_not_fidelity_and_a_paraphrase_the_reverse(seed):
    case = experiments.metric_pitfall_candidates(seed=seed)
    ref, cands = case["reference"], case["candidates"]

    def fid(text):
        return fidelity.fact_fidelity(
            [case["prompt"]],
            [text],
            [ref],
            aliases=synthetic.FEATURE_ALIASES,
            vocabulary_from=PRODUCT_PROMPTS,
        )

    wrong, para = fid(cands["wrong facts"]), fid(cands["paraphrase"])
    assert (
        metrics.corpus_bleu([cands["wrong facts"]], [ref])
        > 50
        > metrics.corpus_bleu([cands["paraphrase"]], [ref])
    )
    assert wrong.per_output[0].missing == ("material", "colour")
    assert {n.split(":")[0] for n in wrong.per_output[0].foreign} == {"material", "colour"}
    assert para.score == 1.0 and para.foreign_per_output == 0
    assert wrong.score < para.score


def test_product_colour_swap_names_the_foreign_colour():
    prompt, ref = PRODUCTS[0]["prompt"], PRODUCTS[0]["completion"]
    colour = fidelity.prompt_fields(prompt)["colour"]
    other = "sky blue" if colour != "sky blue" else "black"
    out = fidelity.fact_fidelity(
        [prompt],
        [ref.replace(colour, other)],
        aliases=synthetic.FEATURE_ALIASES,
        vocabulary_from=PRODUCT_PROMPTS,
    )
    assert out.per_output[0].missing == ("colour",) and out.per_output[0].foreign == (f"colour:{other}",)


def test_longest_phrase_wins_whether_own_or_foreign():
    # "vegan leather" is this wallet's material; "leather" alone is another product's material
    prompt = "Write a product description.\nCategory: wallet\nMaterial: vegan leather\nColour: black"
    vocab = [prompt.replace("vegan leather", "leather")]
    ok = fidelity.fact_fidelity([prompt], ["A black wallet in vegan leather."], vocabulary_from=vocab)
    bad = fidelity.fact_fidelity([prompt], ["A black wallet in leather."], vocabulary_from=vocab)
    assert ok.score == 1.0 and ok.foreign_per_output == 0
    assert bad.per_output[0].missing == ("material",) and bad.per_output[0].foreign == ("material:leather",)
    steel = prompt.replace("vegan leather", "steel")
    enamelled = fidelity.fact_fidelity(
        [steel],
        ["A black enamelled steel wallet."],
        vocabulary_from=[prompt, steel.replace("steel", "enamelled steel")],
    )
    assert enamelled.per_output[0].missing == ("material",)
    assert enamelled.per_output[0].foreign == ("material:enamelled steel",)


def test_matching_ignores_case_hyphens_and_accents_stay():
    text = fidelity.normalize("An EXTRA-long, Café au lait scarf!")
    assert fidelity._find(text, "extra long") and fidelity._find(text, "café au lait")
    assert not fidelity._find(text, "cafe au lait") and not fidelity._find(text, "long scarf")


# -------------------------------------------------------------------------------------- cases


def test_case_summary_with_parties_swapped_fails_the_role_check():
    record = CASES[0]
    values = fidelity._case_values(record["prompt"])
    p, d = values["plaintiff"], values["defendant"]
    swapped = record["completion"].replace(p, "\0").replace(d, p).replace("\0", d)
    report = _check([record], [swapped])
    assert report.score == 1.0  # every fact is named...
    assert report.parties_right == 0.0  # ...but the defendant now sues the plaintiff
    assert _check([record], [record["completion"]]).parties_right == 1.0


def test_case_outcome_changed_is_missing_and_foreign():
    settled = next(r for r in CASES if "settled" in r["completion"])
    changed = re.sub(r"the parties settled[^.;]*", "the court dismissed the claim", settled["completion"])
    assert changed != settled["completion"]
    out = _check(CASES, [changed if r is settled else r["completion"] for r in CASES])
    i = CASES.index(settled)
    assert out.per_output[i].missing == ("outcome",)
    assert out.per_output[i].foreign == ("outcome:defendant won",)
    assert out.named_share("outcome") == pytest.approx(1 - 1 / len(CASES))


def test_case_prompt_without_the_course_structure_is_refused():
    with pytest.raises(ValueError, match="brought a claim against"):
        fidelity.fact_fidelity(["Summarize the case in one or two sentences.\nCase: nothing"], ["x"])


# ------------------------------------------------------------------------------------- health


def test_health_answer_about_another_topic_misses_the_key_facts():
    cold = next(r for r in HEALTH if "common cold" in r["prompt"] and "symptoms" in r["prompt"])
    burn = next(r for r in HEALTH if "minor burn" in r["prompt"] and "symptoms" in r["prompt"])
    assert _check([cold], [burn["completion"]]).score < 0.5
    reworded = "You may notice sneezing, a blocked or runny nose, a sore throat and a slight mild cough."
    assert _check([cold], [reworded]).score == 1.0  # word order and wording free, the facts count


@pytest.mark.parametrize(
    ("text", "dosing"),
    [
        ("Take 500 mg of paracetamol.", True),
        ("Take two tablets twice a day.", True),
        ("Use 5 ml every 4-6 hours.", True),
        ("Rest and drink plenty of fluids.", False),
        ("Symptoms improve within a week to ten days.", False),
    ],
)
def test_dosing_advice_is_flagged(text, dosing):
    record = HEALTH[0]
    assert _check([record], [text]).dosing_flagged == int(dosing)


# ------------------------------------------------------------------------------------- errors


def test_bad_calls_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown fidelity task"):
        fidelity.fact_fidelity(["Tell me a joke."], ["no"])
    with pytest.raises(ValueError, match="one per prompt"):
        fidelity.fact_fidelity(PRODUCT_PROMPTS[:2], ["one"])
    with pytest.raises(ValueError, match="needs the reference"):
        fidelity.fact_fidelity([HEALTH[0]["prompt"]], ["x"])
    with pytest.raises(ValueError, match="no prompts"):
        fidelity.fact_fidelity([], [])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 999), st.text(max_size=80))
def test_fidelity_is_a_share_and_extra_text_never_removes_a_named_fact(i, extra):
    prompt, ref = PRODUCT_PROMPTS[i], PRODUCTS[i]["completion"]
    base = fidelity.fact_fidelity([prompt], [ref], aliases=synthetic.FEATURE_ALIASES)
    more = fidelity.fact_fidelity([prompt], [ref + " " + extra], aliases=synthetic.FEATURE_ALIASES)
    assert 0.0 <= more.score <= 1.0
    assert set(base.per_output[0].named) <= set(more.per_output[0].named)


# ------------------------------------------------------------------ chrF, stop rate, distinct-n


def test_chrf_is_sacrebleus_and_kinder_than_bleu_to_word_forms():
    hyp, ref = ["The bags have two zipped pockets."], ["The bag has two zipped pockets."]
    assert metrics.chrf(hyp, ref) == pytest.approx(sacrebleu.CHRF().corpus_score(hyp, [ref]).score)
    assert metrics.chrf(ref, ref) == 100.0
    assert metrics.chrf(hyp, ref) > metrics.corpus_bleu(hyp, ref)
    with pytest.raises(ValueError, match="same length"):
        metrics.chrf(hyp, ref * 2)


def test_stop_rate():
    assert metrics.stop_rate([True, False, True, True]) == 0.75
    with pytest.raises(ValueError, match="undefined"):
        metrics.stop_rate([])


def _distinct_reference(texts, n):
    grams = Counter()
    for t in texts:
        w = t.lower().split()
        grams.update(zip(*(w[k:] for k in range(n)), strict=False))
    return len(grams) / sum(grams.values())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from(["a", "b", "c", "d", "soft", "navy"]), min_size=3, max_size=12), min_size=1
    ),
    st.integers(1, 3),
)
def test_distinct_n_matches_a_counter_and_falls_with_repetition(word_lists, n):
    texts = [" ".join(w) for w in word_lists]
    assert metrics.distinct_n(texts, n) == pytest.approx(_distinct_reference(texts, n))
    assert metrics.distinct_n(texts * 2, n) == pytest.approx(metrics.distinct_n(texts, n) / 2)


def test_distinct_n_known_values_and_errors():
    assert metrics.distinct_n(["soft soft soft soft"], 1) == 0.25
    assert metrics.distinct_n(["a b c", "a b d"], 2) == 0.75
    with pytest.raises(ValueError, match="no 2-gram"):
        metrics.distinct_n(["one", ""], 2)


def test_random_words_never_fool_fidelity():
    rng = random.Random(0)
    words = " ".join(rng.choice(["soft", "bag", "the", "lovely"]) for _ in range(30))
    report = fidelity.fact_fidelity(PRODUCT_PROMPTS[:50], [words] * 50)
    assert report.score == 0.0
