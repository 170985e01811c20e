"""The end-to-end demo: `lumorik-sft demo` on the embedded model and the course's product data.

It writes a noisy raw file (course data), then runs the four stages of the core library on it:
curation, encoding, training, evaluation before and after, samples and a loss-curve PNG.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from lumorik_sft import data, encoding, models, training
from lumorik_sft.course import synthetic
from lumorik_sft.course.experiments import before_after_table
from lumorik_sft.course.plots import plot_loss_curves
from lumorik_sft.defaults import recommended_learning_rate, resolve_precision
from lumorik_sft.pipeline import EvalReport, evaluate_model, model_and_tokenizer


@dataclass
class DemoSettings:
    """Sizes and hyperparameters of the end-to-end demo (fast mode shrinks them)."""

    out_dir: Path = Path("runs/demo")
    model: str | None = None
    seed: int = 0
    epochs: int = 2  # val perplexity 1.05 and BLEU 84 after 2 (1.04 and 88 after 3), 2/3 of the time
    batch_size: int = 8
    learning_rate: float | None = None  # None: the model's (defaults.recommended_learning_rate)
    max_length: int = 256
    n_generate: int = 100
    # decoded together: the embedded model decodes 50 prompts in about a third of the time that
    # batches of 16 take on a 2-core CPU (the model is small; each step's overhead dominates)
    generation_batch_size: int = 50
    # the 256-token context minus the longest product prompt (81 tokens); a third of the
    # descriptions need more than 128 tokens, so a smaller cap cuts them and lowers BLEU
    max_new_tokens: int = 175
    n_train: int | None = None  # cap on training examples (fast mode)
    precision: str = "auto"  # bf16 autocast on a bf16-capable CPU or GPU (~2.8x faster here)
    progress: bool = True

    def learning_rate_for(self, source: str | None, model: PreTrainedModel) -> float:
        """The rate to train `model` with: the one set here, else the one `training.train` would pick
        for None (`defaults.recommended_learning_rate`), known up front so the demo can print it."""
        if self.learning_rate is not None:
            return self.learning_rate
        return recommended_learning_rate(source, model)

    def train_config(
        self, model: PreTrainedModel, learning_rate: float, **overrides: Any
    ) -> training.TrainConfig:
        """The demo's training settings for `model`: bf16 autocast where its device supports it."""
        precision = resolve_precision(self.precision, next(model.parameters()).device)
        options: dict[str, Any] = dict(
            learning_rate=learning_rate,
            batch_size=self.batch_size,
            epochs=self.epochs,
            warmup_ratio=0.05,
            seed=self.seed,
            progress=self.progress,
            precision=precision,
            # oneDNN builds bf16 kernels per batch shape: a few widths instead of dozens (measured
            # here: 20 steps in 30 s, against 96 s unrounded and 48 s in fp32, on a loaded CPU).
            pad_to_multiple_of=64 if precision == "bf16" else None,
        )
        return training.TrainConfig(**{**options, **overrides})

    @classmethod
    def for_mode(cls, fast: bool, **overrides: Any) -> DemoSettings:
        base = cls(epochs=1, n_generate=8, n_train=96, max_new_tokens=32) if fast else cls()
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base


def run_demo(settings: DemoSettings, echo=print) -> dict[str, Any]:
    """Curate -> encode -> evaluate -> train -> evaluate -> samples and a loss-curve PNG."""
    start = time.perf_counter()
    stages = _StageClock()
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw.jsonl"
    synthetic.write_noisy_product_descriptions(raw, seed=settings.seed)

    model, tokenizer, source = model_and_tokenizer(
        settings.model,
        seed=settings.seed,
        fallback_texts=[
            r["prompt"] + "\n" + r["completion"] for r in synthetic.product_descriptions(seed=settings.seed)
        ],
    )

    stages.lap("setup")
    echo("== 1. Data curation ==")
    report = data.run_curation(
        # Twice the context: longer is a broken row; 256-512 tokens get their prompt cut at encoding.
        raw,
        out / "data",
        seed=settings.seed,
        skip_invalid=True,
        max_tokens=2 * settings.max_length,
        length_fn=lambda r: encoding.pair_length(tokenizer, r["prompt"], r["completion"]),
    )
    echo(report.summary())
    train_records = data.read_jsonl(out / "data" / "train.jsonl")
    val_records = data.read_jsonl(out / "data" / "val.jsonl")
    if settings.n_train is not None:
        train_records = train_records[: settings.n_train]

    stages.lap("curation")
    echo("\n== 2. Tokenization and encoding ==")
    echo(f"model: {source} ({models.count_parameters(model) / 1e6:.2f}M parameters)")
    train_ex, enc_report = encoding.encode_records(train_records, tokenizer, max_length=settings.max_length)
    val_ex, _ = encoding.encode_records(val_records, tokenizer, max_length=settings.max_length)
    echo(
        f"encoded {enc_report.encoded} training examples: {enc_report.prompt_tokens} prompt tokens "
        f"(masked, -100) and {enc_report.completion_tokens} completion tokens (supervised); "
        f"{enc_report.truncated} truncated, dropped {dict(enc_report.dropped) or 'none'}"
    )

    n_gen = min(settings.n_generate, len(val_records))
    evaluate = functools.partial(
        evaluate_model,
        model,
        tokenizer,
        val_records,
        max_length=settings.max_length,
        n_generate=n_gen,
        max_new_tokens=settings.max_new_tokens,
        fact_aliases=synthetic.FEATURE_ALIASES,
        progress=settings.progress,
        generation_batch_size=settings.generation_batch_size,
    )  # the same evaluation before and after training
    stages.lap("encoding")
    echo(f"\n== 4a. Evaluation before SFT ({len(val_records)} validation pairs) ==")
    before = evaluate()
    stages.lap("evaluation before")
    echo(_metrics_line(before))

    lr = settings.learning_rate_for(source, model)
    echo(f"\n== 3. Training (lr {lr:g}, batch {settings.batch_size}, {settings.epochs} epochs) ==")
    config = settings.train_config(model, lr, output_dir=str(out / "model"))
    echo(f"precision: {config.precision}")
    result = training.train(model, tokenizer, train_ex, val_ex, config)
    stages.lap("training")
    for ep in result.epochs[1:]:
        echo(
            f"epoch {ep['epoch']}: train loss {_fmt(ep.get('train_loss'))}, "
            f"val loss {ep['val_loss']:.3f}, val perplexity {ep['val_perplexity']:.2f}"
        )

    echo("\n== 4b. Evaluation after SFT ==")
    after = evaluate()
    stages.lap("evaluation after")
    echo(_metrics_line(after))
    echo(_comparison_table(before, after))
    echo("\n== Samples (validation prompts the model never trained on) ==")
    for i in range(min(3, n_gen)):
        echo(
            f"--- prompt ---\n{after.prompts[i]}\n--- reference ---\n{after.references[i]}\n"
            f"--- before SFT ---\n{before.predictions[i]}\n--- after SFT ---\n{after.predictions[i]}\n"
        )

    png = out / "loss_curve.png"
    plot_loss_curves(result, path=png)
    summary = {
        "model": source,
        "seconds": round(time.perf_counter() - start, 1),
        "stage_seconds": stages.seconds,
        "curation": report.to_dict(),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "history": result.to_dict(),
        "loss_curve": str(png),
        "learning_rate": lr,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    echo(
        f"loss curve: {png}\nsummary: {out / 'summary.json'}\ndemo finished in {summary['seconds']:.0f} s ("
        + ", ".join(f"{name} {sec:.0f} s" for name, sec in stages.seconds.items())
        + ")"
    )
    return summary


class _StageClock:
    """Wall seconds of each stage of the demo, so a slow machine shows where its time went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 1)
        self._last = now


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _metrics_line(r: EvalReport) -> str:
    rouge = ", ".join(f"{k} {v:.3f}" for k, v in r.rouge.items())
    facts = r.fidelity or {}
    return (
        f"completion loss {r.loss:.3f}, perplexity {r.perplexity:.2f} over {r.n_tokens} tokens; "
        f"BLEU {_fmt(r.bleu)}; chrF {_fmt(r.chrf)}; {rouge}; stop rate {_fmt(r.stop_rate)}; "
        f"distinct-2 {_fmt(r.distinct_2)}; fact fidelity {_fmt(facts.get('fidelity'))}, "
        f"foreign facts per output {_fmt(facts.get('foreign_per_output'))}"
    )


def _comparison_table(before: EvalReport, after: EvalReport) -> str:
    """`experiments.before_after_table`'s rows (the notebooks' table) as plain text."""
    rows = before_after_table(before, after)
    width = max(len(r["metric"]) for r in rows) + 2
    lines = [f"{'metric':<{width}}{'before':>10}{'after':>10}"]
    lines += [f"{r['metric']:<{width}}{_fmt(r['before']):>10}{_fmt(r['after']):>10}" for r in rows]
    return "\n".join(lines)
