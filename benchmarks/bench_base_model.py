"""Figures of the embedded base model (issue 4): recipe, SFT learning-rate sweep, worked example,
knowledge task. Prints each figure with its target and PASS/FAIL.

    python benchmarks/bench_base_model.py --quick         # smoke run: tiny sizes, ~20 s
    python benchmarks/bench_base_model.py                 # full run: ~15 min on 2 idle cores
    python benchmarks/bench_base_model.py --write-card    # ... and record the figures in the card
    python benchmarks/bench_base_model.py --sweep-epochs 1          # cheaper sweep, see Settings
    python benchmarks/bench_base_model.py --timing-only --write-card   # re-time the SFT run only
    python benchmarks/bench_base_model.py --recipe-only --second-run /tmp/base2 --write-card

What it measures:

1. The recipe, from `card.json`: time taken, tokens seen, validation perplexity, and the weights
   checksum (against the card, and against a second run of the recipe if `--second-run` is given).
2. SFT learning-rate sweep on the worked example (product descriptions, 900/100 split by
   `data.split_records(seed=0)`, batch 8): held-out completion perplexity per learning rate; the
   best becomes `recommended_sft_learning_rate` (what `defaults.recommended_learning_rate` reads).
3. Worked-example SFT at that learning rate (3 epochs): completion perplexity, BLEU and ROUGE of
   greedy generations on the 100 held-out pairs before and after, the agreement ceiling, and the
   wall time of the run (bf16 autocast, and fp32 for comparison). `--timing-only` re-measures
   just that run when the full benchmark shared the machine with other jobs.
4. Knowledge task (`doc_qa.python_doc_qa`, held out by module): pretrained base + SFT against the
   same architecture and tokenizer from random init + SFT, each at its own best learning rate.

Timings depend on what else runs on the machine: the script measures, for every timed phase, how
many cores *other* processes used meanwhile (from /proc/stat) and the load average, and flags
timings taken under contention. `--write-card` in `--quick` mode writes into a temporary copy of
the model folder, never into the embedded model.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lumorik_sft import (  # noqa: E402
    data,
    defaults,
    encoding,
    generation,
    metrics,
    models,
    pipeline,
)
from lumorik_sft.basemodel import doc_qa  # noqa: E402
from lumorik_sft.basemodel.pretrain import (  # noqa: E402
    _cpu_name,
    set_dropout,
    update_model_card,
    weights_checksum,
)
from lumorik_sft.course import demo, synthetic  # noqa: E402
from lumorik_sft.course.experiments import BaseModelFactory, run_sft  # noqa: E402
from lumorik_sft.models import cpu_supports_bf16  # noqa: E402

# Targets of issue 4 ("Figures").
RECIPE_MAX_SECONDS = 30 * 60
PPL_RATIO_MIN = 2.0
BLEU_GAIN_MIN = 20.0
BLEU_CEILING_SHARE_MIN = 0.6
SFT_MAX_SECONDS = 120.0
KNOWLEDGE_RATIO_MIN = 1.5
CONTENDED_CORES = 0.25  # other processes using more than this many cores on average


@dataclass
class Settings:
    """Sizes of a benchmark run; `quick()` shrinks everything to a smoke run."""

    n_products: int = 1000
    val_fraction: float = 0.1
    epochs: int = 3
    batch_size: int = 8
    warmup_ratio: float = 0.05  # as in notebook 05 and `demo.run_demo`
    seed: int = 0
    sweep_lrs: tuple[float, ...] = (5e-5, 3e-4, 1e-3, 3e-3)
    sweep_epochs: int = 3  # 1: cheaper sweep, winner confirmed by the full 3-epoch run
    precision: str = "bf16"
    compare_fp32: bool = True
    n_generate: int | None = None  # None: all held-out pairs
    knowledge_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)
    knowledge_epochs: int = 3
    knowledge_cap: tuple[int, int] | None = None  # (train, val) caps for smoke runs
    max_new_tokens: int | None = None  # None: from the longest reference
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            n_products=80,
            val_fraction=0.2,
            epochs=1,
            sweep_lrs=(3e-4, 3e-3),
            sweep_epochs=1,
            compare_fp32=True,
            n_generate=8,
            knowledge_lrs=(1e-3, 3e-3),
            knowledge_epochs=1,
            knowledge_cap=(48, 16),
            max_new_tokens=24,
            quick=True,
        )


# ---------------------------------------------------------------- machine and contention


class CpuWatch:
    """How many cores other processes used during a phase: busy time in /proc/stat minus ours."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float]:
        busy = math.nan
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            busy = (user + nice + system + irq + softirq + steal) / self.hz
        except (OSError, ValueError):
            pass
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system

    def stop(self) -> dict[str, float]:
        wall0, busy0, self0 = self.start
        wall1, busy1, self1 = self._snapshot()
        wall = max(wall1 - wall0, 1e-9)
        others = max(0.0, (busy1 - busy0) - (self1 - self0)) / wall
        return {
            "seconds": wall1 - wall0,
            "own_cores": (self1 - self0) / wall,
            "other_cores": others,
            "loadavg_1min": os.getloadavg()[0],
        }


def contended(watch: dict[str, float]) -> bool:
    return watch["other_cores"] > CONTENDED_CORES


def machine_info() -> dict[str, Any]:
    import sacrebleu
    import tokenizers
    import transformers

    return {
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "bf16_kernels": cpu_supports_bf16(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "sacrebleu": sacrebleu.__version__,
        "platform": platform.platform(),
    }


def log(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- 1. the recipe


def recipe_figures(folder: Path, card: dict[str, Any], second_run: Path | None) -> dict[str, Any]:
    t, r = card["training"], card["results"]
    actual = weights_checksum(folder)
    # A run interrupted and resumed from --work-dir: total_seconds covers only the last process,
    # while step_seconds adds up the optimizer steps of every process. The recipe took at least
    # the steps of all processes plus the last one's setup (corpus, tokenizer, validation, save).
    setup = (
        t["total_seconds"] - t["step_seconds"]
        if t["step_seconds"] <= t["train_seconds"]
        else t["total_seconds"] - t["train_seconds"]
    )
    resumed = t["step_seconds"] > t["train_seconds"] + 1.0
    recipe_seconds = t["step_seconds"] + setup if resumed else t["total_seconds"]
    # The fastest epoch's seconds per step, as if every step had run that fast: what the recipe
    # takes on the same machine without other jobs, when one epoch ran without them.
    rates = [
        e["seconds"] / (e["step"] - prev["step"])
        for prev, e in zip(r["epochs"], r["epochs"][1:], strict=False)
        if e["step"] > prev["step"]
    ]
    projected = min(rates) * t["steps"] + setup if rates else None
    out = {
        "recipe_seconds": recipe_seconds,
        "resumed": resumed,
        "setup_seconds": setup,
        "step_seconds": t["step_seconds"],
        "fastest_seconds_per_step": min(rates) if rates else None,
        "projected_seconds_at_fastest_epoch_rate": projected,
        "total_seconds": t["total_seconds"],
        "train_seconds": t["train_seconds"],
        "tokens_seen": t["tokens_seen"],
        "steps": t["steps"],
        "precision": t["precision"],
        "threads": t["threads"],
        "val_perplexity": r["val_perplexity"],
        "initial_val_perplexity": r["initial_val_perplexity"],
        "weights_sha256": card["weights_sha256"],
        "weights_match_card": actual == card["weights_sha256"],
        "second_run": "not re-run",
        "second_run_identical": None,
    }
    if second_run is not None:
        other = weights_checksum(second_run)
        out["second_run"] = str(second_run)
        out["second_run_sha256"] = other
        out["second_run_identical"] = other == card["weights_sha256"]
        other_card = second_run / "card.json"
        if other_card.exists():
            oc = json.loads(other_card.read_text())
            out["second_run_seconds"] = oc["training"]["total_seconds"]
            out["second_run_corpus_identical"] = oc["corpus"]["sha256"] == card["corpus"]["sha256"]
    log("== 1. Recipe (from card.json) ==")
    if resumed:
        log(
            f"time taken at least {recipe_seconds / 60:.1f} min: the run was interrupted and "
            f"resumed, the card's total_seconds ({t['total_seconds'] / 60:.1f} min) covers only "
            f"the last process; optimizer steps took {t['step_seconds'] / 60:.1f} min in all "
            f"({t['precision']}, {t['threads']} threads, {t['cpu']})"
        )
    else:
        log(
            f"time taken {t['total_seconds'] / 60:.1f} min (optimizer steps "
            f"{t['step_seconds'] / 60:.1f} min, {t['precision']}, {t['threads']} threads, "
            f"{t['cpu']})"
        )
    if projected is not None:
        log(
            f"fastest epoch: {min(rates):.3f} s/step; all {t['steps']:,} steps at that rate plus "
            f"setup: {projected / 60:.1f} min (projection, not a measurement)"
        )
    log(
        f"tokens seen {t['tokens_seen']:,} in {t['steps']:,} steps; validation perplexity "
        f"{r['initial_val_perplexity']:.1f} -> {r['val_perplexity']:.2f}"
    )
    log(
        f"weights sha256 {card['weights_sha256']} "
        f"({'matches' if out['weights_match_card'] else 'DOES NOT MATCH'} model.safetensors)"
    )
    if second_run is None:
        log("second run: not re-run")
    else:
        log(
            f"second run {second_run}: sha256 {out['second_run_sha256']} -> "
            f"{'identical' if out['second_run_identical'] else 'DIFFERENT'}"
        )
    return out


# ---------------------------------------------------------------- SFT helpers


def encode(records: list[dict[str, str]], tokenizer, what: str) -> list[dict[str, list[int]]]:
    """encode_records at the model's context (256); says how many pairs did not fit."""
    examples, report = encoding.encode_records(records, tokenizer)
    if report.encoded != len(records):
        raise RuntimeError(f"encoding dropped {what} pairs: {report.to_dict()}")
    log(
        f"  {what}: {report.encoded} pairs, {report.completion_tokens / report.encoded:.0f} "
        f"completion tokens on average, {report.truncated} cut to {encoding.DEFAULT_MAX_LENGTH} "
        "tokens (the prompt is cut from the left; every completion keeps its end and EOS)"
    )
    return examples


def completion_ppl(model, tokenizer, records) -> pipeline.EvalReport:
    """fp32, token-weighted completion loss and perplexity (no generation)."""
    return pipeline.evaluate_model(model, tokenizer, records, n_generate=0)


def sweep(
    factory, tokenizer, train_ex, val_ex, val_records, lrs, settings: Settings, epochs: int, label: str
) -> tuple[list[dict[str, Any]], dict[float, Any]]:
    """One SFT run per learning rate, same data, order and seed; fp32 re-evaluation of each."""
    rows, kept = [], {}
    for lr in lrs:
        watch = CpuWatch()
        run = run_sft(
            factory,
            tokenizer,
            train_ex,
            val_ex,
            keep_model=True,
            learning_rate=lr,
            batch_size=settings.batch_size,
            epochs=epochs,
            warmup_ratio=settings.warmup_ratio,
            seed=settings.seed,
            precision=settings.precision,
        )
        cpu = watch.stop()
        model = run.pop("model")
        ppl = math.inf if run["diverged"] else completion_ppl(model, tokenizer, val_records).perplexity
        row = {
            "learning_rate": lr,
            "epochs": epochs,
            "steps": run["steps"],
            "completion_perplexity": ppl,
            "val_loss_by_epoch": [round(e["val_loss"], 4) for e in run["epochs_log"]],
            "diverged": run["diverged"],
            "seconds": round(run["seconds"], 1),
            "other_cores": round(cpu["other_cores"], 2),
        }
        rows.append(row)
        kept[lr] = (model, run)
        log(
            f"  {label} lr {lr:<8g} completion perplexity {ppl:8.3f}  "
            f"({run['steps']} steps, {run['seconds']:.0f} s, other processes "
            f"{cpu['other_cores']:.2f} cores{', CONTENDED' if contended(cpu) else ''})"
        )
    return rows, kept


LR_TIE = 0.01  # perplexities within 1% of the best count as a tie


def best_lr(rows: list[dict[str, Any]]) -> float:
    """The smallest learning rate within 1% of the best perplexity: on a tie, the safer step size.

    >>> best_lr([{"learning_rate": 1e-3, "completion_perplexity": 1.112},
    ...          {"learning_rate": 3e-3, "completion_perplexity": 1.111}])
    0.001
    """
    best = min(r["completion_perplexity"] for r in rows)
    return min(r["learning_rate"] for r in rows if r["completion_perplexity"] <= best * (1 + LR_TIE))


def max_new_tokens_for(tokenizer, records, context: int) -> int:
    """Room for the longest reference (+ EOS and a margin), within the context."""
    longest_c = max(len(encoding.completion_ids(tokenizer, r["completion"])) for r in records)
    longest_p = max(len(encoding.prompt_ids(tokenizer, r["prompt"])) for r in records)
    return max(1, min(context - longest_p, longest_c + 16))


# ---------------------------------------------------------------- 2 + 3. the worked example


def worked_example(factory: BaseModelFactory, settings: Settings) -> dict[str, Any]:
    tokenizer = factory.tokenizer
    records = synthetic.product_descriptions(settings.n_products, seed=settings.seed)
    train_records, val_records = data.split_records(
        records, val_fraction=settings.val_fraction, seed=settings.seed
    )
    log("\n== Data: product descriptions ==")
    train_ex, val_ex = encode(train_records, tokenizer, "train"), encode(val_records, tokenizer, "held-out")
    context = factory.base.config.n_positions
    max_new = settings.max_new_tokens or max_new_tokens_for(tokenizer, val_records, context)
    n_gen = len(val_records) if settings.n_generate is None else settings.n_generate
    log(
        f"\n== 2. SFT learning-rate sweep: product descriptions, {len(train_records)} train / "
        f"{len(val_records)} held-out pairs, batch {settings.batch_size}, "
        f"{settings.sweep_epochs} epoch(s), {settings.precision} =="
    )
    rows, kept = sweep(
        factory,
        tokenizer,
        train_ex,
        val_ex,
        val_records,
        settings.sweep_lrs,
        settings,
        settings.sweep_epochs,
        "products",
    )
    lr = best_lr(rows)
    log(f"best learning rate: {lr:g}")

    if settings.sweep_epochs == settings.epochs:  # the winner's sweep run is the SFT run
        model, run = kept[lr]
        sft_cpu = next(r["other_cores"] for r in rows if r["learning_rate"] == lr)
    else:  # a cheaper sweep: confirm the winner with the full run
        full_rows, full_kept = sweep(
            factory, tokenizer, train_ex, val_ex, val_records, [lr], settings, settings.epochs, "full run"
        )
        model, run = full_kept[lr]
        sft_cpu = full_rows[0]["other_cores"]
    sft_seconds = run["seconds"]
    del kept

    log(
        f"\n== 3. Worked example: SFT at lr {lr:g}, {settings.epochs} epochs, batch "
        f"{settings.batch_size}, {settings.precision}; {n_gen} held-out pairs, greedy, "
        f"max_new_tokens {max_new} =="
    )
    gen_watch = CpuWatch()
    before = pipeline.evaluate_model(
        factory.base, tokenizer, val_records, n_generate=n_gen, max_new_tokens=max_new
    )
    after = pipeline.evaluate_model(model, tokenizer, val_records, n_generate=n_gen, max_new_tokens=max_new)
    gen_cpu = gen_watch.stop()
    # the notebooks and `lumorik-sft demo` generate at most 96 new tokens: show what that costs
    short = None
    if max_new > demo.DemoSettings.max_new_tokens:
        short = generation.generate_completions(
            model, tokenizer, after.prompts, max_new_tokens=demo.DemoSettings.max_new_tokens
        )
        short = metrics.corpus_bleu(short, after.references)
    ceiling = synthetic.product_agreement_bleu()
    # a generation that never emitted EOS was cut by max_new_tokens (re-encoding is approximate)
    truncated = sum(len(tokenizer(p)["input_ids"]) >= max_new - 2 for p in after.predictions)
    out: dict[str, Any] = {
        "task": f"product descriptions: {len(train_records)} train / {len(val_records)} held-out "
        f"pairs (data.split_records seed {settings.seed})",
        "learning_rate": lr,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "warmup_ratio": settings.warmup_ratio,
        "precision": settings.precision,
        "steps": run["steps"],
        "max_new_tokens": max_new,
        "n_generate": n_gen,
        "perplexity_before": before.perplexity,
        "perplexity_after": after.perplexity,
        "perplexity_ratio": before.perplexity / after.perplexity,
        "bleu_before": before.bleu,
        "bleu_after": after.bleu,
        "bleu_gain": after.bleu - before.bleu,
        "agreement_ceiling_bleu": ceiling,
        "bleu_share_of_ceiling": after.bleu / ceiling if ceiling else None,
        "rouge_before": before.rouge,
        "rouge_after": after.rouge,
        "generations_hitting_max_new_tokens": truncated,
        "bleu_after_at_demo_max_new_tokens": short,
        "sft_seconds": sft_seconds,
        "sft_other_cores": sft_cpu,
        "generation_seconds_before_and_after": gen_cpu["seconds"],
    }
    log(
        f"completion perplexity {before.perplexity:.2f} -> {after.perplexity:.3f} "
        f"({out['perplexity_ratio']:.1f}x lower)"
    )
    log(
        f"BLEU {before.bleu:.1f} -> {after.bleu:.1f} (+{out['bleu_gain']:.1f}); agreement "
        f"ceiling {ceiling:.1f} (two samples of the generator for the same prompts); "
        f"{out['bleu_share_of_ceiling']:.0%} of it"
    )
    log("ROUGE before: " + ", ".join(f"{k} {v:.3f}" for k, v in before.rouge.items()))
    log("ROUGE after:  " + ", ".join(f"{k} {v:.3f}" for k, v in after.rouge.items()))
    log(f"generations that hit max_new_tokens after SFT: {truncated}/{n_gen}")
    if short is not None:
        log(
            f"BLEU after SFT with max_new_tokens {demo.DemoSettings.max_new_tokens} (the "
            f"notebooks' setting): {short:.1f}"
        )
    log(f"SFT wall time {sft_seconds:.1f} s ({settings.precision}, {run['steps']} steps)")
    if settings.compare_fp32 and settings.precision != "fp32":
        fp32_settings = copy.copy(settings)
        fp32_settings.precision = "fp32"
        fp32_rows, fp32_kept = sweep(
            factory,
            tokenizer,
            train_ex,
            val_ex,
            val_records,
            [lr],
            fp32_settings,
            settings.epochs,
            "fp32 run",
        )
        del fp32_kept
        out["fp32_seconds"] = fp32_rows[0]["seconds"]
        out["fp32_perplexity_after"] = fp32_rows[0]["completion_perplexity"]
        out["fp32_other_cores"] = fp32_rows[0]["other_cores"]
        log(
            f"fp32 for comparison: {out['fp32_seconds']:.1f} s, completion perplexity "
            f"{out['fp32_perplexity_after']:.3f}; bf16 is "
            f"{out['fp32_seconds'] / max(sft_seconds, 1e-9):.1f}x faster"
        )
    for i in range(min(2, n_gen)):
        log(
            f"--- prompt ---\n{after.prompts[i]}\n--- reference ---\n{after.references[i]}\n"
            f"--- base model ---\n{before.predictions[i]}\n--- after SFT ---\n"
            f"{after.predictions[i]}"
        )
    sweep_table = {
        "task": f"{out['task']}, batch {settings.batch_size}, {settings.sweep_epochs} epoch(s), "
        f"warmup {settings.warmup_ratio:g}, seed {settings.seed}, "
        f"{settings.precision}; held-out completion perplexity (fp32 evaluation)",
        "rows": rows,
        "best_learning_rate": lr,
        "chapter_learning_rate": defaults.CHAPTER_LEARNING_RATE,
    }
    return {"worked_example": out, "sweep": sweep_table}


# ---------------------------------------------------------------- 4. knowledge task


def random_init_like(base, tokenizer, seed: int):
    """The base model's architecture and tokenizer, freshly initialised."""
    cfg = base.config
    model = models.build_model(
        "gpt2",
        tokenizer,
        seed=seed,
        n_layer=cfg.n_layer,
        width=cfg.n_embd,
        n_head=cfg.n_head,
        context=cfg.n_positions,
    )
    set_dropout(model, cfg.resid_pdrop)
    if models.count_parameters(model) != models.count_parameters(base):
        raise RuntimeError("the random-init model does not have the base model's size")
    return model


def knowledge_task(factory: BaseModelFactory, settings: Settings) -> dict[str, Any]:
    tokenizer = factory.tokenizer
    train_records, val_records = doc_qa.python_doc_qa(seed=settings.seed)
    if settings.knowledge_cap:
        train_records = train_records[: settings.knowledge_cap[0]]
        val_records = val_records[: settings.knowledge_cap[1]]
    log("\n== Data: python_doc_qa ==")
    train_ex, val_ex = encode(train_records, tokenizer, "train"), encode(val_records, tokenizer, "held-out")
    n_mod = len({r["module"] for r in val_records})
    log(
        f"\n== 4. Knowledge task: python_doc_qa, {len(train_records)} train pairs / "
        f"{len(val_records)} held-out pairs from {n_mod} held-out modules, "
        f"{settings.knowledge_epochs} epochs, batch {settings.batch_size}, {settings.precision} =="
    )
    random_base = random_init_like(factory.base, tokenizer, settings.seed)
    random_factory = BaseModelFactory(random_base, tokenizer, "random-init gpt2")
    ks = copy.copy(settings)
    out: dict[str, Any] = {
        "train_pairs": len(train_records),
        "val_pairs": len(val_records),
        "val_modules": n_mod,
        "epochs": settings.knowledge_epochs,
        "batch_size": settings.batch_size,
    }
    best_models = {}
    for name, fac in (("pretrained", factory), ("random_init", random_factory)):
        base_ppl = completion_ppl(fac.base, tokenizer, val_records).perplexity
        rows, kept = sweep(
            fac,
            tokenizer,
            train_ex,
            val_ex,
            val_records,
            settings.knowledge_lrs,
            ks,
            settings.knowledge_epochs,
            name,
        )
        lr = best_lr(rows)
        best = next(r for r in rows if r["learning_rate"] == lr)
        best_models[name] = kept[lr][0]
        out[name] = {
            "perplexity_before_sft": base_ppl,
            "sweep": rows,
            "best_learning_rate": lr,
            "perplexity": best["completion_perplexity"],
        }
        log(
            f"  {name}: before SFT {base_ppl:.1f}; best lr {lr:g} -> held-out completion "
            f"perplexity {best['completion_perplexity']:.2f}"
        )
    out["ratio_random_over_pretrained"] = out["random_init"]["perplexity"] / out["pretrained"]["perplexity"]
    log(f"random init / pretrained perplexity: {out['ratio_random_over_pretrained']:.2f}x")
    prompts = [r["prompt"] for r in val_records[:3]]
    gens = {
        name: generation.generate_completions(m, tokenizer, prompts, max_new_tokens=64)
        for name, m in best_models.items()
    }
    for i, r in enumerate(val_records[:3]):
        log(
            f"--- {r['name']} ---\nreference:   {r['completion']}\npretrained:  "
            f"{gens['pretrained'][i]}\nrandom init: {gens['random_init'][i]}"
        )
    return out


# ---------------------------------------------------------------- the table


def target_rows(recipe, wx, knowledge) -> list[dict[str, Any]]:
    def row(figure, value, target, ok, note=""):
        return {
            "figure": figure,
            "value": value,
            "target": target,
            "pass": None if ok is None else bool(ok),
            "note": note,
        }

    if recipe.get("second_run_seconds"):  # a whole second run, timed from start to end
        recipe_row = row(
            "recipe time (min)",
            round(recipe["second_run_seconds"] / 60, 1),
            "< 30",
            recipe["second_run_seconds"] < RECIPE_MAX_SECONDS,
            f"second run, uninterrupted; the embedded model's own run took "
            f"{recipe['recipe_seconds'] / 60:.1f} min" + (" (resumed)" if recipe["resumed"] else ""),
        )
    else:
        recipe_row = row(
            "recipe time (min)",
            round(recipe["recipe_seconds"] / 60, 1),
            "< 30",
            recipe["recipe_seconds"] < RECIPE_MAX_SECONDS,
            ("resumed run: steps of both processes + setup; " if recipe["resumed"] else "")
            + (
                f"fastest-epoch projection {recipe['projected_seconds_at_fastest_epoch_rate'] / 60:.1f} min"
                if recipe["projected_seconds_at_fastest_epoch_rate"]
                else ""
            ),
        )
    rows = [
        recipe_row,
        row(
            "weights checksum matches card", recipe["weights_match_card"], "yes", recipe["weights_match_card"]
        ),
        row(
            "second run, same checksum",
            recipe["second_run_identical"] if recipe["second_run_identical"] is not None else "not re-run",
            "identical",
            recipe["second_run_identical"],
        ),
        row(
            "SFT perplexity before / after",
            round(wx["perplexity_ratio"], 2),
            ">= 2x",
            wx["perplexity_ratio"] >= PPL_RATIO_MIN,
        ),
        row(
            "SFT BLEU gain over base (points)",
            round(wx["bleu_gain"], 1),
            ">= +20",
            wx["bleu_gain"] >= BLEU_GAIN_MIN,
        ),
        row(
            "SFT BLEU / agreement ceiling",
            round(wx["bleu_share_of_ceiling"], 3),
            ">= 0.6",
            wx["bleu_share_of_ceiling"] >= BLEU_CEILING_SHARE_MIN,
        ),
        row(
            f"SFT wall time (s, {wx['precision']})",
            round(wx["sft_seconds"], 1),
            "< 120",
            wx["sft_seconds"] < SFT_MAX_SECONDS,
            _contention_note(wx["sft_other_cores"]),
        ),
    ]
    if "fp32_seconds" in wx:
        rows.append(
            row(
                "SFT wall time (s, fp32)",
                round(wx["fp32_seconds"], 1),
                "< 120 (info)",
                None,
                _contention_note(wx["fp32_other_cores"]),
            )
        )
    rows.append(
        row(
            "knowledge: random-init / pretrained perplexity",
            round(knowledge["ratio_random_over_pretrained"], 2),
            ">= 1.5x",
            knowledge["ratio_random_over_pretrained"] >= KNOWLEDGE_RATIO_MIN,
        )
    )
    return rows


def _contention_note(other_cores: float | None) -> str:
    if other_cores is None or other_cores <= CONTENDED_CORES:
        return ""
    return f"contended: other processes used {other_cores:.2f} cores"


def print_table(rows) -> None:
    log(f"\n{'figure':<48}{'value':>14}  {'target':<14}result")
    for r in rows:
        result = "n/a" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        value = r["value"] if isinstance(r["value"], str) else f"{r['value']}"
        note = f"  ({r['note']})" if r["note"] else ""
        log(f"{r['figure']:<48}{value:>14}  {r['target']:<14}{result}{note}")


# ---------------------------------------------------------------- timing only


def time_sft(factory: BaseModelFactory, settings: Settings, lr: float) -> dict[str, Any]:
    """Wall time of the worked-example SFT run alone, in bf16 and fp32 (the machine idle?)."""
    tokenizer = factory.tokenizer
    records = synthetic.product_descriptions(settings.n_products, seed=settings.seed)
    train_records, val_records = data.split_records(
        records, val_fraction=settings.val_fraction, seed=settings.seed
    )
    log("\n== Data: product descriptions ==")
    train_ex = encode(train_records, tokenizer, "train")
    val_ex = encode(val_records, tokenizer, "held-out")
    log(
        f"\n== 3'. Worked-example SFT timing: lr {lr:g}, {settings.epochs} epochs, batch "
        f"{settings.batch_size} =="
    )
    out = {}
    for precision in ("bf16", "fp32"):
        s = copy.copy(settings)
        s.precision = precision
        rows, kept = sweep(
            factory, tokenizer, train_ex, val_ex, val_records, [lr], s, settings.epochs, f"{precision} run"
        )
        del kept
        out[precision] = rows[0]
    return out


def timing_only(args, settings: Settings, folder: Path, card_folder: Path) -> int:
    """Re-time the SFT run (unless --recipe-only) and re-read the recipe figures; with
    --write-card, replace those in the card and recompute the PASS/FAIL table."""
    card = json.loads((folder / "card.json").read_text())
    lr = card.get("recommended_sft_learning_rate")
    bench = card.get("benchmark")
    if not lr or not bench:
        raise SystemExit(
            "--timing-only and --recipe-only need a card with a full benchmark (run with --write-card first)"
        )
    recipe = recipe_figures(folder, card, args.second_run)
    wx = dict(bench["worked_example"])
    if args.recipe_only:
        rows = target_rows(recipe, wx, bench["knowledge_task"])
        print_table(rows)
        if args.write_card:
            update_model_card(card_folder, _jsonable({"benchmark": {"recipe": recipe, "targets": rows}}))
            log(f"model card updated: {card_folder / 'card.json'} and README.md")
        return 0
    model, tokenizer = models.load_model_and_tokenizer(folder, device="cpu")
    model.eval()
    watch = CpuWatch()
    t = time_sft(BaseModelFactory(model, tokenizer, str(folder)), settings, lr)
    cpu = watch.stop()
    if "sft_seconds_first_measurement" not in wx:
        wx["sft_seconds_first_measurement"] = wx["sft_seconds"]
        wx["sft_other_cores_first_measurement"] = wx["sft_other_cores"]
    wx.update(
        sft_seconds=t["bf16"]["seconds"],
        sft_other_cores=t["bf16"]["other_cores"],
        sft_perplexity_retimed_run=t["bf16"]["completion_perplexity"],
        fp32_seconds=t["fp32"]["seconds"],
        fp32_other_cores=t["fp32"]["other_cores"],
        fp32_perplexity_after=t["fp32"]["completion_perplexity"],
    )
    log(
        f"bf16 {t['bf16']['seconds']:.1f} s, fp32 {t['fp32']['seconds']:.1f} s "
        f"({t['fp32']['seconds'] / t['bf16']['seconds']:.1f}x); completion perplexity "
        f"{t['bf16']['completion_perplexity']:.3f} (bf16), "
        f"{t['fp32']['completion_perplexity']:.3f} (fp32)"
    )
    rows = target_rows(recipe, wx, bench["knowledge_task"])
    print_table(rows)
    contention = (
        ""
        if not contended(cpu)
        else (
            f"other processes used {cpu['other_cores']:.2f} of {os.cpu_count()} cores while the SFT "
            "run was re-timed"
        )
    )
    log(
        f"other processes used {cpu['other_cores']:.2f} cores during the timing runs "
        f"({'CONTENDED' if contention else 'not contended'})"
    )
    if args.write_card:
        update_model_card(
            card_folder,
            _jsonable(
                {
                    "benchmark": {
                        "recipe": recipe,
                        "worked_example": wx,
                        "targets": rows,
                        "contention": contention,
                        "timing_command": " ".join(["python benchmarks/bench_base_model.py", *sys.argv[1:]]),
                        "timing_date": datetime.datetime.now(datetime.timezone.utc).strftime(
                            "%Y-%m-%d %H:%M UTC"
                        ),
                        "timing_other_cores": round(cpu["other_cores"], 2),
                        "note": "figures from the full run; SFT timings from the timing run (see "
                        "timing_command), the first, contended measurement kept as "
                        "sft_seconds_first_measurement",
                    }
                }
            ),
        )
        log(f"model card updated: {card_folder / 'card.json'} and README.md")
    return 0


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    parser.add_argument(
        "--write-card",
        action="store_true",
        help="merge the figures into card.json and README.md of the model",
    )
    parser.add_argument(
        "--second-run",
        type=Path,
        default=None,
        help="folder of a second run of the recipe (same seed), to compare",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=models.EMBEDDED_MODEL_DIR,
        help="model folder (default: the embedded base model)",
    )
    parser.add_argument(
        "--sweep-epochs",
        type=int,
        default=None,
        help="epochs per sweep run (default: 3; 1 is cheaper, the winner is then confirmed by a full run)",
    )
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-fp32-comparison", action="store_true")
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="only re-time the worked-example SFT run (bf16 and fp32) at the "
        "card's recommended lr, e.g. when the full run was contended",
    )
    parser.add_argument(
        "--recipe-only",
        action="store_true",
        help="only re-read the recipe figures (and --second-run) from the card",
    )
    args = parser.parse_args(argv)

    settings = Settings.quick_settings() if args.quick else Settings()
    settings.precision = args.precision
    settings.compare_fp32 = settings.compare_fp32 and not args.no_fp32_comparison
    if args.sweep_epochs:
        settings.sweep_epochs = args.sweep_epochs
    start = time.perf_counter()
    total_watch = CpuWatch()
    folder = args.model.resolve()
    if not (folder / "card.json").exists():
        raise SystemExit(
            f"no model card at {folder}; build the model with `lumorik-sft pretrain` (or pass --model DIR)"
        )
    tmp = None
    if args.write_card and args.quick:
        # smoke runs never write into a real model: copy it and write the copy
        tmp = Path(tempfile.mkdtemp(prefix="bench-base-model-"))
        shutil.copytree(folder, tmp / folder.name)
        card_folder = tmp / folder.name
    else:
        card_folder = folder
    if args.timing_only or args.recipe_only:
        code = timing_only(args, settings, folder, card_folder)
        log(f"total time {time.perf_counter() - start:.0f} s")
        return code
    machine = machine_info()
    load0 = os.getloadavg()
    log(
        f"bench_base_model {'--quick ' if args.quick else ''}on {machine['cpu']}, "
        f"{machine['threads']} torch threads, torch {machine['torch']}, transformers "
        f"{machine['transformers']}; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}"
    )
    log(f"model: {folder}")
    card = json.loads((folder / "card.json").read_text())
    recipe = recipe_figures(folder, card, args.second_run)

    model, tokenizer = models.load_model_and_tokenizer(folder, device="cpu")
    model.eval()
    factory = BaseModelFactory(model, tokenizer, str(folder))
    log(f"base model: {models.count_parameters(model):,} parameters")
    result = worked_example(factory, settings)
    knowledge = knowledge_task(factory, settings)
    rows = target_rows(recipe, result["worked_example"], knowledge)
    total = time.perf_counter() - start
    cpu = total_watch.stop()
    load1 = os.getloadavg()
    contention = ""
    if contended(cpu):
        contention = (
            f"other processes used {cpu['other_cores']:.2f} of {os.cpu_count()} cores "
            f"on average (load average {load1[0]:.2f})"
        )
    print_table(rows)
    if contention:
        log(f"\nWARNING: timings taken under contention: {contention}")
    else:
        log(
            f"\nother processes used {cpu['other_cores']:.2f} cores on average (load average "
            f"{load1[0]:.2f}): timings are not contended"
        )

    if args.write_card:
        wx = result["worked_example"]
        figures = {
            "recommended_sft_learning_rate": result["sweep"]["best_learning_rate"],
            "sft_lr_sweep": result["sweep"],
            "benchmark": {
                "command": " ".join(
                    ["python benchmarks/bench_base_model.py", *(sys.argv[1:] if argv is None else argv)]
                ),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": machine,
                "settings": _jsonable(asdict(settings)),
                "recipe": recipe,
                "worked_example": wx,
                "knowledge_task": knowledge,
                "targets": rows,
                "total_seconds": round(total, 1),
                "other_cores": round(cpu["other_cores"], 2),
                "loadavg_start_end": [round(load0[0], 2), round(load1[0], 2)],
                "contention": contention,
            },
        }
        update_model_card(card_folder, _jsonable(figures))
        log(f"model card updated: {card_folder / 'card.json'} and README.md")
    log(f"total time {total:.0f} s ({total / 60:.1f} min)")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists, non-finite floats -> None: card.json stays strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":
    sys.exit(main())
