"""The stages composed: a model to fine-tune, and one evaluation of it on a split.

`lumorik-sft eval` and the course's demo (`lumorik_sft.course.demo`) call these. Each function only
composes the stage modules (encoding, metrics, generation); the CLI only parses arguments and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lumorik_sft import encoding, generation, metrics, models
from lumorik_sft.fidelity import FidelityReport, detect_task, fact_fidelity


def model_and_tokenizer(
    name_or_path: str | None,
    *,
    fallback_texts: list[str] | None = None,
    seed: int = 0,
    device: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The requested model, else the embedded one, else a small GPT-2 built from scratch.

    The last case exists only for a checkout without the embedded weights: it trains a
    tokenizer on `fallback_texts` and initialises a model randomly, and says so.
    """
    if name_or_path is not None or models.has_embedded_model():
        model, tokenizer = models.load_model_and_tokenizer(name_or_path, device=device)
        return model, tokenizer, str(name_or_path or models.embedded_model_path())
    if not fallback_texts:
        raise FileNotFoundError("no model given and the embedded base model is missing")
    tokenizer = models.train_bpe_tokenizer(fallback_texts, vocab_size=2048)
    model = models.build_model("gpt2", tokenizer, seed=seed, n_layer=4, width=128, n_head=4, context=256)
    return model.to(models.resolve_device(device)), tokenizer, "random-init gpt2 (no embedded model)"


@dataclass
class EvalReport:
    """Everything the evaluation stage measures on one split."""

    loss: float
    perplexity: float
    n_tokens: int
    bleu: float | None = None
    rouge: dict[str, float] = field(default_factory=dict)
    chrf: float | None = None
    stop_rate: float | None = None  # share of outputs ended by EOS before the token limit
    distinct_2: float | None = None  # unique / all word bigrams: low means repetition
    fidelity: dict[str, Any] | None = None  # `FidelityReport.summary()`, for course-format prompts
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    fact_check: FidelityReport | None = field(default=None, repr=False)  # per-output detail

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): everything but the per-output fact check."""
        return {k: v for k, v in self.__dict__.items() if k != "fact_check"}


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, str]],
    *,
    max_length: int | None = None,
    batch_size: int = 16,
    n_generate: int | None = None,
    max_new_tokens: int = 96,
    fact_aliases: dict[str, tuple[str, ...]] | None = None,
    progress: bool = False,
) -> EvalReport:
    """Token-weighted loss and perplexity on all records; generation metrics on the first `n_generate`.

    Generation metrics: BLEU, ROUGE, chrF, stop rate, distinct-2 and, when the prompts are in
    one of the course's formats (`fidelity.detect_task`), fact fidelity (``fact_aliases`` go to
    it). ``max_length`` defaults to 256 tokens or the model's context, whichever is shorter.
    """
    max_length = encoding.fit_max_length(model, max_length)
    examples, _ = encoding.encode_records(records, tokenizer, max_length=max_length)
    collate = encoding.SFTCollator(tokenizer.pad_token_id)
    batches = (collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size))
    result = metrics.evaluate_loss(model, batches)
    report = EvalReport(loss=result.loss, perplexity=result.perplexity, n_tokens=result.n_tokens)
    chosen = records if n_generate is None else records[:n_generate]
    if chosen:
        report.prompts = [r["prompt"] for r in chosen]
        report.references = [r["completion"] for r in chosen]
        report.predictions, stopped = generation.generate_with_stops(
            model,
            tokenizer,
            report.prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
        )
        _score_generations(report, stopped, fact_aliases)
    return report


def _score_generations(
    report: EvalReport, stopped: list[bool], fact_aliases: dict[str, tuple[str, ...]] | None
) -> None:
    """Fill the report's generation metrics from its predictions and references."""
    preds, refs = report.predictions, report.references
    report.bleu = metrics.corpus_bleu(preds, refs)
    report.rouge = metrics.rouge(preds, refs)
    report.chrf = metrics.chrf(preds, refs)
    report.stop_rate = metrics.stop_rate(stopped)
    report.distinct_2 = metrics.distinct_n(preds, 2) if any(len(p.split()) > 1 for p in preds) else None
    tasks = {detect_task(p) for p in report.prompts}
    if len(tasks) == 1 and None not in tasks:  # all prompts in one course format
        report.fact_check = fact_fidelity(report.prompts, preds, refs, aliases=fact_aliases)
        report.fidelity = report.fact_check.summary()
