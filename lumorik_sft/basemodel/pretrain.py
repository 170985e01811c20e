"""The recipe of the embedded base model: corpus -> tokenizer -> GPT-2 -> our training loop.

SFT fine-tunes a *pretrained* model, and students here have no hub access and two CPU cores.
So the package ships a small GPT-2 pretrained on documentation text that is already on every
machine (see `lumorik_sft.basemodel.corpus`), and this module is how it was made::

    lumorik-sft pretrain                      # ~20 minutes on 2 CPU cores, into the package
    python -m lumorik_sft.basemodel.pretrain --out /tmp/base --max-steps 20   # a quick look

The run is deterministic: a fixed number of optimizer steps (never a time budget, which would
stop at a different step on a busier machine), a seeded model and data order, and the same
corpus hash, so a second run gives the same `model.safetensors` checksum on the same machine
type, thread count and library versions (all recorded in the card).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lumorik_sft.basemodel.corpus import DEFAULT_SOURCES, Corpus, CorpusSource, assemble_corpus
from lumorik_sft.defaults import resolve_precision
from lumorik_sft.models import (
    EMBEDDED_MODEL_DIR,
    build_model,
    count_parameters,
    resolve_device,
    train_bpe_tokenizer,
)

__all__ = [
    "MODEL_FILES",
    "PretrainConfig",
    "add_arguments",
    "main",
    "pack_blocks",
    "run_from_args",
    "run_pretrain",
    "update_model_card",
    "weights_checksum",
    "write_model_card",
]

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json", "README.md", "card.json", "corpus_manifest.json")
MAX_OUTPUT_BYTES = 30 * 1024 * 1024


@dataclass
class PretrainConfig:
    """Settings of the pretraining recipe; the defaults build the embedded model.

    Corpus: sources, max_corpus_chars, val_fraction. Tokenizer: vocab_size, min_frequency.
    Model: n_layer, width, n_head, context, dropout. Optimisation: learning_rate, batch_size,
    max_steps, warmup_steps, weight_decay, max_grad_norm, seed. Hardware: device, precision,
    threads. Output: output_dir, work_dir, progress.
    """

    sources: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Corpus source names to use (default: all of corpus.DEFAULT_SOURCES)."})
    max_corpus_chars: int | None = field(default=None, metadata={
        "help": "Cap on corpus characters, filled in source order (None: ~10M, all sources)."})
    val_fraction: float = field(default=0.02, metadata={
        "help": "Fraction of modules held out as validation text (whole modules)."})
    vocab_size: int = field(default=4096, metadata={
        "help": "BPE vocabulary. 4,096 keeps the embedding and output layers (a quarter of "
                "the compute at width 256) small; a larger one gives shorter sequences."})
    min_frequency: int = field(default=2, metadata={
        "help": "A BPE merge must occur this often; 2 keeps one-off strings out of the vocab."})
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks."})
    width: int = field(default=256, metadata={"help": "Hidden size (n_embd)."})
    n_head: int = field(default=4, metadata={"help": "Attention heads (head size width/n_head)."})
    context: int = field(default=256, metadata={
        "help": "Tokens per training block and the model's maximum length (n_positions)."})
    dropout: float = field(default=0.0, metadata={
        "help": "Dropout in every layer. 0: a short run over ~3.6 passes of the corpus "
                "underfits, so regularisation only slows it down."})
    learning_rate: float = field(default=1e-3, metadata={
        "help": "Peak AdamW learning rate; small models train well at 1e-3 with warmup."})
    batch_size: int = field(default=16, metadata={
        "help": "Blocks per optimizer step (16 x 256 = 4,096 tokens)."})
    # Throughput of this config on the course's 2-core CPU (AMD EPYC with AVX512-BF16, torch
    # 2.13, 2 threads, batch 16 x 256 tokens, machine otherwise idle): fp32 0.88 s/step (about
    # 4,600 tokens/s), bf16 autocast 0.32 s/step (about 12,800 tokens/s, 2.8x faster). 3,500
    # bf16 steps = 14.3M tokens (~3.6 passes over the corpus) in ~19 minutes, plus ~1 minute
    # for corpus, tokenizer, packing and validation: ~20 minutes. In fp32 it takes ~52 minutes;
    # on a busy machine (other jobs on the same 2 cores) each step can take 2-5x longer.
    max_steps: int = field(default=3500, metadata={
        "help": "Optimizer steps: the stopping rule (a fixed count keeps runs reproducible)."})
    warmup_steps: int = field(default=200, metadata={
        "help": "Linear warmup steps before the linear decay to 0 at max_steps."})
    weight_decay: float = field(default=0.1, metadata={
        "help": "AdamW weight decay on weight matrices (GPT-style pretraining value)."})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Gradient clipping: guards the early high-learning-rate steps."})
    seed: int = field(default=0, metadata={
        "help": "Seeds the model initialisation and the order of training blocks."})
    device: str = field(default="auto", metadata={
        "help": "'auto' (CUDA, MPS, CPU) or a torch device; the card records which ran."})
    precision: str = field(default="auto", metadata={
        "help": "'auto' (bf16 autocast where the CPU or GPU supports bf16, else fp32), "
                "'fp32' or 'bf16'."})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (None: leave torch's default); results depend on it."})
    output_dir: str = field(default=str(EMBEDDED_MODEL_DIR), metadata={
        "help": "Where the Hugging Face folder goes (default: inside the package)."})
    work_dir: str | None = field(default=None, metadata={
        "help": "Checkpoints for resuming after Ctrl-C (None: no checkpoints)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar and log lines."})

    def __post_init__(self) -> None:
        if isinstance(self.sources, list):
            self.sources = tuple(self.sources)
        if self.width % self.n_head:
            raise ValueError(f"width {self.width} must be divisible by n_head {self.n_head}; "
                             "e.g. width 256 with 4 or 8 heads")
        for name in ("vocab_size", "n_layer", "width", "n_head", "context", "batch_size",
                     "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 259:
            raise ValueError(f"vocab_size must be >= 259 (256 bytes + 2 special tokens + 1), "
                             f"got {self.vocab_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def corpus_sources(self) -> tuple[CorpusSource, ...]:
        """The `CorpusSource`s named by `sources` (all defaults when None)."""
        if self.sources is None:
            return DEFAULT_SOURCES
        known = {s.name: s for s in DEFAULT_SOURCES}
        unknown = [n for n in self.sources if n not in known]
        if unknown:
            raise ValueError(f"unknown corpus sources {unknown}; choose from {sorted(known)}")
        return tuple(known[n] for n in self.sources)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sources"] = list(self.sources) if self.sources is not None else None
        return data

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for the CLI and the model card."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------- precision


# ---------------------------------------------------------------- data


def pack_blocks(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, context: int,
) -> list[dict[str, list[int]]]:
    """Tokenize documents, join them with EOS, and cut fixed blocks of `context` tokens.

    Every token is supervised (labels == input_ids) and no block is padded; the tail that does
    not fill a block is dropped. EOS between documents teaches the model where text ends. With
    EOS = 0 and context 4, documents [5, 6, 7] and [8, 9] give::

        [5, 6, 7, 0] [8, 9, 0]  ->  input_ids = labels = [[5, 6, 7, 0]]  (tail [8, 9, 0] dropped)
    """
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens to predict anything, got {context}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for start in range(0, len(texts), 256):
        batch = list(texts[start:start + 256])
        # verbose=False: documents are longer than the model's context, on purpose
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    mask = [1] * context  # one shared list: blocks are read, never written
    blocks = []
    for i in range(0, len(stream) - context + 1, context):
        ids = stream[i:i + context]
        blocks.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return blocks


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout layer (and the config, so the saved model says the same) to p."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, name):
            setattr(model.config, name, p)


# ---------------------------------------------------------------- outputs


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


def _fmt_num(x: float | int | None, spec: str = ",") -> str:
    return "n/a" if x is None else format(x, spec)


def write_model_card(card: dict[str, Any], path: str | Path) -> None:
    """Write the human-readable model card (README.md) from the card data of `run_pretrain`."""
    m, c, t, r = card["model"], card["corpus"], card["training"], card["results"]
    helps = PretrainConfig.help()
    sources = "\n".join(
        f"| {s['name']} | {s['version']} | {s['license']} | {s['documents']:,} | {s['chars']:,} |"
        for s in c["sources"])
    hyper = "\n".join(
        f"| `{k}` | `{v}` | {helps.get(k, '')} |" for k, v in card["config"].items()
        if k not in ("output_dir", "work_dir", "progress", "sources"))
    text = f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, lumorik-sft, tiny, cpu]
---

# lumorik-sft base model: a {m['parameters'] / 1e6:.1f}M-parameter GPT-2 pretrained on documentation

A small causal language model made by `lumorik-sft pretrain` (module `lumorik_sft.basemodel.pretrain`) so
that the course's SFT notebooks fine-tune a *pretrained* model offline, on a 2-core CPU, in
minutes. It writes English in the style of Python documentation; it knows little else.

## Size
GPT-2 architecture (`GPT2LMHeadModel`): {m['n_layer']} layers, width {m['width']},
{m['n_head']} heads, context {m['context']} tokens, vocabulary {m['vocab_size']:,}
(byte-level BPE, `<|endoftext|>` = EOS id {m['eos_token_id']}, `<|pad|>` = pad id
{m['pad_token_id']}); {m['parameters']:,} parameters (input and output embeddings tied),
`model.safetensors` {m['weights_bytes'] / 2**20:.1f} MiB (fp32).

## Corpus
Documentation already installed with Python and this course's dependencies, read offline by
parsing source files (no imports): docstrings cleaned with `inspect.cleandoc`, each kept once.
{c['chars']:,} characters in all; {c['val_documents']} whole modules ({c['val_chars']:,}
characters) held out for validation. Corpus SHA-256: `{c['sha256']}` (Python {c['python']}).

| source | version | license | documents | characters |
|---|---|---|---:|---:|
{sources}

Tokens: {c['train_tokens']:,} training ({c['train_blocks']:,} blocks of {m['context']}),
{c['val_tokens']:,} validation ({c['val_blocks']:,} blocks). The licenses are read from each
package's installed metadata and all are permissive (MPL-2.0, for tqdm, is file-level copyleft
on its source code; the card lists it so you can leave the source out with `--sources`).

## Training
Our own loop (`lumorik_sft.training.train`): AdamW, linear warmup and decay, gradient clipping,
token-weighted loss, {t['precision']} on {t['device']} with {t['threads']} threads.
{t['steps']:,} optimizer steps x {t['tokens_per_step']:,} tokens = **{t['tokens_seen']:,} tokens
seen** ({t['epochs_over_corpus']:.2f} passes over the training tokens) in
**{t['train_seconds'] / 60:.1f} minutes** of training and validation
({t['tokens_per_second']:,.0f} tokens/s in optimizer steps, CPU: {t['cpu']});
the whole recipe took {t['total_seconds'] / 60:.1f} minutes. torch {t['torch']}, transformers
{t['transformers']}, tokenizers {t['tokenizers']}.

| setting | value | why |
|---|---|---|
{hyper}

## Results
Validation perplexity on the held-out modules: **{_fmt_num(r['val_perplexity'], '.2f')}**
(loss {_fmt_num(r['val_loss'], '.4f')}; {_fmt_num(r['initial_val_perplexity'], '.1f')} before
training). Final training loss {_fmt_num(r['final_train_loss'], '.4f')}.

## Intended use and limits
For teaching: fine-tuning, evaluation and generation demos on a CPU. It is tiny and trained on
about {c['chars'] / 1e6:.0f}M characters of docstrings, so it produces fluent-looking but often
wrong text, knows nothing outside Python-library documentation, and must not be used for
anything that matters. It has seen code snippets and API names from the sources above; it has
no safety tuning. Context is {m['context']} tokens: longer inputs must be truncated.

## Reproduce and verify
`lumorik-sft pretrain` (same seed, machine type, thread count and library versions) gives the
same weights. SHA-256 of `model.safetensors`: `{card['weights_sha256']}`.
Machine-readable numbers: `card.json`; corpus details: `corpus_manifest.json`.
"""
    Path(path).write_text(text, encoding="utf-8")


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
        parts.append(f"Measured by `{bench['command']}` on {bench.get('date', 'n/a')}"
                     f" ({bench.get('machine', {}).get('cpu', 'n/a')}, "
                     f"{bench.get('machine', {}).get('threads', 'n/a')} threads).")
        if bench.get("contention"):
            parts.append(f"Timings were taken under contention: {bench['contention']}.")
        parts.append("")
    if "recommended_sft_learning_rate" in card:
        parts.append(f"Recommended SFT learning rate: **{card['recommended_sft_learning_rate']:g}**"
                     " (`defaults.recommended_learning_rate` reads it from `card.json`); the "
                     "chapter's 5e-5 remains an option, see the sweep.\n")
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
        parts += [f"| {t['figure']} | {_fmt_cell(t['value'])} | {t['target']} | "
                  f"{'n/a' if t.get('pass') is None else 'PASS' if t['pass'] else 'FAIL'} | "
                  f"{t.get('note', '')} |" for t in targets]
        parts.append("")
    parts.append("All figures: `card.json` (keys `recommended_sft_learning_rate`, `sft_lr_sweep`, "
                 "`benchmark`).")
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
        raise ValueError(f"{folder}/model.safetensors (sha256 {actual[:16]}...) does not match "
                         f"its card ({str(card.get('weights_sha256'))[:16]}...); refusing to "
                         "record figures measured on other weights")
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


def _save_folder(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path,
                 card: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Write the folder next to `out`, then swap it in: a crash never leaves half a model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    card["weights_sha256"] = weights_checksum(tmp)
    card["model"]["weights_bytes"] = (tmp / "model.safetensors").stat().st_size
    (tmp / "corpus_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_model_card(card, tmp / "README.md")
    for p in tmp.iterdir():
        p.chmod(0o644)  # safetensors writes 0600; a shipped asset must be world-readable
    card["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    missing = [f for f in MODEL_FILES if not (tmp / f).exists()]
    total = sum(p.stat().st_size for p in tmp.iterdir())
    if missing or total > MAX_OUTPUT_BYTES:
        raise RuntimeError(f"refusing to install {out}: missing {missing}, {total:,} bytes "
                           f"(limit {MAX_OUTPUT_BYTES:,}); shrink vocab_size or width")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the recipe


def _log(config: PretrainConfig, message: str) -> None:
    if config.progress:
        print(f"[pretrain] {message}", flush=True)


def _cpu_name() -> str:
    """The CPU model, for the card: throughput and bf16 support depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _card(config: PretrainConfig, corpus: Corpus, model: torch.nn.Module,
          tokenizer: PreTrainedTokenizerBase, blocks: dict[str, int], result: Any,
          precision: str, device: torch.device, seconds: dict[str, float]) -> dict[str, Any]:
    import tokenizers
    import transformers

    tokens_per_step = config.batch_size * config.context
    trained = [e for e in result.epochs if e["epoch"] > 0]
    final = trained[-1] if trained else result.epochs[-1]
    return {
        "model": {
            "architecture": "GPT2LMHeadModel", "n_layer": config.n_layer, "width": config.width,
            "n_head": config.n_head, "context": config.context, "vocab_size": len(tokenizer),
            "parameters": count_parameters(model), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "corpus": {
            **{k: v for k, v in corpus.manifest().items() if k != "val_modules"},
            "train_blocks": blocks["train"], "val_blocks": blocks["val"],
            "train_tokens": blocks["train"] * config.context,
            "val_tokens": blocks["val"] * config.context,
        },
        "training": {
            "steps": result.global_step, "tokens_per_step": tokens_per_step,
            "tokens_seen": result.global_step * tokens_per_step,
            "epochs_over_corpus": result.global_step * config.batch_size / blocks["train"],
            "precision": precision, "device": str(device), "threads": torch.get_num_threads(),
            "train_seconds": seconds["train"], "step_seconds": seconds["steps"],
            "total_seconds": seconds["total"],
            # optimizer steps only: validation passes are excluded from the rate
            "tokens_per_second": result.global_step * tokens_per_step / max(seconds["steps"],
                                                                            1e-9),
            "cpu": _cpu_name(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "results": {
            "val_loss": final["val_loss"], "val_perplexity": final["val_perplexity"],
            "initial_val_perplexity": result.epochs[0]["val_perplexity"],
            "final_train_loss": result.final_train_loss,
            "epochs": result.epochs,
        },
        "config": config.to_dict(),
    }


def run_pretrain(config: PretrainConfig | None = None) -> dict[str, Any]:
    """Build the base model from scratch and save it in Hugging Face format; returns the card data.

    Steps: assemble the corpus -> train a byte-level BPE tokenizer on its training text -> pack
    documents into blocks of `context` tokens -> build a seeded GPT-2 -> `training.train` for
    `max_steps` steps with validation on held-out modules -> save config, weights, tokenizer,
    generation config, model card and manifests into `output_dir`.
    """
    from lumorik_sft.training import TrainConfig, train

    config = config or PretrainConfig()
    t0 = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    corpus = assemble_corpus(config.corpus_sources(), max_chars=config.max_corpus_chars,
                             val_fraction=config.val_fraction)
    _log(config, f"corpus: {corpus.chars:,} characters, sha256 {corpus.sha256[:16]}..., "
                 f"{len(corpus.val_texts)} held-out modules ({time.perf_counter() - t0:.0f} s)")
    tokenizer = train_bpe_tokenizer(corpus.train_texts, vocab_size=config.vocab_size,
                                    min_frequency=config.min_frequency)
    train_blocks = pack_blocks(corpus.train_texts, tokenizer, config.context)
    val_blocks = pack_blocks(corpus.val_texts, tokenizer, config.context)
    tokenizer.model_max_length = config.context  # after packing: documents are longer
    if not train_blocks or not val_blocks:
        raise ValueError(f"the corpus gives {len(train_blocks)} training and {len(val_blocks)} "
                         f"validation blocks of {config.context} tokens; raise max_corpus_chars "
                         "or val_fraction, or lower context")
    _log(config, f"tokenizer: {len(tokenizer):,} tokens; blocks: {len(train_blocks):,} train, "
                 f"{len(val_blocks):,} val ({time.perf_counter() - t0:.0f} s)")
    model = build_model("gpt2", tokenizer, seed=config.seed, n_layer=config.n_layer,
                        width=config.width, n_head=config.n_head, context=config.context)
    set_dropout(model, config.dropout)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    per_epoch = math.ceil(len(train_blocks) / config.batch_size)
    train_config = TrainConfig(
        learning_rate=config.learning_rate, batch_size=config.batch_size,
        epochs=math.ceil(config.max_steps / per_epoch), max_steps=config.max_steps,
        warmup_steps=min(config.warmup_steps, config.max_steps),
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, seed=config.seed,
        device=str(device), precision=precision, eval_batch_size=config.batch_size,
        output_dir=config.work_dir, log_every=50 if config.progress else 0,
        progress=config.progress,
    )
    t_train = time.perf_counter()
    result = train(model, tokenizer, train_blocks, val_blocks, train_config,
                   resume=bool(config.work_dir and (Path(config.work_dir) / "checkpoint.pt")
                               .exists()))
    seconds = {"train": time.perf_counter() - t_train,
               "steps": sum(e["seconds"] for e in result.epochs)}
    if result.interrupted:
        raise KeyboardInterrupt(f"pretraining stopped at step {result.global_step}; nothing "
                                "installed (set work_dir to resume)")
    model.to("cpu").eval()
    card = _card(config, corpus, model, tokenizer,
                 {"train": len(train_blocks), "val": len(val_blocks)}, result, precision,
                 device, {**seconds, "total": time.perf_counter() - t0})
    _save_folder(model, tokenizer, Path(config.output_dir), card, corpus.manifest())
    _log(config, f"saved {config.output_dir}: val perplexity "
                 f"{_fmt_num(card['results']['val_perplexity'], '.2f')}, sha256 "
                 f"{card['weights_sha256'][:16]}... ({card['training']['total_seconds']:.0f} s)")
    return card


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per PretrainConfig field, with its help text and default."""
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        helptext = f"{f.metadata.get('help', '')} (default: {default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=helptext)
        elif f.name == "sources":
            parser.add_argument(flag, dest=f.name, nargs="+", default=None, help=helptext)
        else:
            flags = [flag, "--out"] if f.name == "output_dir" else [flag]
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            parser.add_argument(*flags, dest=f.name, type=kind, default=default, help=helptext)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the recipe from parsed arguments; prints where the model went."""
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    config = PretrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    card = run_pretrain(config)
    print(json.dumps({"output_dir": config.output_dir, "weights_sha256": card["weights_sha256"],
                      "val_perplexity": card["results"]["val_perplexity"],
                      "tokens_seen": card["training"]["tokens_seen"],
                      "minutes": round(card["training"]["total_seconds"] / 60, 1)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lumorik_sft.basemodel.pretrain",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
