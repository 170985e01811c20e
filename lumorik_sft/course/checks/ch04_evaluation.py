"""Exercises of ``04_evaluation.ipynb``: ``corpus_perplexity``, ``bleu_score`` and ``cohen_kappa``.

Each exercise's functions (cases, reference, run, compare) come first, then
``CHAPTER.register(...)`` declares it; see :mod:`lumorik_sft.course.checks.framework`.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from typing import Any

from lumorik_sft.course.checks.framework import WORDS, Chapter, close, raised, sentence

CHAPTER = Chapter("04_evaluation.ipynb")


# ------------------------------------------------------------------------------- corpus perplexity


def _ppl_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(5):
        rng = random.Random(f"ppl/{seed}/{k}")
        batches = []
        for j in range(rng.randint(2, 4)):
            n = 1 if j == 0 else rng.randint(8, 30)  # one tiny batch: equal weighting is wrong
            centre = rng.uniform(-4.0, -0.3)
            batches.append([round(min(0.0, rng.gauss(centre, 0.5)), 5) for _ in range(n)])
        rng.shuffle(batches)
        cases.append({"batches": batches})
    cases.append({"batches": [[], []]})  # no tokens: the denominator is zero
    return cases


def _ppl_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.metrics import perplexity_from_logprobs

    try:
        return perplexity_from_logprobs([x for b in case["batches"] for x in b])
    except ValueError as err:
        return raised(err)


def _run_ppl(fn: Callable, case: dict[str, Any]) -> Any:
    return float(fn(copy.deepcopy(case["batches"])))


def _ppl_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if close(got, expected, rel=1e-6):
        return None
    batches = [b for b in case["batches"] if b]
    means = [-sum(b) / len(b) for b in batches]
    if close(got, sum(math.exp(m) for m in means) / len(means), rel=1e-6):
        return (
            "you averaged per-batch perplexities: sum the log-probs of ALL tokens and divide by the "
            "total token count, then exponentiate once"
        )
    if close(got, math.exp(sum(means) / len(means)), rel=1e-6):
        return (
            "you averaged per-batch mean NLLs, so a 1-token batch weighs as much as a 30-token one: "
            "weight by tokens (total NLL / total tokens)"
        )
    if got < 1:
        return f"perplexity is always >= 1, got {got:.4g}: exponentiate the NEGATIVE mean log-prob"
    return (
        f"perplexity is {got:.6g}, expected {expected:.6g}: exp(-(sum of all log-probs) / (number of tokens))"
    )


CHAPTER.register(
    name="corpus_perplexity",
    symbol="corpus_perplexity",
    points=2,
    make_cases=_ppl_cases,
    reference=_ppl_reference,
    run=_run_ppl,
    compare=_ppl_compare,
    forbidden=(
        "lumorik_sft.metrics:perplexity_from_logprobs",
        "lumorik_sft.metrics:perplexity_from_probs",
        "lumorik_sft.metrics:mean_nll",
    ),
    hint="exp(-(sum of all log-probs) / (number of tokens)); raise ValueError when there are no tokens",
    wrong_variants=("perplexity averaged over batches", "mean of batch mean NLLs", "sign error"),
)


# -------------------------------------------------------------------------------------------- BLEU


def _bleu_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(3):
        rng = random.Random(f"bleu/{seed}/{k}")
        refs, preds = [], []
        for _ in range(rng.randint(3, 5)):
            ref = sentence(rng, 6, 12) + "."
            words = ref.split()
            if rng.random() < 0.7:
                for _ in range(rng.randint(1, 3)):
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
            if rng.random() < 0.5:
                words = words[: max(2, len(words) - rng.randint(1, 3))]
            refs.append(ref)
            preds.append(" ".join(words))
        cases.append({"predictions": preds, "references": refs})
    return cases


def _bleu_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.metrics import corpus_bleu

    return corpus_bleu(case["predictions"], case["references"])


def _run_bleu(fn: Callable, case: dict[str, Any]) -> Any:
    return float(fn(list(case["predictions"]), list(case["references"])))


def _bleu_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    import sacrebleu

    if close(got, expected, rel=1e-6, abs_=1e-6):
        return None
    preds, refs = case["predictions"], case["references"]
    if close(got * 100, expected, rel=1e-6, abs_=1e-6):
        return "BLEU here is on sacrebleu's 0-100 scale: return compute(...)['score'] unchanged"
    sentence_mean = sum(
        sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(preds, refs, strict=True)
    ) / len(preds)
    if close(got, sentence_mean, rel=1e-6, abs_=1e-6):
        return (
            "corpus BLEU is not a mean of sentence BLEUs: pass all predictions and references to one "
            "compute() call, which sums n-gram counts over the corpus first"
        )
    if close(got, sacrebleu.corpus_bleu(refs, [preds]).score, rel=1e-6, abs_=1e-6):
        return "predictions and references are swapped (BLEU is not symmetric: the brevity penalty)"
    return f"BLEU is {got:.4f}, expected {expected:.4f}: use metrics.load_metric('bleu').compute(...)"


CHAPTER.register(
    name="bleu_score",
    symbol="bleu_score",
    points=1,
    make_cases=_bleu_cases,
    reference=_bleu_reference,
    run=_run_bleu,
    compare=_bleu_compare,
    forbidden=("lumorik_sft.metrics:corpus_bleu",),
    hint="metrics.load_metric('bleu').compute(predictions=..., references=...)['score']",
    wrong_variants=("mean of sentence BLEUs", "predictions and references swapped", "0-1 scale"),
)


# ------------------------------------------------------------------------------------- Cohen's kappa

_VERDICT_LABELS = ("base", "SFT", "tie")


def _kappa_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(4):
        rng = random.Random(f"kappa/{seed}/{k}")
        n = rng.randint(8, 30)
        labels = _VERDICT_LABELS[:2] if k == 0 else _VERDICT_LABELS
        first = [rng.choice(labels) for _ in range(n)]
        # rater 2 agrees with rater 1 most of the time, and otherwise picks any label
        second = [x if rng.random() < 0.6 else rng.choice(_VERDICT_LABELS) for x in first]
        cases.append({"labels_1": first, "labels_2": second})
    cases.append({"labels_1": ["SFT"] * 6, "labels_2": ["SFT"] * 6})  # p_e = 1: undefined
    cases.append({"labels_1": ["SFT"] * 5, "labels_2": ["tie"] * 5})  # constant but different: 0
    return cases


def _kappa_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.human_eval import cohen_kappa

    try:
        return cohen_kappa(case["labels_1"], case["labels_2"])
    except ValueError as err:
        return raised(err)


def _run_kappa(fn: Callable, case: dict[str, Any]) -> Any:
    return float(fn(list(case["labels_1"]), list(case["labels_2"])))


def _kappa_chance(case: dict[str, Any], pooled: bool) -> tuple[float, float]:
    """Observed agreement and chance agreement (each rater's own rates, or both raters pooled)."""
    a, b = case["labels_1"], case["labels_2"]
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    labels = set(a) | set(b)
    if pooled:
        return observed, sum(((a.count(c) + b.count(c)) / (2 * n)) ** 2 for c in labels)
    return observed, sum(a.count(c) * b.count(c) for c in labels) / (n * n)


def _kappa_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if close(got, expected, rel=1e-9, abs_=1e-9):
        return None
    observed, _ = _kappa_chance(case, pooled=False)
    _, pooled = _kappa_chance(case, pooled=True)
    if close(got, observed, rel=1e-9, abs_=1e-9):
        return (
            "you returned the raw agreement p_o: kappa also subtracts the agreement expected by chance, "
            "(p_o - p_e) / (1 - p_e)"
        )
    if pooled < 1 and close(got, (observed - pooled) / (1 - pooled), rel=1e-9, abs_=1e-9):
        return (
            "your chance agreement pools both raters' labels (that is Scott's pi): Cohen's p_e uses each "
            "rater's own rates, the sum over labels of p_rater1(label) * p_rater2(label)"
        )
    k = len(set(case["labels_1"]) | set(case["labels_2"]))
    if k > 1 and close(got, (observed - 1 / k) / (1 - 1 / k), rel=1e-9, abs_=1e-9):
        return "p_e is not 1 / (number of labels): use how often each rater actually gave each label"
    return f"kappa is {got:.6g}, expected {expected:.6g}: (p_o - p_e) / (1 - p_e)"


CHAPTER.register(
    name="cohen_kappa",
    symbol="cohen_kappa",
    points=1,
    make_cases=_kappa_cases,
    reference=_kappa_reference,
    run=_run_kappa,
    compare=_kappa_compare,
    forbidden=("lumorik_sft.human_eval:cohen_kappa",),
    hint=(
        "kappa = (p_o - p_e) / (1 - p_e); p_e = sum over labels of (rater 1's share of that label) x "
        "(rater 2's share); raise ValueError when p_e == 1"
    ),
    wrong_variants=("raw agreement", "Scott's pi (pooled chance)", "no ValueError when p_e == 1"),
)
