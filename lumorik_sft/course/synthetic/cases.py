"""The legal application's data: short made-up cases and their two-sentence summaries.

Sized for the embedded model's 256-token context: with its tokenizer a case prompt is at most
125 tokens and a summary (with EOS) at most 74, so a training pair fits with room to spare, and
so does any case prompt plus :data:`CASE_MAX_NEW_TOKENS` generated tokens. The first version ran
to 195 and 128 tokens: most pairs were cut from the left, the instruction and plaintiff first.
"""

from __future__ import annotations

import random

from lumorik_sft.course.synthetic.common import Record, check_size

# A generation budget for case summaries: the longest summary (with EOS) plus a margin, so a
# fine-tuned model can finish and stop, and any case prompt plus this budget fits 256 tokens
# (tests/test_cases_fit.py measures both with the embedded tokenizer).
CASE_MAX_NEW_TOKENS = 96

# ----------------------------------------------------------------------------------- case summaries

_PLAINTIFFS = (
    "Harbor Lane Bakery",
    "Mira Okafor",
    "Tessel Robotics Ltd",
    "Jonas Feld",
    "Greenway Cooperative",
    "Priya Raman",
    "Old Mill Brewing",
    "Lucia Brandt",
)
_DEFENDANTS = (
    "Northgate Property Group",
    "Calder Logistics",
    "Dr. Samuel Reyes",
    "Brightpath Media",
    "Westfield Motors",
    "Kestrel Software Inc",
    "Oakridge Council",
    "Vela Apparel",
)
_AMOUNTS = ("12,000", "48,500", "150,000", "7,250", "320,000", "95,000")

# claim type -> (claim phrase, two fact patterns: (sentence in the case, key fact in the summary)).
# The facts name no party: names cost 6-10 tokens each with the embedded tokenizer.
_CLAIMS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "breach of contract": (
        "breach of contract",
        (
            (
                "The equipment ordered for March was delivered four months late.",
                "the equipment came four months late",
            ),
            (
                "Monthly invoices went unpaid halfway through a two-year service agreement.",
                "invoices went unpaid",
            ),
        ),
    ),
    "negligence": (
        "negligence",
        (
            (
                "The plaintiff slipped on an unmarked wet floor in the defendant's premises.",
                "an unmarked wet floor",
            ),
            (
                "A delivery van driven for the defendant reversed into the plaintiff's parked car.",
                "a van hit a parked car",
            ),
        ),
    ),
    "unpaid deposit": (
        "the return of a deposit",
        (
            (
                "The landlord kept the full deposit at the end of the lease, citing wear and tear.",
                "the deposit was kept for wear and tear",
            ),
            (
                "The landlord refused to return the deposit, saying the flat needed repainting.",
                "the flat needed repainting",
            ),
        ),
    ),
    "unfair dismissal": (
        "unfair dismissal",
        (
            (
                "The plaintiff was dismissed without a warning or a hearing after ten years of service.",
                "dismissed with no warning or hearing",
            ),
            (
                "The plaintiff was dismissed two weeks after a complaint about safety.",
                "dismissed after a safety complaint",
            ),
        ),
    ),
    "copyright infringement": (
        "copyright infringement",
        (
            (
                "Photographs taken by the plaintiff appeared in an advertising campaign without a licence.",
                "photographs used without a licence",
            ),
            (
                "Software code written by the plaintiff was published under the defendant's name.",
                "code published under another name",
            ),
        ),
    ),
    "defamation": (
        "defamation",
        (
            (
                "An article falsely stated that the plaintiff had been convicted of fraud.",
                "a false fraud conviction",
            ),
            (
                "Online reviews claimed that the plaintiff sold counterfeit goods.",
                "claims of counterfeit goods",
            ),
        ),
    ),
}

# outcome -> (last sentence of the case, summary clause). `lumorik_sft.fidelity` reads the
# outcome from these words ("found for", "dismissed the claim", "partly liable", "settled").
_OUTCOMES = {
    "plaintiff": ("The court found for {p} and awarded damages.", "the court found for the plaintiff"),
    "defendant": ("The court dismissed the claim.", "the court dismissed the claim"),
    "partial": (
        "The court found the defendant partly liable and awarded half the sum.",
        "the defendant was found partly liable",
    ),
    "settled": ("Before judgment, the parties settled on confidential terms.", "the parties settled"),
}


def case_summaries(n: int = 200, seed: int = 0) -> list[Record]:
    """Synthetic legal cases (parties, claim, fact, outcome) with two-sentence summaries.

    The summary is determined by the case: who sued whom, for what and for how much, and the
    outcome; a second sentence gives the key fact in a few words.
    """
    return [_case_record(*key) for key in case_keys(n, seed)]


def case_keys(n: int, seed: int) -> list[tuple[str, str, str, int, str, str]]:
    """n distinct (plaintiff, defendant, claim, fact pattern, amount, outcome) draws, seeded."""
    check_size(
        "case_summaries",
        n,
        len(_PLAINTIFFS) * len(_DEFENDANTS) * len(_CLAIMS) * 2 * len(_AMOUNTS) * len(_OUTCOMES),
    )
    rng = random.Random(seed)
    keys: dict[tuple, None] = {}  # insertion-ordered set
    while len(keys) < n:
        key = (
            rng.choice(_PLAINTIFFS),
            rng.choice(_DEFENDANTS),
            rng.choice(sorted(_CLAIMS)),
            rng.randrange(2),
            rng.choice(_AMOUNTS),
            rng.choice(sorted(_OUTCOMES)),
        )
        keys.setdefault(key)
    return list(keys)


def _case_record(p: str, d: str, claim: str, fact: int, amount: str, outcome: str) -> Record:
    claim_phrase, facts = _CLAIMS[claim]
    slots = {"p": p, "d": d, "amount": amount}
    fact_text, key_fact = (s.format(**slots) for s in facts[fact])
    outcome_text, outcome_clause = (s.format(**slots) for s in _OUTCOMES[outcome])
    claim_text = f"{p} brought a claim against {d} for {claim_phrase}, seeking {amount} dollars."
    case = f"{claim_text} {fact_text} {outcome_text}"
    summary = (
        f"{p} sued {d} for {claim_phrase}, seeking {amount} dollars; {outcome_clause}. Key fact: {key_fact}."
    )
    return {"prompt": f"Summarize the case in one or two sentences.\nCase: {case}", "completion": summary}
