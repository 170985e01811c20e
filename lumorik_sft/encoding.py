"""Tokenization and encoding (stage 2): one contract, prompt + completion -> ids, mask, labels.

The contract, with literal values (prompt ids [5, 6], completion ids [7, 8], EOS = 0, pad = 1)::

    input_ids      = [   5,    6, 7, 8, 0]
    attention_mask = [   1,    1, 1, 1, 1]
    labels         = [-100, -100, 7, 8, 0]

The model is only taught the completion and the EOS that ends it; the prompt is context.
A batch of that row and a shorter one, right-padded by `SFTCollator`::

    input_ids      = [[   5,    6, 7,    8,    0], [   5, 7,    0,    1,    1]]
    attention_mask = [[   1,    1, 1,    1,    1], [   1, 1,    1,    0,    0]]
    labels         = [[-100, -100, 7,    8,    0], [-100, 7,    0, -100, -100]]

The chapter's `labels=batch["input_ids"]` trains on the prompt and on padding instead; see
`naive_encode` for its version, kept for the errata lesson.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from lumorik_sft.chat import has_generation_markers
from lumorik_sft.models import context_length, prepare_tokenizer, shown_path

IGNORE_INDEX = -100
DEFAULT_SEPARATOR = "\n"
DEFAULT_MAX_LENGTH = 256


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, separator: str = DEFAULT_SEPARATOR
) -> list[int]:
    """Token ids of the prompt as the model sees it, at training and at generation alike.

    Special tokens are added here (a Llama tokenizer's BOS) and never to the completion.
    """
    # verbose=False: length is checked by `truncate_pair`, not by the tokenizer's warning.
    return list(tokenizer(prompt + separator, add_special_tokens=True, verbose=False)["input_ids"])


def completion_ids(tokenizer: PreTrainedTokenizerBase, completion: str) -> list[int]:
    """Token ids of the completion followed by EOS, so the model learns where to stop."""
    ids = list(tokenizer(completion, add_special_tokens=False, verbose=False)["input_ids"])
    return [*ids, tokenizer.eos_token_id]


def _leading_special(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> int:
    """How many special tokens (BOS) open the prompt: truncation must keep them."""
    special = set(tokenizer.all_special_ids)
    n = 0
    while n < len(ids) - 1 and ids[n] in special:
        n += 1
    return n


def truncate_pair(
    prompt: list[int],
    completion: list[int],
    max_length: int,
    *,
    keep_head: int = 0,
    min_prompt_tokens: int = 1,
) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into `max_length`, cutting the prompt (from the left) first.

    The completion is the supervision, so it is cut (from the right) only once the prompt is
    down to `min_prompt_tokens` (plus the `keep_head` special tokens that open it).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    floor = min(len(prompt), keep_head + min_prompt_tokens)
    keep = max(floor, max_length - len(completion))
    head, body = prompt[:keep_head], prompt[keep_head:]
    tail = body[len(body) - (keep - len(head)) :] if keep > len(head) else []
    new_prompt = (head + tail)[:keep]
    return new_prompt, completion[: max(0, max_length - len(new_prompt))]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    completion: str,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    separator: str = DEFAULT_SEPARATOR,
    min_prompt_tokens: int = 1,
) -> dict[str, list[int]] | None:
    """Encode one pair under the contract above; None when no completion token survives."""
    prepare_tokenizer(tokenizer)
    p_ids = prompt_ids(tokenizer, prompt, separator)
    c_ids = completion_ids(tokenizer, completion)
    p_ids, c_ids = truncate_pair(
        p_ids,
        c_ids,
        max_length,
        keep_head=_leading_special(tokenizer, p_ids),
        min_prompt_tokens=min_prompt_tokens,
    )
    if not c_ids:
        return None
    return {
        "input_ids": p_ids + c_ids,
        "attention_mask": [1] * (len(p_ids) + len(c_ids)),
        "labels": [IGNORE_INDEX] * len(p_ids) + c_ids,
    }


def pair_length(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    completion: str,
    separator: str = DEFAULT_SEPARATOR,
) -> int:
    """Untruncated token length of a pair (prompt, separator, completion, EOS)."""
    prepare_tokenizer(tokenizer)
    return len(prompt_ids(tokenizer, prompt, separator)) + len(completion_ids(tokenizer, completion))


@dataclass
class EncodeReport:
    """What encoding did to a data set: nothing is dropped or cut without being counted."""

    read: int = 0
    encoded: int = 0
    truncated: int = 0
    completion_cut: int = 0  # truncated into the completion: its end and EOS are gone
    dropped: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    turns_dropped: int = 0  # chats: whole earlier turns dropped to fit (`fit_chat`)
    details: dict[str, str] = field(default_factory=dict)  # the first dropped record per reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "encoded": self.encoded,
            "truncated": self.truncated,
            "completion_cut": self.completion_cut,
            "dropped": dict(self.dropped),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "turns_dropped": self.turns_dropped,
            "details": dict(self.details),
        }

    def summary(self, what: str = "examples") -> str:
        """One line for logs: what was kept, cut and dropped."""
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        return (
            f"encoded {self.encoded} of {self.read} {what} ({self.prompt_tokens} prompt tokens, "
            f"masked; {self.completion_tokens} completion tokens, supervised); "
            f"{self.truncated} truncated, {self.completion_cut} of them into the completion "
            f"(EOS lost); dropped: {dropped}"
        )


def fit_max_length(model: Any, requested: int | None = None) -> int:
    """Tokens per example: `requested`, else 256 capped by the model's context.

    A request beyond the context is an error here rather than an index error deep in the
    forward pass: the model has no position embedding past its context.
    """
    limit = context_length(model)
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if limit is not None and requested > limit:
        raise ValueError(
            f"max length {requested} is longer than the model's context of {limit} "
            f"tokens; use {limit} or less"
        )
    return requested


def encode_records(
    records: Iterable[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    separator: str = DEFAULT_SEPARATOR,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
) -> tuple[list[dict[str, list[int]]], EncodeReport]:
    """Encode many records; the report counts truncations and drops by reason."""
    report = EncodeReport()
    examples: list[dict[str, list[int]]] = []
    for record in records:
        report.read += 1
        full_completion = len(completion_ids(tokenizer, record[completion_field]))
        full = len(prompt_ids(tokenizer, record[prompt_field], separator)) + full_completion
        ex = encode_example(
            tokenizer,
            record[prompt_field],
            record[completion_field],
            max_length=max_length,
            separator=separator,
        )
        if ex is None:
            report.dropped["no_completion_tokens"] += 1
            continue
        report.truncated += int(full > len(ex["input_ids"]))
        n_completion = sum(label != IGNORE_INDEX for label in ex["labels"])
        report.completion_cut += int(n_completion < full_completion)
        report.completion_tokens += n_completion
        report.prompt_tokens += len(ex["input_ids"]) - n_completion
        report.encoded += 1
        examples.append(ex)
    assert report.read == report.encoded + sum(report.dropped.values())
    return examples, report


def round_up(n: int, multiple: int | None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (unchanged for None or 0)."""
    return -(-n // multiple) * multiple if multiple else n


def pad_sequences(
    rows: Sequence[Sequence[int]],
    value: int,
    *,
    side: str = "right",
    length: int | None = None,
) -> torch.Tensor:
    """Stack ragged rows into one tensor, padding on the given side to `length` or the longest."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    width = max(len(r) for r in rows) if length is None else length
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} tokens, more than the padded length {width}")
        if len(row):
            t = torch.as_tensor(list(row), dtype=torch.long)
            if side == "right":
                out[i, : len(row)] = t
            else:
                out[i, width - len(row) :] = t
    return out


@dataclass
class SFTCollator:
    """Pad each batch to its own longest row (dynamic padding), not to the model's maximum.

    Right padding for training: every row's tokens keep positions 0..n-1, and padding is
    masked out of attention (mask 0) and out of the loss (label -100).
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        batch = {
            "input_ids": pad_sequences(
                [f["input_ids"] for f in features], self.pad_token_id, side=self.padding_side, length=width
            ),
            "attention_mask": pad_sequences(
                [f["attention_mask"] for f in features], 0, side=self.padding_side, length=width
            ),
        }
        if "labels" in features[0]:
            batch["labels"] = pad_sequences(
                [f["labels"] for f in features], IGNORE_INDEX, side=self.padding_side, length=width
            )
        return batch


def encode_prompts_for_generation(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    separator: str = DEFAULT_SEPARATOR,
    max_prompt_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch: every prompt ends at the last column, where generation starts."""
    prepare_tokenizer(tokenizer)
    rows = []
    for p in prompts:
        ids = prompt_ids(tokenizer, p, separator)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            head = _leading_special(tokenizer, ids)
            ids = ids[:head] + ids[len(ids) - (max_prompt_tokens - head) :]
        rows.append(ids)
    collate = SFTCollator(tokenizer.pad_token_id, padding_side="left")
    return collate([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows])


def naive_encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, *, max_length: int = 1024
) -> dict[str, list[int]]:
    """The chapter's encoding, fixed only enough to run, for the errata lesson.

    `tokenizer(prompt, completion, truncation=True, padding="max_length")` raises on GPT-2
    (no pad token); given one, it pads every row to `max_length` (1,024 for GPT-2), adds no
    EOS, and the chapter then trains with `labels=input_ids`: prompt and padding included.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "Asking to pad but the tokenizer does not have a padding token "
            "(the chapter's code fails here on GPT-2)"
        )
    enc = tokenizer(prompt, completion, truncation=True, padding="max_length", max_length=max_length)
    ids = list(enc["input_ids"])
    return {"input_ids": ids, "attention_mask": list(enc["attention_mask"]), "labels": list(ids)}


def supervision_spans(
    tokenizer: PreTrainedTokenizerBase, example: dict[str, Sequence[int]]
) -> list[tuple[str, bool]]:
    """(token text, supervised?) for each token: the data behind a colour-coded view."""
    return [
        (tokenizer.decode([tid]), label != IGNORE_INDEX)
        for tid, label in zip(example["input_ids"], example["labels"], strict=True)
    ]


def render_supervision(
    tokenizer: PreTrainedTokenizerBase, example: dict[str, Sequence[int]], *, html: bool = False
) -> str:
    """Show which tokens the model is trained on: green supervised, grey context.

    HTML for notebooks, ANSI colours for a terminal; each token is bracketed so that token
    boundaries (and a BPE merge across the prompt/completion boundary) are visible.
    """
    parts = []
    for text, supervised in supervision_spans(tokenizer, example):
        shown = text.replace("\n", "\\n")
        if html:
            import html as html_lib

            colour = "#c8f7c5" if supervised else "#e6e6e6"
            parts.append(
                f'<span style="background:{colour};border:1px solid #999;margin:1px;'
                f'font-family:monospace">{html_lib.escape(shown)}</span>'
            )
        else:
            parts.append(f"\x1b[42m{shown}\x1b[0m" if supervised else f"\x1b[90m{shown}\x1b[0m")
    return "".join(parts)


# ------------------------------------------------------------------------------------- chats
#
# The contract for a conversation, with our chat template (`lumorik_sft.chat`): the whole chat is
# one row; labels are the ids of every assistant reply and of the <|end|> that closes it, -100 for
# everything else (system and user turns, role tokens, the newlines between turns)::
#
#     <|user|>   Hi  <|end|>  \n  <|assistant|>  Hello  <|end|>  \n
#       -100   -100    -100  -100      -100      Hello  <|end|>  -100


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot say which tokens are the assistant's."""


def chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template, refused unless ``{% generation %}`` marks the assistant's part.

    Without the markers no token can be told apart as the assistant's, and a mask built anyway is
    all -100: the loss would train on nothing, silently.
    """
    template = tokenizer.chat_template
    name = shown_path(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if not template or not isinstance(template, str):
        raise ChatTemplateError(
            f"tokenizer {name} has no chat template; use a chat model (e.g. --model embedded-chat) "
            "or set tokenizer.chat_template (see lumorik_sft.chat.add_chat_format)"
        )
    if not has_generation_markers(template):
        raise ChatTemplateError(
            f"the chat template of {name} has no {{% generation %}} markers, so no token can be "
            "marked as the assistant's (the mask would be all -100); wrap each assistant reply and "
            "its end-of-turn token in {% generation %}...{% endgeneration %}"
        )
    return template


def special_token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Texts the tokenizer turns into a special token wherever they appear, longest first."""
    texts = set(tokenizer.all_special_tokens)
    texts.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((t for t in texts if t), key=len, reverse=True)


def check_chat_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> None:
    """Refuse a message containing a special token's text: it would *become* that token.

    A user who types ``<|end|><|assistant|>`` would otherwise end their turn and speak as the
    assistant (prompt injection through the template), and a reply containing ``<|end|>`` would
    teach the model to stop mid-sentence.
    """
    for number, message in enumerate(messages, start=1):
        for text in special_token_texts(tokenizer):
            if text in message["content"]:
                raise ValueError(
                    f"message {number} ({message['role']}) contains {text!r}, the text of a special "
                    "token, which the tokenizer would read as that token; remove or rewrite it"
                )


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The chat as the model reads it, and the character spans inside the generation markers.

    The same rendering as ``tokenizer.apply_chat_template`` (which calls this renderer too).
    """
    rendered, spans = render_jinja_template(
        conversations=[list(messages)],
        chat_template=chat_template(tokenizer),
        return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )
    return rendered[0], [tuple(span) for span in spans[0]]


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    max_length: int | None = None,
    *,
    last_turn_only: bool = False,
) -> dict[str, list[int]]:
    """Ids, attention mask and labels of a chat: the loss on every assistant reply and its end token.

    Render the chat with its template, tokenize the text with character offsets, and supervise each
    token that lies inside an assistant span. ``last_turn_only`` supervises the final reply only.
    With ``max_length``, whole earlier exchanges are dropped until the chat fits (`fit_chat`);
    a chat whose last exchange alone is too long raises ValueError.
    """
    check_chat_text(tokenizer, messages)
    if max_length is not None:
        fitted, _ = fit_chat(tokenizer, messages, max_length)
        if fitted is None:
            raise ValueError(f"the chat's last exchange alone is longer than {max_length} tokens")
        messages = fitted
    text, spans = render_chat(tokenizer, messages)
    if last_turn_only:
        spans = spans[-1:]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        if any(start < span_end and end > span_start for span_start, span_end in spans):
            labels[i] = ids[i]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def chat_length(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> int:
    """Tokens of the whole rendered chat."""
    text, _ = render_chat(tokenizer, messages)
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def fit_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    max_length: int,
    length: Callable[[PreTrainedTokenizerBase, Sequence[dict[str, str]]], int] | None = None,
) -> tuple[list[dict[str, str]] | None, int]:
    """Drop the oldest exchanges (a user turn and the reply to it) until the chat fits.

    The system message and the last exchange (or, for a history, the last user turn) are kept
    whole: no turn is ever cut in half, so no reply is half supervised. ``length`` measures a
    chat (default `chat_length`; generation passes the prompt's length). Returns (messages,
    turns dropped), or (None, turns) when even the system message and the last exchange are
    too long.
    """
    length = length or chat_length
    kept = list(messages)
    dropped = 0
    first = 1 if kept and kept[0]["role"] == "system" else 0
    while length(tokenizer, kept) > max_length:
        if len(kept) - first <= 2:
            return None, dropped + len(kept) - first
        del kept[first : first + 2]
        dropped += 2
    return kept, dropped


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, history: Sequence[dict[str, str]]) -> list[int]:
    """Ids of a chat so far plus the assistant's header: where the model writes its next reply.

    A token prefix of the full chat once the reply is added (tested), so the model generates
    from exactly the context it was trained on.
    """
    check_chat_text(tokenizer, history)
    text = tokenizer.apply_chat_template(list(history), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _prompt_length(tokenizer: PreTrainedTokenizerBase, history: Sequence[dict[str, str]]) -> int:
    return len(chat_prompt_ids(tokenizer, history))


def encode_chat_prompts_for_generation(
    tokenizer: PreTrainedTokenizerBase,
    histories: Sequence[Sequence[dict[str, str]]],
    *,
    max_prompt_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded batch of chats so far, each ending in the assistant's header.

    A history too long for ``max_prompt_tokens`` loses whole early exchanges (never half a turn).
    """
    prepare_tokenizer(tokenizer)
    rows = []
    for history in histories:
        if max_prompt_tokens is not None:
            fitted, _ = fit_chat(tokenizer, history, max_prompt_tokens, length=_prompt_length)
            if fitted is None:
                raise ValueError(f"the last user turn alone is longer than {max_prompt_tokens} tokens")
            history = fitted
        rows.append(chat_prompt_ids(tokenizer, history))
    collate = SFTCollator(tokenizer.pad_token_id, padding_side="left")
    return collate([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows])


def encode_chats(
    records: Iterable[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    last_turn_only: bool = False,
    messages_field: str = "messages",
) -> tuple[list[dict[str, list[int]]], EncodeReport]:
    """Encode chat records; the report counts dropped turns and dropped chats by reason.

    Reasons: ``too_long`` (the last exchange alone does not fit), ``special_token_text`` (a
    message holds a special token's text; the first such message is kept in ``report.details``).
    """
    chat_template(tokenizer)  # refuse a template without markers once, before any record
    report = EncodeReport()
    examples: list[dict[str, list[int]]] = []
    for record in records:
        report.read += 1
        messages = record[messages_field]
        try:
            check_chat_text(tokenizer, messages)
        except ValueError as err:
            _drop(report, "special_token_text", record, str(err))
            continue
        fitted, dropped = fit_chat(tokenizer, messages, max_length)
        if fitted is None:
            _drop(report, "too_long", record, f"the last exchange alone is over {max_length} tokens")
            continue
        example = encode_chat(tokenizer, fitted, last_turn_only=last_turn_only)
        supervised = sum(label != IGNORE_INDEX for label in example["labels"])
        if supervised == 0:
            _drop(report, "no_supervised_tokens", record, "no assistant token left to train on")
            continue
        report.truncated += int(dropped > 0)
        report.turns_dropped += dropped
        report.completion_tokens += supervised
        report.prompt_tokens += len(example["input_ids"]) - supervised
        report.encoded += 1
        examples.append(example)
    assert report.read == report.encoded + sum(report.dropped.values())
    return examples, report


def _drop(report: EncodeReport, reason: str, record: dict[str, Any], detail: str) -> None:
    report.dropped[reason] += 1
    line = record.get("line")
    report.details.setdefault(reason, f"line {line}: {detail}" if line is not None else detail)
