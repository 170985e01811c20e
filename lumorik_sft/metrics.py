"""Loss, perplexity, BLEU, ROUGE, chrF, fact fidelity, stop rate and distinct-n, done right.

The chapter's worked example, with the arithmetic fixed (it rounds each term first
and reports a sum of 4.01):

>>> [round(x, 3) for x in token_nll([0.1, 0.6, 0.3])]
[2.303, 0.511, 1.204]
>>> round(sequence_nll([0.1, 0.6, 0.3]), 3)
4.017
>>> round(mean_nll([0.1, 0.6, 0.3]), 3), round(perplexity_from_probs([0.1, 0.6, 0.3]), 2)
(1.339, 3.82)

Validation perplexity is token-weighted: exp(total completion NLL / total completion
tokens) over the whole split (`evaluate_loss`), never a mean of per-batch
perplexities (`mean_of_batch_perplexities`, kept only to show the difference).

`completion_nll` is the loss written out plainly: run the model, shift, sum the cross-entropy
over supervised tokens. Training runs `fused_loss.completion_nll`, the same numbers with less
work; its tests compare it with this one.

BLEU, ROUGE and chrF reward shared wording; they cannot tell a right fact from a wrong one.
`fact_fidelity` (from `lumorik_sft.fidelity`) checks the facts the prompt gives; `stop_rate` and
`distinct_n` catch the two classic failures of a small generator: never stopping, repeating itself.

Run the doctests with ``python -m doctest lumorik_sft/metrics.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lumorik_sft.attention import model_inputs
from lumorik_sft.encoding import IGNORE_INDEX
from lumorik_sft.fidelity import FidelityReport, fact_fidelity  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # evaluate pulls in datasets; import it only when a module is loaded.
    import evaluate

_METRIC_MODULES_DIR = Path(__file__).resolve().parent / "metric_modules"
METRIC_MODULE_NAMES = ("bleu", "rouge")
DEFAULT_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# --------------------------------------------------------------------------- formulas


def _as_floats(values: Iterable[float], what: str) -> list[float]:
    """Materialise the input once and refuse empty input (a zero-token denominator)."""
    floats = [float(v) for v in values]
    if not floats:
        raise ValueError(
            f"Got no {what}: perplexity and mean NLL divide by the number of tokens, "
            "which would be zero. Pass at least one token."
        )
    return floats


def _safe_exp(x: float) -> float:
    """exp that returns inf instead of raising OverflowError for huge losses."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def token_nll(probs: Iterable[float]) -> list[float]:
    """Per-token negative log-likelihood -ln p of each true token's probability.

    >>> [round(x, 3) for x in token_nll([0.1, 0.6, 0.3])]
    [2.303, 0.511, 1.204]
    """
    values = _as_floats(probs, "token probabilities")
    for i, p in enumerate(values):
        if not 0.0 < p <= 1.0:  # also rejects NaN
            raise ValueError(
                f"Token probability at index {i} is {p!r}; probabilities must satisfy "
                "0 < p <= 1 (p = 0 has infinite NLL). Did you pass logits or log-probs?"
            )
    return [-math.log(p) for p in values]


def sequence_nll(probs: Iterable[float]) -> float:
    """Summed NLL of a sequence: the chapter's loss L = -sum_t log p(y_t | y_<t, x).

    Uses math.fsum so the result does not depend on token order by rounding.
    """
    return math.fsum(token_nll(probs))


def mean_nll(probs: Iterable[float]) -> float:
    """Mean NLL per token, the quantity that perplexity exponentiates."""
    nlls = token_nll(probs)
    return math.fsum(nlls) / len(nlls)


def perplexity_from_probs(probs: Iterable[float]) -> float:
    """Perplexity exp(mean NLL) from the probabilities of the true tokens."""
    return _safe_exp(mean_nll(probs))


def perplexity_from_logprobs(logprobs: Iterable[float]) -> float:
    """Perplexity exp(-mean(log p)) from natural-log token log-probabilities (<= 0).

    >>> perplexity_from_logprobs([0.0, 0.0])
    1.0
    """
    values = _as_floats(logprobs, "token log-probabilities")
    for i, lp in enumerate(values):
        if not lp <= 0.0:  # also rejects NaN
            raise ValueError(
                f"Log-probability at index {i} is {lp!r}; log-probabilities must be <= 0. "
                "Did you pass NLLs (which are >= 0) instead? Negate them."
            )
    return _safe_exp(-math.fsum(values) / len(values))


# --------------------------------------------------------------------------- model loss


def _model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's weights (HF models expose `.device`, plain modules do not)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a batch to `device`, leaving other values as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_labels(batch: Mapping[str, Any]) -> torch.Tensor:
    """``batch["labels"]``, once we know it is there and aligned with ``input_ids``.

    Labels must not be shifted already: the loss shifts them, and a pre-shifted batch would
    silently train each position to predict the token after the next.
    """
    if "labels" not in batch:
        raise KeyError("completion_nll needs batch['labels'] (-100 on unsupervised tokens).")
    labels = batch["labels"]
    if labels.shape != batch["input_ids"].shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match input_ids' [B, T] "
            f"{tuple(batch['input_ids'].shape)}; labels must be aligned with input_ids (not pre-shifted)."
        )
    return labels


def completion_nll(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
    """Summed NLL over supervised tokens, and how many there are: the reference loss.

    Logits at position t predict token t + 1, so we compare ``logits[:, :-1]`` with
    ``labels[:, 1:]``; positions whose label is -100 (prompt, padding) are ignored. A label
    at position 0 is never predicted and so never counted (same as HF's loss). Cross-entropy
    runs in float32 even for bf16/fp16 logits. We avoid the model's own ``labels=`` loss
    because it returns a *mean*, and means of batches with different token counts cannot be
    combined correctly. `attention.model_inputs` picks the batch's model inputs (and, for a
    padding-free packed batch, attention per example).

    Training uses `fused_loss.completion_nll`: the same value and gradients with less work
    (the LM head only on supervised positions, fused with the loss).

    Returns:
        ``(nll_sum, n_tokens)``: a 0-dim float32 tensor (keeps the graph, so it can be
        backpropagated) and a Python int. ``nll_sum`` is 0 when ``n_tokens`` is 0.
    """
    labels = check_labels(batch)
    with model_inputs(model, batch) as inputs:
        logits = model(**inputs).logits  # [B, T, vocab]
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    targets = labels[:, 1:].to(logits.device)  # position t predicts token t + 1
    nll_sum = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
    )
    return nll_sum, int((targets != IGNORE_INDEX).sum().item())


LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], tuple[torch.Tensor, int]]
"""``completion_nll``'s signature: the reference, or `fused_loss.completion_nll`."""


@dataclass(frozen=True)
class EvalResult:
    """Token-weighted loss over a whole split.

    Attributes:
        nll_sum: total NLL over all supervised (completion) tokens, in nats.
        n_tokens: number of supervised tokens that were predicted.
        loss: ``nll_sum / n_tokens``, the mean NLL per completion token.
        perplexity: ``exp(loss)``.
    """

    nll_sum: float
    n_tokens: int
    loss: float
    perplexity: float


def _no_tokens_error() -> ValueError:
    return ValueError(
        "No supervised tokens: every label is -100 (or only position 0 is supervised, which "
        "is never predicted). Loss and perplexity would divide by zero; check the label mask "
        "and that completions were not truncated away."
    )


EVAL_TOKENS_PER_FORWARD = 2048
"""Evaluation runs a padded batch this many positions (rows x width) at a time at most."""


def _per_batch_nll(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    device: torch.device | str | None,
    tokens_per_forward: int | None = EVAL_TOKENS_PER_FORWARD,
    loss_fn: LossFn = completion_nll,
) -> list[tuple[float, int]]:
    """(nll_sum, n_tokens) for every batch, in eval mode without gradients.

    The model's previous train/eval mode is restored afterwards, so this can be called
    in the middle of a training loop. A batch of more than ``tokens_per_forward`` positions
    runs a few rows at a time (`_row_slices`; the sums are the same), so the memory of an
    evaluation does not grow with its batch size.
    """
    device = _model_device(model) if device is None else device
    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.inference_mode():
            for batch in batches:
                nll, n = 0.0, 0
                for piece in _row_slices(batch, tokens_per_forward):
                    piece_nll, piece_n = loss_fn(model, _to_device(piece, device))
                    nll, n = nll + float(piece_nll), n + piece_n
                results.append((nll, n))
    finally:
        model.train(was_training)
    return results


def _row_slices(batch: Mapping[str, Any], tokens: int | None) -> Iterator[Mapping[str, Any]]:
    """The batch in slices of whole rows with at most ``tokens`` positions each (at least a row).

    Rows are independent in a padded batch and in block-masked packed rows, so every tensor
    with one entry per row is sliced alike; a padding-free row (``cu_seq_lens_q``) is one row.
    """
    rows, width = batch["input_ids"].shape
    if tokens is None or rows * width <= tokens or "cu_seq_lens_q" in batch:
        yield batch
        return
    step = max(1, tokens // width)
    for r in range(0, rows, step):
        yield {
            k: v[r : r + step] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
            for k, v in batch.items()
        }


def evaluate_loss(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str | None = None,
    tokens_per_forward: int | None = EVAL_TOKENS_PER_FORWARD,
    loss_fn: LossFn = completion_nll,
) -> EvalResult:
    """Validation loss and perplexity, weighted by supervised tokens.

    perplexity = exp(sum of completion NLL / number of completion tokens) over all
    batches, so a batch with 3 completion tokens weighs 3, not as much as one with 300.

    Args:
        model: any causal LM returning ``.logits`` of shape [B, T, V].
        batches: dicts with ``input_ids``, ``attention_mask``, ``labels`` ([B, T]).
        device: where to run; defaults to the model's device.
        tokens_per_forward: run larger batches a few rows at a time (None: whole batches).
        loss_fn: the per-batch ``(nll_sum, n_tokens)``; the training loop passes the faster
            `fused_loss.completion_nll`, which gives the same numbers.
    """
    per_batch = _per_batch_nll(model, batches, device, tokens_per_forward, loss_fn)
    nll_sum = math.fsum(nll for nll, _ in per_batch)
    n_tokens = sum(n for _, n in per_batch)
    if n_tokens == 0:
        raise _no_tokens_error()
    loss = nll_sum / n_tokens
    return EvalResult(nll_sum=nll_sum, n_tokens=n_tokens, loss=loss, perplexity=_safe_exp(loss))


def mean_of_batch_perplexities(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str | None = None,
) -> float:
    """The WRONG way to get validation perplexity: average exp(batch mean NLL) over batches.

    Kept so the notebooks can show why it is wrong: it weighs every batch equally
    whatever its number of completion tokens, and averages after exponentiating (by
    Jensen's inequality that is >= the right value even with equal token counts). Use
    `evaluate_loss` instead.
    """
    per_batch = _per_batch_nll(model, batches, device)
    if not per_batch:
        raise ValueError("Got no batches: cannot average perplexities over zero batches.")
    if any(n == 0 for _, n in per_batch):
        raise _no_tokens_error()
    return math.fsum(_safe_exp(nll / n) for nll, n in per_batch) / len(per_batch)


# --------------------------------------------------------------------------- BLEU / ROUGE


def _check_pairs(predictions: Sequence[str], references: Sequence[Any]) -> None:
    """Generation metrics compare pairs: refuse mismatched or empty lists up front."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, not a string.")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} "
            f"predictions and {len(references)} references (one reference per prediction)."
        )
    if len(predictions) == 0:
        raise ValueError("Got no predictions: need at least one (prediction, reference) pair.")


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], **kwargs: Any) -> float:
    """Corpus BLEU (0-100) with sacrebleu's standard settings, one reference per prediction.

    Equal to ``sacrebleu.corpus_bleu(predictions, [references], **kwargs).score``; note
    sacrebleu wants reference *streams*, hence the extra list. ``kwargs`` (tokenize,
    lowercase, smooth_method, ...) go to sacrebleu. Corpus BLEU is not a mean of
    sentence BLEUs: n-gram counts are summed over the corpus first. A corpus with no
    matching 4-gram scores 0 (e.g. a single 3-word sentence, even if identical).
    """
    import sacrebleu

    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], **kwargs).score)


def rouge(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    rouge_types: Sequence[str] = DEFAULT_ROUGE_TYPES,
    use_stemmer: bool = True,
) -> dict[str, float]:
    """Mean ROUGE F1 per type over (prediction, reference) pairs, each in [0, 1].

    Same scale as HF evaluate's rouge (not x100). Texts are passed to
    ``rouge_score.rouge_scorer.RougeScorer`` unchanged, like evaluate does: rougeLsum
    treats "\\n" as the sentence separator, so join sentences with newlines first if you
    want summary-level LCS (otherwise rougeLsum equals rougeL). We report the exact mean
    of per-pair F1; evaluate's default ``use_aggregator=True`` reports a bootstrap
    median of means instead, which can differ in the last digits.
    """
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    if not rouge_types:
        raise ValueError(f"rouge_types is empty; choose from e.g. {DEFAULT_ROUGE_TYPES}.")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    per_pair = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {t: math.fsum(s[t].fmeasure for s in per_pair) / len(per_pair) for t in rouge_types}


def chrf(predictions: Sequence[str], references: Sequence[str], **kwargs: Any) -> float:
    """Corpus chrF (0-100): F-score of character n-grams (Popović, 2015), sacrebleu's defaults.

    Kinder than BLEU to a different word form ("pocket" / "pockets") and defined for one short
    sentence. Equal to ``sacrebleu.corpus_chrf(predictions, [references], **kwargs).score``.
    """
    import sacrebleu

    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)], **kwargs).score)


def stop_rate(stopped: Sequence[bool]) -> float:
    """Share of generations that ended with EOS before the token limit.

    `generation.generate_with_stops` returns the flags. A model never taught to emit EOS (the
    chapter's pad = EOS bug) scores 0: every answer runs until it is cut off.
    """
    if len(stopped) == 0:
        raise ValueError("Got no generations: the stop rate of zero outputs is undefined.")
    return sum(bool(s) for s in stopped) / len(stopped)


def distinct_n(predictions: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): unique word n-grams / all word n-grams over the outputs.

    Low values mean repetition, within an output ("soft soft soft") or across outputs (the same
    answer to every prompt). Words are lower-cased and split on whitespace.

    >>> distinct_n(["the cat sat", "the cat ran"], n=1)
    0.6666666666666666
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = [
        tuple(words[i : i + n])
        for text in predictions
        for words in [text.lower().split()]
        for i in range(len(words) - n + 1)
    ]
    if not grams:
        raise ValueError(f"The outputs hold no {n}-gram: distinct-{n} is undefined.")
    return len(set(grams)) / len(grams)


# --------------------------------------------------------------------------- evaluate modules


def metric_module_path(name: str) -> str:
    """Absolute path of a bundled, offline `evaluate` metric script ('bleu' or 'rouge').

    `evaluate.load("bleu")` needs the Hub; these local scripts do not.
    """
    if name not in METRIC_MODULE_NAMES:
        raise ValueError(f"Unknown metric module {name!r}; choose one of {METRIC_MODULE_NAMES}.")
    return str(_METRIC_MODULES_DIR / f"{name}.py")


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` on a bundled metric script, so it works offline.

    ``kwargs`` go to ``evaluate.load``: ``cache_dir`` only moves the temporary
    predictions/references files, ``keep_in_memory=True`` avoids them. The script itself
    is always copied under ``HF_MODULES_CACHE`` (``~/.cache/huggingface/modules``),
    which evaluate reads from the environment once, at import time.
    """
    import evaluate

    return evaluate.load(metric_module_path(name), **kwargs)
