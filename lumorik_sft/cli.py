"""The core library's commands. They parse arguments and call the library, nothing more.

    lumorik-sft data raw.jsonl --out data  # curate, dedupe, filter, split 90/10
    lumorik-sft data alpaca.jsonl --out chats  # Alpaca/ShareGPT/messages -> {"messages": [...]}
    lumorik-sft train --train data/train.jsonl --val data/val.jsonl --out run
    lumorik-sft eval --model run/final --data data/val.jsonl
    lumorik-sft generate --model run/final --prompt "Write a product description. ..."
    lumorik-sft chat --model run/final --message "My order has not arrived."

The `lumorik-sft` command (`lumorik_sft.course.cli`) adds the course's and the base-model
recipe's commands to these; `python -m lumorik_sft.cli` runs the core ones alone (as
`accelerate launch -m lumorik_sft.cli train ...` does). `train` has one flag per `TrainConfig`
field, generated from the dataclass. Bad input exits with status 2 and one line naming the
problem, never a traceback (set LUMORIK_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lumorik_sft.config import TrainConfig, add_dataclass_arguments, config_from_args
from lumorik_sft.conversations import INPUT_FORMATS

# Today's short names for some TrainConfig fields; each field also has its own --field-name flag.
TRAIN_FLAG_ALIASES = {
    "learning_rate": ["--lr"],
    "grad_accum_steps": ["--grad-accum"],
    "output_dir": ["--out"],
}

EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError, KeyError)


def add_model_argument(p: argparse.ArgumentParser, default_help: str = "the embedded base model") -> None:
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face model name (e.g. gpt2) or a local folder with config.json "
        f"(default: {default_help})",
    )


def _cmd_data(args: argparse.Namespace) -> int:
    from lumorik_sft import data, encoding
    from lumorik_sft.models import load_model_and_tokenizer

    length_fn = None
    if args.max_tokens is not None:
        _, tokenizer = load_model_and_tokenizer(args.model, device="cpu")

        def length_fn(r: dict) -> int:
            return encoding.pair_length(tokenizer, r["prompt"], r["completion"])

    report = data.run_curation(
        args.input,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        skip_invalid=args.skip_invalid,
        max_tokens=args.max_tokens,
        length_fn=length_fn,
        prompt_field=args.prompt_field,
        completion_field=args.completion_field,
        messages_field=args.messages_field,
        input_format=args.input_format,
    )
    print(report.summary())
    return 0


def _encode_file(
    path: str, what: str, tokenizer: Any, max_length: int, last_turn_only: bool = False, records: Any = None
) -> list:
    """Read (DataError names file:line:field) unless read already, encode, say what was cut or dropped."""
    from lumorik_sft import data, pipeline

    records = data.read_records(path).records if records is None else records
    examples, report = pipeline.encode_data(
        records, tokenizer, max_length=max_length, last_turn_only=last_turn_only
    )
    print(
        f"{path}: {report.summary(f'{what} chats' if pipeline.is_chat_data(records) else f'{what} examples')}"
    )
    for reason, detail in report.details.items():
        print(f"{path}: dropped ({reason}), first: {detail}")
    if report.completion_cut:
        print(
            f"lumorik-sft: warning: {report.completion_cut} {what} example(s) lost the end of "
            f"their completion and its EOS to max length {max_length}: the model does not learn "
            "to stop on them; raise --max-length or shorten the prompts",
            file=sys.stderr,
        )
    return examples


def _cmd_train(args: argparse.Namespace) -> int:
    from lumorik_sft import data, encoding, pipeline, training
    from lumorik_sft.models import load_model_and_tokenizer

    config = config_from_args(TrainConfig, args)  # validated before the model loads
    model_name, train_records = args.model, None
    if model_name is None:  # the data decide: chats need the embedded model with a chat template
        train_records = data.read_records(args.train).records
        model_name = pipeline.default_model(train_records, None)
    if model_name != args.model:
        print(f"chat data: training {model_name} (the embedded model with a chat template)")
    model, tokenizer = load_model_and_tokenizer(model_name, device=config.device)
    max_length = encoding.fit_max_length(model, args.max_length)
    last = args.last_turn_only
    train_ex = _encode_file(args.train, "training", tokenizer, max_length, last, train_records)
    val_ex = _encode_file(args.val, "validation", tokenizer, max_length, last) if args.val else None
    print(f"max length {max_length} tokens")
    # learning_rate None goes through: train() applies the model's recommended rate
    result = training.train(model, tokenizer, train_ex, val_ex, config, resume=args.resume)
    chosen = "" if config.learning_rate is not None else " (the model's recommended rate)"
    print(f"learning rate {result.config['learning_rate']:g}{chosen}")
    for ep in result.epochs:
        print(json.dumps(ep))
    return 130 if result.interrupted else 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lumorik_sft import data
    from lumorik_sft.models import load_model_and_tokenizer
    from lumorik_sft.pipeline import default_model, evaluate_model

    records = data.read_records(args.data).records
    model, tokenizer = load_model_and_tokenizer(default_model(records, args.model), device=args.device)
    aliases = getattr(args, "fact_aliases", None)  # the course's front door supplies its data's aliases
    products = getattr(args, "fact_products", None)  # and its product names, for chats' fact use
    report = evaluate_model(
        model,
        tokenizer,
        records,
        max_length=args.max_length,
        n_generate=args.n_generate,
        max_new_tokens=args.max_new_tokens,
        fact_aliases=aliases() if callable(aliases) else aliases,
        fact_products=(products() if callable(products) else products) or (),
    )
    hidden = ("predictions", "references", "prompts", "histories")
    out = {k: v for k, v in report.to_dict().items() if k not in hidden}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from lumorik_sft import data, generation, pipeline
    from lumorik_sft.conversations import split_last_reply
    from lumorik_sft.models import load_model_and_tokenizer

    prompts = list(args.prompt or [])
    chats = []
    if args.prompt_file and not prompts:
        first = data.read_records(args.prompt_file).records if _has_messages(args.prompt_file) else []
        chats = [split_last_reply(r["messages"])[0] for r in first]
    if args.prompt_file and not chats:
        prompts += data.read_prompts(args.prompt_file)
    if not prompts and not chats:
        raise ValueError("give at least one --prompt or a --prompt-file")
    model_name = args.model if args.model or not chats else pipeline.CHAT_MODEL
    model, tokenizer = load_model_and_tokenizer(model_name, device=args.device)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    options |= {"temperature": args.temperature, "seed": args.seed}
    if chats:
        replies = generation.generate_replies(model, tokenizer, chats, **options)
        for history, reply in zip(chats, replies, strict=True):
            print(f"### chat\n{history[-1]['content']}\n### reply\n{reply.text}\n")
        return 0
    for p, c in zip(
        prompts, generation.generate_completions(model, tokenizer, prompts, **options), strict=True
    ):
        print(f"### prompt\n{p}\n### completion\n{c}\n")
    return 0


def _has_messages(path: str) -> bool:
    """Whether a JSONL file's first record is a chat (generate then writes each chat's last reply)."""
    from lumorik_sft.conversations import CHAT_FORMATS, detect_format

    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return detect_format(json.loads(first)) in CHAT_FORMATS
    except ValueError:  # not JSON, or a prompt-only record: read as prompts, which names the line
        return False


def _cmd_chat(args: argparse.Namespace) -> int:
    from lumorik_sft.chat_session import ChatSession, chat_loop
    from lumorik_sft.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model or "embedded-chat", device=args.device)
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        seed=args.seed,
    )
    if not args.message:
        chat_loop(session)
        return 0
    for message in args.message:  # one turn each, in order: a scripted conversation
        reply = session.say(message)
        print(f"you> {message}\nmodel> {reply}" + ("" if session.stopped[-1] else "  [cut at the limit]"))
    return 0


def command_parser(
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `lumorik-sft` parser with no commands yet, and the subparsers to add them to."""
    parser = argparse.ArgumentParser(
        prog="lumorik-sft",
        description="Supervised fine-tuning of causal language models, offline on a CPU.",
    )
    return parser, parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=parser_class
    )


def _add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """How `generate` and `chat` decode: greedy by default, or seeded sampling."""
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")


def add_core_commands(subparsers: argparse._SubParsersAction) -> None:
    """The core library's commands: data, train, eval, generate and chat."""
    p = subparsers.add_parser(
        "data",
        help="curate a JSONL/CSV file of pairs or chats: clean, dedupe, filter, split",
        description="Curate pairs or chats. Chat formats (messages, alpaca, sharegpt) are written as "
        'JSONL of {"messages": [{"role": ..., "content": ...}, ...]}, one whole conversation a line.',
    )
    p.add_argument("input", help="raw .jsonl or .csv file")
    p.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, report.json")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="write malformed lines to rejects.jsonl and go on, instead of stopping",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="drop pairs longer than this many tokens (with --model's tokenizer); chats are not "
        "length-filtered: the chat encoder drops earlier turns to fit and counts them",
    )
    add_model_argument(p, "the embedded base model's tokenizer")
    p.add_argument("--prompt-field", default="prompt", help="prompt field name (default: prompt)")
    p.add_argument(
        "--completion-field", default="completion", help="completion field name (default: completion)"
    )
    p.add_argument(
        "--messages-field", default="messages", help="chat messages field name (default: messages)"
    )
    p.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="auto",
        help="record format: pairs (prompt/completion), messages (chat), alpaca "
        "(instruction/input/output), sharegpt (conversations of from/value), or auto (default: "
        "the first record's fields decide; rows in another format are rejected)",
    )
    p.set_defaults(func=_cmd_data)

    p = subparsers.add_parser(
        "train",
        help="fine-tune a model on curated train/val JSONL files",
        description="Fine-tune a model. Every TrainConfig field is a flag (lumorik_sft.config).",
    )
    add_model_argument(p)
    p.add_argument(
        "--train", required=True, help="training JSONL: pairs (prompt, completion) or chats (messages)"
    )
    p.add_argument("--val", default=None, help="validation JSONL (optional)")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per example (default: 256, or the model's context if shorter)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--last-turn-only",
        action="store_true",
        help="chats: supervise only the last assistant reply (default: every reply and its end token)",
    )
    settings = p.add_argument_group("training settings (TrainConfig's fields)")
    add_dataclass_arguments(settings, TrainConfig, aliases=TRAIN_FLAG_ALIASES, required=["output_dir"])
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser(
        "eval",
        help="perplexity, BLEU, ROUGE, chrF, stop rate, distinct-2 and (course formats) fact fidelity",
    )
    add_model_argument(p)
    p.add_argument("--data", required=True, help="JSONL of pairs (prompt, completion) or chats (messages)")
    p.add_argument("--n-generate", type=int, default=100, help="pairs to generate for the output metrics")
    p.add_argument("--max-new-tokens", type=int, default=96, help="generation length cap")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per example (default: 256, or the model's context if shorter)",
    )
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    p.add_argument("--out", default=None, help="write the full report (with predictions) as JSON")
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser("generate", help="complete prompts with a model")
    add_model_argument(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument(
        "--prompt-file",
        default=None,
        help="JSONL with a prompt field, or chats (messages): then each chat's last reply is written anew",
    )
    p.add_argument("--max-new-tokens", type=int, default=96, help="generation length cap")
    _add_decoding_arguments(p)
    p.set_defaults(func=_cmd_generate)

    p = subparsers.add_parser(
        "chat",
        help="talk to a chat model (the conversation is kept; replies stop at the end-of-turn token)",
    )
    add_model_argument(p, "the embedded chat model, embedded-chat")
    p.add_argument(
        "--message",
        action="append",
        help="a user message (repeatable: a scripted conversation); without it, an interactive loop",
    )
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply length cap (default: 64)")
    _add_decoding_arguments(p)
    p.set_defaults(func=_cmd_chat)


def build_parser() -> argparse.ArgumentParser:
    """The core commands alone (`python -m lumorik_sft.cli`); `lumorik-sft` adds the course's."""
    parser, subparsers = command_parser()
    add_core_commands(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen command: expected errors become one line and exit status 2."""
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


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
