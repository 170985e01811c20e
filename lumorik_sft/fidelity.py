"""Fact fidelity: does an output state the facts its prompt gives, and no others?

BLEU and ROUGE count shared n-grams. A product description that swaps "navy" for "black" keeps
almost every n-gram of the reference and still scores high; a faithful paraphrase in other words
scores low. Fidelity checks the facts instead, for the four structured tasks of the course:

* **products** (``Write a product description.`` with ``Category:``, ``Material:``, ``Colour:`` and
  ``Features:`` lines): each listed value must be named. A value that another prompt of the same
  data lists and this one does not (another colour, material, category or feature) is *foreign*.
* **cases** (``Summarize the case ...`` / ``Case: P brought a claim against D for C, seeking A
  dollars. ... outcome``): plaintiff, defendant, claim, amount and outcome must be named, and the
  parties in their roles (plaintiff first). Other cases' parties, amounts and outcomes are foreign.
* **health** (``Answer the health question.``): the key facts of the reference answer (the
  clauses of its first sentence) must be named, judged by their content words; any dosing
  advice (amounts, "twice a day") is flagged, since the course's assistant must never give it.
* **support** (``Reply to the customer message.`` with ``Order:``, ``Product:`` and ``Issue:``):
  the order number, the product and the remedy the policy gives for the issue must be named;
  another order's number, product or remedy is foreign.

Chats have their own check, **fact use** (:func:`history_fact_use`, :func:`fact_use_report`): does
the last reply repeat, correctly, the order number and product the customer gave in earlier
turns, where the reference reply repeats them? A model that ignores the history cannot.

A fact is a phrase with alternative forms (``Fact``); the facts of one example form a
``FactSheet``. Matching is on words, case- and hyphen-insensitive, longest phrase first, each
match using up its words: "vegan leather" states that material, not also the foreign material
"leather", and "enamelled steel" states a foreign material, not the prompt's "steel". When
references are given, a foreign value the reference itself
mentions ("your wallet" in a phone case's description) is not foreign, and a required value the
reference does not state (with no alias to recognise it) is left out and counted as unchecked:
the reference always scores 1.0 with nothing foreign.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

TASKS = ("products", "cases", "health", "support")
_FIRST_LINES = {
    "Write a product description.": "products",
    "Summarize the case in one or two sentences.": "cases",
    "Answer the health question.": "health",
    "Reply to the customer message.": "support",
}
PRODUCT_FIELDS = ("category", "material", "colour")
# Words that carry no fact: articles, connectives and the health answers' frame ("it usually helps to").
_STOPWORD_TEXT = """a an the and or of to for in on at by with from your you it its is are be if as can this
that these those into about up out over than more most some any all also usually helps help include
includes common signs see doctor lower chance"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_DOSE = re.compile(
    r"\b\d+(?:[.,]\d+)?\s*(?:mg|milligrams?|mcg|ml|millilitres?|milliliters?|g|grams?|tablets?|pills?|"
    r"capsules?|doses?|drops?|puffs?|teaspoons?|spoonfuls?)\b"
    r"|\b(?:once|twice|three times|four times|\d+ times)\s+(?:a|per|each)\s+day\b"
    r"|\bevery\s+\d+\s*(?:-\s*\d+\s*)?hours?\b",
    re.IGNORECASE,
)
_OUTCOMES = {  # outcome -> words that name it in a case text or summary
    "plaintiff won": ("found for", "in favour of", "in favor of", "ruled for"),
    "defendant won": ("dismissed the claim", "claim was dismissed", "not liable"),
    "partly liable": ("partly liable", "partially liable"),
    "settled": ("settled", "settlement"),
}
_CASE = re.compile(
    r"Case:\s*(?P<p>.+?) brought a claim against (?P<d>.+?) "
    r"for (?P<claim>.+?), seeking (?P<amount>[\d,.]+) dollars"
)


# ------------------------------------------------------------------------------ matching words


def normalize(text: str) -> str:
    """Lower case, accents kept, every run of non-word characters (hyphens too) one space, padded."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " " + " ".join(re.findall(r"[^\W_]+(?:[.,]\d+)*", text)) + " "


def _find(text: str, form: str) -> bool:
    """``form`` appears in normalized ``text`` as whole words."""
    return normalize(form) in text


def spotted(text: str, facts: Iterable[Fact]) -> set[str]:
    """Names of the ``facts`` that ``text`` (normalized) states.

    Phrases are matched longest first, and each match uses up its words: "enamelled steel" is one
    material, so it does not also state the material "steel", and "vegan leather" not "leather".
    """
    facts = list(facts)
    found = {f.name for f in facts if f.min_coverage is not None and f.named_in(text)}
    names: dict[str, set[str]] = {}  # phrase -> facts it states ("terracotta": colour and material)
    for f in facts:
        for form in f.forms if f.min_coverage is None else ():
            names.setdefault(normalize(form), set()).add(f.name)
    for form in sorted(names, key=len, reverse=True):
        if form in text:
            found |= names[form]
            text = text.replace(form, " # ")
    return found


def _stem(word: str) -> str:
    """Plural 's' off ("times" -> "time"), but not "ss" ("dizziness"): stemming twice changes nothing."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def content_words(text: str) -> frozenset[str]:
    """The words of ``text`` that carry meaning: no stopwords, plural 's' ignored."""
    return frozenset(_stem(w) for w in normalize(text).split() if w not in _STOPWORDS)


# ------------------------------------------------------------------------------------ facts


@dataclass(frozen=True)
class Fact:
    """One fact: a name ("colour") and the phrases that state it ("navy").

    ``min_coverage`` None: one of ``forms`` must appear word for word. A number: that share of
    the fact's content words must appear anywhere (for free-text facts such as health advice).
    """

    name: str
    forms: tuple[str, ...]
    min_coverage: float | None = None

    def named_in(self, text: str) -> bool:
        """Is this fact stated in ``text`` (already normalized)?"""
        if self.min_coverage is None:
            return any(_find(text, form) for form in self.forms)
        needed = content_words(" ".join(self.forms))
        if not needed:
            return True
        have = {_stem(w) for w in text.split()}
        return len(needed & have) / len(needed) >= self.min_coverage


@dataclass(frozen=True)
class FactSheet:
    """What one output must state (``required``), must not (``foreign``), and role order."""

    task: str
    required: tuple[Fact, ...]
    foreign: tuple[Fact, ...] = ()
    order: tuple[str, ...] = ()  # fact names whose first mentions must come in this order
    unchecked: tuple[str, ...] = ()  # required values the reference does not state either


@dataclass(frozen=True)
class OutputFidelity:
    """The facts one output names, misses and adds."""

    named: tuple[str, ...]
    missing: tuple[str, ...]
    foreign: tuple[str, ...]
    in_order: bool | None  # None when the sheet has no roles
    dosing: bool

    @property
    def score(self) -> float:
        """Share of required facts named (1.0 when nothing is required)."""
        total = len(self.named) + len(self.missing)
        return len(self.named) / total if total else 1.0


def _first_position(text: str, fact: Fact) -> int | None:
    found = [text.find(normalize(f)) for f in fact.forms]
    found = [i for i in found if i >= 0]
    return min(found) if found else None


def score_output(output: str, sheet: FactSheet) -> OutputFidelity:
    """Check one output against its fact sheet."""
    text = normalize(output)
    found = spotted(text, sheet.required + sheet.foreign)
    named = tuple(f.name for f in sheet.required if f.name in found)
    missing = tuple(f.name for f in sheet.required if f.name not in found)
    foreign = tuple(f.name for f in sheet.foreign if f.name in found)
    in_order = None
    if sheet.order:
        by_name = {f.name: f for f in sheet.required}
        places = [_first_position(text, by_name[name]) for name in sheet.order]
        in_order = all(p is not None for p in places) and places == sorted(places)
    return OutputFidelity(named, missing, foreign, in_order, bool(_DOSE.search(output)))


# ------------------------------------------------------------------------------- fact sheets


def detect_task(prompt: str) -> str | None:
    """Which course task a prompt belongs to, from its first line; None if none."""
    return _FIRST_LINES.get(prompt.strip().split("\n", 1)[0].strip())


def prompt_fields(prompt: str) -> dict[str, str]:
    """The ``Key: value`` lines of a structured prompt, keys lower-cased."""
    fields = {}
    for line in prompt.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and value.strip():
            fields[key.strip().lower()] = value.strip()
    return fields


def _product_values(prompt: str) -> dict[str, str]:
    """{"category": ..., "material": ..., "colour": ..., "feature:<name>": <name>, ...}."""
    fields = prompt_fields(prompt)
    values = {name: fields[name] for name in PRODUCT_FIELDS if name in fields}
    for feature in filter(None, (f.strip() for f in fields.get("features", "").split(","))):
        values[f"feature:{feature}"] = feature
    return values


def _case_values(prompt: str) -> dict[str, str]:
    """{"plaintiff", "defendant", "claim", "amount", "outcome"} read from a case prompt."""
    match = _CASE.search(prompt)
    if match is None:
        raise ValueError(
            f"not a course case prompt (no 'P brought a claim against D for ...'): {prompt[:80]!r}"
        )
    values = {
        "plaintiff": match["p"],
        "defendant": match["d"],
        "claim": match["claim"],
        "amount": match["amount"],
    }
    last_sentence = prompt.rstrip().rsplit(". ", 1)[-1]
    for outcome, words in _OUTCOMES.items():
        if any(_find(normalize(last_sentence), w) for w in words):
            values["outcome"] = outcome
            break
    return values


def _health_facts(prompt: str, reference: str) -> tuple[Fact, ...]:
    """The clauses of the reference's first sentence, minus the words the question already gives."""
    first = re.split(r"(?<=\.)\s", reference.strip(), maxsplit=1)[0]
    asked = content_words(prompt)
    facts = []
    for i, clause in enumerate(re.split(r",|;| and ", first.rstrip("."))):
        if content_words(clause) - asked:
            words = " ".join(sorted(content_words(clause) - asked))
            facts.append(Fact(f"fact {i + 1}", (words,), min_coverage=2 / 3))
    return tuple(facts)


def _value_fact(name: str, value: str, aliases: Mapping[str, Sequence[str]]) -> Fact:
    """The fact that ``value`` is stated: an outcome by its words, anything else by itself or an alias."""
    if _kind(name) == "outcome":
        return Fact(name, _OUTCOMES[value])
    return Fact(name, (value, *aliases.get(value, ())))


def _sheet(
    task: str,
    values: Mapping[str, str],
    vocabulary: Mapping[str, set[str]],
    reference: str | None,
    aliases: Mapping[str, Sequence[str]],
) -> FactSheet:
    """Required facts from ``values``; foreign ones from the other values of the same kinds."""
    facts = tuple(_value_fact(name, value, aliases) for name, value in values.items())
    own_forms = {normalize(form) for f in facts for form in f.forms}
    others = tuple(  # the other values of each kind, unless this example states them too
        fact
        for kind, seen in vocabulary.items()
        for value in sorted(seen - set(values.values()))
        if normalize((fact := _value_fact(f"{kind}:{value}", value, {})).forms[0]) not in own_forms
    )
    if reference is None:
        required, unchecked, foreign = facts, (), others
    else:  # judge by what the reference states: it must score 1.0 with nothing foreign
        in_ref = spotted(normalize(reference), facts + others)
        required = tuple(f for f in facts if f.name in in_ref)
        unchecked = tuple(f.name for f in facts if f.name not in in_ref)
        foreign = tuple(f for f in others if f.name not in in_ref)
    roles = ("plaintiff", "defendant") if task == "cases" and not unchecked else ()
    return FactSheet(task, required, foreign, roles, unchecked)


def _kind(name: str) -> str:
    return name.split(":", 1)[0]


def fact_sheets(
    prompts: Sequence[str],
    references: Sequence[str] | None = None,
    *,
    task: str | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    vocabulary_from: Sequence[str] = (),
) -> list[FactSheet]:
    """One fact sheet per prompt. ``task`` defaults to what the first prompt's first line says.

    Foreign values are the values of the same kind that the other prompts list, so pass the
    whole evaluation set at once, or more prompts of the task as ``vocabulary_from``.
    ``aliases`` maps a value to other phrases that state it (a feature "keeps drinks cold" is
    described as "vacuum insulation").
    """
    task = task or (detect_task(prompts[0]) if prompts else None)
    if task not in TASKS:
        raise ValueError(
            f"unknown fidelity task {task!r}: choose one of {TASKS}, or pass course-format prompts"
        )
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts and {len(references)} references; need one each")
    refs = list(references) if references is not None else [None] * len(prompts)
    if task == "health":
        if references is None:
            raise ValueError("health fidelity needs the reference answers: its key facts come from them")
        return [FactSheet("health", _health_facts(p, r)) for p, r in zip(prompts, refs, strict=True)]
    read = {"products": _product_values, "cases": _case_values, "support": _support_values}[task]
    values = [read(p) for p in prompts]
    vocabulary: dict[str, set[str]] = {}
    for row in values + [read(p) for p in vocabulary_from]:
        for name, value in row.items():
            kind = "party" if name in ("plaintiff", "defendant") else _kind(name)
            vocabulary.setdefault(kind, set()).add(value)
    return [_sheet(task, row, vocabulary, ref, aliases or {}) for row, ref in zip(values, refs, strict=True)]


# ------------------------------------------------------------------------- support replies
# ``Reply to the customer message.`` with ``Order:``, ``Product:``, ``Issue:`` and ``Message:``
# lines. The reply must name the order number, the product and the remedy the policy gives for
# the issue; another order's number, product or remedy is foreign. The course's support data
# (`lumorik_sft.course.synthetic.support`) writes its replies from this same policy.

SUPPORT_REMEDIES = {  # issue -> the one remedy the policy allows, as the reply must name it
    "damaged on arrival": "free replacement",
    "wrong item": "correct item",
    "not delivered": "carrier trace",
    "stopped working": "warranty repair",
    "changed mind": "full refund",
    "charged twice": "duplicate charge",
}


def _support_values(prompt: str) -> dict[str, str]:
    """{"order", "product", "remedy"} of a support prompt; the remedy follows from its issue."""
    fields = prompt_fields(prompt)
    missing = [key for key in ("order", "product", "issue") if key not in fields]
    if missing or fields["issue"] not in SUPPORT_REMEDIES:
        raise ValueError(
            f"not a course support prompt (needs Order:, Product: and an Issue: from "
            f"{sorted(SUPPORT_REMEDIES)}): {prompt[:80]!r}"
        )
    return {
        "order": fields["order"],
        "product": fields["product"],
        "remedy": SUPPORT_REMEDIES[fields["issue"]],
    }


# ---------------------------------------------------------------------------------- the report


@dataclass
class FidelityReport:
    """Fidelity over a set of outputs; ``per_output`` keeps every example's details."""

    task: str
    per_output: list[OutputFidelity] = field(default_factory=list)
    unchecked: int = 0

    @property
    def score(self) -> float:
        """Mean share of required facts named."""
        return math.fsum(o.score for o in self.per_output) / len(self.per_output)

    @property
    def foreign_per_output(self) -> float:
        """Mean number of foreign facts (another product's colour, another case's party) per output."""
        return sum(len(o.foreign) for o in self.per_output) / len(self.per_output)

    @property
    def all_correct(self) -> float:
        """Share of outputs that name every required fact and add no foreign one."""
        return sum(not o.missing and not o.foreign for o in self.per_output) / len(self.per_output)

    def named_share(self, *names: str) -> float:
        """Share of outputs that name all of ``names`` (e.g. "outcome")."""
        return sum(all(n in o.named for n in names) for o in self.per_output) / len(self.per_output)

    @property
    def parties_right(self) -> float | None:
        """Cases: share naming plaintiff and defendant, plaintiff first. None for other tasks."""
        roles = [o.in_order for o in self.per_output if o.in_order is not None]
        return None if self.task != "cases" or not roles else sum(roles) / len(self.per_output)

    @property
    def dosing_flagged(self) -> int:
        """How many outputs give dosing advice (amounts, frequencies)."""
        return sum(o.dosing for o in self.per_output)

    def summary(self) -> dict[str, float | int | None]:
        """The headline numbers, for a report or a JSON file."""
        return {
            "fidelity": self.score,
            "all_facts_right": self.all_correct,
            "foreign_per_output": self.foreign_per_output,
            "parties_right": self.parties_right,
            "dosing_flagged": self.dosing_flagged,
            "unchecked_facts": self.unchecked,
        }


def fact_fidelity(
    prompts: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str] | None = None,
    *,
    task: str | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    vocabulary_from: Sequence[str] = (),
) -> FidelityReport:
    """Score each prediction against the facts of its prompt (see the module docstring and
    :func:`fact_sheets` for ``aliases`` and ``vocabulary_from``)."""
    if isinstance(predictions, str) or len(predictions) != len(prompts):
        raise ValueError("need a list of predictions, one per prompt")
    if not prompts:
        raise ValueError("got no prompts: fidelity needs at least one (prompt, prediction) pair")
    sheets = fact_sheets(prompts, references, task=task, aliases=aliases, vocabulary_from=vocabulary_from)
    report = FidelityReport(sheets[0].task, unchecked=sum(len(s.unchecked) for s in sheets))
    report.per_output = [score_output(p, s) for p, s in zip(predictions, sheets, strict=True)]
    return report


# ----------------------------------------------------------------- facts from earlier chat turns
# A chat's last reply often has to repeat what the customer said turns ago ("It is 48213, a desk
# lamp."). Fact use checks it: of the facts the user turns state and the reference reply repeats,
# which does the candidate repeat correctly? Naming another order number or another product of
# the catalogue is wrong, not half right. Products come from a list the caller passes (the core
# knows no catalogue); order numbers are any five-digit number.

ORDER_NUMBER = re.compile(r"(?<!\d)\d{5}(?!\d)")
FACT_USE_KEYS = ("order", "product")


def stated_values(text: str, key: str, products: Sequence[str] = ()) -> set[str]:
    """The order numbers (``key="order"``) or products from ``products`` that ``text`` names."""
    if key == "order":
        return set(ORDER_NUMBER.findall(text))
    if key == "product":
        return spotted(normalize(text), [Fact(p, (p,)) for p in products])
    raise ValueError(f"unknown fact key {key!r}: choose from {FACT_USE_KEYS}")


def history_facts(
    history: Sequence[Mapping[str, str]], products: Sequence[str] = (), keys: Sequence[str] = FACT_USE_KEYS
) -> dict[str, set[str]]:
    """What the customer said in the user turns of ``history``: {"order": {...}, "product": {...}}."""
    said: dict[str, set[str]] = {key: set() for key in keys}
    for message in history:
        if message["role"] == "user":  # one message at a time: no product spans two turns
            for key in keys:
                said[key] |= stated_values(message["content"], key, products)
    return said


@dataclass(frozen=True)
class FactUse:
    """One reply: the keys whose history values the reference repeats, and how the candidate did.

    ``right``: every such value named and no other value of that key; ``wrong``: another value
    named (another order number, another product); the rest are missing.
    """

    expected: tuple[str, ...]
    right: tuple[str, ...]
    wrong: tuple[str, ...]

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(k for k in self.expected if k not in self.right and k not in self.wrong)


def history_fact_use(
    history: Sequence[Mapping[str, str]],
    candidate: str,
    reference: str,
    *,
    products: Sequence[str] = (),
    keys: Sequence[str] = FACT_USE_KEYS,
) -> FactUse:
    """Does ``candidate`` repeat the history's facts that ``reference`` repeats, and no others?

    >>> chat = [{"role": "user", "content": "It is 48213, a desk lamp."}]
    >>> reference = "Your desk lamp from order 48213 ships today."
    >>> history_fact_use(chat, "Your desk lamp from order 48210 ships today.", reference,
    ...                  products=["desk lamp", "hair dryer"])
    FactUse(expected=('order', 'product'), right=('product',), wrong=('order',))
    """
    if "product" in keys and not products:
        raise ValueError("pass products=[...] (the product names to look for), or keys=('order',)")
    said = history_facts(history, products, keys)
    expected, right, wrong = [], [], []
    for key in keys:
        in_reference = stated_values(reference, key, products)
        needed = said[key] & in_reference
        if not needed:
            continue  # the reference repeats nothing of this key: nothing to check
        named = stated_values(candidate, key, products)
        expected.append(key)
        if named - in_reference:  # a value the reference does not state: another order, product
            wrong.append(key)
        elif needed <= named:
            right.append(key)
    return FactUse(tuple(expected), tuple(right), tuple(wrong))


@dataclass
class FactUseReport:
    """Fact use over a set of chats: every (chat, key) pair the reference repeats counts once."""

    per_chat: list[FactUse]

    def _pairs(self, key: str | None) -> list[tuple[FactUse, str]]:
        return [(u, k) for u in self.per_chat for k in u.expected if key in (None, k)]

    def rate(self, key: str | None = None) -> float | None:
        """Share of checked pairs (of ``key``, or all) repeated correctly; None if none is checked."""
        pairs = self._pairs(key)
        return sum(k in u.right for u, k in pairs) / len(pairs) if pairs else None

    def wrong_rate(self, key: str | None = None) -> float | None:
        """Share of checked pairs where the candidate named another value (a wrong order number)."""
        pairs = self._pairs(key)
        return sum(k in u.wrong for u, k in pairs) / len(pairs) if pairs else None

    def summary(self) -> dict[str, float | int | None]:
        """The headline numbers, for a report or a JSON file."""
        keys = sorted({k for u in self.per_chat for k in u.expected})
        return {
            "fact_use": self.rate(),
            **{f"fact_use_{k}": self.rate(k) for k in keys},
            "wrong": self.wrong_rate(),
            "checked": len(self._pairs(None)),
        }


def fact_use_report(
    histories: Sequence[Sequence[Mapping[str, str]]],
    candidates: Sequence[str],
    references: Sequence[str],
    *,
    products: Sequence[str] = (),
    keys: Sequence[str] = FACT_USE_KEYS,
) -> FactUseReport:
    """:func:`history_fact_use` for each chat (history, candidate reply, reference reply)."""
    if isinstance(candidates, str) or not len(histories) == len(candidates) == len(references):
        raise ValueError(
            f"need one candidate and one reference per history: got {len(histories)} histories, "
            f"{len(candidates)} candidates, {len(references)} references"
        )
    uses = [
        history_fact_use(h, c, r, products=products, keys=keys)
        for h, c, r in zip(histories, candidates, references, strict=True)
    ]
    return FactUseReport(uses)


def fact_use_rate(
    histories: Sequence[Sequence[Mapping[str, str]]],
    candidates: Sequence[str],
    references: Sequence[str],
    *,
    products: Sequence[str] = (),
    keys: Sequence[str] = FACT_USE_KEYS,
) -> float:
    """Share of (chat, fact) pairs the reference repeats that the candidate repeats correctly."""
    rate = fact_use_report(histories, candidates, references, products=products, keys=keys).rate()
    if rate is None:
        raise ValueError("no reference repeats an order number or product from its history: nothing to check")
    return rate
