"""Mean ROUGE F1 via rouge_score, as a local `evaluate` metric that needs no network.

Load with ``evaluate.load("<path to this file>")`` (or ``lumorik_sft.metrics.load_metric``).
Self-contained on purpose: evaluate copies this file alone into its module cache, so it
may import libraries but nothing from lumorik_sft.
"""

import math
from typing import Any

import datasets
import evaluate
from rouge_score import rouge_scorer

DEFAULT_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    pages = "74--81",
}
"""

_DESCRIPTION = """\
ROUGE (Lin, 2004) computed by Google's rouge_score: the exact mean over pairs of the
F1 of each ROUGE type, in [0, 1] (same scale as evaluate's rouge, not x100). Texts are
passed through unchanged; rougeLsum splits sentences on newlines only.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction, or list of lists of
        strings (several references per prediction; the best-F1 one counts).
    rouge_types: ROUGE types to compute, default rouge1, rouge2, rougeL, rougeLsum.
    use_stemmer: apply the Porter stemmer ("running" and "runs" both become "run").
Returns:
    dict mapping each ROUGE type to the mean F1 over pairs, in [0, 1].
Examples:
    >>> rouge = evaluate.load("lumorik_sft/metric_modules/rouge.py")
    >>> rouge.compute(predictions=["the cat sat"], references=["the cat sat"])["rouge1"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LumorikRouge(evaluate.Metric):
    """rouge_score mean F1 per ROUGE type, single or multiple references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
            ],
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[Any],
        rouge_types: list[str] | None = None,
        use_stemmer: bool = True,
    ) -> dict[str, float]:
        if len(predictions) != len(references):
            raise ValueError(
                f"Got {len(predictions)} predictions but {len(references)} references; "
                "give one reference (or one list of references) per prediction."
            )
        if not predictions:
            raise ValueError("Got no predictions: ROUGE needs at least one pair.")
        types = list(rouge_types) if rouge_types else list(DEFAULT_ROUGE_TYPES)
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
        scores = [
            scorer.score(ref, pred) if isinstance(ref, str) else scorer.score_multi(ref, pred)
            for pred, ref in zip(predictions, references, strict=True)
        ]
        return {t: math.fsum(s[t].fmeasure for s in scores) / len(scores) for t in types}
