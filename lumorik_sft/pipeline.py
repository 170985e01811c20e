"""The stages composed: a model to fine-tune, and one evaluation of it on a split.

`lumorik-sft eval` and the course's demo (`lumorik_sft.course.demo`) call these. Each function only
composes the stage modules (encoding, metrics, generation); the CLI only parses arguments and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lumorik_sft import encoding, generation, metrics, models


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
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, str]],
    *,
    max_length: int | None = None,
    batch_size: int = 16,
    n_generate: int | None = None,
    max_new_tokens: int = 96,
    progress: bool = False,
) -> EvalReport:
    """Token-weighted loss and perplexity on all records; BLEU/ROUGE on the first `n_generate`.

    ``max_length`` defaults to 256 tokens or the model's context, whichever is shorter.
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
        report.predictions = generation.generate_completions(
            model,
            tokenizer,
            report.prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
        )
        report.bleu = metrics.corpus_bleu(report.predictions, report.references)
        report.rouge = metrics.rouge(report.predictions, report.references)
    return report
