"""`lumorik-sft`: the command line. It parses arguments and calls the library, nothing more.

    lumorik-sft demo                       # the whole pipeline on the embedded model and data
    lumorik-sft data raw.jsonl --out data  # curate, dedupe, filter, split 90/10
    lumorik-sft train --train data/train.jsonl --val data/val.jsonl --out run
    lumorik-sft eval --model run/final --data data/val.jsonl
    lumorik-sft generate --model run/final --prompt "Write a product description. ..."

Bad input exits with status 2 and one line naming the problem, never a traceback
(set LUMORIK_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Commands whose arguments live beside their library code: (name, module, help).
HOOKED_COMMANDS = [
    ("pretrain", "lumorik_sft.basemodel.pretrain", "rebuild the embedded base model from its recipe"),
    ("notebooks", "lumorik_sft.course.notebook_tools", "check notebooks; --execute re-runs them in place"),
    ("exercises", "lumorik_sft.course.exercises", "generate exercises/ from solutions/ (build [--check])"),
    ("grade", "lumorik_sft.course.grading", "grade student notebooks in sandboxed processes"),
]

EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError, KeyError)


def _add_model_arg(p: argparse.ArgumentParser, default_help: str = "the embedded base model") -> None:
    p.add_argument("--model", default=None,
                   help=f"Hugging Face model name or local path (default: {default_help})")


def _cmd_data(args: argparse.Namespace) -> int:
    from lumorik_sft import data, encoding

    length_fn = None
    if args.max_tokens is not None:
        from lumorik_sft.models import load_model_and_tokenizer

        _, tokenizer = load_model_and_tokenizer(args.model, device="cpu")

        def length_fn(r: dict) -> int:
            return encoding.pair_length(tokenizer, r["prompt"], r["completion"])

    report = data.run_curation(
        args.input, args.out, val_fraction=args.val_fraction, seed=args.seed,
        skip_invalid=args.skip_invalid, max_tokens=args.max_tokens, length_fn=length_fn,
        prompt_field=args.prompt_field, completion_field=args.completion_field,
        messages_field=args.messages_field,
    )
    print(report.summary())
    return 0


def _encode_file(path: str, what: str, tokenizer: Any, max_length: int) -> list[dict]:
    """Read (DataError names file:line:field), encode, and say what encoding cut or dropped."""
    from lumorik_sft import data, encoding

    examples, report = encoding.encode_records(data.read_records(path).records, tokenizer,
                                               max_length=max_length)
    print(f"{path}: {report.summary(f'{what} examples')}")
    if report.completion_cut:
        print(f"lumorik-sft: warning: {report.completion_cut} {what} example(s) lost the end of "
              f"their completion and its EOS to max length {max_length}: the model does not learn "
              "to stop on them; raise --max-length or shorten the prompts", file=sys.stderr)
    return examples


def _cmd_train(args: argparse.Namespace) -> int:
    from lumorik_sft import encoding, training
    from lumorik_sft.defaults import recommended_learning_rate
    from lumorik_sft.models import embedded_model_path, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    max_length = encoding.fit_max_length(model, args.max_length)
    train_ex = _encode_file(args.train, "training", tokenizer, max_length)
    val_ex = _encode_file(args.val, "validation", tokenizer, max_length) if args.val else None
    source = args.model or str(embedded_model_path())
    lr = args.lr if args.lr is not None else recommended_learning_rate(source, model)
    print(f"max length {max_length} tokens; lr {lr:g}")
    config = training.TrainConfig(
        learning_rate=lr, batch_size=args.batch_size, grad_accum_steps=args.grad_accum,
        epochs=args.epochs, warmup_ratio=args.warmup_ratio, seed=args.seed, device=args.device,
        precision=args.precision, output_dir=args.out, max_steps=args.max_steps,
        packing=args.packing, pack_length=args.pack_length, pad_to_multiple_of=args.pad_to_multiple_of,
    )
    result = training.train(model, tokenizer, train_ex, val_ex, config, resume=args.resume)
    for ep in result.epochs:
        print(json.dumps(ep))
    return 130 if result.interrupted else 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lumorik_sft import data
    from lumorik_sft.models import load_model_and_tokenizer
    from lumorik_sft.pipeline import evaluate_model

    records = data.read_records(args.data).records
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    report = evaluate_model(model, tokenizer, records, max_length=args.max_length,
                            n_generate=args.n_generate, max_new_tokens=args.max_new_tokens)
    out = {k: v for k, v in report.to_dict().items() if k not in ("predictions", "references", "prompts")}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from lumorik_sft import data
    from lumorik_sft.generation import generate_completions
    from lumorik_sft.models import load_model_and_tokenizer

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += data.read_prompts(args.prompt_file)
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompt-file")
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    outs = generate_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                do_sample=args.sample, temperature=args.temperature, seed=args.seed)
    for p, c in zip(prompts, outs, strict=True):
        print(f"### prompt\n{p}\n### completion\n{c}\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lumorik_sft.course.demo import DemoSettings, run_demo
    from lumorik_sft.defaults import fast_mode

    settings = DemoSettings.for_mode(
        args.fast or fast_mode(), out_dir=Path(args.out), model=args.model, seed=args.seed,
        epochs=args.epochs, learning_rate=args.lr,
    )
    run_demo(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumorik-sft",
        description="Supervised fine-tuning of causal language models, offline on a CPU.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipeline end to end on the embedded model and data")
    _add_model_arg(p)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: 3; 1 in fast mode)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the model card's; the chapter's 5e-5 suits GPT-2)")
    p.add_argument("--fast", action="store_true", help="tiny run in seconds (also LUMORIK_FAST=1)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("data", help="curate a JSONL/CSV file: clean, dedupe, filter, split")
    p.add_argument("input", help="raw .jsonl or .csv file")
    p.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, report.json")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="write malformed lines to rejects.jsonl and go on, instead of stopping")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="drop pairs longer than this many tokens (with --model's tokenizer)")
    _add_model_arg(p, "the embedded base model's tokenizer")
    p.add_argument("--prompt-field", default="prompt", help="prompt field name (default: prompt)")
    p.add_argument("--completion-field", default="completion",
                   help="completion field name (default: completion)")
    p.add_argument("--messages-field", default="messages",
                   help="chat messages field name (default: messages)")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("train", help="fine-tune a model on curated train/val JSONL files")
    _add_model_arg(p)
    p.add_argument("--train", required=True, help="training JSONL (prompt, completion)")
    p.add_argument("--val", default=None, help="validation JSONL (optional)")
    p.add_argument("--out", required=True, help="folder for checkpoints and the final model")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the model card's sweep choice; else 5e-5, the "
                        "chapter's, for models of 50M+ parameters and 1e-3 for smaller ones)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (default: 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--epochs", type=int, default=3, help="epochs (default: 3)")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="share of steps spent warming up")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per example (default: 256, or the model's context if shorter)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast or fp32 (default: auto)")
    p.add_argument("--packing", default="none", choices=["none", "bfd", "length"],
                   help="none: dynamic padding; bfd: pack each micro-batch without padding, "
                        "attention per example (same loss); length: batch examples of similar length")
    p.add_argument("--pack-length", type=int, default=None,
                   help="row length for --packing bfd with block masks (eager attention)")
    p.add_argument("--pad-to-multiple-of", type=int, default=None,
                   help="round batch widths up to this (64 helps bf16 on CPU)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="perplexity, BLEU and ROUGE of a model on a JSONL file")
    _add_model_arg(p)
    p.add_argument("--data", required=True, help="JSONL with prompt and completion")
    p.add_argument("--n-generate", type=int, default=100, help="pairs to generate for BLEU/ROUGE")
    p.add_argument("--max-new-tokens", type=int, default=96, help="generation length cap")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per example (default: 256, or the model's context if shorter)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    p.add_argument("--out", default=None, help="write the full report (with predictions) as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="complete prompts with a model")
    _add_model_arg(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", default=None, help="JSONL file with a prompt field")
    p.add_argument("--max-new-tokens", type=int, default=96, help="generation length cap")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    p.set_defaults(func=_cmd_generate)

    for name, module, help_text in HOOKED_COMMANDS:
        hooks = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text)
        hooks.add_arguments(p)
        p.set_defaults(func=hooks.run_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lumorik-sft: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        if os.environ.get("LUMORIK_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"lumorik-sft: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
