"""The benchmark's case summaries: the course's case data as it was when the committed runs were measured.

The course shortened its cases (notebook 07 needs them to fit a 256-token context); the benchmark keeps
the long ones, frozen here, so every committed run in `runs/` stays comparable and re-checkable: its
examples are piled at the 256-token truncation limit, which is the padding case the benchmark measures.
"""

from __future__ import annotations

from lumorik_sft.course.synthetic.cases import case_keys
from lumorik_sft.course.synthetic.common import Record

# ----------------------------------------------------------------------------------- case summaries

# The parties, amounts and the draw of each case come from the course (`case_keys`); only the long
# texts are frozen here.

# claim type -> (claim phrase, two alternative fact patterns)
_CLAIMS: dict[str, tuple[str, tuple[str, str]]] = {
    "breach of contract": (
        "breach of contract",
        (
            "{d} agreed in writing to deliver equipment by March but delivered it four months late.",
            "{d} stopped paying monthly invoices halfway through a two-year service agreement.",
        ),
    ),
    "negligence": (
        "negligence",
        (
            "{p} was injured after slipping on an unmarked wet floor in premises run by {d}.",
            "A delivery van operated by {d} reversed into a parked vehicle owned by {p}.",
        ),
    ),
    "unpaid deposit": (
        "the return of a rental deposit",
        (
            "{d} kept the full deposit when {p} moved out, citing wear and tear.",
            "{d} refused to return the deposit, claiming the flat needed repainting.",
        ),
    ),
    "unfair dismissal": (
        "unfair dismissal",
        (
            "{p} was dismissed by {d} without a warning or a hearing after ten years of service.",
            "{d} ended the employment of {p} two weeks after a complaint about safety.",
        ),
    ),
    "copyright infringement": (
        "copyright infringement",
        (
            "{d} used photographs taken by {p} in an advertising campaign without a licence.",
            "{d} published software code written by {p} under its own name.",
        ),
    ),
    "defamation": (
        "defamation",
        (
            "{d} published an article stating that {p} had been convicted of fraud, which was untrue.",
            "{d} posted online reviews claiming {p} sold counterfeit goods.",
        ),
    ),
}

# outcome -> (sentence in the case text, summary clause)
_OUTCOMES = {
    "plaintiff": (
        "The court found for {p} and awarded {amount_text}.",
        "the court found for {p} and awarded {amount_text}",
    ),
    "defendant": (
        "The court dismissed the claim, finding that {d} was not liable.",
        "the court dismissed the claim, finding {d} not liable",
    ),
    "partial": (
        "The court found {d} partly liable and awarded half of the sum claimed.",
        "the court found {d} partly liable and awarded half the sum claimed",
    ),
    "settled": (
        "Before judgment, the parties settled on confidential terms.",
        "the parties settled on confidential terms before judgment",
    ),
}


def case_summaries(n: int = 200, seed: int = 0) -> list[Record]:
    """The long cases, drawn exactly as the course draws its own (same parties, claims, seeds)."""
    return [_case_record(*key) for key in case_keys(n, seed)]


def _case_record(p: str, d: str, claim: str, fact: int, amount: str, outcome: str) -> Record:
    claim_phrase, facts = _CLAIMS[claim]
    slots = {"p": p, "d": d, "amount_text": f"{amount} dollars in damages"}
    fact_text = facts[fact].format(**slots)
    outcome_text, outcome_clause = (s.format(**slots) for s in _OUTCOMES[outcome])
    case = (
        f"{p} brought a claim against {d} for {claim_phrase}, seeking {amount} dollars. "
        f"{fact_text} {d} denied the claim and argued that it had acted reasonably. "
        f"The matter was heard in the district court. {outcome_text}"
    )
    summary = (
        f"{p} sued {d} for {claim_phrase}, seeking {amount} dollars, and {outcome_clause}. "
        f"Key fact: {fact_text}"
    )
    return {"prompt": f"Summarize the case in one or two sentences.\nCase: {case}", "completion": summary}
