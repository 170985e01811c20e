"""Experiment drivers for the notebooks: sweeps and comparisons that return plain data.

Each driver trains fresh copies of one base model (a *model factory*: a zero-argument callable
returning a new, untrained model), so runs never leak into each other, and returns a list of
dicts that plots, tables and ``assert`` cells consume. Nothing here prints; the ``plot_*`` helpers at
the end draw the returned data (matplotlib Figures, as in `lumorik_sft.course.plots`).

    factory = base_model_factory(fallback_texts=texts)        # the embedded model, or a toy
    runs = lr_sweep(factory, factory.tokenizer, train_ex, val_ex, [5e-5, 1e-3, 1e-1], epochs=1)
    [(r["label"], r["val_loss_before"], r["val_loss_after"]) for r in runs]

Smoke run from a shell (tiny model, a few seconds on a CPU)::

    python -c "from lumorik_sft.course.experiments import _smoke; _smoke()"
"""

from __future__ import annotations

import copy
import functools
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lumorik_sft import encoding, fidelity, metrics
from lumorik_sft.course import synthetic
from lumorik_sft.training import TrainConfig, train

ModelFactory = Callable[[], PreTrainedModel]
Examples = Sequence[Mapping[str, Sequence[int]]]
Record = dict[str, str]

__all__ = [
    "BaseModelFactory",
    "base_model_factory",
    "batch_size_sweep_fixed_tokens",
    "before_after_table",
    "epochs_comparison",
    "epochs_curve",
    "lr_sweep",
    "metric_pitfall_candidates",
    "noisy_vs_clean",
    "plot_epochs_curve",
    "plot_step_losses",
    "plot_val_losses",
    "quiet_config",
    "run_sft",
    "score_candidates",
    "shuffle_completions",
]


# --------------------------------------------------------------------------- the base model


@dataclass
class BaseModelFactory:
    """A zero-argument callable that returns a fresh copy of one base model.

    The pristine model is loaded once and deep-copied per run: the same as reloading it from
    disk (the weights are bit-identical), without paying the load each time.
    """

    base: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str

    def __call__(self) -> PreTrainedModel:
        return copy.deepcopy(self.base)

    @property
    def pretrained(self) -> bool:
        """False for the random-init fallback used while the embedded model is missing."""
        return not self.source.startswith("random-init")


def base_model_factory(
    name_or_path: str | None = None,
    *,
    fallback_texts: list[str] | None = None,
    seed: int = 0,
    device: str = "auto",
) -> BaseModelFactory:
    """A factory for `pipeline.model_and_tokenizer`'s model: the embedded one, else a toy.

    `fallback_texts` train the toy's tokenizer when the embedded model is missing; pass the
    texts of the task you will fine-tune on.
    """
    from lumorik_sft.pipeline import model_and_tokenizer

    model, tokenizer, source = model_and_tokenizer(
        name_or_path, fallback_texts=fallback_texts, seed=seed, device=device
    )
    model.eval()
    return BaseModelFactory(model, tokenizer, source)


# --------------------------------------------------------------------------- one run


def quiet_config(**overrides: Any) -> TrainConfig:
    """A `TrainConfig` without progress bars or log lines (notebook cells stay short).

    It trains in fp32 unless told otherwise, so a notebook prints the same numbers on a CPU with
    native bf16 (where precision='auto' would pick bf16) as on one without.
    """
    settings: dict[str, Any] = {"progress": False, "log_every": 0, "precision": "fp32"}
    settings.update(overrides)
    return TrainConfig(**settings)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def run_sft(
    model_factory: ModelFactory,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Examples,
    val_examples: Examples,
    *,
    label: str | None = None,
    keep_model: bool = False,
    **config: Any,
) -> dict[str, Any]:
    """Fine-tune a fresh model once and summarise the run as plain data.

    ``config`` holds `TrainConfig` fields (learning_rate, batch_size, epochs, ...). A run whose
    loss becomes NaN or infinite does not raise: it is reported with ``diverged=True`` and the
    step losses seen so far, which is what a learning-rate sweep wants to show.

    Returns a dict: label, learning_rate, batch_size, epochs, n_train, steps (optimizer steps
    done), step_losses, epochs_log (per-epoch records of `TrainResult.epochs`, epoch 0 = before
    training), val_loss_before, val_loss_after (inf when diverged), improvement (before - after),
    diverged, seconds; plus ``model`` (the trained model) when ``keep_model``.
    """
    cfg = quiet_config(**config)
    model = model_factory()
    step_losses: list[float] = []
    epochs_log: list[dict[str, Any]] = []

    def record(event: dict[str, Any]) -> None:
        if event["event"] == "step":
            step_losses.append(event["loss"])
        else:
            epochs_log.append({k: v for k, v in event.items() if k not in ("event", "result")})

    start = time.perf_counter()
    diverged = False
    try:
        train(model, tokenizer, train_examples, val_examples, cfg, callback=record)
    except FloatingPointError:
        diverged = True
    model.eval()
    before = epochs_log[0]["val_loss"] if epochs_log else None
    after = epochs_log[-1]["val_loss"] if len(epochs_log) > 1 else None
    diverged = diverged or not _finite(after) or any(not math.isfinite(x) for x in step_losses)
    if diverged:
        after = math.inf
    out: dict[str, Any] = {
        "label": label or f"lr {cfg.learning_rate:g}",
        "learning_rate": cfg.learning_rate,
        "batch_size": cfg.batch_size,
        "grad_accum_steps": cfg.grad_accum_steps,
        "epochs": cfg.epochs,
        "n_train": len(train_examples),
        "steps": len(step_losses),
        "step_losses": step_losses,
        "epochs_log": epochs_log,
        "val_loss_before": before,
        "val_loss_after": after,
        "improvement": (before - after) if _finite(before) else None,
        "diverged": diverged,
        "seconds": time.perf_counter() - start,
    }
    if keep_model:
        out["model"] = model
    return out


# --------------------------------------------------------------------------- sweeps


def lr_sweep(
    model_factory: ModelFactory,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Examples,
    val_examples: Examples,
    learning_rates: Sequence[float],
    **config: Any,
) -> list[dict[str, Any]]:
    """One `run_sft` per learning rate, everything else equal (same data, order and seed)."""
    if not learning_rates:
        raise ValueError("learning_rates is empty; pass e.g. [5e-5, 1e-3, 1e-1]")
    runs = [{"learning_rate": lr, "label": f"lr {lr:g}"} for lr in learning_rates]
    return _runs(model_factory, tokenizer, train_examples, val_examples, runs, config)


def _runs(
    model_factory: ModelFactory,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Examples,
    val_examples: Examples,
    runs: Sequence[dict[str, Any]],
    config: dict[str, Any],
) -> list[dict[str, Any]]:
    """One `run_sft` per entry of `runs` (its settings over the shared `config`), in order."""
    return [
        run_sft(model_factory, tokenizer, train_examples, val_examples, **{**config, **run}) for run in runs
    ]


def epochs_curve(
    model_factory: ModelFactory,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Examples,
    val_examples: Examples,
    epochs: int,
    **config: Any,
) -> list[dict[str, Any]]:
    """Train loss and validation loss after every epoch of one run (epoch 0: before training).

    Each dict: epoch, step, train_loss (None for epoch 0), val_loss, val_perplexity, gap
    (val_loss - train_loss, None for epoch 0). A small training set and many epochs give the
    overfitting curve: train loss keeps falling while validation loss turns up.
    """
    run = run_sft(model_factory, tokenizer, train_examples, val_examples, epochs=epochs, **config)
    rows = []
    for e in run["epochs_log"]:
        train_loss = e.get("train_loss")
        rows.append(
            {
                "epoch": e["epoch"],
                "step": e["step"],
                "train_loss": train_loss,
                "val_loss": e["val_loss"],
                "val_perplexity": e["val_perplexity"],
                "gap": None if train_loss is None else e["val_loss"] - train_loss,
            }
        )
    return rows


def epochs_comparison(
    model_factory: ModelFactory,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Examples,
    val_examples: Examples,
    epoch_counts: Sequence[int] = (1, 3),
    **config: Any,
) -> list[dict[str, Any]]:
    """Separate runs of 1 and of several epochs (each with its own full LR schedule).

    Unlike reading epoch 1 off a longer run, this compares what you would actually get by
    stopping after one epoch: the 1-epoch run decays its learning rate to 0 within that epoch.
    """
    runs = [{"epochs": n, "label": f"{n} epoch{'s' if n != 1 else ''}"} for n in epoch_counts]
    return _runs(model_factory, tokenizer, train_examples, val_examples, runs, config)


def batch_size_sweep_fixed_tokens(
    model_factory: ModelFactory,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Examples,
    val_examples: Examples,
    batch_sizes: Sequence[int],
    *,
    learning_rate: float,
    lr_scaling: str | None = None,
    **config: Any,
) -> list[dict[str, Any]]:
    """One run per batch size on the same examples and epochs: the same tokens, fewer steps.

    With a fixed budget a batch twice as large makes half as many optimizer steps. ``lr_scaling``
    None keeps ``learning_rate`` for every size; 'sqrt' or 'linear' scale it by
    (batch_size / smallest batch size) ** 0.5 or ** 1, the usual rules of thumb.
    Each dict is a `run_sft` summary plus ``tokens`` (supervised tokens seen, equal for all).
    """
    if not batch_sizes:
        raise ValueError("batch_sizes is empty; pass e.g. [2, 8, 32]")
    if lr_scaling not in (None, "sqrt", "linear"):
        raise ValueError(f"lr_scaling must be None, 'sqrt' or 'linear', got {lr_scaling!r}")
    power = {None: 0.0, "sqrt": 0.5, "linear": 1.0}[lr_scaling]
    smallest = min(batch_sizes)
    tokens = sum(
        sum(1 for t in ex["labels"][1:] if t != encoding.IGNORE_INDEX) for ex in train_examples
    ) * config.get("epochs", TrainConfig.epochs)
    runs = []
    for bs in batch_sizes:
        lr = learning_rate * (bs / smallest) ** power
        run = run_sft(
            model_factory,
            tokenizer,
            train_examples,
            val_examples,
            batch_size=bs,
            learning_rate=lr,
            label=f"batch {bs}",
            **config,
        )
        run["tokens"] = tokens
        runs.append(run)
    return runs


# --------------------------------------------------------------------------- data quality


def shuffle_completions(records: Sequence[Record], fraction: float, *, seed: int = 0) -> list[Record]:
    """Corrupt a share of the pairs: their completions are moved to other prompts.

    ``round(fraction * n)`` pairs are chosen at random and their completions rotated among them,
    so every chosen prompt gets a fluent completion that belongs to another prompt (a noisy
    label: well-formed, wrong). The input list is not modified. Corrupted records carry
    ``"noisy": "yes"``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    out = [dict(r) for r in records]
    k = round(fraction * len(out))
    if k < 2:  # one record cannot swap with itself
        return out
    chosen = random.Random(seed).sample(range(len(out)), k)
    completions = [out[i]["completion"] for i in chosen]
    for j, i in enumerate(chosen):
        out[i]["completion"] = completions[(j + 1) % k]
        out[i]["noisy"] = "yes"
    return out


def noisy_vs_clean(
    model_factory: ModelFactory,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    val_records: Sequence[Record],
    *,
    variants: Sequence[tuple[int, float]],
    seed: int = 0,
    max_length: int = encoding.DEFAULT_MAX_LENGTH,
    **config: Any,
) -> list[dict[str, Any]]:
    """Train on (n examples, noise fraction) variants; score all on the same clean validation set.

    ``variants=[(100, 0.0), (100, 0.5), (200, 0.5)]`` compares clean data, the same amount of
    noisy data, and twice as much noisy data. Each variant uses the first n of ``records``, then
    `shuffle_completions`. Each dict is a `run_sft` summary plus n, noise, n_corrupted.
    """
    if not variants:
        raise ValueError("variants is empty; pass e.g. [(100, 0.0), (100, 0.5), (200, 0.5)]")
    if max(n for n, _ in variants) > len(records):
        raise ValueError(f"a variant asks for more than the {len(records)} records given")
    val_ex, _ = encoding.encode_records(val_records, tokenizer, max_length=max_length)
    runs = []
    for n, noise in variants:
        chosen = shuffle_completions(records[:n], noise, seed=seed)
        train_ex, _ = encoding.encode_records(chosen, tokenizer, max_length=max_length)
        label = f"{n} clean" if noise == 0 else f"{n}, {noise:.0%} noisy"
        run = run_sft(model_factory, tokenizer, train_ex, val_ex, label=label, **config)
        run.update(n=n, noise=noise, n_corrupted=sum(r.get("noisy") == "yes" for r in chosen))
        runs.append(run)
    return runs


# --------------------------------------------------------------------------- evaluation


def before_after_table(before: Any, after: Any) -> list[dict[str, Any]]:
    """Rows (metric, before, after, change, better) from two `pipeline.EvalReport`s.

    Loss, perplexity, foreign facts and dosing flags are better when lower; the rest (BLEU,
    ROUGE, chrF, stop rate, distinct-2, fact fidelity) when higher. A metric is shown when both
    reports have it; dosing flags only for health answers, where they matter.
    """
    rows = [
        ("loss", before.loss, after.loss, False),
        ("perplexity", before.perplexity, after.perplexity, False),
    ]
    if before.bleu is not None and after.bleu is not None:
        rows.append(("BLEU", before.bleu, after.bleu, True))
    rows += [(k, before.rouge[k], after.rouge[k], True) for k in after.rouge if k in before.rouge]
    for name, key in (("chrF", "chrf"), ("stop rate", "stop_rate"), ("distinct-2", "distinct_2")):
        rows.append((name, getattr(before, key, None), getattr(after, key, None), True))
    facts_b, facts_a = getattr(before, "fidelity", None) or {}, getattr(after, "fidelity", None) or {}
    health = getattr(getattr(after, "fact_check", None), "task", None) == "health"
    for key in ("fidelity", "all_facts_right", "foreign_per_output", "parties_right", "dosing_flagged"):
        if key != "dosing_flagged" or health:
            higher = key not in ("foreign_per_output", "dosing_flagged")
            rows.append((key.replace("_", " "), facts_b.get(key), facts_a.get(key), higher))
    return [
        {"metric": name, "before": b, "after": a, "change": a - b, "better": (a > b) if higher else (a < b)}
        for name, b, a, higher in rows
        if b is not None and a is not None
    ]


def metric_pitfall_candidates(seed: int = 7) -> dict[str, Any]:
    """A product prompt, its reference, and candidate completions that fool one metric or another.

    Candidates (all fluent):
    - ``reference``: the reference itself;
    - ``wrong facts``: the same sentences with the colour and material of another product:
      near-perfect BLEU/ROUGE, factually wrong;
    - ``paraphrase``: the right facts in plain words of our own: low BLEU, correct;
    - ``other product``: the description of a different product in the same tone.
    """
    rng = random.Random(seed)
    attrs = synthetic.sample_product_attributes(rng)
    other = synthetic.sample_product_attributes(rng)
    while {other["colour"], other["material"]} & {attrs["colour"], attrs["material"]}:  # "terracotta" is both
        other = synthetic.sample_product_attributes(rng)
    wording = seed * 1000 + 1  # same wording seed -> the same template choices
    reference = synthetic.sample_description(attrs, random.Random(wording))
    wrong = dict(attrs, colour=other["colour"], material=other["material"])
    paraphrase = (
        f"Made from {attrs['material']} and coloured {attrs['colour']}, this "
        f"{attrs['category']} comes with these features: {', '.join(attrs['features'])}."
    )
    other_same_tone = dict(other, tone=attrs["tone"], length=attrs["length"])
    return {
        "prompt": synthetic.render_product_prompt(attrs),
        "reference": reference,
        "candidates": {
            "reference": reference,
            "wrong facts": synthetic.sample_description(wrong, random.Random(wording)),
            "paraphrase": paraphrase,
            "other product": synthetic.sample_description(other_same_tone, random.Random(wording)),
        },
    }


def score_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    reference: str,
    candidates: Mapping[str, str],
    *,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Score each candidate completion of one prompt by the model and against the reference.

    Each dict: name, text, loss and perplexity (the model's token-weighted NLL of the candidate
    given the prompt, EOS included), bleu and chrf (0-100) and rougeL (0-1) against the
    reference, and for a product prompt fidelity (share of its facts named) and foreign (other
    products' attributes named, judged against the course's 1,000 product prompts).
    ``max_length`` defaults to the smaller of the model's context and 256 tokens.
    """
    max_length = encoding.fit_max_length(model, max_length)
    collate = encoding.SFTCollator(tokenizer.pad_token_id)
    rows = []
    for name, text in candidates.items():
        ex = encoding.encode_example(tokenizer, prompt, text, max_length=max_length)
        if ex is None:
            raise ValueError(f"candidate {name!r} has no completion token left after encoding")
        ev = metrics.evaluate_loss(model, [collate([ex])])
        rows.append(
            {
                "name": name,
                "text": text,
                "loss": ev.loss,
                "perplexity": ev.perplexity,
                "bleu": metrics.corpus_bleu([text], [reference]),
                "rougeL": metrics.rouge([text], [reference], rouge_types=("rougeL",))["rougeL"],
                "chrf": metrics.chrf([text], [reference]),
                **_fact_check(prompt, text, reference),
            }
        )
    return rows


@functools.cache
def _course_product_prompts() -> tuple[str, ...]:
    """The 1,000 course product prompts, built once: they define what counts as foreign."""
    return tuple(r["prompt"] for r in synthetic.product_descriptions(1000, seed=0))


def _fact_check(prompt: str, text: str, reference: str) -> dict[str, float]:
    """Fidelity of one product description, foreign values taken from every course product."""
    if fidelity.detect_task(prompt) != "products":
        return {}
    aliases = synthetic.FEATURE_ALIASES
    check = fidelity.fact_fidelity(
        [prompt], [text], [reference], aliases=aliases, vocabulary_from=_course_product_prompts()
    )
    return {"fidelity": check.score, "foreign": check.foreign_per_output}


# --------------------------------------------------------------------------- plots


def _axes(ax: Any, size: tuple[float, float] = (7, 4)) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def plot_step_losses(
    runs: Sequence[Mapping[str, Any]], *, ax: Any = None, title: str | None = None, ylim_to_start: bool = True
) -> Any:
    """Training loss per optimizer step, one line per run (diverged runs end with an x).

    ``ylim_to_start`` caps the y axis a little above the starting loss, so one exploding run
    does not flatten the others (its spikes leave the plot, which is the point).
    """
    fig, ax = _axes(ax)
    for run in runs:
        losses = run["step_losses"]
        steps = range(1, len(losses) + 1)
        (line,) = ax.plot(steps, losses, label=run["label"] + (" (diverged)" if run["diverged"] else ""))
        if run["diverged"] and losses:
            ax.plot([len(losses)], [losses[-1]], "x", color=line.get_color(), markersize=10)
    starts = [r["val_loss_before"] for r in runs if _finite(r["val_loss_before"])]
    if ylim_to_start and starts:
        ax.set_ylim(bottom=0, top=max(starts) * 1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (NLL per completion token)")
    ax.set_title(title or "training loss per step")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_val_losses(runs: Sequence[Mapping[str, Any]], *, ax: Any = None, title: str | None = None) -> Any:
    """Validation loss after training, one bar per run; the dashed line is the loss before."""
    fig, ax = _axes(ax)
    labels = [r["label"] for r in runs]
    before = [r["val_loss_before"] for r in runs if _finite(r["val_loss_before"])]
    top = (
        max([*before, *(r["val_loss_after"] for r in runs if _finite(r["val_loss_after"]))], default=1.0)
        * 1.15
    )
    heights = [r["val_loss_after"] if _finite(r["val_loss_after"]) else top for r in runs]
    bars = ax.bar(labels, heights, color="tab:green")
    for bar, run in zip(bars, runs, strict=True):
        if run["diverged"]:
            bar.set_hatch("//")
            bar.set_color("tab:red")
        text = "diverged" if run["diverged"] else f"{run['val_loss_after']:.3f}"
        ax.annotate(
            text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9
        )
    if before:
        ax.axhline(before[0], linestyle="--", color="grey", label=f"before training {before[0]:.3f}")
        ax.legend(loc="lower right")
    ax.set_ylim(0, top * 1.08)
    ax.set_xlabel("run")
    ax.set_ylabel("validation loss (lower is better)")
    ax.set_title(title or "validation loss after training")
    ax.tick_params(axis="x", labelrotation=15)
    return fig


def plot_epochs_curve(rows: Sequence[Mapping[str, Any]], *, ax: Any = None, title: str | None = None) -> Any:
    """Train and validation loss per epoch (from `epochs_curve`), the best epoch marked."""
    fig, ax = _axes(ax)
    trained = [r for r in rows if r["train_loss"] is not None]
    ax.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], "o-", label="train loss")
    ax.plot([r["epoch"] for r in rows], [r["val_loss"] for r in rows], "s--", label="validation loss")
    best = min(rows, key=lambda r: r["val_loss"])
    ax.axvline(
        best["epoch"],
        color="grey",
        alpha=0.5,
        linestyle=":",
        label=f"lowest validation loss (epoch {best['epoch']})",
    )
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("loss (NLL per completion token)")
    ax.set_title(title or "train and validation loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


# --------------------------------------------------------------------------- smoke


def _smoke() -> None:
    """A two-point learning-rate sweep on a tiny random model: proves the drivers run."""
    from lumorik_sft.models import build_model, train_bpe_tokenizer

    records = synthetic.product_descriptions(40)
    tokenizer = train_bpe_tokenizer([r["prompt"] + "\n" + r["completion"] for r in records], vocab_size=400)
    base = build_model("gpt2", tokenizer, n_layer=2, width=32, n_head=2, context=256)
    factory = BaseModelFactory(base, tokenizer, "random-init toy")
    examples, _ = encoding.encode_records(records, tokenizer)
    for run in lr_sweep(factory, tokenizer, examples[:32], examples[32:], [1e-4, 3e-3], epochs=1):
        print(run["label"], round(run["val_loss_before"], 3), round(run["val_loss_after"], 3))
