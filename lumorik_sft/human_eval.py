"""Human evaluation: blind A/B ratings, win rate with a confidence interval, agreement between raters.

BLEU, ROUGE and perplexity cannot tell a wrong colour from a right one; a person can. The classic
protocol, used here, is a **blind pairwise comparison**: for each prompt a rater sees two systems'
outputs side by side, labelled only "Output 1" and "Output 2", in an order drawn at random per
item (people prefer whatever is shown first surprisingly often), and says which is better or
that they tie. A short rubric (correct facts, follows the instruction, fluent, safe) makes the
rater look at the same things every time and leaves a record of *why*.

* `blind_pairs` draws the seeded presentation order; `Rating` records what was shown where, so a
  rating can be un-blinded later (`Rating.winner`).
* `save_ratings` / `load_ratings` keep ratings in JSONL, one per line, appended as a rater clicks;
  a bad line is a :class:`~lumorik_sft.records.DataError` naming file, line and field.
* `match_ratings` joins ratings to the outputs they judged and refuses ratings of other outputs:
  each rating carries a fingerprint of the two texts, so regenerated outputs never silently
  inherit old verdicts.
* `win_rate` counts wins, losses and ties and gives a Wilson score interval for the win rate.
* `cohen_kappa` measures agreement between two raters beyond what chance would give, on labels
  `paired_labels` lines up; `agreement` reports it beside the raw agreement.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from lumorik_sft.records import DataError

__all__ = [
    "RUBRIC",
    "VERDICTS",
    "Agreement",
    "BlindPair",
    "Rating",
    "WinRate",
    "agreement",
    "blind_pairs",
    "cohen_kappa",
    "fingerprint",
    "load_ratings",
    "match_ratings",
    "paired_labels",
    "save_ratings",
    "wilson_interval",
    "win_rate",
]

# Pass/fail per output: four yes/no questions are quick to answer and easy to agree on.
RUBRIC: tuple[str, ...] = ("correct_facts", "follows_instruction", "fluent", "safe")
# "A" is the output shown first ("Output 1"), "B" the one shown second ("Output 2").
VERDICTS: tuple[str, ...] = ("A", "B", "tie")


def fingerprint(outputs: Mapping[str, str]) -> str:
    """A short hash of the outputs a rating judged (system -> text), whatever order they were shown in.

    Ratings carry it so that ratings of other outputs (a regenerated run) are detected.
    """
    canonical = json.dumps(sorted(outputs.items()), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------- presentation


@dataclass(frozen=True)
class BlindPair:
    """One item as a rater sees it: the prompt and two outputs, in a random but recorded order.

    ``system_a`` produced ``output_a`` (shown first, "Output 1"); ``system_b`` produced
    ``output_b`` ("Output 2"). A user interface shows the prompt and the outputs, never the
    systems.
    """

    item_id: str
    prompt: str
    system_a: str
    system_b: str
    output_a: str
    output_b: str

    @property
    def fingerprint(self) -> str:
        return fingerprint({self.system_a: self.output_a, self.system_b: self.output_b})


def blind_pairs(
    items: Sequence[Mapping[str, str]], system_a: str, system_b: str, seed: int = 0
) -> list[BlindPair]:
    """One `BlindPair` per item, the order of its two outputs drawn per item from ``seed``.

    Each item maps ``"id"``, ``"prompt"``, `system_a` and `system_b` to strings. Each item's
    coin flip is seeded by ``(seed, id)``, not by its position, so adding or removing items does
    not reshuffle the others, and the same seed always shows the same order.
    """
    if system_a == system_b:
        raise ValueError(f"the two systems must differ, got {system_a!r} twice")
    pairs, seen = [], set()
    for item in items:
        item_id = str(item["id"])
        if item_id in seen:
            raise ValueError(f"item id {item_id!r} appears twice")
        seen.add(item_id)
        first, second = (system_a, system_b)
        if random.Random(f"{seed}/{item_id}").random() < 0.5:
            first, second = second, first
        pairs.append(BlindPair(item_id, item["prompt"], first, second, item[first], item[second]))
    return pairs


# ------------------------------------------------------------------------------------------ ratings


@dataclass(frozen=True)
class Rating:
    """One rater's verdict on one `BlindPair`, with what was shown where (so it can be un-blinded).

    ``verdict`` is ``"A"`` (Output 1 is better), ``"B"`` (Output 2) or ``"tie"``. ``rubric_a`` and
    ``rubric_b`` say, for each output, which `RUBRIC` criteria it passes. ``outputs`` is the
    `fingerprint` of the two texts rated.
    """

    item_id: str
    prompt: str
    rater: str
    system_a: str
    system_b: str
    verdict: str
    outputs: str
    rubric_a: dict[str, bool] = field(default_factory=dict)
    rubric_b: dict[str, bool] = field(default_factory=dict)
    timestamp: str | None = None

    def __post_init__(self) -> None:
        _validate(asdict(self))

    @classmethod
    def of(cls, pair: BlindPair, rater: str, verdict: str, **fields: Any) -> Rating:
        """A rating of `pair`: copies its id, prompt, systems and fingerprint."""
        return cls(
            pair.item_id,
            pair.prompt,
            rater,
            pair.system_a,
            pair.system_b,
            verdict,
            pair.fingerprint,
            **fields,
        )

    def winner(self) -> str:
        """The un-blinded verdict: the better system's name, or ``"tie"``."""
        return {"A": self.system_a, "B": self.system_b}.get(self.verdict, "tie")

    def passes(self, system: str, criterion: str) -> bool:
        """Whether `system`'s output passed a `RUBRIC` criterion (unticked counts as failed)."""
        if criterion not in RUBRIC:
            raise ValueError(f"unknown criterion {criterion!r}; the rubric is {RUBRIC}")
        rubric = {self.system_a: self.rubric_a, self.system_b: self.rubric_b}.get(system)
        if rubric is None:
            raise ValueError(
                f"item {self.item_id!r} compares {self.system_a} and {self.system_b}, not {system}"
            )
        return rubric.get(criterion, False)


_STRINGS = ("item_id", "prompt", "rater", "system_a", "system_b", "verdict", "outputs")


def _validate(row: Mapping[str, Any]) -> None:
    """Raise ValueError("field 'x': problem") for the first thing wrong with a rating's fields."""
    for name in _STRINGS:
        if not isinstance(row.get(name), str) or not row[name]:
            raise ValueError(f"field '{name}': must be a non-empty string, got {row.get(name)!r}")
    if row["verdict"] not in VERDICTS:
        raise ValueError(f"field 'verdict': must be one of {', '.join(VERDICTS)}, got {row['verdict']!r}")
    if row["system_a"] == row["system_b"]:
        raise ValueError(f"field 'system_b': must differ from system_a, both are {row['system_a']!r}")
    for name in ("rubric_a", "rubric_b"):
        rubric = row.get(name, {})
        if not isinstance(rubric, dict):
            raise ValueError(f"field '{name}': must be an object, got {type(rubric).__name__}")
        for key, value in rubric.items():
            if key not in RUBRIC or not isinstance(value, bool):
                raise ValueError(f"field '{name}': {key!r}: {value!r} (criteria {RUBRIC}, true or false)")
    if row.get("timestamp") is not None and not isinstance(row["timestamp"], str):
        raise ValueError(f"field 'timestamp': must be a string or null, got {row['timestamp']!r}")


def save_ratings(path: str | os.PathLike, ratings: Iterable[Rating], *, append: bool = False) -> None:
    """Write ratings as JSONL, one per line; ``append=True`` adds to the file (one click, one line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for rating in ratings:
            f.write(json.dumps(asdict(rating), ensure_ascii=False) + "\n")


def load_ratings(path: str | os.PathLike) -> list[Rating]:
    """Read a JSONL file of ratings; blank lines are skipped, a bad line raises ``DataError``."""
    ratings = []
    text = Path(path).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(str(path), number, f"invalid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(str(path), number, f"expected a JSON object, got {type(row).__name__}")
        unknown = sorted(set(row) - set(Rating.__dataclass_fields__))
        if unknown:
            raise DataError(str(path), number, f"field '{unknown[0]}': not a rating field")
        missing = [name for name in _STRINGS if name not in row]
        if missing:
            raise DataError(str(path), number, f"field '{missing[0]}': missing")
        try:
            ratings.append(Rating(**row))
        except (TypeError, ValueError) as err:
            raise DataError(str(path), number, str(err)) from None
    return ratings


def match_ratings(ratings: Iterable[Rating], pairs: Sequence[BlindPair]) -> list[Rating]:
    """The ratings of exactly these pairs' outputs; raise ValueError for a rating of anything else.

    A rating belongs to a pair when the item id, the prompt and the fingerprint of the two
    outputs agree (the order may differ: each rater sees their own). When outputs are regenerated
    (another model, another run), an old rating would otherwise be joined to text its rater never
    saw; here it is an error that says which item changed.
    """
    ratings, by_id = list(ratings), {p.item_id: p for p in pairs}
    for r in ratings:
        pair = by_id.get(r.item_id)
        if pair is None:
            raise ValueError(f"rating by {r.rater} of item {r.item_id!r}: no such item among the pairs")
        for what, rated, now in (("prompt", r.prompt, pair.prompt), ("outputs", r.outputs, pair.fingerprint)):
            if rated != now:
                raise ValueError(
                    f"rating by {r.rater} of item {r.item_id!r} was made for other {what}: "
                    "they were regenerated since it was made; rate them again"
                )
    return ratings


# ---------------------------------------------------------------------------------------- win rate


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    Unlike the textbook ``p +- z * sqrt(p(1-p)/n)`` (the Wald interval), it stays inside [0, 1]
    and does not collapse to a zero width at 0 or n successes, which matters with the dozen or
    so ratings a person can give in a sitting.
    """
    if n <= 0:
        raise ValueError(f"need at least one trial, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 or n successes a bound is exactly 0 or 1; computed, it can be off by rounding (1e-18).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class WinRate:
    """How one system fared: ``rate = wins / (wins + losses)`` with its Wilson interval."""

    system: str
    wins: int
    losses: int
    ties: int
    rate: float
    low: float
    high: float
    confidence: float

    def __str__(self) -> str:
        pct = round(100 * self.confidence)
        return (
            f"{self.system}: {self.wins} wins, {self.losses} losses, {self.ties} ties; win rate "
            f"{self.rate:.2f} ({pct}% CI {self.low:.2f}-{self.high:.2f})"
        )


def win_rate(ratings: Iterable[Rating], system: str, confidence: float = 0.95) -> WinRate:
    """Wins, losses and ties of `system`, and its win rate **among decisive comparisons**.

    Ties are reported but left out of the rate and the interval: a tie says neither output is
    better, and counting it as half a win would pull every rate towards 0.5 and make the binomial
    interval pretend to more trials than there were decisions. The interval assumes independent
    comparisons, so pass one rating per item (one rater's, or an agreed verdict); an item rated
    twice is an error.
    """
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    for r in ratings:
        if system not in (r.system_a, r.system_b):
            raise ValueError(f"item {r.item_id!r} compares {r.system_a} and {r.system_b}, not {system}")
        if r.item_id in seen:
            raise ValueError(f"item {r.item_id!r} is rated twice: pass one rater's ratings (one per item)")
        seen.add(r.item_id)
        winner = r.winner()
        counts["tie" if winner == "tie" else "win" if winner == system else "loss"] += 1
    wins, losses, ties = counts["win"], counts["loss"], counts["tie"]
    if wins + losses == 0:
        raise ValueError(f"no decisive comparison for {system} ({ties} ties): the win rate is undefined")
    low, high = wilson_interval(wins, wins + losses, confidence)
    return WinRate(system, wins, losses, ties, wins / (wins + losses), low, high, confidence)


# --------------------------------------------------------------------------------------- agreement


def paired_labels(
    ratings: Iterable[Rating],
    rater_1: str,
    rater_2: str,
    label: Callable[[Rating], Hashable] = Rating.winner,
) -> tuple[list[Hashable], list[Hashable]]:
    """Two raters' labels of the items both rated, aligned item by item (in `rater_1`'s order).

    The default label is the un-blinded verdict (`Rating.winner`): the raters may have seen an
    item in different orders, so their raw ``"A"``/``"B"`` letters cannot be compared, the winners
    can. Pass ``label=lambda r: r.passes("SFT", "correct_facts")`` to compare a rubric criterion.
    """
    by_rater: dict[str, dict[str, Hashable]] = {rater_1: {}, rater_2: {}}
    for r in ratings:
        if r.rater in by_rater:
            by_rater[r.rater][r.item_id] = label(r)
    first, second = by_rater[rater_1], by_rater[rater_2]
    common = [item for item in first if item in second]
    return [first[i] for i in common], [second[i] for i in common]


def cohen_kappa(labels_1: Sequence[Hashable], labels_2: Sequence[Hashable]) -> float:
    """Cohen's kappa: ``(p_o - p_e) / (1 - p_e)`` for two raters labelling the same items.

    ``p_o`` is the share of items they label alike; ``p_e`` is the share they would label alike by
    chance, each rater drawing labels at their own observed rates. 1 is perfect agreement, 0 no
    better than chance, negative worse than chance. Raises ValueError when both raters give every
    item one and the same label: then ``p_e = 1`` and kappa is 0/0, undefined (scikit-learn
    returns nan); report the raw agreement instead.
    """
    if len(labels_1) != len(labels_2):
        raise ValueError(f"the raters labelled {len(labels_1)} and {len(labels_2)} items: pair them first")
    n = len(labels_1)
    if n == 0:
        raise ValueError("no items: kappa needs at least one item rated by both raters")
    observed = sum(a == b for a, b in zip(labels_1, labels_2, strict=True)) / n
    counts_1, counts_2 = Counter(labels_1), Counter(labels_2)
    expected = sum(counts_1[label] * counts_2[label] for label in counts_1) / (n * n)
    if expected == 1:
        label = labels_1[0]
        raise ValueError(
            f"kappa is undefined: both raters gave every item the label {label!r}, so chance "
            "agreement is already 1; report the raw agreement (1.0) instead"
        )
    return (observed - expected) / (1 - expected)


@dataclass(frozen=True)
class Agreement:
    """Raw agreement and Cohen's kappa of two raters; ``kappa`` is None where it is undefined."""

    n: int
    observed: float
    kappa: float | None

    def __str__(self) -> str:
        kappa = "undefined (both raters used one label only)" if self.kappa is None else f"{self.kappa:.2f}"
        return f"{self.n} items, raw agreement {self.observed:.2f}, Cohen's kappa {kappa}"


def agreement(labels_1: Sequence[Hashable], labels_2: Sequence[Hashable]) -> Agreement:
    """`cohen_kappa` with the raw agreement beside it, for reports: kappa is None when undefined."""
    try:
        kappa: float | None = cohen_kappa(labels_1, labels_2)
    except ValueError:
        if len(labels_1) != len(labels_2) or not labels_1:
            raise
        kappa = None
    observed = sum(a == b for a, b in zip(labels_1, labels_2, strict=True)) / len(labels_1)
    return Agreement(len(labels_1), observed, kappa)
