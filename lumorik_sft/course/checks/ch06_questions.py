"""Exercises of ``06_practice_questions.ipynb``: the answers ``ANSWER_Q1`` to ``ANSWER_Q5``.

Each question's functions (cases, reference, compare) come first, then ``CHAPTER.register(...)``
declares it; see :mod:`lumorik_sft.course.checks.framework`. Answers are values, not functions
(``kind="answer"``), so every question runs with :func:`~lumorik_sft.course.checks.framework.run_answer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lumorik_sft.course.checks.framework import Chapter, close, not_a_number, one_case, run_answer, short

CHAPTER = Chapter("06_practice_questions.ipynb")


def _fixed(value: Any) -> Callable[[dict[str, Any]], Any]:
    """A reference that is a constant (the right letter), or None where ``compare`` holds the rubric."""
    return lambda case: value


def _choice_compare(symbol: str, correct: str, why: dict[str, str]) -> Callable:
    """``compare`` of a multiple-choice question: one letter, 'a' to 'd'; `why` explains wrong ones."""

    def compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
        if got is None:
            return f"set {symbol} to one of 'a', 'b', 'c', 'd'"
        if not isinstance(got, str) or got.strip().lower() not in ("a", "b", "c", "d"):
            return f"{symbol} must be one letter, 'a' to 'd'; got {short(got)}"
        answer = got.strip().lower()
        if answer == correct:
            return None
        return f"not {answer!r}: {why.get(answer, 'read the options again')}"

    return compare


# --------------------------------------------------------------- Q1: the role of the learning rate

CHAPTER.register(
    name="q1",
    symbol="ANSWER_Q1",
    points=1,
    make_cases=one_case,
    reference=_fixed("b"),
    run=run_answer,
    compare=_choice_compare(
        "ANSWER_Q1",
        "b",
        {
            "a": "that is the batch size",
            "c": "the learning rate does not change the loss function, "
            "only the step taken along its gradient",
            "d": "a larger learning rate is not always faster: too large diverges or oscillates",
        },
    ),
    kind="answer",
    wrong_variants=("a", "c", "d"),
)


# -------------------------------------------------------------- Q2: why a validation split matters

Q2_RUBRIC = (
    ("overfitting", ("overfit", "over-fit", "memoris", "memoriz")),
    (
        "unseen data",
        ("unseen", "held-out", "held out", "new data", "generalis", "generaliz", "not trained on"),
    ),
    (
        "decisions",
        ("hyperparameter", "early stop", "checkpoint", "model selection", "tune", "tuning", "choose"),
    ),
)


def _q2_cases(seed: int) -> list[dict[str, Any]]:
    return [{"group": i} for i in range(len(Q2_RUBRIC))]


def _q2_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if not isinstance(got, str) or not got.strip():
        return "write ANSWER_Q2 as a sentence or two (a string)"
    n_words = len(got.split())
    if not 8 <= n_words <= 150:
        return f"answer in 8 to 150 words, in sentences (got {n_words} words)"
    topic, keywords = Q2_RUBRIC[case["group"]]
    text = got.lower()
    if any(k in text for k in keywords):
        return None
    return f"your answer does not mention {topic} (e.g. one of: {', '.join(keywords[:3])})"


CHAPTER.register(
    name="q2",
    symbol="ANSWER_Q2",
    points=2,
    make_cases=_q2_cases,
    reference=_fixed(None),
    run=run_answer,
    compare=_q2_compare,
    kind="answer",
    wrong_variants=("keyword stuffing", "off-topic"),
    review="a keyword screen for the three ideas: it cannot tell an answer that denies them "
    "from one that explains them, so read ANSWER_Q2",
)


# ------------------------------------------------------------------- Q3: perplexity from log-probs

Q3_LOGPROBS = [-0.5, -1.0, -1.5, -2.0]


def _q3_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.metrics import perplexity_from_logprobs

    return perplexity_from_logprobs(Q3_LOGPROBS)


def _q3_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if (problem := not_a_number("ANSWER_Q3", got)) is not None:
        return problem
    if close(got, expected, abs_=0.005):
        return None
    if close(got, math.exp(-1.25), abs_=0.005):
        return "a perplexity is >= 1: exponentiate the NEGATIVE mean log-probability"
    if close(got, 1.25, abs_=0.005):
        return "1.25 is the mean NLL; perplexity is exp of it"
    return f"{got} is not exp(-mean(log p)) for these log-probs (2 decimals)"


CHAPTER.register(
    name="q3",
    symbol="ANSWER_Q3",
    points=1,
    make_cases=one_case,
    reference=_q3_reference,
    run=run_answer,
    compare=_q3_compare,
    kind="answer",
    wrong_variants=("mean NLL", "sign error"),
)


# ----------------------------------------------------------------- Q4: which labels the model gets

CHAPTER.register(
    name="q4",
    symbol="ANSWER_Q4",
    points=1,
    make_cases=one_case,
    reference=_fixed("c"),
    run=run_answer,
    compare=_choice_compare(
        "ANSWER_Q4",
        "c",
        {
            "a": "that is the chapter's labels=input_ids: it trains on the prompt and on padding",
            "b": "the EOS must be supervised, or the model never learns to stop",
            "d": "padding needs label -100, not the pad id, or the loss learns to predict padding",
        },
    ),
    kind="answer",
    wrong_variants=("a (chapter's erratum)", "b", "d"),
)


# ------------------------------------------------------------ Q5: advantages of JSONL (choose all)

Q5_OPTIONS = {
    "a": (True, "one record per line: a file can be streamed, appended to and split line by line"),
    "b": (False, "JSONL does not compress better than CSV; it repeats every key on every line"),
    "c": (True, "a malformed line breaks only that record, and errors name the line"),
    "d": (False, "JSONL enforces no schema: any line may hold any object; you must validate"),
    "e": (True, "text with commas, quotes and newlines needs no special quoting rules beyond JSON's"),
}


def _q5_cases(seed: int) -> list[dict[str, Any]]:
    return [{"option": k} for k in sorted(Q5_OPTIONS)]


def _q5_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if got is None:
        return "set ANSWER_Q5 to a set of letters, e.g. {'a', 'b'}"
    if isinstance(got, str):
        got = list(got.replace(",", " ").split())
    if not isinstance(got, list) or not all(isinstance(x, str) for x in got):
        return f"ANSWER_Q5 must be a set of letters, got {short(got)}"
    chosen = {x.strip().lower() for x in got}
    if not chosen:
        return "choose at least one option"
    unknown = sorted(chosen - set(Q5_OPTIONS))
    if unknown:
        return f"options are the letters a to e; {', '.join(map(repr, unknown))} is not one"
    if not any(Q5_OPTIONS[x][0] for x in chosen):
        return "none of the options you chose is an advantage of JSONL"
    option = case["option"]
    right, why = Q5_OPTIONS[option]
    if (option in chosen) == right:
        return None
    return f"option {option!r} is {'an advantage' if right else 'not an advantage'}: {why}"


CHAPTER.register(
    name="q5",
    symbol="ANSWER_Q5",
    points=1,
    make_cases=_q5_cases,
    reference=_fixed(None),
    run=run_answer,
    compare=_q5_compare,
    kind="answer",
    wrong_variants=("all options", "a only"),
)
