"""The chat record format, its checks, and converters from the Alpaca and ShareGPT formats.

A chat is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``: an
optional system message first, then user and assistant turns alternating, starting with the user
and ending with the assistant. That is the shape a chat template renders and the encoder supervises
(every assistant turn), so `lumorik_sft.records` checks every chat against it on reading, where a bad
row can still be named by file and line, instead of failing later inside a template.

Errors are ValueErrors naming the turn, 1-based, as a reader counts them::

    >>> validate_messages([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}])
    Traceback (most recent call last):
    ...
    ValueError: turn 2: unknown role 'bot' (expected system, user or assistant)

Run the examples: ``python -m doctest -v lumorik_sft/conversations.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")
# `auto` picks one of the others per file, from the first record's fields (see `detect_format`).
INPUT_FORMATS = ("auto", "pairs", "messages", "alpaca", "sharegpt")
CHAT_FORMATS = ("messages", "alpaca", "sharegpt")
# ShareGPT's speaker names, and the roles they mean; "user"/"assistant" appear in converted dumps.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "gpt": "assistant",
    "user": "user",
    "assistant": "assistant",
}


def _type(value: Any) -> str:
    return type(value).__name__


def _or_list(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1]


# ---------------------------------------------------------------------------------------- checks


def _check_message(turn: int, message: Any) -> dict[str, str]:
    """One message's own shape: an object with exactly a known role and string content."""
    if not isinstance(message, dict):
        raise ValueError(f"turn {turn}: a message must be an object, got {_type(message)}")
    for key in MESSAGE_KEYS:
        if key not in message:
            raise ValueError(f"turn {turn}: missing '{key}'")
    extra = [key for key in message if key not in MESSAGE_KEYS]
    if extra:
        # Keys such as 'name', 'weight' or 'tool_calls' change what a turn means; the pipeline
        # writes only role and content, so dropping them silently would train on something else.
        raise ValueError(
            f"turn {turn}: unexpected key(s) {', '.join(map(repr, extra))}; "
            "a message holds only 'role' and 'content'"
        )
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ValueError(f"turn {turn}: unknown role {role!r} (expected {_or_list(ROLES)})")
    if not isinstance(content, str):
        raise ValueError(f"turn {turn}: 'content' must be a string, got {_type(content)}")
    return {"role": role, "content": content}


def _check_order(messages: list[dict[str, str]]) -> None:
    """System only first; then user, assistant, user, ... ending with the assistant."""
    start = 1 if messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages[start:], start=start):
        turn, role = index + 1, message["role"]
        if role == "system":
            raise ValueError(f"turn {turn}: a system message may only be the first message")
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if role != expected:
            if index > start:
                where = f"after the {messages[index - 1]['role']} turn"
            else:
                where = "after the system message" if start else "first"
            article = "an" if expected == "assistant" else "a"
            raise ValueError(f"turn {turn}: expected {article} {expected} turn {where}, got {role}")
    last = len(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"turn {last}: the chat ends here with no assistant turn; it needs at least one")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"turn {last}: the chat must end with an assistant turn, got {messages[-1]['role']}")


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a chat and return a copy of its messages (``role`` and ``content`` only).

    Raises ValueError naming the turn (1-based) and the problem. Empty content is accepted here:
    curation drops such a chat with the counted reason ``empty_message``, as it drops empty pairs.

    >>> validate_messages([{"role": "system", "content": "Be brief."},
    ...     {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}])[2]
    {'role': 'assistant', 'content': 'Hello.'}
    >>> validate_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    Traceback (most recent call last):
    ...
    ValueError: turn 2: expected an assistant turn after the user turn, got user
    """
    if not isinstance(messages, list):
        raise ValueError(f"not a list of messages: got {_type(messages)}")
    if not messages:
        raise ValueError("no messages: a chat needs a user turn and an assistant turn")
    checked = [_check_message(turn, message) for turn, message in enumerate(messages, start=1)]
    _check_order(checked)
    return checked


# ------------------------------------------------------------------------------------- converters


def _string(record: dict[str, Any], name: str, *, required: bool) -> str:
    """A string field; a missing optional field (or null) reads as ''."""
    if name not in record or (record[name] is None and not required):
        if required:
            raise ValueError(f"missing field '{name}'")
        return ""
    if not isinstance(record[name], str):
        raise ValueError(f"field '{name}' must be a string, got {_type(record[name])}")
    return record[name]


def alpaca_to_messages(record: Any) -> list[dict[str, str]]:
    """An Alpaca record (``instruction``, optional ``input``, ``output``, optional ``system``) as a chat.

    The user turn is the instruction, followed by a blank line and the input when the input is not
    blank (Alpaca's own template puts the input under the instruction too); the output is the
    assistant turn; a non-blank ``system`` becomes a system message first. Other fields (an id, the
    rendered ``text``) are ignored. Raises ValueError naming the field at fault.

    >>> chat = alpaca_to_messages(
    ...     {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"})
    >>> chat[0]["content"]
    'Translate to French.\\n\\nGood morning'
    >>> chat[1]
    {'role': 'assistant', 'content': 'Bonjour'}
    >>> alpaca_to_messages({"instruction": "Name a colour.", "input": "", "output": "Blue."})
    [{'role': 'user', 'content': 'Name a colour.'}, {'role': 'assistant', 'content': 'Blue.'}]
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_type(record)}")
    instruction = _string(record, "instruction", required=True)
    extra_input = _string(record, "input", required=False)
    output = _string(record, "output", required=True)
    system = _string(record, "system", required=False)
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return validate_messages(messages)


def _sharegpt_message(turn: int, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"turn {turn}: expected an object with 'from' and 'value', got {_type(entry)}")
    for key in ("from", "value"):
        if key not in entry:
            raise ValueError(f"turn {turn}: missing '{key}'")
    extra = [key for key in entry if key not in ("from", "value")]
    if extra:  # e.g. a 'weight' that switches a turn's loss off: never dropped silently
        raise ValueError(
            f"turn {turn}: unexpected key(s) {', '.join(map(repr, extra))}; "
            "a ShareGPT turn holds only 'from' and 'value'"
        )
    speaker = entry["from"]
    if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
        raise ValueError(f"turn {turn}: unknown 'from' {speaker!r} (expected {_or_list(SHAREGPT_ROLES)})")
    return {"role": SHAREGPT_ROLES[speaker], "content": entry["value"]}


def sharegpt_to_messages(record: Any) -> list[dict[str, str]]:
    """A ShareGPT record (``conversations``: a list of ``{"from", "value"}``) as a chat.

    ``from`` is ``system``, ``human`` or ``gpt`` (``user`` and ``assistant`` are accepted too); a
    leading system turn whose value is blank is left out, since many dumps carry an empty one.
    Other record fields are ignored. Raises ValueError naming the field and the turn.

    >>> sharegpt_to_messages({"conversations": [{"from": "human", "value": "Hi"},
    ...     {"from": "gpt", "value": "Hello!"}]})
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_type(record)}")
    if "conversations" not in record:
        raise ValueError("missing field 'conversations'")
    turns = record["conversations"]
    try:
        if not isinstance(turns, list):
            raise ValueError(f"not a list of turns: got {_type(turns)}")
        messages = [_sharegpt_message(turn, entry) for turn, entry in enumerate(turns, start=1)]
        if messages and messages[0]["role"] == "system" and _is_blank(messages[0]["content"]):
            # Dropping it shifts the numbering: validate first, so errors name the file's turns.
            return validate_messages(messages)[1:]
        return validate_messages(messages)
    except ValueError as err:
        raise ValueError(f"field 'conversations': {err}") from None


def _is_blank(content: Any) -> bool:
    return isinstance(content, str) and not content.strip()


def messages_to_prompt_completion(messages: Any) -> tuple[str, str]:
    """Flatten a chat into one prompt/completion pair, for models trained on pairs.

    Reading keeps chats whole (the chat encoder supervises every assistant turn); this is the
    explicit, lossy alternative that supervises only the last one. The completion is the final
    assistant message; the prompt joins the messages before it with a blank line, each prefixed with
    its role (``User: ...``) when an earlier assistant turn is among them, so the turns stay
    distinguishable. Raises ValueError as :func:`validate_messages` does.

    >>> messages_to_prompt_completion([{"role": "system", "content": "Be brief."},
    ...     {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}])
    ('Be brief.\\n\\nHi?', 'Hello.')
    """
    messages = validate_messages(messages)
    context = messages[:-1]
    if any(m["role"] == "assistant" for m in context):
        parts = [f"{m['role'].capitalize()}: {m['content']}" for m in context]
    else:
        parts = [m["content"] for m in context]
    return "\n\n".join(parts), messages[-1]["content"]


# ---------------------------------------------------------------------------------- format, counts


def detect_format(
    obj: Any,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
) -> str:
    """The format of one parsed record, by its fields: "messages", "pairs", "sharegpt" or "alpaca".

    Checked in that order, so a record with both a chat and a prompt is read as a chat, and a pair
    whose prompt field is called ``instruction`` (``prompt_field="instruction"``) stays a pair.
    Raises ValueError for a non-object or a record with none of these fields.

    >>> detect_format({"instruction": "Say hi.", "output": "Hi."})
    'alpaca'
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_type(obj)}")
    if messages_field in obj:
        return "messages"
    if prompt_field in obj or completion_field in obj:
        return "pairs"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    raise ValueError(
        f"no known record fields: expected '{prompt_field}'/'{completion_field}' (pairs), "
        f"'{messages_field}' (chat), 'conversations' (ShareGPT) or 'instruction'/'output' (Alpaca)"
    )


def is_chat(record: dict[str, Any]) -> bool:
    """Whether a record read by `lumorik_sft.records` is a chat (``{"messages": [...]}``) or a pair."""
    return "messages" in record


def split_last_reply(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(history, last reply): what a model is given, and the reference its reply is compared with."""
    *history, last = messages
    if last["role"] != "assistant":
        raise ValueError(f"a chat must end with an assistant turn, this one ends with {last['role']!r}")
    return [dict(m) for m in history], last["content"]


def chat_counts(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Conversations, messages (``turns``, system included) and assistant turns among chat records."""
    chats = [r["messages"] for r in records if is_chat(r)]
    return {
        "conversations": len(chats),
        "turns": sum(len(m) for m in chats),
        "assistant_turns": sum(1 for m in chats for message in m if message["role"] == "assistant"),
    }
