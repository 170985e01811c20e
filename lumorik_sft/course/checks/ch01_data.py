"""Exercises of ``01_data_curation.ipynb``: ``clean_and_dedupe`` and ``leak_free_split``.

Each exercise's functions (cases, reference, run, compare) come first, then
``CHAPTER.register(...)`` declares it; see :mod:`lumorik_sft.course.checks.framework`.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

from lumorik_sft.course.checks.framework import Chapter, messy, sentence, short, text_difference, to_data

CHAPTER = Chapter("01_data_curation.ipynb")


def _records_of(got: Any, what: str = "the result") -> list[tuple[str, str]]:
    if not isinstance(got, list):
        raise TypeError(f"{what} must be a list of records, got {type(got).__name__}")
    out = []
    for i, r in enumerate(got):
        if not isinstance(r, dict) or "prompt" not in r or "completion" not in r:
            raise TypeError(f"{what}[{i}] must be a dict with 'prompt' and 'completion', got {short(r)}")
        out.append((r["prompt"], r["completion"]))
    return out


# -------------------------------------------------------------------------------- clean and dedupe


def _dedupe_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(6):
        rng = random.Random(f"dedupe/{seed}/{k}")
        pairs = [
            (sentence(rng).capitalize() + "?", sentence(rng, 3, 8) + ".") for _ in range(rng.randint(4, 7))
        ]
        records = [{"prompt": p, "completion": c} for p, c in pairs]
        for _ in range(rng.randint(2, 5)):
            p, c = rng.choice(pairs)
            kind = rng.randrange(5)
            if kind == 0:
                records.append({"prompt": p, "completion": c})  # exact copy
            elif kind == 1:
                records.append({"prompt": messy(p, rng), "completion": messy(c, rng)})
            elif kind == 2:
                records.append({"prompt": p, "completion": sentence(rng, 3, 8) + "!"})  # same prompt
            elif kind == 3:
                records.append({"prompt": messy(p, rng), "completion": " \n "})  # empty answer
            else:
                records.append({"prompt": "\u200b ", "completion": c})  # empty prompt
        # at least one invisible-difference duplicate in every case
        p, c = rng.choice(pairs)
        records.append({"prompt": messy(p, rng), "completion": c})
        rng.shuffle(records)
        cases.append({"records": records})
    return cases


def _dedupe_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.data import curate

    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in curate(case["records"]).kept]


def _run_dedupe(fn: Callable, case: dict[str, Any]) -> Any:
    return to_data(fn(case["records"]))


def _dedupe_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    from lumorik_sft.data import clean_text

    want = [(r["prompt"], r["completion"]) for r in expected]
    have = _records_of(got)
    if have == want:
        return None
    for i, (p, c) in enumerate(have):
        for name, value in (("prompt", p), ("completion", c)):
            if clean_text(value) != value:
                return (
                    f"record {i} is not cleaned: {name} {value!r} should be {clean_text(value)!r}; "
                    f"{text_difference(value, clean_text(value))} (clean both fields with data.clean_text)"
                )
        if not p or not c:
            return f"record {i} has an empty {'prompt' if not p else 'completion'} after cleaning: drop it"
    seen: dict[tuple[str, str], int] = {}
    for i, pair in enumerate(have):
        if pair in seen:
            return (
                f"records {seen[pair]} and {i} are the same after cleaning ({short(pair[0], 40)}): "
                "keep only the first"
            )
        seen[pair] = i
    missing = [pair for pair in want if pair not in set(have)]
    if missing:
        return (
            f"{len(missing)} record(s) dropped that should be kept, e.g. {short(missing[0], 70)}: "
            "a duplicate must match in BOTH prompt and completion after cleaning"
        )
    return f"right records, wrong order: keep the input order (first occurrence); got {len(have)} records"


CHAPTER.register(
    name="clean_and_dedupe",
    symbol="clean_and_dedupe",
    points=2,
    make_cases=_dedupe_cases,
    reference=_dedupe_reference,
    run=_run_dedupe,
    compare=_dedupe_compare,
    forbidden=("lumorik_sft.data:curate",),
    hint="clean both fields with data.clean_text, drop empties, then keep the first of each "
    "(prompt, completion) pair",
    wrong_variants=("dedupe before cleaning", "dedupe on the prompt only", "keep empty records"),
)


# --------------------------------------------------------------------------------- leak-free split


def _split_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(6):
        rng = random.Random(f"split/{seed}/{k}")
        prompts = [sentence(rng, 3, 6).capitalize() + "?" for _ in range(rng.randint(10, 18))]
        prompts = list(dict.fromkeys(prompts))
        records = []
        for p in prompts:
            for _ in range(rng.choice([1, 1, 2, 3])):
                shown = messy(p, rng) if rng.random() < 0.35 else p
                records.append({"prompt": shown, "completion": sentence(rng, 3, 7) + "."})
        rng.shuffle(records)
        cases.append(
            {"records": records, "val_fraction": rng.choice([0.2, 0.25, 0.3]), "seed": rng.randrange(1000)}
        )
    return cases


# Seeds tried besides the case's own. A correct split may give the same val for one other seed by
# chance (about 1 in 60 cases here); one that ignores its seed gives it for all four.
OTHER_SEEDS = (1, 2, 3, 4)


def _split_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.data import clean_text, split_records

    train, val = split_records(case["records"], val_fraction=case["val_fraction"], seed=case["seed"])
    other_vals = [
        split_records(case["records"], val_fraction=case["val_fraction"], seed=case["seed"] + k)[1]
        for k in OTHER_SEEDS
    ]
    groups: dict[str, int] = {}
    for r in case["records"]:
        key = clean_text(r["prompt"])
        groups[key] = groups.get(key, 0) + 1
    return {
        "n_train": len(train),
        "n_val": len(val),
        "target": round(len(case["records"]) * case["val_fraction"]),
        "largest_group": max(groups.values()),
        # then a split that ignores its seed is caught
        "seed_matters": any(other != val for other in other_vals),
    }


def _run_split(fn: Callable, case: dict[str, Any]) -> Any:
    kwargs = {"val_fraction": case["val_fraction"], "seed": case["seed"]}
    first = to_data(fn(copy.deepcopy(case["records"]), **kwargs))
    again = to_data(fn(copy.deepcopy(case["records"]), **kwargs))
    others = [
        to_data(fn(copy.deepcopy(case["records"]), **{**kwargs, "seed": case["seed"] + k}))
        for k in OTHER_SEEDS
    ]
    return {"first": first, "again": again, "others": others}


def _split_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    from collections import Counter

    from lumorik_sft.data import clean_text

    first = got["first"]
    if not isinstance(first, list) or len(first) != 2:
        return f"return a pair (train, val), got {short(first)}"
    train, val = _records_of(first[0], "train"), _records_of(first[1], "val")
    records = [(r["prompt"], r["completion"]) for r in case["records"]]
    if Counter(train) + Counter(val) != Counter(records):
        lost = sum((Counter(records) - Counter(train) - Counter(val)).values())
        extra = sum((Counter(train) + Counter(val) - Counter(records)).values())
        return (
            f"train + val must hold every input record exactly once (unchanged): {lost} missing, "
            f"{extra} extra or modified"
        )
    val_prompts = {clean_text(p): p for p, _ in val}
    for p, _ in train:
        if clean_text(p) in val_prompts:
            return (
                f"prompt {short(clean_text(p), 50)} is in both train and val: group records by "
                "their CLEANED prompt and put each group on one side"
            )
    tolerance = max(1, expected["largest_group"])
    if abs(len(val) - expected["target"]) > tolerance:
        return (
            f"val has {len(val)} records; expected about {expected['target']} "
            f"(round({len(records)} * {case['val_fraction']})), give or take {tolerance}"
        )
    if got["again"] != first:
        return "two calls with the same seed gave different splits: shuffle with random.Random(seed)"
    if expected["seed_matters"] and all(other == first for other in got["others"]):
        return (
            "another seed gave the same split: shuffle the groups with random.Random(seed), "
            "so that the seed chooses which groups go to val"
        )
    return None


CHAPTER.register(
    name="leak_free_split",
    symbol="leak_free_split",
    points=2,
    make_cases=_split_cases,
    reference=_split_reference,
    run=_run_split,
    compare=_split_compare,
    forbidden=("lumorik_sft.data:split_records",),
    hint="group by clean_text(prompt), shuffle the groups with random.Random(seed), fill val group by group",
    wrong_variants=("shuffle records and slice", "group by the raw, uncleaned prompt"),
)
