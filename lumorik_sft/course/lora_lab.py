"""Notebook 10's LoRA lab: what LoRA trains, what it costs, and what it learns and forgets.

The notebook only calls these and prints what they return:

* `parameter_arithmetic`: trainable parameters per `LoraSettings`, counted on the model and by the
  formula ``r * (in + out)`` per wrapped layer (the two must agree);
* `optimizer_state_bytes`: the bytes AdamW keeps after a real optimizer step (two fp32 moments
  per trainable parameter), measured from the optimizer's state, beside the formula;
* `forgetting_perplexity`: perplexity on the base model's held-out documentation text (modules
  the recipe never trained on), before and after SFT: how much of what it knew it lost;
* `compare_runs`: full fine-tuning against LoRA settings on the worked example, each at its best
  learning rate from a small sweep, one row of measurements per setting; `plot_comparison` draws it.

Smoke run from a shell (tiny random model, a few seconds)::

    python -c "from lumorik_sft.course.lora_lab import _smoke; _smoke()"
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lumorik_sft import encoding, lora, metrics, pipeline
from lumorik_sft.config import TrainConfig
from lumorik_sft.course import synthetic
from lumorik_sft.schedule import build_optimizer
from lumorik_sft.training import train

Examples = Sequence[Mapping[str, Sequence[int]]]
ModelFactory = Callable[[], PreTrainedModel]
FP32_BYTES = 4

__all__ = [
    "RECORDED_SWEEP",
    "RunSpec",
    "best_recorded_rate",
    "compare_runs",
    "comparison_table",
    "folder_bytes",
    "max_logit_difference",
    "documentation_blocks",
    "forgetting_perplexity",
    "formula_trainable",
    "held_out_documentation",
    "held_out_documents",
    "optimizer_state_bytes",
    "parameter_arithmetic",
    "plot_comparison",
]


# --------------------------------------------------------------------------- parameter arithmetic


def formula_trainable(model: nn.Module, settings: lora.LoraSettings) -> int:
    """``sum of r * (in + out)`` over the layers `settings` would wrap, read from their weights.

    Counts the A and B matrices only (not the trainable token rows); the model is not changed.
    """
    names = lora.resolve_targets(model, settings.targets)
    total = 0
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in names):
            rows, cols = module.weight.shape  # [out, in] for nn.Linear, [in, out] for GPT-2's Conv1D
            total += settings.r * (rows + cols)
    return total


def parameter_arithmetic(
    model: nn.Module, settings_list: Sequence[lora.LoraSettings]
) -> list[dict[str, Any]]:
    """One row per setting: trainable parameters counted on a LoRA copy and by the formula.

    Each row: label, r, targets, layers (wrapped), trainable (counted after `add_lora` on a copy),
    formula (`formula_trainable`), base (the model's parameters), percent (trainable / base).
    """
    base = sum(p.numel() for p in model.parameters())
    rows = []
    for settings in settings_list:
        wrapped = lora.add_lora(copy.deepcopy(model), settings)
        trainable, _ = lora.trainable_parameters(wrapped)
        rows.append(
            {
                "label": f"r={settings.r} {','.join(settings.targets)}",
                "r": settings.r,
                "targets": ",".join(settings.targets),
                "layers": len(lora.lora_layers(wrapped)),
                "trainable": trainable,
                "formula": formula_trainable(model, settings),
                "base": base,
                "percent": 100 * trainable / base,
            }
        )
    return rows


# --------------------------------------------------------------------------- optimizer memory


def optimizer_state_bytes(
    model: nn.Module, config: TrainConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> dict[str, int]:
    """Bytes of AdamW state after one real step on a copy of `model`, set up as `train` would.

    LoRA is added as ``config.lora_*`` asks (nothing when ``lora_r`` is None), the optimizer is
    the training loop's (`schedule.build_optimizer`: trainable parameters only), every trainable
    parameter gets a gradient (a zero one: the state's size does not depend on its values) and the
    optimizer steps once, which is when AdamW creates its moments. Returns trainable (parameters),
    measured (bytes of every state tensor: ``exp_avg``, ``exp_avg_sq`` and the step counters) and
    formula (2 moments x 4 bytes x trainable parameters).
    """
    model = copy.deepcopy(model).float()
    lora.add_lora_from_config(model, tokenizer or _NoTokens(), config)
    cfg = config if config.learning_rate is not None else _with_lr(config)
    optimizer = build_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    measured = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    n = sum(p.numel() for p in trainable)
    return {"trainable": n, "measured": measured, "formula": 2 * FP32_BYTES * n}


def _with_lr(config: TrainConfig) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(config, learning_rate=1e-3)


class _NoTokens:
    """A tokenizer without chat tokens: all `lora.add_lora_from_config` asks a tokenizer for."""

    @staticmethod
    def get_vocab() -> dict[str, int]:
        return {}


# --------------------------------------------------------------------------- forgetting


@functools.cache
def held_out_documents(val_fraction: float = 0.02, sources: tuple[Any, ...] | None = None) -> tuple[Any, ...]:
    """Documentation the embedded model never trained on: its recipe's held-out modules.

    The recipe (`lumorik_sft.basemodel`) holds out whole modules by a stable hash of their names
    (`corpus.is_validation_module`, ``PretrainConfig.val_fraction`` = 0.02). We read the first two
    sources, which are never capped (the standard library's docstrings and the language
    reference), so the modules held out here are the ones the recipe held out there (the model's
    ``corpus_manifest.json`` lists them). A few seconds: every stdlib module is parsed once.
    Returns `corpus.Document`s (module name and text); `sources` (`corpus.CorpusSource`s, in the
    recipe's order) replaces those two.
    """
    from lumorik_sft.basemodel.corpus import DEFAULT_SOURCES, is_validation_module, iter_documents

    seen: set[str] = set()  # the recipe's de-duplication across sources, in the same order
    return tuple(
        doc
        for source in (DEFAULT_SOURCES[:2] if sources is None else sources)
        for doc in iter_documents(source, seen=seen)
        if is_validation_module(doc.source, doc.module, val_fraction)
    )


def held_out_documentation(val_fraction: float = 0.02) -> list[str]:
    """The texts of `held_out_documents`."""
    return [doc.text for doc in held_out_documents(val_fraction)]


def documentation_blocks(
    tokenizer: PreTrainedTokenizerBase,
    context: int,
    n_blocks: int | None = None,
    *,
    texts: Sequence[str] | None = None,
) -> list[dict[str, list[int]]]:
    """The held-out documentation cut into blocks of `context` tokens, as pretraining validated.

    Every token is supervised (`basemodel.pretrain.pack_blocks`); the first `n_blocks` are kept.
    `texts` replaces `held_out_documentation()`.
    """
    from lumorik_sft.basemodel.pretrain import pack_blocks

    texts = held_out_documentation() if texts is None else texts
    blocks = pack_blocks(list(texts), tokenizer, context)
    return blocks[:n_blocks] if n_blocks is not None else blocks


def forgetting_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None = None,
    n_blocks: int | None = 16,
    *,
    blocks: Sequence[Mapping[str, Sequence[int]]] | None = None,
    batch_size: int = 8,
) -> float:
    """Perplexity of `model` on held-out documentation blocks (token-weighted, `metrics.evaluate_loss`).

    Pass `blocks` (any examples with input_ids, attention_mask, labels) to reuse or replace the
    held-out text; otherwise the first `n_blocks` blocks of the model's context length are cut
    with `tokenizer`. A rise after SFT is forgetting: the model predicts text it knew less well.
    """
    if blocks is None:
        if tokenizer is None:
            raise ValueError("pass a tokenizer (to cut the held-out text) or blocks")
        context = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
        blocks = documentation_blocks(tokenizer, context, n_blocks)
    if not blocks:
        raise ValueError("no documentation blocks to score; lower the context or pass blocks")
    collate = encoding.SFTCollator(pad_token_id=0)  # padding is masked out: its id never matters
    batches = (collate(list(blocks[i : i + batch_size])) for i in range(0, len(blocks), batch_size))
    was_training = model.training
    model.eval()
    try:
        return metrics.evaluate_loss(model, batches).perplexity
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- the comparison

# The learning-rate sweep notebook 10 ran before it was cut to fit two minutes (commit 00dcde0,
# idle 2-core AVX512-BF16 machine, fp32): final validation loss per setting and rate after 3 epochs
# on 256 examples, batch 8 (96 steps). The notebook now trains each setting once, at the rate that
# won here, and prints this table so the choice can be checked; re-sweeping cost two thirds of its time.
RECORDED_SWEEP: dict[str, dict[float, float]] = {
    "full FT": {5e-4: 0.301, 1e-3: 0.179},
    "LoRA r=8 attention": {1e-2: 2.817, 2e-2: 2.841},
    "LoRA r=8 all-linear": {5e-3: 1.106, 1e-2: 0.752},
    "LoRA r=32 all-linear": {2e-3: 0.785, 5e-3: 0.320},
}


def best_recorded_rate(label: str) -> float:
    """The rate with the lowest validation loss in `RECORDED_SWEEP` for the setting `label`."""
    sweep = RECORDED_SWEEP[label]
    return min(sweep, key=sweep.__getitem__)


@dataclass
class RunSpec:
    """One setting of the comparison: full fine-tuning (``lora_r=None``) or LoRA, and its rates."""

    label: str
    learning_rates: tuple[float, ...]
    lora_r: int | None = None
    lora_targets: str = "attention"
    lora_alpha: float | None = None  # None: 2 * r, the common choice
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self, **common: Any) -> dict[str, Any]:
        """The `TrainConfig` fields of this setting over the `common` ones (learning rate excluded)."""
        settings = {**common, **self.extra}
        if self.lora_r is not None:
            settings.update(
                lora_r=self.lora_r,
                lora_targets=self.lora_targets,
                lora_alpha=self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r,
            )
        return settings


class _PeakRSS:
    """Peak resident memory of this process while the block runs, minus its value at the start.

    Sampled by a thread every few milliseconds (psutil), so a very short peak can be missed; the
    number includes everything the process allocates meanwhile (activations, gradients, optimizer
    state, the allocator's caches). None where psutil is missing.
    """

    def __init__(self, every_s: float = 0.005) -> None:
        self.every_s = every_s
        self.delta: int | None = None

    def __enter__(self) -> _PeakRSS:
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil comes with accelerate
            self._proc = None
            return self
        self._proc = psutil.Process()
        self._start = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.delta = self._peak - self._start


def _train_once(
    factory: ModelFactory,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Examples,
    val_examples: Examples,
    config: TrainConfig,
) -> dict[str, Any]:
    """Train a fresh model; time every optimizer step and sample peak memory."""
    model = factory()
    stamps: list[float] = []
    evals: list[float] = []
    val_losses: list[float] = []

    def record(event: dict[str, Any]) -> None:
        now = time.perf_counter()
        if event["event"] == "step":
            stamps.append(now)
        else:
            evals.append(now)
            val_losses.append(event["val_loss"])

    start = time.perf_counter()
    with _PeakRSS() as rss:
        train(model, tokenizer, train_examples, val_examples, config, callback=record)
    # Seconds per step: the median gap between consecutive steps, so the validation passes
    # (between the last step of an epoch and the next) do not count as training time.
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "model": model,
        "steps": len(stamps),
        "seconds": time.perf_counter() - start,
        "seconds_per_step": statistics.median(gaps) if gaps else math.nan,
        "peak_rss_delta": rss.delta,
        "val_loss_before": val_losses[0] if val_losses else math.nan,
        "val_loss": val_losses[-1] if len(val_losses) > 1 else math.nan,
    }


def compare_runs(
    factory: ModelFactory,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Examples,
    val_examples: Examples,
    eval_records: Sequence[Mapping[str, str]],
    specs: Sequence[RunSpec],
    *,
    n_generate: int = 16,
    max_new_tokens: int = 64,
    doc_blocks: Sequence[Mapping[str, Sequence[int]]] | None = None,
    **common: Any,
) -> list[dict[str, Any]]:
    """Full fine-tuning and LoRA settings side by side, each at its best rate from a small sweep.

    For every `RunSpec`, one fresh model per learning rate is trained on `train_examples` with
    `common` `TrainConfig` fields (epochs, batch_size, ...; fp32, quiet); the rate with the lowest
    final validation loss wins. The winner is then measured: trainable parameters and optimizer
    state (`optimizer_state_bytes`), peak resident memory during training (`_PeakRSS`: RSS delta,
    sampled), seconds per optimizer step (median), validation loss, BLEU and fact fidelity on the
    first `n_generate` `eval_records` (`pipeline.evaluate_model`), and forgetting: perplexity on
    `doc_blocks` (held-out documentation) after training, beside the base model's.

    Returns one dict per spec: label, learning_rate, sweep ({rate: val loss}), trainable, percent,
    optimizer_bytes, optimizer_bytes_formula, peak_rss_mb, seconds_per_step, steps, val_loss,
    val_loss_before, bleu, fidelity, all_facts_right, doc_ppl_before, doc_ppl_after, forgetting
    (after / before - 1), and model (the winner, for merging and saving).
    """
    if not specs:
        raise ValueError("specs is empty; give at least one RunSpec (full fine-tuning: lora_r=None)")
    base = factory()
    base_total = sum(p.numel() for p in base.parameters())
    before = forgetting_perplexity(base, tokenizer, blocks=doc_blocks) if doc_blocks else None
    del base
    options = {"progress": False, "log_every": 0, "precision": "fp32", **common}
    rows = []
    for spec in specs:
        if not spec.learning_rates:
            raise ValueError(f"{spec.label}: learning_rates is empty; give 2-3 rates to sweep")
        runs = {}
        for lr in spec.learning_rates:
            cfg = TrainConfig(**spec.config(**options), learning_rate=lr)
            runs[lr] = _train_once(factory, tokenizer, train_examples, val_examples, cfg)
        finite = {lr: r for lr, r in runs.items() if math.isfinite(r["val_loss"])}
        lr, best = min((finite or runs).items(), key=lambda item: item[1]["val_loss"])
        for other in runs.values():
            if other is not best:
                del other["model"]
        model = best["model"]
        memory = optimizer_state_bytes(
            factory(), TrainConfig(**spec.config(**options), learning_rate=lr), tokenizer
        )
        report = pipeline.evaluate_model(
            model,
            tokenizer,
            list(eval_records),
            n_generate=n_generate,
            max_new_tokens=max_new_tokens,
            fact_aliases=synthetic.FEATURE_ALIASES,
        )
        fid = report.fidelity or {}
        after = forgetting_perplexity(model, tokenizer, blocks=doc_blocks) if doc_blocks else None
        rows.append(
            {
                "label": spec.label,
                "learning_rate": lr,
                "sweep": {rate: r["val_loss"] for rate, r in runs.items()},
                "trainable": memory["trainable"],
                "percent": 100 * memory["trainable"] / base_total,
                "optimizer_bytes": memory["measured"],
                "optimizer_bytes_formula": memory["formula"],
                "peak_rss_mb": None if best["peak_rss_delta"] is None else best["peak_rss_delta"] / 2**20,
                "seconds_per_step": best["seconds_per_step"],
                "steps": best["steps"],
                "val_loss_before": best["val_loss_before"],
                "val_loss": best["val_loss"],
                "bleu": report.bleu,
                "fidelity": fid.get("fidelity"),
                "all_facts_right": fid.get("all_facts_right"),
                "doc_ppl_before": before,
                "doc_ppl_after": after,
                "forgetting": None if before is None else after / before - 1,
                "model": model,
            }
        )
    return rows


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison as fixed-width text, one line per setting (what the notebook prints)."""
    head = (
        f"{'setting':<22}{'lr':>7}{'trainable':>11}{'%':>7}{'optim KiB':>11}{'peak MiB':>10}"
        f"{'s/step':>8}{'val loss':>10}{'BLEU':>7}{'fidelity':>10}{'doc ppl':>9}{'forget':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        ppl = "-" if r["doc_ppl_after"] is None else f"{r['doc_ppl_after']:.2f}"
        forget = "-" if r["forgetting"] is None else f"{100 * r['forgetting']:+.0f}%"
        bleu = "-" if r["bleu"] is None else f"{r['bleu']:.1f}"
        fid = "-" if r["fidelity"] is None else f"{r['fidelity']:.3f}"
        lines.append(
            f"{r['label']:<22}{r['learning_rate']:>7g}{r['trainable']:>11,}{r['percent']:>7.2f}"
            f"{r['optimizer_bytes'] / 1024:>11,.0f}{peak:>10}{r['seconds_per_step']:>8.3f}"
            f"{r['val_loss']:>10.3f}{bleu:>7}{fid:>10}{ppl:>9}{forget:>9}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the figure


def plot_comparison(rows: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """Four panels, one bar per setting: optimizer state, validation loss, fact fidelity, forgetting."""
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(2, 2)
    labels = [r["label"] for r in rows]
    colors = ["tab:grey" if "full" in r["label"].lower() else "tab:blue" for r in rows]
    panels = [
        (
            axes[0, 0],
            [r["optimizer_bytes"] / 2**20 for r in rows],
            "AdamW state (MiB)",
            "optimizer memory",
            ".2f",
        ),
        (
            axes[0, 1],
            [r["val_loss"] for r in rows],
            "validation loss (nats/token)",
            "what it learned: loss",
            ".3f",
        ),
        (
            axes[1, 0],
            [r["fidelity"] if r["fidelity"] is not None else math.nan for r in rows],
            "fact fidelity (share of facts named)",
            "what it learned: facts",
            ".3f",
        ),
        (
            axes[1, 1],
            [100 * r["forgetting"] if r["forgetting"] is not None else math.nan for r in rows],
            "doc perplexity change (%)",
            "what it forgot: held-out docs",
            "+.1f",
        ),
    ]
    for ax, values, ylabel, panel_title, spec in panels:
        bars = ax.bar(range(len(rows)), [0 if math.isnan(v) else v for v in values], color=colors)
        for bar, value in zip(bars, values, strict=True):
            text = "n/a" if math.isnan(value) else format(value, spec)
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_xlabel("setting")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "full fine-tuning against LoRA, each at its best learning rate")
    return fig


# --------------------------------------------------------------------------- merging and saving


def max_logit_difference(a: nn.Module, b: nn.Module, input_ids: torch.Tensor) -> float:
    """The largest absolute difference between two models' logits on the same tokens (eval mode)."""
    modes = a.training, b.training
    a.eval(), b.eval()  # dropout would make two calls of one model differ
    try:
        with torch.no_grad():
            return (a(input_ids=input_ids).logits - b(input_ids=input_ids).logits).abs().max().item()
    finally:
        a.train(modes[0]), b.train(modes[1])


def folder_bytes(folder: Any) -> int:
    """Total size of the files in a folder (an adapter, a saved model)."""
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- smoke


def _smoke() -> None:
    """Parameter arithmetic and a two-setting comparison on a tiny random model."""
    from lumorik_sft.models import build_model, train_bpe_tokenizer

    records = synthetic.product_descriptions(48)
    tokenizer = train_bpe_tokenizer([r["prompt"] + "\n" + r["completion"] for r in records], vocab_size=400)
    base = build_model("gpt2", tokenizer, n_layer=2, width=32, n_head=2, context=256)
    for row in parameter_arithmetic(
        base, [lora.LoraSettings(r=4), lora.LoraSettings(r=4, targets=("all-linear",))]
    ):
        print(row)
    examples, _ = encoding.encode_records(records, tokenizer)
    specs = [RunSpec("full", (1e-3,)), RunSpec("LoRA r=4", (1e-2,), lora_r=4)]
    rows = compare_runs(
        lambda: copy.deepcopy(base),
        tokenizer,
        examples[:40],
        examples[40:],
        records[40:],
        specs,
        n_generate=2,
        max_new_tokens=8,
        doc_blocks=examples[40:],
        epochs=1,
        batch_size=8,
    )
    print(comparison_table(rows))
