"""Every training setting in one dataclass, with help text per field and fix-it validation.

`TrainConfig` is the one source of the training settings: `lumorik_sft.training.train` reads it,
and the `train` command's flags are generated from its fields and their help by
`add_dataclass_arguments`, which works for any such dataclass.

Importing this module loads neither torch nor transformers (validation imports them when a config
is built), so `lumorik-sft train --help` lists every setting in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Every training setting in one place, with the chapter's values as defaults.

    Optimisation: learning_rate, batch_size, grad_accum_steps, epochs, warmup_ratio,
    warmup_steps, weight_decay, max_grad_norm, max_steps.
    Reproducibility: seed, shuffle. Hardware: device, precision, eval_batch_size, packing,
    pack_length, pad_to_multiple_of, compile.
    Output: output_dir, log_every, progress.
    """

    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak AdamW learning rate, reached after warmup. None: the model's recommended "
            "rate (defaults.recommended_learning_rate: its card's sweep choice, else the "
            "chapter's 5e-5 for 50M+ parameters and 1e-3 below)."
        },
    )
    batch_size: int = field(
        default=8,
        metadata={"help": "Examples per forward pass (micro-batch); lower it if you run out of memory."},
    )
    grad_accum_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step; effective batch = batch_size x this."}
    )
    epochs: int = field(default=3, metadata={"help": "Passes over the training examples."})
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of optimizer steps spent warming the LR up linearly from 0."}
    )
    warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Warmup length in optimizer steps; set this or warmup_ratio, not both."},
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "AdamW decoupled weight decay; never applied to biases and norm weights."},
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this; None or 0 disables clipping."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seeds Python, NumPy and torch, and the shuffling order of every epoch."}
    )
    device: str = field(
        default="auto",
        metadata={"help": "'auto' (CUDA, then MPS, then CPU), or a torch device such as 'cuda:1'."},
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "'fp32', 'bf16' (autocast, fp32 weights) or 'auto': bf16 where the hardware "
            "has native bf16 (CUDA, AVX512-BF16/AMX CPUs), fp32 elsewhere."
        },
    )
    eval_batch_size: int = field(
        default=16, metadata={"help": "Examples per forward pass when computing validation loss."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where checkpoint.pt, history.json and final/ go; None saves nothing."},
    )
    max_steps: int | None = field(
        default=None,
        metadata={"help": "Stop after this many optimizer steps (smoke runs); the LR schedule ends there."},
    )
    log_every: int = field(
        default=50,
        metadata={"help": "Print a one-line summary every N optimizer steps and each epoch; 0 = silent."},
    )
    progress: bool = field(
        default=True,
        metadata={"help": "Show a tqdm progress bar (also off when env CI or TQDM_DISABLE is set)."},
    )
    shuffle: bool = field(
        default=True,
        metadata={"help": "Shuffle examples each epoch, in an order rebuilt from (seed, epoch)."},
    )
    packing: str = field(
        default="none",
        metadata={
            "help": "'none': pad each micro-batch to its longest row; 'bfd': pack the same "
            "micro-batch without padding (one row, attention per example, on sdpa "
            "models) or best-fit decreasing into block-masked rows (same loss, less "
            "padding); 'length': batch examples of similar length together."
        },
    )
    pack_length: int | None = field(
        default=None,
        metadata={
            "help": "Row length for packing='bfd' with block masks (eager attention); None: the "
            "longest example of each micro-batch, so rows are never wider than padding."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={
            "help": "Round each training micro-batch's width up to a multiple of this (e.g. 64): "
            "fewer distinct shapes for kernels that cache per shape (oneDNN bf16 on CPU)."
        },
    )
    fused_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the training loss with the fast path (lumorik_sft.fused_loss: LM head "
            "only on supervised positions, fused with the cross-entropy); False: the plain "
            "reference, metrics.completion_nll. Both give the same loss and gradients."
        },
    )
    compile: str = field(
        default="auto",
        metadata={
            "help": "torch.compile the model's blocks (lumorik_sft.compiled): 'on', 'off', or 'auto': "
            "only when the run is long enough for the compile time to pay back (timed on the first "
            "steps). Same loss and gradients; TrainResult.compile says what was done."
        },
    )
    fused_activations: bool = field(
        default=True,
        metadata={
            "help": "While training, run GPT-2's Python GELU (gelu_new) as PyTorch's fused tanh "
            "GELU: the same formula in one kernel instead of seven (see fused_activations)."
        },
    )

    lora_r: int | None = field(
        default=None,
        metadata={
            "help": "LoRA rank: freeze the model and train r x (in + out) numbers beside each target "
            "layer (lumorik_sft.lora); OUT/final/ then holds the adapter, OUT/merged/ the merged "
            "model. None: full fine-tuning of every weight."
        },
    )
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA scale: each update B A is multiplied by lora_alpha / lora_r."}
    )
    lora_targets: str = field(
        default="attention",
        metadata={
            "help": "Layers LoRA wraps: 'attention' (query, key, value projections), 'all-linear' "
            "(every linear layer but the LM head) or comma-separated module names."
        },
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the input of LoRA's A during training (0: none)."}
    )
    lora_tokens: str = field(
        default="auto",
        metadata={
            "help": "Token embedding rows LoRA trains too: 'auto' (the chat role and end-of-turn "
            "tokens, when the tokenizer has them: rows no pretraining taught), 'none', or "
            "comma-separated tokens."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, Path):
            self.output_dir = str(self.output_dir)
        for message in self._problems():
            raise ValueError(message)

    def _problems(self) -> Iterator[str]:
        """Yield a fix-it message for each invalid setting (the first one is raised)."""
        import torch  # here, not at the top: reading the fields (a CLI's --help) needs no torch

        from lumorik_sft.compiled import COMPILE_MODES
        from lumorik_sft.defaults import PRECISIONS
        from lumorik_sft.packing import PACKING_MODES

        if self.learning_rate is not None and not (
            self.learning_rate > 0 and math.isfinite(self.learning_rate)
        ):
            yield (
                f"learning_rate must be a positive number, got {self.learning_rate!r}; "
                "the chapter uses 5e-5, a common range for fine-tuning is 1e-5 to 2e-4"
            )
        for name in ("batch_size", "grad_accum_steps", "epochs", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                yield f"{name} must be an integer >= 1, got {value!r}"
        if not 0.0 <= self.warmup_ratio < 1.0:
            yield (
                f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}; "
                "e.g. 0.1 warms up over the first 10% of optimizer steps"
            )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            yield f"warmup_steps must be >= 0 or None, got {self.warmup_steps!r}"
        if self.warmup_steps is not None and self.warmup_ratio > 0:
            yield (
                "set warmup_steps or warmup_ratio, not both: "
                f"got warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio}"
            )
        if self.weight_decay < 0:
            yield f"weight_decay must be >= 0, got {self.weight_decay!r} (0.0 disables it)"
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            yield (
                f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm!r}; "
                "use None or 0 to disable clipping"
            )
        if self.compile not in COMPILE_MODES:
            yield f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}"
        if self.packing not in PACKING_MODES:
            yield (
                f"packing must be one of {', '.join(PACKING_MODES)}, got {self.packing!r}; "
                "'bfd' keeps the padded loop's batches and losses with less padding"
            )
        if self.pack_length is not None and (not isinstance(self.pack_length, int) or self.pack_length < 1):
            yield f"pack_length must be an integer >= 1 or None, got {self.pack_length!r}"
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            yield (f"pad_to_multiple_of must be an integer >= 1 or None, got {self.pad_to_multiple_of!r}")
        if self.precision not in PRECISIONS:
            yield f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            yield f"max_steps must be an integer >= 1 or None (no cap), got {self.max_steps!r}"
        if not isinstance(self.log_every, int) or self.log_every < 0:
            yield f"log_every must be an integer >= 0 (0 = no log lines), got {self.log_every!r}"
        if self.lora_r is not None:
            from lumorik_sft.lora import LoraSettings

            try:
                LoraSettings(
                    r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets
                )
            except ValueError as err:
                yield (
                    str(err)
                    .replace("\n  ", " ")
                    .replace("invalid LoRA settings:", "invalid --lora-* settings:")
                )
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                yield (
                    f"device {self.device!r} is not a torch device; use 'auto', 'cpu', "
                    "'cuda', 'cuda:0' or 'mps'"
                )

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step."""
        return self.batch_size * self.grad_accum_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for CLIs and notebook tables."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    required: Iterable[str] = (),
) -> None:
    """Add one --flag per field of the dataclass `cls`, with the field's help text and default.

    Field `pack_length` becomes `--pack-length` (plus any `aliases["pack_length"]`, e.g. `--out`
    for `output_dir`), parsed into `args.pack_length`. A bool field becomes `--x/--no-x`, a
    `tuple[str, ...]` takes one or more values, and an Optional int, float or str also accepts
    `none`. Values are converted, not validated: the dataclass validates when `config_from_args`
    builds it, so each rule lives in one place. (`TrainConfig` for `train`; any recipe config too.)
    """
    aliases = aliases or {}
    required = set(required)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flags = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, ())]
        kind, optional, many = _flag_type(f.name, hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if f.name in required:
            shown = "required"
        elif kind is bool:
            shown = f"default: --{'' if default else 'no-'}{flags[0][2:]}"
        else:
            shown = f"default: {'none' if default is None else default}"
        helptext = f"{f.metadata.get('help', '')} ({shown})".replace("%", "%%")
        if kind is bool:
            action = parser.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default
            )
            action.help = helptext  # set after: Python 3.10 appends its own "(default: ...)" to help=
        else:
            metavar = {int: "N", float: "X"}.get(kind, f.name.upper())
            parser.add_argument(
                *flags,
                dest=f.name,
                type=_parse_flag(kind, optional and not many),
                nargs="+" if many else None,
                default=default,
                required=f.name in required,
                metavar=metavar,
                help=helptext,
            )


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build (and so validate) the dataclass `cls` from the flags `add_dataclass_arguments` added."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _flag_type(name: str, hint: Any) -> tuple[type, bool, bool]:
    """(bool, int, float or str; whether None is allowed; whether it is a tuple of them)."""
    kinds = [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = list(typing.get_args(hint))
    optional = type(None) in kinds
    kinds = [k for k in kinds if k is not type(None)]
    many = len(kinds) == 1 and typing.get_origin(kinds[0]) is tuple
    if many and typing.get_args(kinds[0])[1:] == (Ellipsis,):
        kinds = list(typing.get_args(kinds[0])[:1])
    if len(kinds) != 1 or kinds[0] not in (bool, int, float, str) or (many and kinds[0] is bool):
        raise TypeError(
            f"field {name!r} has type {hint}; a flag takes a bool, int, float or str, "
            "a tuple[int|float|str, ...], or an Optional of one"
        )
    return kinds[0], optional, many


def _parse_flag(kind: type, optional: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        return kind(text)

    parse.__name__ = kind.__name__  # argparse says "invalid int value: 'x'"
    return parse
