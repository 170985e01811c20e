"""Corpus BLEU via sacrebleu, as a local `evaluate` metric that needs no network.

Load with ``evaluate.load("<path to this file>")`` (or ``lumorik_sft.metrics.load_metric``).
Self-contained on purpose: evaluate copies this file alone into its module cache, so it
may import libraries but nothing from lumorik_sft.
"""

from typing import Any

import datasets
import evaluate
import sacrebleu

_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""

_DESCRIPTION = """\
Corpus-level BLEU (Papineni et al., 2002) computed by sacrebleu with its standard
tokenisation, so scores are comparable across papers. Scores are in [0, 100].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings (one per prediction), or list of lists of
        strings (several references per prediction, the same number for each).
    **kwargs: passed to sacrebleu.corpus_bleu (tokenize, lowercase, smooth_method, ...).
Returns:
    score: BLEU in [0, 100]; counts, totals, precisions (per n-gram order), bp (brevity
    penalty), sys_len, ref_len.
Examples:
    >>> bleu = evaluate.load("lumorik_sft/metric_modules/bleu.py")
    >>> preds = refs = ["the cat sat on the mat"]
    >>> bleu.compute(predictions=preds, references=refs)["score"]
    100.00000000000004
"""


def _reference_streams(references: list[Any]) -> list[list[str]]:
    """Transpose per-prediction references into sacrebleu's per-reference streams."""
    if all(isinstance(r, str) for r in references):
        return [list(references)]
    n_refs = len(references[0])
    if n_refs == 0 or any(len(refs) != n_refs for refs in references):
        raise ValueError(
            "Every prediction needs the same, non-zero number of references "
            f"(the first has {n_refs}); sacrebleu cannot score ragged reference lists."
        )
    return [[refs[i] for refs in references] for i in range(n_refs)]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LumorikBleu(evaluate.Metric):
    """sacrebleu corpus BLEU with single or multiple references."""

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
                        "references": datasets.Sequence(
                            datasets.Value("string", id="sequence"), id="references"
                        ),
                    }
                ),
            ],
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions: list[str], references: list[Any], **kwargs: Any) -> dict[str, Any]:
        if len(predictions) != len(references):
            raise ValueError(
                f"Got {len(predictions)} predictions but {len(references)} references; "
                "give one reference (or one list of references) per prediction."
            )
        if not predictions:
            raise ValueError("Got no predictions: BLEU needs at least one pair.")
        result = sacrebleu.corpus_bleu(predictions, _reference_streams(references), **kwargs)
        return {
            "score": result.score,
            "counts": result.counts,
            "totals": result.totals,
            "precisions": result.precisions,
            "bp": result.bp,
            "sys_len": result.sys_len,
            "ref_len": result.ref_len,
        }
