"""Case summaries fit the embedded model's context, at training and at generation.

Notebook 07 once cut 226 of 240 case prompts from the left without saying so: the instruction
and the plaintiff were gone. These tests measure every case with the embedded tokenizer.
"""

from __future__ import annotations

import json

import pytest

from lumorik_sft import encoding
from lumorik_sft.course.synthetic import case_summaries
from lumorik_sft.course.synthetic.cases import CASE_MAX_NEW_TOKENS
from lumorik_sft.fidelity import fact_fidelity
from lumorik_sft.models import EMBEDDED_MODEL_DIR, has_embedded_model

pytestmark = pytest.mark.skipif(not has_embedded_model(), reason="needs the embedded base model")

STOP_MARGIN = 16  # tokens the generation budget leaves beyond the longest summary, so a model can stop
TRAIN_MARGIN = 32  # tokens a training pair leaves free in the context


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)


@pytest.fixture(scope="module")
def context() -> int:
    return json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text())["n_positions"]


@pytest.mark.parametrize("n", [None, 2000])  # the default 200, and ten times more
def test_every_case_fits_training_and_generation(tokenizer, context, n) -> None:
    records = case_summaries() if n is None else case_summaries(n)
    prompts = [len(encoding.prompt_ids(tokenizer, r["prompt"])) for r in records]
    summaries = [len(encoding.completion_ids(tokenizer, r["completion"])) for r in records]
    assert max(p + s for p, s in zip(prompts, summaries, strict=True)) <= context - TRAIN_MARGIN
    assert max(summaries) + STOP_MARGIN <= CASE_MAX_NEW_TOKENS
    assert max(prompts) + CASE_MAX_NEW_TOKENS <= context
    _, report = encoding.encode_records(records, tokenizer, max_length=context)
    assert (report.truncated, report.completion_cut, dict(report.dropped)) == (0, 0, {})


def test_generation_keeps_the_whole_prompt(tokenizer, context) -> None:
    prompts = [r["prompt"] for r in case_summaries(50)]
    batch = encoding.encode_prompts_for_generation(
        tokenizer, prompts, max_prompt_tokens=context - CASE_MAX_NEW_TOKENS
    )
    full = [encoding.prompt_ids(tokenizer, p) for p in prompts]
    rows = zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True)
    kept = [[t for t, m in zip(row, mask, strict=True) if m] for row, mask in rows]
    assert kept == full  # instruction and plaintiff kept


def test_fact_checker_reads_every_case_and_its_reference_scores_full() -> None:
    records = case_summaries(300)
    prompts, refs = [r["prompt"] for r in records], [r["completion"] for r in records]
    summary = fact_fidelity(prompts, refs, refs).summary()
    assert summary["fidelity"] == summary["parties_right"] == summary["all_facts_right"] == 1.0
    assert summary["unchecked_facts"] == 0 and summary["foreign_per_output"] == 0
    swapped = [_swap_parties(r) for r in records]
    assert fact_fidelity(prompts, swapped, refs).parties_right == 0.0


def _swap_parties(record: dict[str, str]) -> str:
    """The reference with plaintiff and defendant exchanged: same words, wrong roles."""
    p, d = record["completion"].split(" for ", 1)[0].split(" sued ")
    return record["completion"].replace(p, "\0").replace(d, p).replace("\0", d)


# ------------------------------------------------------------------- 07's before/after table


def test_before_after_table_shows_generation_and_fact_rows() -> None:
    from types import SimpleNamespace

    from lumorik_sft.course.experiments import before_after_table
    from lumorik_sft.pipeline import EvalReport

    def report(loss: float, chrf: float, parties: float, foreign: float, task: str) -> EvalReport:
        facts = {"fidelity": parties, "all_facts_right": parties, "foreign_per_output": foreign}
        facts |= {"parties_right": parties if task == "cases" else None, "dosing_flagged": 1}
        out = EvalReport(loss=loss, perplexity=2.0, n_tokens=1, bleu=50.0, chrf=chrf, stop_rate=0.5)
        out.fidelity, out.fact_check = facts, SimpleNamespace(task=task)
        return out

    rows = {
        r["metric"]: r
        for r in before_after_table(report(3, 10, 0.2, 2, "cases"), report(1, 90, 0.9, 1, "cases"))
    }
    assert list(rows) == [
        "loss",
        "perplexity",
        "BLEU",
        "chrF",
        "stop rate",
        "fidelity",
        "all facts right",
        "foreign per output",
        "parties right",
    ]  # no distinct-2 (not measured), no dosing row for cases
    assert rows["parties right"]["after"] == 0.9 and rows["parties right"]["better"]
    assert rows["foreign per output"]["better"] and rows["chrF"]["change"] == 80
    assert not rows["stop rate"]["better"]  # unchanged is not better
    health = before_after_table(report(3, 10, 0.2, 0, "health"), report(1, 90, 0.9, 0, "health"))
    assert [r["metric"] for r in health][-2:] == ["foreign per output", "dosing flagged"]
