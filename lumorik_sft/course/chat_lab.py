"""Notebook 09's chat-SFT lab: the mask bugs, the runs, the reply checks and the figures.

The notebook only calls these and prints what they return. Three mask bugs are reproduced here
on purpose, each next to the correct encoding from `lumorik_sft.encoding`:

* a template without ``{% generation %}`` markers (`missing_markers_demo`): Hugging Face builds an
  all-zero assistant mask and only logs a warning; `encoding.encode_chat` refuses the template;
* the end-of-turn token outside the supervised span (`end_outside_generation`,
  `without_end_supervision`): the model is never trained to stop;
* only the last assistant turn supervised (``encode_chats(..., last_turn_only=True)``): the
  earlier replies are context, never targets (`check_replies` on `assistant_turns` shows it).

    python -c "from lumorik_sft.course.chat_lab import *; print(pretty_template(end_outside_generation()))"
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lumorik_sft import encoding, metrics
from lumorik_sft.chat import CHAT_TEMPLATE, END_OF_TURN
from lumorik_sft.chat_session import ChatSession
from lumorik_sft.config import TrainConfig
from lumorik_sft.fidelity import fact_use_report, history_fact_use, history_facts
from lumorik_sft.generation import generate_replies
from lumorik_sft.training import TrainResult, train

Messages = Sequence[Mapping[str, str]]
Example = dict[str, list[int]]
IGNORE = encoding.IGNORE_INDEX


def quiet_transformers() -> None:
    """No "Loading weights" bars or info logs: transformers writes them to stderr, which a
    committed notebook must not hold (`notebook_tools.check_notebook`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cpu_kind() -> str:
    """The CPU's model name and whether it has native bf16: numbers trained here depend on both."""
    from pathlib import Path

    from lumorik_sft.models import cpu_supports_bf16

    info = Path("/proc/cpuinfo")
    names = (
        [
            line.split(":", 1)[1].strip()
            for line in info.read_text().splitlines()
            if line.startswith("model name")
        ]
        if info.exists()
        else []
    )
    name = names[0] if names else (platform.processor() or platform.machine() or "unknown CPU")
    return f"{name}, {'native bf16 (AVX512-BF16 or AMX)' if cpu_supports_bf16() else 'no native bf16'}"


def pretty_template(template: str) -> str:
    """The one-line Jinja template with a line break before each tag, for reading."""
    return re.sub(r"(?<!^)(?=\{%)", "\n", template).strip()


# ----------------------------------------------------------------------- bug 1: no markers

_MARKER_TAGS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def strip_generation_markers(template: str) -> str:
    """The template without its ``{% generation %}`` tags: the same text, no assistant spans."""
    return _MARKER_TAGS.sub("", template)


def with_template(tokenizer: PreTrainedTokenizerBase, template: str) -> PreTrainedTokenizerBase:
    """A copy of the tokenizer with another chat template (the original is left alone)."""
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """Collect what transformers logs at WARNING and above instead of writing it to stderr."""
    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger()  # the library's root logger, "transformers"
    saved, level = list(root.handlers), root.level
    default = getattr(hf_logging, "_default_handler", None)
    handler = _Records()
    if default in saved:
        root.removeHandler(default)  # the stderr handler
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)
        root.handlers[:] = saved  # back in the same order as before
        root.setLevel(level)


@dataclass
class MarkerBug:
    """What happens to one chat under a template without generation markers."""

    n_tokens: int
    mask_with_markers: list[int]  # the correct template's assistant mask
    mask_without_markers: list[int]  # the stripped template's: all zeros
    logged: list[str]  # what transformers logged about it (a warning, printed once per process)
    refusal: str  # `encode_chat`'s error for the stripped template


def missing_markers_demo(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> MarkerBug:
    """Ask Hugging Face for the assistant mask with and without markers; ask `encode_chat` too."""
    broken = with_template(tokenizer, strip_generation_markers(encoding.chat_template(tokenizer)))
    options = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}
    good = tokenizer.apply_chat_template(list(messages), **options)
    with transformers_warnings() as logged:
        bad = broken.apply_chat_template(list(messages), **options)
    try:
        encoding.encode_chat(broken, messages)
    except encoding.ChatTemplateError as err:
        refusal = str(err)
    else:  # pragma: no cover - the guard is what the lesson shows
        raise AssertionError("encode_chat accepted a template without generation markers")
    return MarkerBug(
        n_tokens=len(bad["input_ids"]),
        mask_with_markers=list(good["assistant_masks"]),
        mask_without_markers=list(bad["assistant_masks"]),
        logged=list(logged),
        refusal=refusal,
    )


# --------------------------------------------------------------- bug 2: <|end|> unsupervised

_SUPERVISED_END = "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
_UNSUPERVISED_END = "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|end|>' }}"


def end_outside_generation(template: str = CHAT_TEMPLATE) -> str:
    """Our template with ``<|end|>`` moved after ``{% endgeneration %}``: a common template bug."""
    if _SUPERVISED_END not in template:
        raise ValueError("not lumorik_sft.chat.CHAT_TEMPLATE: no assistant block to rewrite")
    return template.replace(_SUPERVISED_END, _UNSUPERVISED_END)


def without_end_supervision(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """Copies of the examples with every ``<|end|>`` label set to -100: the same bug, on labels."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return [
        {
            **ex,
            "labels": [
                IGNORE if tid == end else lab for tid, lab in zip(ex["input_ids"], ex["labels"], strict=True)
            ],
        }
        for ex in examples
    ]


def supervised_tokens(examples: Sequence[Example]) -> int:
    """Tokens the loss is computed on (labels other than -100)."""
    return sum(lab != IGNORE for ex in examples for lab in ex["labels"])


def supervised_ends(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> int:
    """``<|end|>`` tokens among the supervised ones: 0 means the model never learns to stop."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return sum(lab == end for ex in examples for lab in ex["labels"])


@torch.no_grad()
def end_probability(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
) -> float:
    """Mean probability the model gives ``<|end|>`` where a reply ends, teacher-forced.

    The stopping skill itself, measured without generating: pass correctly encoded examples
    (their ``<|end|>`` supervised); each such position counts once.
    """
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    collate = encoding.SFTCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(list(examples[start : start + batch_size]))
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        targets_end = (batch["labels"][:, 1:] == end).to(device)  # position t-1 predicts token t
        probs += logits[:, :-1].float().softmax(-1)[..., end][targets_end].tolist()
    model.train(was_training)
    if not probs:
        raise ValueError("no supervised <|end|> in these examples: encode them with the correct template")
    return sum(probs) / len(probs)


# ------------------------------------------------------------------------------- the runs


@dataclass
class ChatRun:
    """One fine-tuned copy of a model, and what it was trained on."""

    label: str
    model: PreTrainedModel
    result: TrainResult
    n_chats: int
    supervised_tokens: int
    seconds: float


def train_chat_model(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example] | None = None,
    *,
    label: str = "SFT",
    epochs: int = 3,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    precision: str = "auto",
    device: str = "auto",
    compile: str = "auto",
) -> ChatRun:
    """Fine-tune a deep copy of ``base`` (left untouched), so every run starts from the same weights.

    ``compile`` is `TrainConfig.compile`: the notebook passes "off" because its runs are too short
    for compiling to pay back, and 'auto' would decide from step timings of a possibly shared CPU.
    """
    model = copy.deepcopy(base)
    config = TrainConfig(
        learning_rate=learning_rate,
        batch_size=batch_size,
        epochs=epochs,
        seed=seed,
        precision=precision,
        device=device,
        progress=False,
        log_every=0,
        compile=compile,
    )
    start = time.perf_counter()
    result = train(
        model, tokenizer, list(train_examples), list(val_examples) if val_examples else None, config
    )
    return ChatRun(
        label=label,
        model=model,
        result=result,
        n_chats=len(train_examples),
        supervised_tokens=supervised_tokens(train_examples),
        seconds=time.perf_counter() - start,
    )


# ------------------------------------------------------------------------ checking replies


def assistant_turns(
    records: Sequence[Mapping[str, Any]], *, which: str = "earlier"
) -> list[tuple[list[dict[str, str]], str]]:
    """(history before it, reply) for each assistant turn: ``which`` is "earlier", "last" or "all"."""
    if which not in ("earlier", "last", "all"):
        raise ValueError(f"which={which!r}: use 'earlier', 'last' or 'all'")
    out = []
    for record in records:
        messages = record["messages"]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        chosen = {"earlier": turns[:-1], "last": turns[-1:], "all": turns}[which]
        out += [([dict(m) for m in messages[:i]], messages[i]["content"]) for i in chosen]
    return out


_ORDER_QUESTION = re.compile(r"\border number\b[^.!?]*\?", re.IGNORECASE)


def asks_for_order(text: str) -> bool:
    """Does the reply ask for the order number ("What is your order number?")."""
    return _ORDER_QUESTION.search(text) is not None


_NUMBER = re.compile(r"\d{3,}")


def invents_order(history: Messages, reply: str) -> bool:
    """Does the reply name a number (3+ digits) that is not an order number the customer gave?

    Catches made-up and miscopied order numbers, also with a digit too many or too few.
    """
    given = history_facts(history, keys=("order",))["order"]
    return bool(set(_NUMBER.findall(reply)) - given)


def check_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[tuple[Messages, str]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    products: Sequence[str] = (),
) -> dict[str, Any]:
    """Greedy replies to each (history, reference): stop rate, chrF, asking and invented facts.

    ``asks_when_needed``: of the turns whose reference asks for the order number, the share where
    the reply asks too (None if none does); ``invented``: the share of replies that name a number
    the customer never gave; ``fact_use``: with ``products``, `fact_use_report`'s rate (None when
    no reference repeats a fact of its history).
    """
    histories = [list(h) for h, _ in turns]
    references = [r for _, r in turns]
    done = generate_replies(model, tokenizer, histories, max_new_tokens=max_new_tokens, batch_size=batch_size)
    texts = [c.text for c in done]
    asking = [asks_for_order(t) for t, r in zip(texts, references, strict=True) if asks_for_order(r)]
    return {
        "n": len(turns),
        "stop_rate": metrics.stop_rate([c.stopped for c in done]),
        "chrf": metrics.chrf(texts, references),
        "asks_when_needed": sum(asking) / len(asking) if asking else None,
        "invented": sum(invents_order(h, t) for h, t in zip(histories, texts, strict=True)) / len(texts),
        "fact_use": fact_use_report(histories, texts, references, products=products).rate()
        if products
        else None,
        "texts": texts,
        "references": references,
        "histories": histories,
    }


def fact_use_rows(
    histories: Sequence[Messages],
    predictions: Sequence[str],
    references: Sequence[str],
    products: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per checked reply: the facts given, the verdict per fact, the reply and reference."""
    rows = []
    for history, prediction, reference in zip(histories, predictions, references, strict=True):
        use = history_fact_use(history, prediction, reference, products=products)
        if not use.expected:
            continue
        said = history_facts(history, products)
        verdict = {
            k: "right" if k in use.right else "wrong" if k in use.wrong else "missing" for k in use.expected
        }
        rows.append(
            {
                "order": min(said["order"], default=None),
                "product": min(said["product"], default=None),
                "verdict": verdict,
                "reply": prediction,
                "reference": reference,
            }
        )
    return rows


def digits_off(given: str, named: Sequence[str]) -> int | None:
    """Fewest positions in which a named 5-digit number differs from the given one (None: none named)."""
    return min((sum(a != b for a, b in zip(given, n, strict=True)) for n in named), default=None)


def order_error_kinds(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How the order numbers of `fact_use_rows` that are not right fail: how many digits off,
    a number of another length ("8545454" for "85454"), or no number at all."""
    kinds: dict[str, int] = {}
    for row in rows:
        if row["verdict"].get("order") in (None, "right"):
            continue
        numbers = _NUMBER.findall(row["reply"])
        off = digits_off(row["order"], sorted(n for n in numbers if len(n) == len(row["order"])))
        if off is not None:
            key = f"{off} digit{'s' if off > 1 else ''} off"
        else:
            key = "a number of another length" if numbers else "no number"
        kinds[key] = kinds.get(key, 0) + 1
    return dict(sorted(kinds.items()))


# ------------------------------------------------------------------------- tables, figures

RATE_METRICS = (
    ("stop_rate", "stop rate"),
    ("fact_use", "fact use"),
    ("fact_use_order", "fact use: order"),
    ("fact_use_product", "fact use: product"),
)


def eval_summary(report: Any) -> dict[str, float | None]:
    """The headline numbers of a chat `pipeline.EvalReport`, flat."""
    facts = report.fact_use or {}
    return {
        "perplexity": report.perplexity,
        "bleu": report.bleu,
        "chrf": report.chrf,
        "stop_rate": report.stop_rate,
        "fact_use": facts.get("fact_use"),
        "fact_use_order": facts.get("fact_use_order"),
        "fact_use_product": facts.get("fact_use_product"),
        "wrong_facts": facts.get("wrong"),
    }


_HIGHER_IS_BETTER = {"perplexity": False, "wrong_facts": False}


def compare_runs(runs: Mapping[str, Mapping[str, float | None]]) -> list[dict[str, Any]]:
    """Rows (metric, one column per run) from flat metric dicts, e.g. `eval_summary`'s.

    With two runs a ``better`` column says whether the second improved on the first (lower
    perplexity and wrong facts, higher everything else). Metrics missing from a run are skipped.
    """
    names = list(runs)
    keys = [k for k in runs[names[0]] if all(runs[n].get(k) is not None for n in names)]
    rows = []
    for key in keys:
        row: dict[str, Any] = {"metric": key.replace("_", " ")}
        row.update({name: runs[name][key] for name in names})
        if len(names) == 2:
            first, second = (runs[n][key] for n in names)
            row["better"] = second < first if not _HIGHER_IS_BETTER.get(key, True) else second > first
        rows.append(row)
    return rows


def plot_metric_groups(
    runs: Mapping[str, Mapping[str, float | None]],
    metrics_shown: Sequence[tuple[str, str]],
    *,
    ax: Axes | None = None,
    title: str = "",
    ylabel: str = "share of replies (higher is better)",
) -> Figure:
    """Grouped bars: one group per metric (values in [0, 1]), one bar per run, each bar labelled."""
    import numpy as np

    if ax is None:
        fig = Figure(figsize=(1.9 * len(metrics_shown) + 2, 3.8), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure  # type: ignore[assignment]
    x = np.arange(len(metrics_shown))
    width = 0.8 / len(runs)
    colours = ["lightgrey", "tab:blue", "tab:orange", "tab:green", "tab:red"]
    for i, (name, values) in enumerate(runs.items()):
        heights = [float(values.get(key) or 0.0) for key, _ in metrics_shown]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, heights, width, label=name,
                      color=colours[i % len(colours)], edgecolor="dimgrey")  # fmt: skip
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    ax.set_xticks(x, [label.replace(": ", ":\n") for _, label in metrics_shown])
    ax.set_ylim(0, 1.18)
    ax.set_xlabel("metric")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "runs compared")
    ax.legend(loc="upper left", ncols=len(runs), fontsize=8, frameon=False)
    return fig


def plot_sft_summary(result: TrainResult, before: Mapping[str, Any], after: Mapping[str, Any]) -> Figure:
    """Left: the run's loss curves; right: the base and fine-tuned models' reply metrics."""
    from lumorik_sft.course.plots import plot_loss_curves

    fig = Figure(figsize=(13, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1, 1.15))
    plot_loss_curves(result, ax=left)
    plot_metric_groups({"base": before, "after SFT": after}, RATE_METRICS, ax=right,
                       title="the last reply of each validation chat")  # fmt: skip
    return fig


# ------------------------------------------------------------------------- chatting


def reply_line(session: ChatSession, text: str) -> str:
    """Say ``text`` in the session; the reply as one printable line (or why it was refused)."""
    try:
        reply = session.say(text)
    except ValueError as err:  # special-token text typed by the user
        return f"(refused: {err})"
    cut = "" if session.stopped[-1] else f"  [cut at {session.max_new_tokens} tokens]"
    return f"model> {reply}{cut}"


def scripted_chat(session: ChatSession, lines: Sequence[str]) -> list[str]:
    """A conversation from fixed user lines: the widget's static fallback, and testable."""
    transcript = []
    for text in lines:
        transcript += [f"you> {text}", reply_line(session, text)]
    return transcript


def chat_widget(session: ChatSession) -> Any:
    """A text box, Send and Reset buttons and the conversation, for a live Jupyter frontend."""
    import ipywidgets as w

    box = w.Text(placeholder="Write to the support assistant, then press Send", layout=w.Layout(width="60%"))
    send, reset = w.Button(description="Send", button_style="primary"), w.Button(description="Reset")
    out = w.Output(layout=w.Layout(border="1px solid #bbb", padding="4px", min_height="6em"))

    def on_send(_: Any) -> None:
        text = box.value.strip()
        if text:
            box.value = ""
            out.append_stdout(f"you> {text}\n{reply_line(session, text)}\n")

    def on_reset(_: Any) -> None:
        session.reset()
        out.outputs = ()
        out.append_stdout("(new conversation)\n")

    send.on_click(on_send)
    reset.on_click(on_reset)
    return w.VBox([w.HBox([box, send, reset]), out])
