"""The recipe of the embedded base model: corpus -> tokenizer -> GPT-2 -> our training loop.

SFT fine-tunes a *pretrained* model, and students here have no hub access and two CPU cores.
So the package ships a small GPT-2 pretrained on documentation text that is already on every
machine (see `lumorik_sft.basemodel.corpus`), and this module is how it was made::

    lumorik-sft pretrain                      # into the package; the card records how long it took
    python -m lumorik_sft.basemodel.pretrain --out /tmp/base --max-steps 20   # a quick look

The run is deterministic: a fixed number of optimizer steps (never a time budget, which would
stop at a different step on a busier machine), a seeded model and data order, and the same
corpus hash, so a second run gives the same `model.safetensors` checksum on the same machine
type, thread count and library versions (all recorded in the card).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lumorik_sft.basemodel.card import format_number, update_model_card, weights_checksum, write_model_card
from lumorik_sft.basemodel.config import PretrainConfig
from lumorik_sft.basemodel.corpus import Corpus, assemble_corpus
from lumorik_sft.defaults import resolve_precision
from lumorik_sft.models import (
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

MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "README.md",
    "card.json",
    "corpus_manifest.json",
)
MAX_OUTPUT_BYTES = 30 * 1024 * 1024


# ---------------------------------------------------------------- data


def pack_blocks(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    context: int,
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
        batch = list(texts[start : start + 256])
        # verbose=False: documents are longer than the model's context, on purpose
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    mask = [1] * context  # one shared list: blocks are read, never written
    blocks = []
    for i in range(0, len(stream) - context + 1, context):
        ids = stream[i : i + context]
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


def _save_folder(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    card: dict[str, Any],
    manifest: dict[str, Any],
) -> None:
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
        raise RuntimeError(
            f"refusing to install {out}: missing {missing}, {total:,} bytes "
            f"(limit {MAX_OUTPUT_BYTES:,}); shrink vocab_size or width"
        )
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


def _card(
    config: PretrainConfig,
    corpus: Corpus,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    blocks: dict[str, int],
    result: Any,
    precision: str,
    device: torch.device,
    seconds: dict[str, float],
) -> dict[str, Any]:
    import tokenizers
    import transformers

    tokens_per_step = config.batch_size * config.context
    trained = [e for e in result.epochs if e["epoch"] > 0]
    final = trained[-1] if trained else result.epochs[-1]
    return {
        "model": {
            "architecture": "GPT2LMHeadModel",
            "n_layer": config.n_layer,
            "width": config.width,
            "n_head": config.n_head,
            "context": config.context,
            "vocab_size": len(tokenizer),
            "parameters": count_parameters(model),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "corpus": {
            **{k: v for k, v in corpus.manifest().items() if k != "val_modules"},
            "train_blocks": blocks["train"],
            "val_blocks": blocks["val"],
            "train_tokens": blocks["train"] * config.context,
            "val_tokens": blocks["val"] * config.context,
        },
        "training": {
            "steps": result.global_step,
            "tokens_per_step": tokens_per_step,
            "tokens_seen": result.global_step * tokens_per_step,
            "epochs_over_corpus": result.global_step * config.batch_size / blocks["train"],
            "precision": precision,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "train_seconds": seconds["train"],
            "step_seconds": seconds["steps"],
            "total_seconds": seconds["total"],
            # optimizer steps only: validation passes are excluded from the rate
            "tokens_per_second": result.global_step * tokens_per_step / max(seconds["steps"], 1e-9),
            "cpu": _cpu_name(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "results": {
            "val_loss": final["val_loss"],
            "val_perplexity": final["val_perplexity"],
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
    corpus = assemble_corpus(
        config.corpus_sources(), max_chars=config.max_corpus_chars, val_fraction=config.val_fraction
    )
    _log(
        config,
        f"corpus: {corpus.chars:,} characters, sha256 {corpus.sha256[:16]}..., "
        f"{len(corpus.val_texts)} held-out modules ({time.perf_counter() - t0:.0f} s)",
    )
    tokenizer = train_bpe_tokenizer(
        corpus.train_texts, vocab_size=config.vocab_size, min_frequency=config.min_frequency
    )
    train_blocks = pack_blocks(corpus.train_texts, tokenizer, config.context)
    val_blocks = pack_blocks(corpus.val_texts, tokenizer, config.context)
    tokenizer.model_max_length = config.context  # after packing: documents are longer
    if not train_blocks or not val_blocks:
        raise ValueError(
            f"the corpus gives {len(train_blocks)} training and {len(val_blocks)} "
            f"validation blocks of {config.context} tokens; raise max_corpus_chars "
            "or val_fraction, or lower context"
        )
    _log(
        config,
        f"tokenizer: {len(tokenizer):,} tokens; blocks: {len(train_blocks):,} train, "
        f"{len(val_blocks):,} val ({time.perf_counter() - t0:.0f} s)",
    )
    model = build_model(
        "gpt2",
        tokenizer,
        seed=config.seed,
        n_layer=config.n_layer,
        width=config.width,
        n_head=config.n_head,
        context=config.context,
    )
    set_dropout(model, config.dropout)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    per_epoch = math.ceil(len(train_blocks) / config.batch_size)
    train_config = TrainConfig(
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        epochs=math.ceil(config.max_steps / per_epoch),
        max_steps=config.max_steps,
        warmup_steps=min(config.warmup_steps, config.max_steps),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        device=str(device),
        precision=precision,
        eval_batch_size=config.batch_size,
        output_dir=config.work_dir,
        log_every=50 if config.progress else 0,
        progress=config.progress,
    )
    t_train = time.perf_counter()
    result = train(
        model,
        tokenizer,
        train_blocks,
        val_blocks,
        train_config,
        resume=bool(config.work_dir and (Path(config.work_dir) / "checkpoint.pt").exists()),
    )
    seconds = {"train": time.perf_counter() - t_train, "steps": sum(e["seconds"] for e in result.epochs)}
    if result.interrupted:
        raise KeyboardInterrupt(
            f"pretraining stopped at step {result.global_step}; nothing installed (set work_dir to resume)"
        )
    model.to("cpu").eval()
    card = _card(
        config,
        corpus,
        model,
        tokenizer,
        {"train": len(train_blocks), "val": len(val_blocks)},
        result,
        precision,
        device,
        {**seconds, "total": time.perf_counter() - t0},
    )
    _save_folder(model, tokenizer, Path(config.output_dir), card, corpus.manifest())
    _log(
        config,
        f"saved {config.output_dir}: val perplexity "
        f"{format_number(card['results']['val_perplexity'], '.2f')}, sha256 "
        f"{card['weights_sha256'][:16]}... ({card['training']['total_seconds']:.0f} s)",
    )
    return card


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per PretrainConfig field, with its help text and default."""
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        helptext = f"{f.metadata.get('help', '')} (default: {default})"
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=helptext
            )
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
    print(
        json.dumps(
            {
                "output_dir": config.output_dir,
                "weights_sha256": card["weights_sha256"],
                "val_perplexity": card["results"]["val_perplexity"],
                "tokens_seen": card["training"]["tokens_seen"],
                "minutes": round(card["training"]["total_seconds"] / 60, 1),
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lumorik_sft.basemodel.pretrain", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
