"""`lumorik-sft`: the front door. The core library's commands, the course's and the base model's.

    lumorik-sft demo                       # the whole pipeline on the embedded model and data
    lumorik-sft data raw.jsonl --out data  # curate, dedupe, filter, split 90/10
    lumorik-sft train --train data/train.jsonl --val data/val.jsonl --out run
    lumorik-sft eval --model run/final --data data/val.jsonl
    lumorik-sft generate --model run/final --prompt "Write a product description. ..."
    lumorik-sft lab                        # the course in JupyterLab
    lumorik-sft notebooks --execute        # re-run every notebook in place
    lumorik-sft exercises build --check    # exercises/ generated from solutions/
    lumorik-sft grade submissions/ --out grades/
    lumorik-sft pretrain                   # rebuild the embedded base model from its recipe

data, train, eval and generate live in the core (`lumorik_sft.cli`, which also runs them alone as
`python -m lumorik_sft.cli`); each other command's arguments live beside its code, in an
`add_arguments(parser)` and `run_from_args(args)` pair. Building the parser imports no torch, so
`lumorik-sft --help` answers at once: modules that need torch are imported inside the handlers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lumorik_sft.cli import add_core_commands, add_model_argument, command_parser, run
from lumorik_sft.config import TrainConfig
from lumorik_sft.course import exercises, grading, lab, notebook_tools


class _CommandParser(argparse.ArgumentParser):
    """A command's parser that can take its arguments only when that command is chosen.

    `add_arguments=` defers them: the base model's recipe imports torch to describe its flags,
    and `lumorik-sft --help` or `lumorik-sft train --help` should not wait for torch.
    """

    def __init__(
        self,
        *args: Any,
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._deferred_arguments = add_arguments

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._deferred_arguments is not None:
            add, self._deferred_arguments = self._deferred_arguments, None
            add(self)
        return super().parse_known_args(args, namespace)


def _cmd_demo(args: argparse.Namespace) -> int:
    from lumorik_sft.course.demo import DemoSettings, run_demo
    from lumorik_sft.defaults import fast_mode

    settings = DemoSettings.for_mode(
        args.fast or fast_mode(),
        out_dir=Path(args.out),
        model=args.model,
        seed=args.seed,
        epochs=args.epochs,
        learning_rate=args.lr,
    )
    run_demo(settings)
    return 0


def _pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    from lumorik_sft.basemodel import pretrain

    pretrain.add_arguments(parser)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from lumorik_sft.basemodel import pretrain

    return pretrain.run_from_args(args)


def _course_fact_aliases() -> dict[str, tuple[str, ...]]:
    """How the course's product descriptions phrase each feature, for `eval`'s fact check."""
    from lumorik_sft.course.synthetic import FEATURE_ALIASES

    return FEATURE_ALIASES


def _course_products() -> tuple[str, ...]:
    """The support dialogues' product names, for `eval`'s fact use on chats."""
    from lumorik_sft.course.synthetic import SUPPORT_PRODUCTS

    return tuple(SUPPORT_PRODUCTS)


def build_parser() -> argparse.ArgumentParser:
    parser, sub = command_parser(parser_class=_CommandParser)

    p = sub.add_parser("demo", help="run the whole pipeline end to end on the embedded model and data")
    add_model_argument(p)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: 2; 1 in fast mode)")
    p.add_argument("--lr", type=float, default=None, help=TrainConfig.help()["learning_rate"])
    p.add_argument("--fast", action="store_true", help="tiny run in seconds (also LUMORIK_FAST=1)")
    p.set_defaults(func=_cmd_demo)

    add_core_commands(sub)
    sub.choices["eval"].set_defaults(fact_aliases=_course_fact_aliases, fact_products=_course_products)

    for name, module, help_text in [
        ("lab", lab, "open the course in JupyterLab (widget state saved with the notebooks)"),
        ("notebooks", notebook_tools, "check notebooks; --execute re-runs them in place"),
        ("exercises", exercises, "generate exercises/ from solutions/ (build [--check])"),
        ("grade", grading, "grade student notebooks in sandboxed processes"),
    ]:
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run_from_args)

    p = sub.add_parser(
        "pretrain", help="rebuild the embedded base model from its recipe", add_arguments=_pretrain_arguments
    )
    p.set_defaults(func=_cmd_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
