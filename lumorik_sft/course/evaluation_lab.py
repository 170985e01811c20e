"""Evaluation experiments of notebooks 04-06: generate, check the facts, draw the metrics side by side.

The loss sees every token equally; a wrong colour is one token of sixty. These helpers make the
models of an experiment write, and score what they wrote with the fact checker
(`lumorik_sft.fidelity`) next to BLEU and the stop rate, so a notebook can show what a change costs
in facts, not only in loss.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lumorik_sft import metrics
from lumorik_sft.course.synthetic import FEATURE_ALIASES
from lumorik_sft.generation import generate_with_stops

Record = Mapping[str, str]


def generate_and_check(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    *,
    max_new_tokens: int,
    **generate: Any,
) -> dict[str, Any]:
    """Greedy (or ``generate``'s) completions of ``records``' prompts, scored against their facts.

    Returns fidelity, all_facts_right, foreign_per_output, bleu, stop_rate, the texts and the
    full `FidelityReport` (``fact_check``).
    """
    prompts = [r["prompt"] for r in records]
    references = [r["completion"] for r in records]
    texts, stopped = generate_with_stops(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **generate)
    check = metrics.fact_fidelity(prompts, texts, references, aliases=FEATURE_ALIASES)
    return {
        "fidelity": check.score,
        "all_facts_right": check.all_correct,
        "foreign_per_output": check.foreign_per_output,
        "bleu": metrics.corpus_bleu(texts, references),
        "stop_rate": metrics.stop_rate(stopped),
        "texts": texts,
        "fact_check": check,
    }


def check_runs(
    runs: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    *,
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """Add `generate_and_check`'s numbers to each run trained with ``keep_model=True``."""
    for run in runs:
        if "model" not in run:
            raise ValueError(f"run {run.get('label')!r} kept no model: train it with keep_model=True")
        run.update(generate_and_check(run["model"], tokenizer, records, max_new_tokens=max_new_tokens))
    return runs


def plot_metric_bars(
    rows: Sequence[Mapping[str, Any]],
    panels: Sequence[tuple[str, str, str]],
    *,
    name: str = "label",
    xlabel: str = "run",
    colors: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """One bar chart per metric, the same rows in each, every bar labelled with its value.

    ``panels``: (key in each row, axis label, "higher" or "lower" is better). Value labels keep
    a bar of height 0.01 readable, and the y axis says which way is better.
    """
    fig = Figure(figsize=(4.2 * len(panels), 3.8), layout="constrained")
    names = [str(r[name]) for r in rows]
    for ax, (key, label, better) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        values = [float(r[key]) for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colors or "tab:blue")
        ax.bar_label(bars, labels=[_short(v) for v in values], padding=2, fontsize=9)
        ax.set_xticks(range(len(rows)), [textwrap.fill(n, 10) for n in names])  # long names on two lines
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{label} ({better} is better)")
        ax.set_title(label)
        ax.set_ylim(0, max([*values, 1e-9]) * 1.2)
        ax.margins(x=0.1)
    if title:
        fig.suptitle(title)
    return fig


def _short(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
