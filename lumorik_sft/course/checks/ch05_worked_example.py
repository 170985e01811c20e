"""Exercises of ``05_worked_example.ipynb``: ``sequence_nll``, ``ANSWER_WORKED_LOSS`` and ``build_batches``.

Each exercise's functions (cases, reference, run, compare) come first, then
``CHAPTER.register(...)`` declares it; see :mod:`lumorik_sft.course.checks.framework`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from lumorik_sft.course.checks.framework import (
    Chapter,
    close,
    messy,
    not_a_number,
    one_case,
    raised,
    run_answer,
    sentence,
    short,
    to_data,
    toy_tokenizer,
)

CHAPTER = Chapter("05_worked_example.ipynb")


# ------------------------------------------------------------------------------------ sequence NLL


def _seq_cases(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"seq/{seed}")
    cases = [
        {"probs": [round(rng.uniform(0.01, 1.0), 4) for _ in range(rng.randint(1, 8))]} for _ in range(5)
    ]
    cases.append({"probs": [0.5, 0.0, 0.25]})  # p = 0: infinite NLL, must raise ValueError
    return cases


def _seq_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.metrics import sequence_nll

    try:
        return sequence_nll(case["probs"])
    except ValueError as err:
        return raised(err)


def _run_seq(fn: Callable, case: dict[str, Any]) -> Any:
    return float(fn(list(case["probs"])))


def _seq_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if close(got, expected, rel=1e-9, abs_=1e-12):
        return None
    probs = case["probs"]
    if close(got, expected / len(probs), rel=1e-9):
        return "return the SUM of -ln p over the tokens (the chapter's loss L), not the mean"
    if close(got, -sum(math.log10(p) for p in probs), rel=1e-9):
        return "use the natural log (math.log), not log10: NLL and perplexity are in nats"
    if abs(got - expected) < 0.01 * len(probs):
        return (
            f"got {got!r}, expected {expected!r}: do not round the terms before adding them "
            "(the chapter's 4.01 comes from that)"
        )
    return f"got {got:.6f}, expected {expected:.6f}: L = -sum(ln p_t)"


CHAPTER.register(
    name="sequence_nll",
    symbol="sequence_nll",
    points=1,
    make_cases=_seq_cases,
    reference=_seq_reference,
    run=_run_seq,
    compare=_seq_compare,
    forbidden=("lumorik_sft.metrics:sequence_nll", "lumorik_sft.metrics:token_nll"),
    hint="sum of -math.log(p); a probability of 0 must raise ValueError",
    wrong_variants=("mean instead of sum", "log10", "rounded terms"),
)


# --------------------------------------------------------------------------------- the worked loss


def _worked_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.metrics import sequence_nll

    return round(sequence_nll([0.1, 0.6, 0.3]), 3)


def _worked_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if (problem := not_a_number("ANSWER_WORKED_LOSS", got)) is not None:
        return problem
    if close(got, expected, abs_=0.0015):
        return None
    if close(got, 4.01, abs_=1e-9):
        return "4.01 is the chapter's figure, from rounding each term first; add the unrounded terms"
    return f"{got} is not -ln(0.1) - ln(0.6) - ln(0.3) to 3 decimals"


CHAPTER.register(
    name="worked_loss",
    symbol="ANSWER_WORKED_LOSS",
    points=1,
    make_cases=one_case,
    reference=_worked_reference,
    run=run_answer,
    compare=_worked_compare,
    kind="answer",
    wrong_variants=("4.01",),
)


# ----------------------------------------------------------------------------------- build batches


def _batches_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(3):
        rng = random.Random(f"batches/{seed}/{k}")
        records = [
            {"prompt": sentence(rng, 3, 6).capitalize() + "?", "completion": sentence(rng, 2, 6) + "."}
            for _ in range(rng.randint(4, 6))
        ]
        records.append({"prompt": messy(records[0]["prompt"], rng), "completion": records[0]["completion"]})
        records.append({"prompt": records[1]["prompt"], "completion": "  "})
        rng.shuffle(records)
        cases.append(
            {"records": records, "tokenizer": "toy", "batch_size": rng.choice([2, 3]), "max_length": 64}
        )
    return cases


def _batches_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.data import curate
    from lumorik_sft.encoding import SFTCollator, encode_example

    tok = toy_tokenizer()
    examples = [
        encode_example(tok, r["prompt"], r["completion"], max_length=case["max_length"])
        for r in curate(case["records"]).kept
    ]
    examples = [e for e in examples if e is not None]
    collate = SFTCollator(tok.pad_token_id)
    size = case["batch_size"]
    return [to_data(collate(examples[i : i + size])) for i in range(0, len(examples), size)]


def _run_batches(fn: Callable, case: dict[str, Any]) -> Any:
    out = fn(case["records"], toy_tokenizer(), batch_size=case["batch_size"], max_length=case["max_length"])
    return to_data(list(out))


def _batches_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if not isinstance(got, list):
        return f"return a list of batches, got {short(got)}"
    n_want = sum(len(b["input_ids"]) for b in expected)
    n_got = sum(len(b.get("input_ids", [])) for b in got if isinstance(b, dict))
    if n_got != n_want:
        return (
            f"{n_got} examples in your batches, expected {n_want}: curate first (clean, drop empty and "
            "duplicate records) with data.curate"
        )
    if len(got) != len(expected):
        return f"{len(got)} batches, expected {len(expected)} of batch_size={case['batch_size']}, in order"
    for b, (have, want) in enumerate(zip(got, expected, strict=True)):
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in have:
                return f"batch {b} has no {key!r}"
            if have[key] == want[key]:
                continue
            if len(have[key][0]) != len(want[key][0]):
                return (
                    f"batch {b} is {len(have[key][0])} columns wide, expected {len(want[key][0])}: pad to "
                    "the longest row of each batch (SFTCollator), not to max_length"
                )
            if key == "labels" and have["labels"] == have["input_ids"]:
                return (
                    "labels equal input_ids: that is the chapter's erratum; prompt and padding must be "
                    "-100 (use encoding.encode_example and SFTCollator)"
                )
            return f"batch {b} {key} differs from the reference: {short(have[key])} vs {short(want[key])}"
    return None


CHAPTER.register(
    name="build_batches",
    symbol="build_batches",
    points=2,
    make_cases=_batches_cases,
    reference=_batches_reference,
    run=_run_batches,
    compare=_batches_compare,
    hint="data.curate -> encoding.encode_example per record -> SFTCollator per chunk of batch_size",
    wrong_variants=("no curation", "labels = input_ids", "pad to max_length"),
)
