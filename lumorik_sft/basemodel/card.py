"""The embedded model's card: its checksum, the README a reader sees, and the figures added later.

`pretrain.run_pretrain` writes the card; `benchmarks/bench_base_model.py --write-card` adds the
measured figures (`update_model_card`) without retraining.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from lumorik_sft.basemodel.config import PretrainConfig


def weights_checksum(path: str | Path) -> str:
    """SHA-256 of a model folder's `model.safetensors` (or of the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def format_number(x: float | int | None, spec: str = ",") -> str:
    return "n/a" if x is None else format(x, spec)


def write_model_card(card: dict[str, Any], path: str | Path) -> None:
    """Write the human-readable model card (README.md) from the card data of `run_pretrain`."""
    m, c, t, r = card["model"], card["corpus"], card["training"], card["results"]
    helps = PretrainConfig.help()
    sources = "\n".join(
        f"| {s['name']} | {s['version']} | {s['license']} | {s['documents']:,} | {s['chars']:,} |"
        for s in c["sources"]
    )
    hyper = "\n".join(
        f"| `{k}` | `{v}` | {helps.get(k, '')} |"
        for k, v in card["config"].items()
        if k not in ("output_dir", "work_dir", "progress", "sources")
    )
    text = f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, lumorik-sft, tiny, cpu]
---

# lumorik-sft base model: a {m["parameters"] / 1e6:.1f}M-parameter GPT-2 pretrained on documentation

A small causal language model made by `lumorik-sft pretrain` (module `lumorik_sft.basemodel.pretrain`) so
that the course's SFT notebooks fine-tune a *pretrained* model offline, on a 2-core CPU, in
minutes. It writes English in the style of Python documentation; it knows little else.

## Size
GPT-2 architecture (`GPT2LMHeadModel`): {m["n_layer"]} layers, width {m["width"]},
{m["n_head"]} heads, context {m["context"]} tokens, vocabulary {m["vocab_size"]:,}
(byte-level BPE, `<|endoftext|>` = EOS id {m["eos_token_id"]}, `<|pad|>` = pad id
{m["pad_token_id"]}); {m["parameters"]:,} parameters (input and output embeddings tied),
`model.safetensors` {m["weights_bytes"] / 2**20:.1f} MiB (fp32).

## Corpus
Documentation already installed with Python and this course's dependencies, read offline by
parsing source files (no imports): docstrings cleaned with `inspect.cleandoc`, each kept once.
{c["chars"]:,} characters in all; {c["val_documents"]} whole modules ({c["val_chars"]:,}
characters) held out for validation. Corpus SHA-256: `{c["sha256"]}` (Python {c["python"]}).

| source | version | license | documents | characters |
|---|---|---|---:|---:|
{sources}

Tokens: {c["train_tokens"]:,} training ({c["train_blocks"]:,} blocks of {m["context"]}),
{c["val_tokens"]:,} validation ({c["val_blocks"]:,} blocks). The licenses are read from each
package's installed metadata and all are permissive (MPL-2.0, for tqdm, is file-level copyleft
on its source code; the card lists it so you can leave the source out with `--sources`).

## Training
Our own loop (`lumorik_sft.training.train`): AdamW, linear warmup and decay, gradient clipping,
token-weighted loss, {t["precision"]} on {t["device"]} with {t["threads"]} threads.
{t["steps"]:,} optimizer steps x {t["tokens_per_step"]:,} tokens = **{t["tokens_seen"]:,} tokens
seen** ({t["epochs_over_corpus"]:.2f} passes over the training tokens) in
**{t["train_seconds"] / 60:.1f} minutes** of training and validation
({t["tokens_per_second"]:,.0f} tokens/s in optimizer steps, CPU: {t["cpu"]});
the whole recipe took {t["total_seconds"] / 60:.1f} minutes. torch {t["torch"]}, transformers
{t["transformers"]}, tokenizers {t["tokenizers"]}.

| setting | value | why |
|---|---|---|
{hyper}

## Results
Validation perplexity on the held-out modules: **{format_number(r["val_perplexity"], ".2f")}**
(loss {format_number(r["val_loss"], ".4f")}; {format_number(r["initial_val_perplexity"], ".1f")} before
training). Final training loss {format_number(r["final_train_loss"], ".4f")}.

## Intended use and limits
For teaching: fine-tuning, evaluation and generation demos on a CPU. It is tiny and trained on
about {c["chars"] / 1e6:.0f}M characters of docstrings, so it produces fluent-looking but often
wrong text, knows nothing outside Python-library documentation, and must not be used for
anything that matters. It has seen code snippets and API names from the sources above; it has
no safety tuning. Context is {m["context"]} tokens: longer inputs must be truncated.

## Reproduce and verify
`lumorik-sft pretrain` (same seed, kind of CPU, thread count and library versions) gives the
same weights, bit for bit. This one was recorded on {t["cpu"]}, {_cpu_kind(t)}.
SHA-256 of `model.safetensors`: `{card["weights_sha256"]}`. On another kind of CPU the
matrix kernels round differently (and 'auto' precision may choose another dtype), so the weights
differ{_other_cpu(card)}. The chat variant (`../chat-model`) is made from these weights by a step
that trains nothing and rebuilds bit for bit on any CPU.
Machine-readable numbers: `card.json`; corpus details: `corpus_manifest.json`.
"""
    Path(path).write_text(text, encoding="utf-8")


def _cpu_kind(training: dict[str, Any]) -> str:
    """What kind of CPU the run had, read from the precision 'auto' chose on it."""
    if training.get("device") != "cpu":
        return f"device {training.get('device')}"
    if training.get("precision") == "bf16":
        return "a CPU with native bf16 (AVX512-BF16 or AMX), so 'auto' trained in bf16 autocast"
    return "a CPU without native bf16 (e.g. AVX2 only), so 'auto' trained in fp32"


def _other_cpu(card: dict[str, Any]) -> str:
    """The card's record of a rerun on another kind of CPU (key ``other_cpu_rerun``), if any."""
    rerun = card.get("other_cpu_rerun")
    if not rerun:
        return ""
    return (
        f": a rerun there gave {rerun['same']} and a validation perplexity of "
        f"{rerun['val_perplexity']:.2f} against {card['results']['val_perplexity']:.2f}"
    )


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values in `extra` win, nested dicts are merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _fmt_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _figures_markdown(card: dict[str, Any]) -> str:
    """The README section for figures measured after pretraining (by benchmarks/)."""
    bench = card.get("benchmark", {})
    sweep = card.get("sft_lr_sweep", {})
    if not bench and not sweep and "recommended_sft_learning_rate" not in card:
        return ""
    parts = ["\n## Measured figures\n"]
    if bench.get("command"):
        parts.append(
            f"Measured by `{bench['command']}` on {bench.get('date', 'n/a')}"
            f" ({bench.get('machine', {}).get('cpu', 'n/a')}, "
            f"{bench.get('machine', {}).get('threads', 'n/a')} threads)."
        )
        if bench.get("contention"):
            parts.append(f"Timings were taken under contention: {bench['contention']}.")
        parts.append("")
    if "recommended_sft_learning_rate" in card:
        parts.append(
            f"Recommended SFT learning rate: **{card['recommended_sft_learning_rate']:g}**"
            " (`defaults.recommended_learning_rate` reads it from `card.json`); the "
            "chapter's 5e-5 remains an option, see the sweep.\n"
        )
    rows = sweep.get("rows", [])
    if rows:
        parts.append(f"Learning-rate sweep: {sweep.get('task', '')}\n")
        keys = list(rows[0])
        parts.append("| " + " | ".join(keys) + " |")
        parts.append("|" + "---|" * len(keys))
        parts += ["| " + " | ".join(_fmt_cell(r.get(k)) for k in keys) + " |" for r in rows]
        parts.append("")
    targets = bench.get("targets", [])
    if targets:
        parts.append("| figure | value | target | result | note |")
        parts.append("|---|---|---|---|---|")
        parts += [
            f"| {t['figure']} | {_fmt_cell(t['value'])} | {t['target']} | "
            f"{'n/a' if t.get('pass') is None else 'PASS' if t['pass'] else 'FAIL'} | "
            f"{t.get('note', '')} |"
            for t in targets
        ]
        parts.append("")
    parts.append(
        "All figures: `card.json` (keys `recommended_sft_learning_rate`, `sft_lr_sweep`, `benchmark`)."
    )
    return "\n".join(parts) + "\n"


def update_model_card(path: str | Path, figures: dict[str, Any]) -> dict[str, Any]:
    """Merge measured figures into a saved model's `card.json` and rewrite its README.md.

    `path` is the model folder (or its `card.json`). `figures` is merged recursively into the
    card data (nested dicts key by key, anything else replaced), e.g. ``{"benchmark": {...},
    "recommended_sft_learning_rate": 1e-3}``; the README is rewritten by `write_model_card`
    plus a "Measured figures" section. Refuses to change `weights_sha256`, and refuses a folder
    whose `model.safetensors` no longer matches its card: figures measured on other weights
    must not be recorded here. Only `card.json` and `README.md` are written (each atomically).
    Returns the merged card.
    """
    folder = Path(path)
    if folder.name == "card.json":
        folder = folder.parent
    card_path = folder / "card.json"
    if not card_path.exists():
        raise FileNotFoundError(f"no card.json in {folder}; run `lumorik-sft pretrain` first")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    if "weights_sha256" in figures and figures["weights_sha256"] != card.get("weights_sha256"):
        raise ValueError("figures may not change weights_sha256; rebuild the model instead")
    actual = weights_checksum(folder)
    if actual != card.get("weights_sha256"):
        raise ValueError(
            f"{folder}/model.safetensors (sha256 {actual[:16]}...) does not match "
            f"its card ({str(card.get('weights_sha256'))[:16]}...); refusing to "
            "record figures measured on other weights"
        )
    card = _merge(card, figures)
    readme = folder / "README.md"
    tmp_readme = folder / f".README.md.tmp-{os.getpid()}"
    write_model_card(card, tmp_readme)
    with open(tmp_readme, "a", encoding="utf-8") as f:
        f.write(_figures_markdown(card))
    tmp_readme.chmod(0o644)
    if isinstance(card.get("files"), dict) and "README.md" in card["files"]:
        card["files"]["README.md"] = tmp_readme.stat().st_size
    tmp_card = folder / f".card.json.tmp-{os.getpid()}"
    tmp_card.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    tmp_card.chmod(0o644)
    tmp_readme.replace(readme)
    tmp_card.replace(card_path)
    return card
