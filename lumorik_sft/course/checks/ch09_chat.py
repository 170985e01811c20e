"""Exercises of ``09_chat_sft.ipynb``: ``assistant_labels`` and ``last_reply_labels``.

Both write the label mask of a multi-turn chat, one label per token of the chat as the template
renders it (role token, content, ``<|end|>``, ``"\\n"`` for every turn): the token's id on what the
model must learn to write, -100 elsewhere. The hidden cases are random chats (with a system
message or not, 1 to 4 exchanges, text with spaces, newlines, tabs, accents and emoji); the
reference is `lumorik_sft.encoding.encode_chat` (``last_turn_only=True`` for the second
exercise). On a wrong label the feedback names the first wrong position, its token, the turn and
role it belongs to, what was expected, and why.

Each exercise's functions (cases, reference, run, compare) come first, then
``CHAPTER.register(...)`` declares it; see :mod:`lumorik_sft.course.checks.framework`.
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Callable
from typing import Any

from lumorik_sft.course.checks.framework import WORDS, Chapter, short, to_data

CHAPTER = Chapter("09_chat_sft.ipynb")


@functools.lru_cache(maxsize=1)
def chat_tokenizer():
    """The embedded chat model's tokenizer (offline, in milliseconds); the references' own copy.

    A student's function gets a deep copy (`_run`), so one that changes its tokenizer (adds a
    token, edits the template) cannot change the expected labels of the next cases.
    """
    from transformers import AutoTokenizer

    from lumorik_sft.models import embedded_chat_model_path

    return AutoTokenizer.from_pretrained(embedded_chat_model_path())


# --------------------------------------------------------------------------------------- the chats

# Pieces of text a person might type besides words: spaces at either end, runs of whitespace,
# newlines, tabs, digits, punctuation, accents (composed and not), CJK and emoji. A chat never
# holds "<|", the start of every special token's text (role tokens, <|end|>, <|endoftext|>,
# <|pad|>): such text would *become* that token, and encode_chat refuses it (tests/test_chat.py
# has the injection cases). Without it, tokenizing turn by turn gives exactly the ids of the
# whole rendered chat, because each special token splits the text (checked on more than a
# thousand of these chats, and on hypothesis chats, in tests/test_checks_chat.py).
_EXTRAS = (
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "\u00a0",
    "nai\u0308ve",
    "ß",
    "中文",
    "🙂",
    "👍🏽",
    "#60494",
    "42",
    ".",
    ",",
    "?",
    "!",
    "'",
    '"',
    "<",
    ">",
    "|",
    "-",
)


def _text(rng: random.Random) -> str:
    parts = [
        rng.choice(WORDS) if rng.random() < 0.6 else rng.choice(_EXTRAS) for _ in range(rng.randint(1, 9))
    ]
    text = "".join(p + rng.choice((" ", " ", " ", " ", "", "  ", "\n")) for p in parts)
    if rng.random() < 0.3:
        text = rng.choice((" ", "  ", "\n", "\t")) + text
    if rng.random() < 0.5:
        text = text.rstrip(" ")
    return text.replace("<|", "< |")  # "<" then "|" would start a special token's text


def chat_cases(seed: int) -> list[dict[str, Any]]:
    """Eight random chats: with and without a system message, times 1, 2, 3 and 4 exchanges."""
    cases = []
    for k in range(8):
        rng = random.Random(f"chat/{seed}/{k}")
        messages = [{"role": "system", "content": _text(rng)}] if k % 2 == 0 else []
        for _ in range(k // 2 + 1):
            messages.append({"role": "user", "content": _text(rng)})
            messages.append({"role": "assistant", "content": _text(rng)})
        cases.append({"tokenizer": "embedded-chat", "messages": messages})
    return cases


# ----------------------------------------------------------------------------- reference and run


def _positions(tokenizer: Any, ids: list[int]) -> list[list[Any]]:
    """``[turn, role, part]`` for each position; part is role, text, end or newline (after <|end|>)."""
    from lumorik_sft.chat import END_OF_TURN, ROLE_TOKENS

    role_of = {tokenizer.convert_tokens_to_ids(token): role for role, token in ROLE_TOKENS.items()}
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    where, turn, role, part = [], 0, "", "text"
    for token in ids:
        if token in role_of:
            turn, role, part = turn + 1, role_of[token], "role"
        elif token == end:
            part = "end"
        else:
            part = {"role": "text", "text": "text", "end": "newline", "newline": "newline"}[part]
        where.append([turn, role, part])
    return where


def _reference(case: dict[str, Any], *, last_turn_only: bool) -> dict[str, Any]:
    from lumorik_sft.encoding import encode_chat

    tokenizer = chat_tokenizer()
    encoded = encode_chat(tokenizer, case["messages"], last_turn_only=last_turn_only)
    ids = encoded["input_ids"]
    return {
        "input_ids": ids,
        "labels": encoded["labels"],
        "tokens": [tokenizer.decode([token]) for token in ids],
        "where": _positions(tokenizer, ids),
    }


def _run(fn: Callable, case: dict[str, Any]) -> Any:
    return to_data(fn(copy.deepcopy(chat_tokenizer()), copy.deepcopy(case["messages"])))


# ------------------------------------------------------------------------------------- feedback


def _turn(where: list[Any], last_reply: int) -> str:
    turn, role, _ = where
    if role == "assistant":
        return f"turn {turn}, an assistant turn" + ("" if turn == last_reply else " (not the last)")
    return f"turn {turn}, a {role} turn"


def _place(i: int, expected: dict[str, Any], last_reply: int) -> str:
    where = expected["where"][i]
    part = where[2]
    at = {"role": "opening", "text": "in", "end": "closing", "newline": "after"}[part]
    return f"position {i} (token {expected['tokens'][i]!r} {at} {_turn(where, last_reply)})"


def _why(i: int, expected: dict[str, Any], got: list[int], last_turn_only: bool) -> str:
    """Why the label at position `i` is wrong, for the common mistakes first."""
    from lumorik_sft.encoding import IGNORE_INDEX as NOT_TRAINED

    want, ids, where = expected["labels"], expected["input_ids"], expected["where"]
    turn, role, part = where[i]
    if want[i] != NOT_TRAINED and got[i] == NOT_TRAINED:
        untouched = all(got[j] == NOT_TRAINED for j, w in enumerate(where) if w[0] == turn)
        later = any(got[j] != NOT_TRAINED for j, w in enumerate(where) if w[0] > turn)
        if untouched and later and not last_turn_only:
            return (
                "every assistant reply is trained, not only the last one (that is the "
                "last-turn-only variant): each reply is an example of how the assistant answers"
            )
        if part == "end":
            return "the end-of-turn token must be trained or the model never stops"
        return (
            "an assistant reply is what the model learns to write: label each of its tokens with its own id"
        )
    if want[i] == NOT_TRAINED:
        if part == "role":
            return (
                "role tokens come from the template, not from the model (at generation the prompt "
                "already ends in <|assistant|>): label them -100"
            )
        if part == "newline":
            return (
                "the '\\n' after <|end|> is the template's, outside {% generation %}: the model "
                "stops at <|end|>, so label it -100"
            )
        if role == "assistant" and last_turn_only:
            return (
                "only the final reply is trained in this variant: earlier replies are context "
                "the model reads, label them -100"
            )
        return (
            f"{role} turns are the model's input, not what it learns to write: label their text "
            "and their <|end|> -100"
        )
    return (
        f"a trained token's label is its own id ({ids[i]}); tokenize each piece with "
        "add_special_tokens=False, as the template renders it"
    )


def _label_list(got: Any) -> list[int]:
    if isinstance(got, dict):
        raise TypeError(f"return the labels themselves, a list of ints (not a dict with keys {sorted(got)})")
    if not isinstance(got, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in got):
        raise TypeError(f"return a list of ints (or a 1-D tensor), one label per token, got {short(got)}")
    return got


def _compare(case: dict[str, Any], expected: Any, got: Any, *, last_turn_only: bool) -> str | None:
    from lumorik_sft.encoding import IGNORE_INDEX as NOT_TRAINED

    labels = _label_list(got)
    want = expected["labels"]
    n_turns = len(case["messages"])
    if len(labels) != len(want):
        missing = len(want) - len(labels)
        per_turn = (
            " (one token missing per turn: the role token, the <|end|> or the '\\n' after it?)"
            if missing == n_turns
            else ""
        )
        return (
            f"returned {len(labels)} labels for a chat of {len(want)} tokens ({n_turns} turns): one "
            f"label per token, each turn being its role token, its text, <|end|> and '\\n'{per_turn}"
        )
    wrong = [i for i, (a, b) in enumerate(zip(labels, want, strict=True)) if a != b]
    if not wrong:
        return None
    if labels[:-1] == want[1:] or labels[1:] == want[:-1]:
        side = "left" if labels[:-1] == want[1:] else "right"
        return (
            f"your labels are the right mask shifted one position to the {side}: give each token its "
            "own id as its label; the model's loss shifts labels against its predictions itself"
        )
    i = wrong[0]
    last_reply = max(turn for turn, role, _ in expected["where"] if role == "assistant")
    status = "supervised" if want[i] != NOT_TRAINED else "not trained"
    more = f" [{len(wrong)} wrong positions in this chat]" if len(wrong) > 1 else ""
    return (
        f"{_place(i, expected, last_reply)}: expected {want[i]} ({status}), got {labels[i]} -- "
        f"{_why(i, expected, labels, last_turn_only)}{more}"
    )


# --------------------------------------------------------------------------- assistant labels


def _assistant_reference(case: dict[str, Any]) -> Any:
    return _reference(case, last_turn_only=False)


def _assistant_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    return _compare(case, expected, got, last_turn_only=False)


# transformers' own mask (apply_chat_template(..., return_assistant_tokens_mask=True)) stays allowed:
# disabling it would disable the template's rendering too, which a solution working from character
# offsets needs; the notebook shows it after the exercise, as a cross-check.
_FORBIDDEN = (
    "lumorik_sft.encoding:encode_chat",
    "lumorik_sft.encoding:encode_chats",
    "lumorik_sft.encoding:render_chat",
)

CHAPTER.register(
    name="assistant_labels",
    symbol="assistant_labels",
    points=3,
    make_cases=chat_cases,
    reference=_assistant_reference,
    run=_run,
    compare=_assistant_compare,
    forbidden=_FORBIDDEN,
    hint=(
        "per turn: the role token and the '\\n' get -100; the text and <|end|> get their own ids in "
        "an assistant turn, -100 in any other"
    ),
    wrong_variants=(
        "labels = input_ids",
        "user turns supervised",
        "<|end|> not supervised",
        "role tokens supervised",
        "only the last reply supervised",
        "the '\\n' after <|end|> left out",
        "labels shifted by one",
    ),
)


# ------------------------------------------------------------------------- last reply labels


def _last_reference(case: dict[str, Any]) -> Any:
    return _reference(case, last_turn_only=True)


def _last_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    return _compare(case, expected, got, last_turn_only=True)


CHAPTER.register(
    name="last_reply_labels",
    symbol="last_reply_labels",
    points=1,
    make_cases=chat_cases,
    reference=_last_reference,
    run=_run,
    compare=_last_compare,
    forbidden=_FORBIDDEN,
    hint="the labels of assistant_labels, with every assistant turn but the chat's last one set to -100",
    wrong_variants=("every reply supervised", "<|end|> of the last reply not supervised"),
)
