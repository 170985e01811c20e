"""Synthetic course data, generated from a seed: nothing to download, identical on every machine.

Four sets, one per example in the chapter:

* ``products``: the worked example, 1,000 product-description pairs (-> 900/100 split). The
  description follows from the attributes listed in the prompt, with only small seeded wording
  variation, so the task is learnable and BLEU against a reference is meaningful.
* ``health``: a health-information Q&A chatbot (general information only, never dosing).
* ``cases``: legal case summarization (short made-up case -> 1-2 sentence summary).
* ``support``: customer-service replies (order, product, issue -> the policy's next step).

``noisy_product_descriptions_jsonl`` dirties the products set for the curation lesson. One module
per set (`products`, `health`, `cases`, `support`); this package assembles them by name.

    python -c "from lumorik_sft.course.synthetic import product_descriptions as p; print(p(1)[0])"

This module deliberately does not import the Hugging Face ``datasets`` library (see
``lumorik_sft.data.to_hf_dataset`` for that).
"""

from __future__ import annotations

from collections.abc import Callable

from lumorik_sft.course.synthetic.cases import case_summaries
from lumorik_sft.course.synthetic.common import SYNTHETIC_NOTICE, Record
from lumorik_sft.course.synthetic.health import HEALTH_SAFETY_NOTE, health_qa
from lumorik_sft.course.synthetic.products import (
    FEATURE_ALIASES,
    MALFORMED_LINE,
    NOISE_COUNTS,
    distinct_products,
    noisy_product_descriptions_jsonl,
    product_agreement_bleu,
    product_descriptions,
    render_product_prompt,
    sample_description,
    sample_product_attributes,
    write_noisy_product_descriptions,
    write_product_csv,
)
from lumorik_sft.course.synthetic.support import support_replies
from lumorik_sft.course.synthetic.support_chat import (
    SUPPORT_PRODUCTS,
    dialogue_facts,
    split_last_reply,
    support_dialogues,
)

__all__ = [
    "COURSE_DATASETS",
    "FEATURE_ALIASES",
    "HEALTH_SAFETY_NOTE",
    "MALFORMED_LINE",
    "NOISE_COUNTS",
    "Record",
    "SUPPORT_PRODUCTS",
    "SYNTHETIC_NOTICE",
    "case_summaries",
    "dialogue_facts",
    "distinct_products",
    "health_qa",
    "load_course_dataset",
    "noisy_product_descriptions_jsonl",
    "product_agreement_bleu",
    "product_descriptions",
    "render_product_prompt",
    "sample_description",
    "sample_product_attributes",
    "split_last_reply",
    "support_dialogues",
    "support_replies",
    "write_noisy_product_descriptions",
    "write_product_csv",
]

# ------------------------------------------------------------------------------------- registry

COURSE_DATASETS: dict[str, Callable[..., list[Record]]] = {
    "products": product_descriptions,
    "health": health_qa,
    "cases": case_summaries,
    "support": support_replies,
}


def load_course_dataset(name: str, n: int | None = None, seed: int = 0) -> list[Record]:
    """One of :data:`COURSE_DATASETS` by name; ``n=None`` uses that set's default size."""
    if name not in COURSE_DATASETS:
        raise ValueError(f"unknown course dataset {name!r}; choose from {sorted(COURSE_DATASETS)}")
    make = COURSE_DATASETS[name]
    return make(seed=seed) if n is None else make(n=n, seed=seed)
