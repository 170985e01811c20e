"""The stages composed: a model to fine-tune, and one evaluation of it on a split.

`lumorik-sft eval` and the course's demo (`lumorik_sft.course.demo`) call these. Each function only
composes the stage modules (encoding, metrics, generation); the CLI only parses arguments and prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lumorik_sft import encoding, generation, metrics, models
from lumorik_sft.conversations import is_chat, split_last_reply
from lumorik_sft.fidelity import FidelityReport, detect_task, fact_fidelity, fact_use_report

CHAT_MODEL = "embedded-chat"  # the default model for chat data: the embedded model has no template


def is_chat_data(records: list[dict[str, Any]]) -> bool:
    """True for a data set of chats (``{"messages": [...]}``); a file holds one kind only."""
    return bool(records) and is_chat(records[0])


def default_model(records: list[dict[str, Any]], requested: str | None) -> str | None:
    """The model asked for; else the embedded chat model for chats, the embedded model for pairs."""
    if requested is not None:
        return requested
    return CHAT_MODEL if is_chat_data(records) else None


def encode_data(
    records: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    last_turn_only: bool = False,
) -> tuple[list[dict[str, list[int]]], encoding.EncodeReport]:
    """Chats through the chat template (loss on every assistant reply), pairs as prompt + completion."""
    if is_chat_data(records):
        return encoding.encode_chats(records, tokenizer, max_length=max_length, last_turn_only=last_turn_only)
    return encoding.encode_records(records, tokenizer, max_length=max_length)


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
        source = str(name_or_path or "embedded")
        return model, tokenizer, models.embedded_alias(source) or source  # no machine path
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
    fact_use: dict[str, Any] | None = None  # chats: `FactUseReport.summary()`, facts from earlier turns
    histories: list[list[dict[str, str]]] = field(default_factory=list)  # chats: what each reply saw
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
    fact_products: Sequence[str] = (),
    progress: bool = False,
    generation_batch_size: int | None = None,
) -> EvalReport:
    """Token-weighted loss and perplexity on all records; generation metrics on the first `n_generate`.

    Generation metrics: BLEU, ROUGE, chrF, stop rate, distinct-2 and, when the prompts are in
    one of the course's formats (`fidelity.detect_task`), fact fidelity (``fact_aliases`` go to
    it). ``max_length`` defaults to 256 tokens or the model's context, whichever is shorter.

    Chats (``{"messages": [...]}``): the loss is over every assistant token; the model writes
    each chat's last reply from the turns before it, stopping at its end-of-turn token; fact use
    checks the order numbers (and ``fact_products``) the earlier turns stated.
    ``generation_batch_size`` (default: ``batch_size``): prompts decoded together; on a CPU a
    small model decodes a batch of 50 in little more time than one of 16.
    """
    max_length = encoding.fit_max_length(model, max_length)
    examples, _ = encode_data(records, tokenizer, max_length=max_length)
    collate = encoding.SFTCollator(tokenizer.pad_token_id)
    batches = (collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size))
    result = metrics.evaluate_loss(model, batches)
    report = EvalReport(loss=result.loss, perplexity=result.perplexity, n_tokens=result.n_tokens)
    chosen = records if n_generate is None else records[:n_generate]
    if not chosen:
        return report
    options = {
        "max_new_tokens": max_new_tokens,
        "batch_size": generation_batch_size or batch_size,
        "progress": progress,
    }
    if is_chat_data(records):
        splits = [split_last_reply(r["messages"]) for r in chosen]
        report.histories = [history for history, _ in splits]
        report.references = [reply for _, reply in splits]
        report.prompts = [h[-1]["content"] for h in report.histories]  # the turn being answered
        done = generation.generate_replies(model, tokenizer, report.histories, **options)
    else:
        report.prompts = [r["prompt"] for r in chosen]
        report.references = [r["completion"] for r in chosen]
        done = generation.generate_detailed(model, tokenizer, report.prompts, **options)
    report.predictions = [c.text for c in done]
    _score_generations(report, [c.stopped for c in done], fact_aliases)
    if report.histories:
        keys = ("order", "product") if fact_products else ("order",)
        uses = fact_use_report(
            report.histories, report.predictions, report.references, products=fact_products, keys=keys
        )
        report.fact_use = uses.summary() if uses.rate() is not None else None
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
