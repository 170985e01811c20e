"""A knowledge-bearing SFT task: questions about Python objects whose answers the corpus holds.

The answers are the first sentences of standard-library docstrings that pretraining read
(`lumorik_sft.basemodel.corpus`), and the split is by module, so a model can answer the held-out
questions only from what pretraining taught it. `benchmarks/bench_base_model.py` measures that.
"""

from __future__ import annotations

import re

from lumorik_sft.basemodel.corpus import (
    STDLIB_C_MODULES,
    STDLIB_SOURCE,
    CorpusSource,
    is_validation_module,
    iter_documents,
    stable_hash,
)

QA_PROMPT = "Question: What does the Python {kind} `{name}` do?\nAnswer:"
QA_MAX_WORDS = 40
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)`'\"\]])\.(?=\s|$)")


def first_sentence(doc: str) -> str:
    """The docstring's summary: its first paragraph's first sentence, on one line.

    '' when the summary is not a plain sentence (a signature line, a doctest, a list) or is longer
    than QA_MAX_WORDS words: such answers would test formatting, not knowledge.
    """
    para = " ".join(doc.split("\n\n", 1)[0].split())
    m = _SENTENCE_END.search(para)
    sentence = para[: m.end()] if m else para
    words = sentence.split()
    if not 3 <= len(words) <= QA_MAX_WORDS or not sentence.endswith("."):
        return ""
    if not sentence[0].isupper() or sentence.startswith((">>>", "..", "-", "*")) or "(" in words[0]:
        return ""
    return sentence


def _qa_candidates(val_fraction: float) -> dict[str, list[dict[str, str]]]:
    """Public module-level functions and classes of public pure-Python stdlib modules, by module.

    Only modules in the corpus *training* split qualify, and only docstrings the corpus keeps (the
    first copy of each), so every answer is text that pretraining reads next to its name.
    """
    seen: set[str] = set()
    by_module: dict[str, list[dict[str, str]]] = {}
    for doc in iter_documents(CorpusSource(STDLIB_SOURCE, "stdlib"), seen=seen):
        module = doc.module
        if any(p.startswith("_") for p in module.split(".")) or module in STDLIB_C_MODULES:
            continue
        if is_validation_module(STDLIB_SOURCE, module, val_fraction):
            continue
        for e in doc.entries:
            if e.kind not in ("function", "class") or e.name.count(".") != module.count(".") + 1:
                continue
            if e.name.rsplit(".", 1)[1].startswith("_"):
                continue
            answer = first_sentence(e.doc)
            if answer:
                kind = "class" if e.kind == "class" else "function"
                by_module.setdefault(module, []).append(
                    {
                        "prompt": QA_PROMPT.format(kind=kind, name=e.name),
                        "completion": answer,
                        "module": module,
                        "name": e.name,
                    }
                )
    # An answer shared by several names (aliases, copies) is ambiguous: keep none of them.
    counts: dict[str, int] = {}
    for rows in by_module.values():
        for r in rows:
            counts[r["completion"]] = counts.get(r["completion"], 0) + 1
    return {
        m: kept
        for m, rows in by_module.items()
        if (kept := [r for r in rows if counts[r["completion"]] == 1])
    }


def python_doc_qa(
    seed: int = 0,
    *,
    n_val_modules: int = 20,
    max_per_module: int = 5,
    corpus_val_fraction: float = 0.02,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Question-answer pairs about Python stdlib objects, split by module (train, val).

    Each record is ``{"prompt": "Question: What does the Python function `textwrap.dedent` do?\\n
    Answer:", "completion": "Remove any common leading whitespace from every line in `text`.",
    "module": "textwrap", "name": "textwrap.dedent"}``. No module is in both splits, so the
    validation answers cannot be learned from the SFT data: only from pretraining, which read
    every one of these docstrings (the modules are all in the corpus's training split when it is
    assembled with the same `corpus_val_fraction`). `seed` picks which modules are held out and
    which objects are asked about (at most `max_per_module` per module); the result is otherwise
    fixed.
    """
    by_module = _qa_candidates(corpus_val_fraction)
    modules = sorted(by_module)
    if n_val_modules >= len(modules):
        raise ValueError(
            f"n_val_modules={n_val_modules} leaves no training module "
            f"({len(modules)} modules have questions); lower it"
        )
    order = sorted(modules, key=lambda m: stable_hash(f"qa:{seed}:{m}"))
    # Prefer modules with several questions for validation, so ~100 pairs come from ~20 modules.
    rich = [m for m in order if len(by_module[m]) >= 4]
    val_modules = set((rich + [m for m in order if m not in rich])[:n_val_modules])
    train, val = [], []
    for m in modules:
        rows = sorted(by_module[m], key=lambda r: stable_hash(f"qa:{seed}:{r['name']}"))
        rows = sorted(rows[:max_per_module], key=lambda r: r["name"])
        (val if m in val_modules else train).extend(rows)
    return train, val
