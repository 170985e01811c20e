"""The chat mask exercises of 09_chat_sft.ipynb: the solutions pass, each common wrong mask fails with the
first wrong position, its token and its turn's role, and the hidden chats are seeded and varied.

`tests/test_checks.py` and `tests/test_grading.py` also run `WRONG_CHAT` (it joins their `WRONG`), with
every other exercise's variants: the stubs fail, the grader grades the notebook like the others.
"""
# ruff: noqa: E501  (wrong solutions are written as source snippets)

from __future__ import annotations

import contextlib
import random
import re
from pathlib import Path

import nbformat
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lumorik_sft import conversations, encoding
from lumorik_sft.chat import END_OF_TURN, ROLE_TOKENS
from lumorik_sft.course import checks
from lumorik_sft.course.checks import ch09_chat
from lumorik_sft.course.grading import _compile_cell

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "09_chat_sft.ipynb"

_PIECES = """    for m in messages:
        head = tokenizer(ROLE_TOKENS[m["role"]], add_special_tokens=False)["input_ids"]
        text = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
        end = tokenizer(END_OF_TURN, add_special_tokens=False)["input_ids"]
        newline = tokenizer("\\n", add_special_tokens=False)["input_ids"]
        mine = m["role"] == "assistant"
        no = lambda ids: [-100] * len(ids)
"""

# Plausible wrong masks, each with the feedback it must get (position, token, turn and role, and why).
# Each is exec'd in the solution notebook's namespace (ROLE_TOKENS, END_OF_TURN, assistant_labels).
WRONG_CHAT: dict[str, list[tuple[str, str]]] = {
    "assistant_labels": [
        (
            "def assistant_labels(tokenizer, messages):  # user turns supervised too\n    labels = []\n"
            + _PIECES
            + "        labels += no(head) + (text + end if m['role'] != 'system' else no(text + end)) + no(newline)\n"
            "    return labels",
            "a user turn): expected -100 (not trained), got",
        ),
        (
            "def assistant_labels(tokenizer, messages):  # forgets <|end|>\n    labels = []\n"
            + _PIECES
            + "        labels += no(head) + (text if mine else no(text)) + no(end) + no(newline)\n"
            "    return labels",
            "(token '<|end|>' closing turn",
        ),
        (
            "def assistant_labels(tokenizer, messages):  # the <|assistant|> token supervised\n    labels = []\n"
            + _PIECES
            + "        labels += (head + text + end if mine else no(head + text + end)) + no(newline)\n"
            "    return labels",
            "(token '<|assistant|>' opening turn",
        ),
        (
            "def assistant_labels(tokenizer, messages):  # only the last reply\n    labels = []\n"
            + _PIECES
            + "        last = m is messages[-1]\n"
            "        labels += no(head) + (text + end if last else no(text + end)) + no(newline)\n"
            "    return labels",
            "an assistant turn (not the last)): expected",
        ),
        (
            "def assistant_labels(tokenizer, messages):  # labels = input_ids\n    labels = []\n"
            + _PIECES
            + "        labels += head + text + end + newline\n"
            "    return labels",
            "position 0 (token '<|",
        ),
        (
            "def assistant_labels(tokenizer, messages):  # no '\\n' token after <|end|>\n    labels = []\n"
            + _PIECES
            + "        labels += no(head) + (text + end if mine else no(text + end))\n"
            "    return labels",
            "one token missing per turn",
        ),
        (
            "def assistant_labels(tokenizer, messages):  # shifted for next-token prediction\n    labels = []\n"
            + _PIECES
            + "        labels += no(head) + (text + end if mine else no(text + end)) + no(newline)\n"
            "    return labels[1:] + [-100]",
            "shifted one position to the left",
        ),
    ],
    "last_reply_labels": [
        (
            "def last_reply_labels(tokenizer, messages):  # every reply, as assistant_labels\n"
            "    return assistant_labels(tokenizer, messages)",
            "an assistant turn (not the last)): expected -100 (not trained)",
        ),
        (
            "def last_reply_labels(tokenizer, messages):  # the last reply without its <|end|>\n    labels = []\n"
            + _PIECES
            + "        last = m is messages[-1]\n"
            "        labels += no(head) + (text if last else no(text)) + no(end) + no(newline)\n"
            "    return labels",
            "the end-of-turn token must be trained or the model never stops",
        ),
    ],
}

# Why each variant is wrong, in the words the feedback uses.
WHY = {
    ("assistant_labels", 0): "user turns are the model's input",
    ("assistant_labels", 1): "the end-of-turn token must be trained or the model never stops",
    ("assistant_labels", 2): "role tokens come from the template",
    ("assistant_labels", 3): "not only the last one",
    ("assistant_labels", 4): "role tokens come from the template",
    ("assistant_labels", 5): "role token, its text, <|end|> and '\\n'",
    ("assistant_labels", 6): "the model's loss shifts labels",
    ("last_reply_labels", 0): "only the final reply is trained in this variant",
    ("last_reply_labels", 1): "(token '<|end|>' closing turn",
}


PLACE = re.compile(
    r"  case \d+: position \d+ \(token '.*' (opening|in|closing|after) turn \d+, an? (system|user|assistant) "
    r"turn( \(not the last\))?\): expected -?\d+ \((supervised|not trained)\), got -?\d+ -- "
)


WHOLE_MASK = {("assistant_labels", 5), ("assistant_labels", 6)}  # wrong length, shifted: no one position


def _namespace(folder: str) -> dict:
    """The notebook's code run as the grader runs it (without the checks. calls)."""
    ns: dict = {"__name__": "__main__", "display": lambda *a, **k: None}
    nb = nbformat.read(ROOT / folder / NOTEBOOK, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        with contextlib.suppress(NotImplementedError):  # the exercise notebook's demo cells call the stubs
            exec(_compile_cell(cell.source, i), ns)
    return ns


@pytest.fixture(scope="module")
def solution():
    return _namespace("solutions")


def _turn_by_turn(tokenizer, messages, last_only=False):
    """The solution's idea, written out once more: ids and labels from each turn's pieces."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids, labels = [], []
    for i, m in enumerate(messages):
        head = tokenizer(ROLE_TOKENS[m["role"]], add_special_tokens=False)["input_ids"]
        body = tokenizer(m["content"] + END_OF_TURN, add_special_tokens=False)["input_ids"]
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        trained = m["role"] == "assistant" and (i == last or not last_only)
        ids += head + body + newline
        labels += [-100] * len(head) + (body if trained else [-100] * len(body)) + [-100] * len(newline)
    return ids, labels


# ------------------------------------------------------------------------ the exercise is sound


def test_turn_by_turn_equals_encode_chat_on_every_chat_the_check_draws():
    """Tokenizing turn by turn gives encode_chat's ids and labels (both variants) on 1,200 hidden chats."""
    tokenizer = ch09_chat.chat_tokenizer()
    for seed in range(150):
        for case in ch09_chat.chat_cases(seed):
            for last_only in (False, True):
                expected = encoding.encode_chat(tokenizer, case["messages"], last_turn_only=last_only)
                ids, labels = _turn_by_turn(tokenizer, case["messages"], last_only)
                assert ids == expected["input_ids"] and labels == expected["labels"], (seed, case)


_TEXT = (
    st.lists(
        st.sampled_from(
            [*"aZ09 .,!?\n\t-'\"<|>", "é", "ß", "中", "😀", "\u00a0", "nai\u0308ve", "  ", " Hi"]
        ),
        max_size=12,
    )
    .map("".join)
    .filter(lambda s: "<|" not in s)
)


@st.composite
def _chats(draw):
    messages = [{"role": "system", "content": draw(_TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        messages += [{"role": "user", "content": draw(_TEXT)}, {"role": "assistant", "content": draw(_TEXT)}]
    return messages


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_chats())
def test_turn_by_turn_equals_encode_chat_beyond_the_check(messages):
    """Also on text the check does not draw (empty turns, text right before <|end|>, '<' and '|' alone)."""
    tokenizer = ch09_chat.chat_tokenizer()
    expected = encoding.encode_chat(tokenizer, messages)
    assert _turn_by_turn(tokenizer, messages) == (expected["input_ids"], expected["labels"])


def test_hidden_chats_are_seeded_and_cover_system_and_one_to_four_exchanges():
    assert ch09_chat.chat_cases(0) == ch09_chat.chat_cases(0)
    assert ch09_chat.chat_cases(1) != ch09_chat.chat_cases(2)
    for seed in (0, 1, 12345):
        cases = ch09_chat.chat_cases(seed)
        shapes = set()
        for case in cases:
            messages = case["messages"]
            assert conversations.validate_messages(messages) == messages  # alternates, ends with a reply
            has_system = messages[0]["role"] == "system"
            shapes.add((has_system, (len(messages) - has_system) // 2))
            assert all("<|" not in m["content"] for m in messages)
        assert shapes == {(s, n) for s in (False, True) for n in (1, 2, 3, 4)}
    text = "".join(
        m["content"] for seed in range(5) for c in ch09_chat.chat_cases(seed) for m in c["messages"]
    )
    for kind in ("\n", "\t", "  ", "é", "🙂", "\u00a0"):
        assert kind in text, f"the hidden chats never hold {kind!r}"
    starts = [
        m["content"][:1] for seed in range(5) for c in ch09_chat.chat_cases(seed) for m in c["messages"]
    ]
    assert " " in starts  # leading spaces, which BPE would merge with a header that ended in text


# ---------------------------------------------------------------------------- solutions and stubs


@pytest.mark.parametrize("name", ["assistant_labels", "last_reply_labels"])
def test_the_solution_passes_and_the_stub_fails(name, solution, capsys):
    getattr(checks, f"check_{name}")(solution[name])
    assert capsys.readouterr().out.strip() == f"check_{name}: all 8 cases passed"
    stub = _namespace("exercises")[name]
    assert not checks.run_check(name, stub)
    assert "not written yet (raised NotImplementedError)" in capsys.readouterr().out


def test_the_solution_passes_whatever_seed_the_grader_draws(solution):
    for name in ("assistant_labels", "last_reply_labels"):
        ex = checks.EXERCISES[name]
        for seed in range(15):
            for case in ex.make_cases(seed):
                got = checks.run_case(ex, solution[name], case)
                assert checks.judge(ex, case, ex.reference(case), got) is None, (name, seed, case)


# ------------------------------------------------------------------------------ wrong masks bite


@pytest.mark.parametrize(
    "name,index", [(n, i) for n, variants in WRONG_CHAT.items() for i in range(len(variants))]
)
def test_a_wrong_mask_fails_naming_position_token_and_role(name, index, solution, capsys):
    source, feedback = WRONG_CHAT[name][index]
    ns = dict(solution)
    exec(source, ns)
    assert not checks.run_check(name, ns[name])
    out = capsys.readouterr().out
    assert feedback in out and WHY[(name, index)] in out, out
    first = out.splitlines()[0]
    if (name, index) not in WHOLE_MASK:
        assert PLACE.match(first), first


def test_the_message_names_the_first_wrong_position_exactly(solution):
    """A golden message: the forgotten <|end|> of the only reply of a two-turn chat."""
    ex = checks.EXERCISES["assistant_labels"]
    case = {
        "tokenizer": "embedded-chat",
        "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
    }
    expected = ex.reference(case)
    assert expected["input_ids"] == [4097, 41, 74, 32, 4099, 200, 4098, 3208, 315, 15, 4099, 200]
    assert expected["labels"] == [-100] * 7 + [3208, 315, 15, 4099, -100]
    got = [-100] * 7 + [3208, 315, 15, -100, -100]
    assert ex.compare(case, expected, got) == (
        "position 10 (token '<|end|>' closing turn 2, an assistant turn): expected 4099 (supervised), "
        "got -100 -- the end-of-turn token must be trained or the model never stops"
    )
    user = [-100, 41, 74, 32, 4099, -100, -100, 3208, 315, 15, 4099, -100]
    assert ex.compare(case, expected, user) == (
        "position 1 (token 'H' in turn 1, a user turn): expected -100 (not trained), got 41 -- user turns "
        "are the model's input, not what it learns to write: label their text and their <|end|> -100 "
        "[4 wrong positions in this chat]"
    )
    newline = expected["labels"][:-1] + [200]
    assert "position 11 (token '\\n' after turn 2, an assistant turn)" in ex.compare(case, expected, newline)
    assert "label it -100" in ex.compare(case, expected, newline)


def test_wrong_shapes_get_feedback_not_a_crash(solution, capsys):
    assert not checks.run_check("assistant_labels", lambda tokenizer, messages: {"labels": [1]})
    assert "return the labels themselves, a list of ints" in capsys.readouterr().out
    assert not checks.run_check("assistant_labels", lambda tokenizer, messages: "labels")
    assert "return a list of ints (or a 1-D tensor)" in capsys.readouterr().out
    import torch

    tensor = lambda tokenizer, messages: torch.tensor(solution["assistant_labels"](tokenizer, messages))  # noqa: E731
    assert checks.run_check("assistant_labels", tensor)  # a 1-D tensor is as good as a list
    assert "all 8 cases passed" in capsys.readouterr().out


def test_calling_encode_chat_is_caught(solution, capsys):
    ns = dict(solution)
    exec(
        "from lumorik_sft.encoding import encode_chat\n"
        "def assistant_labels(tokenizer, messages):\n    return encode_chat(tokenizer, messages)['labels']",
        ns,
    )
    assert not checks.run_check("assistant_labels", ns["assistant_labels"])
    assert "calls lumorik_sft.encoding.encode_chat, the package's reference" in capsys.readouterr().out
    assert encoding.encode_chat.__name__ == "encode_chat"  # restored afterwards
    assert encoding.encode_chat(
        ch09_chat.chat_tokenizer(), [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    )


def test_a_function_that_changes_its_tokenizer_cannot_change_the_expected_labels(solution, capsys):
    """Each case gets a copy of the tokenizer; the references keep their own."""

    def vandal(tokenizer, messages):
        labels = solution["assistant_labels"](tokenizer, messages)
        tokenizer.chat_template = "{{ 'nothing' }}"
        tokenizer.add_tokens(["navy", "canvas"])
        return labels

    assert checks.run_check("assistant_labels", vandal)
    assert "all 8 cases passed" in capsys.readouterr().out
    assert ch09_chat.chat_tokenizer().chat_template.startswith("{%- for message in messages")


def test_random_wrong_labels_are_reported_at_their_first_position(solution):
    """Flip one random label of a right mask: the feedback names exactly that position."""
    ex = checks.EXERCISES["assistant_labels"]
    rng = random.Random(0)
    for case in ex.make_cases(7):
        expected = ex.reference(case)
        got = list(expected["labels"])
        i = rng.randrange(len(got))
        got[i] = expected["input_ids"][i] if got[i] == -100 else -100
        message = ex.compare(case, expected, got)
        assert message.startswith(f"position {i} (token "), message
        role = expected["where"][i][1]
        assert f" a {role} turn" in message or f" an {role} turn" in message, message
