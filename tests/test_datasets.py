"""Tests for lumorik_sft.course.synthetic: seeded synthetic course data and the noisy curation file."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from lumorik_sft.course.synthetic import (
    COURSE_DATASETS,
    NOISE_COUNTS,
    SYNTHETIC_NOTICE,
    case_summaries,
    distinct_products,
    health_qa,
    load_course_dataset,
    noisy_product_descriptions_jsonl,
    product_agreement_bleu,
    product_descriptions,
    render_product_prompt,
    sample_description,
    sample_product_attributes,
    write_noisy_product_descriptions,
    write_product_csv,
)
from lumorik_sft.data import DataError, clean_text, read_records, run_curation, split_records


@pytest.fixture(scope="module")
def products() -> list[dict]:
    return product_descriptions(1000, seed=0)


def _field(prompt: str, name: str) -> str:
    return re.search(rf"^{name}: (.*)$", prompt, re.M).group(1)


# -------------------------------------------------------------------------------------- products


def test_products_unique_seeded_and_clean(products: list[dict]) -> None:
    assert len(products) == 1000 and len({r["prompt"] for r in products}) == 1000
    assert product_descriptions(1000, seed=0) == products
    assert product_descriptions(50, seed=1) != products[:50]
    for r in products:  # already clean, so curation keeps every original as is
        assert clean_text(r["prompt"]) == r["prompt"] and clean_text(r["completion"]) == r["completion"]
        assert 25 <= len(r["completion"].split()) <= 90
    train, val = split_records(products, val_fraction=0.1, seed=0)
    assert (len(train), len(val)) == (900, 100)


def test_products_prompt_format_and_variety(products: list[dict]) -> None:
    first = products[0]["prompt"].split("\n")
    assert first[0] == "Write a product description."
    assert [line.split(":")[0] for line in first[1:]] == [
        "Category",
        "Material",
        "Colour",
        "Features",
        "Tone",
        "Length",
    ]
    categories = Counter(_field(r["prompt"], "Category") for r in products)
    tones = Counter(_field(r["prompt"], "Tone") for r in products)
    assert len(categories) >= 15 and len(tones) >= 4
    assert {_field(r["prompt"], "Length") for r in products} == {"short", "long"}
    assert {len(_field(r["prompt"], "Features").split(", ")) for r in products} == {1, 2, 3}


def _sentences(text: str) -> int:
    return len(re.findall(r"[.!](?= |$)", text))


def test_description_follows_from_attributes() -> None:
    rng = random.Random(3)
    attrs = sample_product_attributes(rng)
    while len(attrs["features"]) < 3:
        attrs = sample_product_attributes(rng)
    text = sample_description(attrs, rng)
    assert attrs["colour"] in text and attrs["material"] in text and attrs["category"] in text
    short = sample_description(attrs | {"length": "short"}, random.Random(0))
    long = sample_description(attrs | {"length": "long"}, random.Random(0))
    assert _sentences(long) == _sentences(short) + 2
    by_tone = {
        t: sample_description(attrs | {"tone": t}, random.Random(0))
        for t in ("friendly", "professional", "playful", "luxurious")
    }
    assert len({t.split()[0] for t in by_tone.values()}) == 4  # each tone opens differently
    one, other = ({**attrs, "features": [f], "tone": "professional"} for f in attrs["features"][:2])
    rng_one, rng_other = random.Random(0), random.Random(0)
    assert sample_description(one, rng_one) != sample_description(other, rng_other)
    assert _sentences(sample_description(attrs | {"features": attrs["features"][:1]}, rng)) == (
        _sentences(sample_description(attrs, rng)) - 2
    )
    assert "Features: " + ", ".join(attrs["features"]) in render_product_prompt(attrs)


def test_agreement_bleu_high_but_not_perfect() -> None:
    bleu = product_agreement_bleu(n=200, seed=0)
    assert 40 <= bleu < 100
    assert product_agreement_bleu(n=200, seed=0) == bleu


def test_product_csv_round_trip(tmp_path: Path, products: list[dict]) -> None:
    write_product_csv(tmp_path / "products.csv", products[:20])
    read = read_records(tmp_path / "products.csv")
    assert [{"prompt": r["prompt"], "completion": r["completion"]} for r in read.records] == products[:20]
    assert read.records[1]["line"] == 9  # header + one 7-line quoted prompt before it


# ----------------------------------------------------------------------------------- noisy file


def _whitespace_tokens(record: dict) -> int:
    return len((record["prompt"] + " " + record["completion"]).split())


def test_noisy_file_curates_to_the_originals(tmp_path: Path, products: list[dict]) -> None:
    text = noisy_product_descriptions_jsonl(seed=0)
    assert text == noisy_product_descriptions_jsonl(seed=0) and text.startswith("\ufeff")
    assert "\r\n" in text and "\u200b" in text and 1100 <= text.count("\n") <= 1200
    path = tmp_path / "raw.jsonl"
    write_noisy_product_descriptions(path, seed=0)
    report = run_curation(
        path, tmp_path / "out", skip_invalid=True, max_tokens=200, length_fn=_whitespace_tokens
    )
    assert report.rejected == 1 and report.rejected_reasons == {"invalid_json": 1}
    assert report.dropped == {
        "empty_prompt": NOISE_COUNTS["empty_prompt"],
        "empty_completion": NOISE_COUNTS["empty_completion"],
        "duplicate": NOISE_COUNTS["exact_duplicate"] + NOISE_COUNTS["variant_duplicate"],
        "too_long": NOISE_COUNTS["too_long"],
    }
    assert report.read == 1151 == report.kept + sum(report.dropped.values()) + report.rejected
    assert (report.kept, report.train, report.val) == (1000, 900, 100)
    kept = read_records(tmp_path / "out" / "train.jsonl").records
    kept += read_records(tmp_path / "out" / "val.jsonl").records
    assert sorted((r["prompt"], r["completion"]) for r in kept) == sorted(
        (r["prompt"], r["completion"]) for r in products
    )


def test_noisy_file_without_skip_invalid_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    write_noisy_product_descriptions(path, seed=1)
    with pytest.raises(DataError, match=r"raw\.jsonl:17: invalid JSON: Unterminated string"):
        run_curation(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- health and cases


def test_health_qa_safe_unique_and_seeded() -> None:
    records = health_qa(200, seed=0)
    assert len({r["prompt"] for r in records}) == 200
    assert health_qa(200, seed=0) == records and health_qa(200, seed=1) != records
    for r in records:
        assert r["completion"].endswith("This is general information, not medical advice.")
        assert not re.search(r"\d|\bmg\b|\bml\b|dose|dosage|tablet", r["completion"], re.I)
        topic = r["prompt"]  # the answer names the topic asked about
        assert any(
            t in topic and t in r["completion"]
            for t in (
                "cold",
                "burn",
                "allerg",
                "ankle",
                "dehydration",
                "sleeping",
                "heartburn",
                "headache",
                "fever",
            )
        )
    child = [r for r in records if "Asking about: a child" in r["prompt"]]
    assert child and all("For a child" in r["completion"] for r in child)
    with pytest.raises(ValueError, match="distinct questions"):
        health_qa(1000)


def test_case_summaries_follow_from_case() -> None:
    records = case_summaries(200, seed=0)
    assert len({r["prompt"] for r in records}) == 200
    assert case_summaries(200, seed=0) == records and case_summaries(200, seed=1) != records
    for r in records:
        case = r["prompt"].split("Case: ", 1)[1]
        plaintiff = case.split(" brought a claim against ")[0]
        assert r["completion"].startswith(plaintiff + " sued ")
        assert len(case.split(". ")) >= 3 and len(r["completion"].split()) < len(case.split())
        if "settled" in case:
            assert "settled" in r["completion"]


def test_registry_and_notice() -> None:
    assert set(COURSE_DATASETS) == {"products", "health", "cases", "support"}
    assert len(load_course_dataset("products")) == 1000
    assert load_course_dataset("health", n=5, seed=2) == health_qa(5, seed=2)
    assert "SYNTHETIC" in SYNTHETIC_NOTICE and "not medical advice" in SYNTHETIC_NOTICE
    with pytest.raises(ValueError, match="unknown course dataset"):
        load_course_dataset("nope")


def test_asking_for_more_records_than_exist_fails_at_once() -> None:
    from lumorik_sft.course.synthetic.products import _CATEGORIES, _COLOURS, LENGTHS, TONES

    every_prompt = {
        render_product_prompt(
            {
                "category": cat,
                "material": mat,
                "colour": col,
                "features": list(feats),
                "tone": tone,
                "length": length,
            }
        )
        for cat, (_, materials, features) in _CATEGORIES.items()
        for mat, col, tone, length in itertools.product(materials, _COLOURS, TONES, LENGTHS)
        for k in (1, 2, 3)
        for feats in itertools.combinations(sorted(features), k)
    }
    assert distinct_products() == len(every_prompt)
    with pytest.raises(ValueError, match=f"product_descriptions has {len(every_prompt):,} distinct"):
        product_descriptions(len(every_prompt) + 1)
    cases = case_summaries(8 * 8 * 6 * 2 * 6 * 4)  # every case there is, each once
    assert len({c["prompt"] for c in cases}) == len(cases) == 18_432
    with pytest.raises(ValueError, match="case_summaries has 18,432 distinct records; asked for"):
        case_summaries(18_433)
