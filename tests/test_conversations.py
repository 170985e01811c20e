"""Tests for lumorik_sft.conversations and chats through reading and `lumorik-sft data`.

Every check names its turn; converters are pinned with literal records; the Alpaca and ShareGPT
fixture files go through the `data` command end to end, in-process and once as a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lumorik_sft import cli
from lumorik_sft.conversations import (
    alpaca_to_messages,
    chat_counts,
    detect_format,
    messages_to_prompt_completion,
    sharegpt_to_messages,
    validate_messages,
)
from lumorik_sft.data import DataError, read_jsonl, read_records

FIXTURES = Path(__file__).parent / "fixtures"


def sys_(content: str) -> dict:
    return {"role": "system", "content": content}


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def bot(content: str) -> dict:
    return {"role": "assistant", "content": content}


def write_jsonl(path: Path, *rows: object) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- validation


def test_valid_chats_come_back_as_copies_with_role_and_content() -> None:
    chat = [sys_("Be brief."), user("Hi?"), bot("Hello."), user("Bye?"), bot("Bye.")]
    checked = validate_messages(chat)
    assert checked == chat and checked is not chat and checked[0] is not chat[0]
    assert validate_messages([user(""), bot("")]) == [user(""), bot("")]  # empty: curation's call


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ("hello", "not a list of messages: got str"),
        ({"role": "user"}, "not a list of messages: got dict"),
        ([], "no messages: a chat needs a user turn and an assistant turn"),
        ([user("q"), "a"], "turn 2: a message must be an object, got str"),
        ([{"content": "q"}, bot("a")], "turn 1: missing 'role'"),
        ([user("q"), {"role": "assistant"}], "turn 2: missing 'content'"),
        (
            [user("q"), bot("a") | {"name": "x", "weight": 0}],
            "turn 2: unexpected key(s) 'name', 'weight'; a message holds only 'role' and 'content'",
        ),
        (
            [user("q"), {"role": "bot", "content": "a"}],
            "turn 2: unknown role 'bot' (expected system, user or assistant)",
        ),
        ([{"role": None, "content": "q"}, bot("a")], "turn 1: unknown role None"),
        ([user("q"), {"role": "assistant", "content": 7}], "turn 2: 'content' must be a string, got int"),
        ([{"role": "user", "content": None}, bot("a")], "turn 1: 'content' must be a string, got NoneType"),
        ([user("q"), sys_("late"), bot("a")], "turn 2: a system message may only be the first message"),
        (
            [sys_("s"), sys_("s"), user("q"), bot("a")],
            "turn 2: a system message may only be the first message",
        ),
        ([bot("a"), user("q")], "turn 1: expected a user turn first, got assistant"),
        ([sys_("s"), bot("a")], "turn 2: expected a user turn after the system message, got assistant"),
        (
            [user("q"), user("q2"), bot("a")],
            "turn 2: expected an assistant turn after the user turn, got user",
        ),
        (
            [user("q"), bot("a"), bot("b")],
            "turn 3: expected a user turn after the assistant turn, got assistant",
        ),
        ([user("q")], "turn 1: the chat ends here with no assistant turn; it needs at least one"),
        ([sys_("s")], "turn 1: the chat ends here with no assistant turn"),
        ([sys_("s"), user("q")], "turn 2: the chat ends here with no assistant turn"),
        ([user("q"), bot("a"), user("q2")], "turn 3: the chat must end with an assistant turn, got user"),
    ],
)
def test_each_problem_is_named_with_its_turn(messages: object, error: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_messages(messages)
    assert str(info.value).startswith(error)


def test_flattening_is_explicit_and_checks_the_chat() -> None:
    assert messages_to_prompt_completion([sys_("Be brief."), user("Define SFT."), bot("Tuning.")]) == (
        "Be brief.\n\nDefine SFT.",
        "Tuning.",
    )
    multi = [user("a"), bot("b"), user("c"), bot("d")]
    assert messages_to_prompt_completion(multi) == ("User: a\n\nAssistant: b\n\nUser: c", "d")
    with pytest.raises(ValueError, match="turn 2: expected an assistant turn"):
        messages_to_prompt_completion([user("a"), user("b"), bot("c")])


# ---------------------------------------------------------------------------------- converters


def test_alpaca_without_input_is_the_instruction_alone() -> None:
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    assert alpaca_to_messages(record) == [user("Name a colour."), bot("Blue.")]
    assert alpaca_to_messages({"instruction": "Name a colour.", "output": "Blue."}) == [
        user("Name a colour."),
        bot("Blue."),
    ]
    assert alpaca_to_messages(record | {"input": " \n", "system": None, "text": "ignored"}) == [
        user("Name a colour."),
        bot("Blue."),
    ]


def test_alpaca_input_follows_the_instruction_after_a_blank_line() -> None:
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert alpaca_to_messages(record) == [user("Translate to French.\n\nGood morning"), bot("Bonjour")]


def test_alpaca_system_comes_first_and_a_blank_one_is_left_out() -> None:
    record = {"instruction": "Summarise.", "input": "A long text.", "output": "Short.", "system": "Be terse."}
    assert alpaca_to_messages(record) == [
        sys_("Be terse."),
        user("Summarise.\n\nA long text."),
        bot("Short."),
    ]
    assert alpaca_to_messages(record | {"system": "  "})[0] == user("Summarise.\n\nA long text.")


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ({"input": "x", "output": "y"}, "missing field 'instruction'"),
        ({"instruction": "x"}, "missing field 'output'"),
        ({"instruction": "x", "output": None}, "field 'output' must be a string, got NoneType"),
        ({"instruction": ["x"], "output": "y"}, "field 'instruction' must be a string, got list"),
        ({"instruction": "x", "input": 3, "output": "y"}, "field 'input' must be a string, got int"),
        ({"instruction": "x", "output": "y", "system": {}}, "field 'system' must be a string, got dict"),
        (["x"], "expected a JSON object, got list"),
    ],
)
def test_alpaca_errors_name_the_field(record: object, error: str) -> None:
    with pytest.raises(ValueError) as info:
        alpaca_to_messages(record)
    assert str(info.value) == error


def test_sharegpt_human_gpt_and_system() -> None:
    record = {
        "id": "ignored",
        "conversations": [
            {"from": "system", "value": "You help with orders."},
            {"from": "human", "value": "Where is order 12?"},
            {"from": "gpt", "value": "It shipped."},
            {"from": "human", "value": "When does it arrive?"},
            {"from": "gpt", "value": "Friday."},
        ],
    }
    assert sharegpt_to_messages(record) == [
        sys_("You help with orders."),
        user("Where is order 12?"),
        bot("It shipped."),
        user("When does it arrive?"),
        bot("Friday."),
    ]


def test_sharegpt_accepts_user_and_assistant_and_drops_a_blank_system() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": " "},
            {"from": "user", "value": "Hi"},
            {"from": "assistant", "value": "Hello"},
        ]
    }
    assert sharegpt_to_messages(record) == [user("Hi"), bot("Hello")]


@pytest.mark.parametrize(
    ("turns", "error"),
    [
        (
            [{"from": "human", "value": "Hi"}, {"from": "bard", "value": "Yo"}],
            "field 'conversations': turn 2: unknown 'from' 'bard' "
            "(expected system, human, gpt, user or assistant)",
        ),
        ([{"from": 1, "value": "Hi"}], "field 'conversations': turn 1: unknown 'from' 1"),
        ([{"value": "Hi"}], "field 'conversations': turn 1: missing 'from'"),
        ([{"from": "human"}], "field 'conversations': turn 1: missing 'value'"),
        (
            [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo", "weight": 0}],
            "field 'conversations': turn 2: unexpected key(s) 'weight'",
        ),
        (
            [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": 5}],
            "field 'conversations': turn 2: 'content' must be a string, got int",
        ),
        ([{"from": "human", "value": "Hi"}, "yo"], "field 'conversations': turn 2: expected an object"),
        (
            [{"from": "system", "value": ""}, {"from": "gpt", "value": "Yo"}],
            "field 'conversations': turn 2: expected a user turn after the system message",
        ),
        (
            [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}],
            "field 'conversations': turn 2: expected an assistant turn after the user turn, got user",
        ),
        (
            [{"from": "human", "value": "Hi"}],
            "field 'conversations': turn 1: the chat ends here with no assistant",
        ),
        ([], "field 'conversations': no messages"),
        ("Hi", "field 'conversations': not a list of turns: got str"),
    ],
)
def test_sharegpt_errors_name_the_turn(turns: object, error: str) -> None:
    with pytest.raises(ValueError) as info:
        sharegpt_to_messages({"conversations": turns})
    assert str(info.value).startswith(error)
    with pytest.raises(ValueError, match="missing field 'conversations'"):
        sharegpt_to_messages({"messages": []})


def test_detect_format_by_fields() -> None:
    assert detect_format({"messages": [], "prompt": "p"}) == "messages"
    assert detect_format({"prompt": "p", "completion": "c"}) == "pairs"
    assert detect_format({"completion": "c"}) == "pairs"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "i", "output": "o"}) == "alpaca"
    assert detect_format({"output": "o"}) == "alpaca"
    assert detect_format({"instruction": "i", "output": "o"}, prompt_field="instruction") == "pairs"
    assert detect_format({"chat": []}, messages_field="chat") == "messages"
    with pytest.raises(ValueError, match="no known record fields: expected 'prompt'/'completion'"):
        detect_format({"question": "q"})
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        detect_format([])


def test_chat_counts() -> None:
    records = [
        {"messages": [sys_("s"), user("a"), bot("b"), user("c"), bot("d")]},
        {"messages": [user("x"), bot("y")]},
    ]
    assert chat_counts(records + [{"prompt": "p", "completion": "c"}]) == {
        "conversations": 2,
        "turns": 7,
        "assistant_turns": 3,
    }


# ------------------------------------------------------------------------------------- reading


def test_chats_are_read_whole_with_their_line(tmp_path: Path) -> None:
    chat = [sys_("Be brief."), user("a"), bot("b"), user("c"), bot("d")]
    path = write_jsonl(
        tmp_path / "chat.jsonl", {"messages": chat, "id": 1}, {"messages": [user("x"), bot("y")]}
    )
    result = read_records(path)
    assert result.records == [{"messages": chat, "line": 1}, {"messages": [user("x"), bot("y")], "line": 2}]
    assert result.format == "messages" and result.n_read == 2


def test_a_malformed_chat_names_file_line_field_and_turn(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        {"messages": [user("q"), bot("a")]},
        {"messages": [user("q"), {"role": "bot", "content": "a"}]},
    )
    with pytest.raises(DataError) as info:
        read_records(path)
    assert (
        str(info.value)
        == f"{path}:2: field 'messages': turn 2: unknown role 'bot' (expected system, user or assistant)"
    )
    assert info.value.code == "malformed_messages"
    result = read_records(path, skip_invalid=True)
    assert [(r["line"], r["code"]) for r in result.rejects] == [(2, "malformed_messages")]
    assert (
        read_records(path, messages_field="chat", input_format="messages", skip_invalid=True).rejects[0][
            "reason"
        ]
        == "missing field 'chat'"
    )


def test_alpaca_and_sharegpt_are_read_as_chats(tmp_path: Path) -> None:
    alpaca = read_records(FIXTURES / "alpaca.jsonl", skip_invalid=True)
    assert alpaca.format == "alpaca" and alpaca.n_read == 9
    assert alpaca.records[1] == {
        "messages": [user("Translate to French.\n\nGood morning"), bot("Bonjour.")],
        "line": 2,
    }
    assert [(r["line"], r["code"]) for r in alpaca.rejects] == [(6, "malformed_alpaca"), (9, "mixed_formats")]
    assert alpaca.rejects[0]["reason"] == "field 'output' must be a string, got int"
    assert alpaca.rejects[1]["reason"] == (
        "a prompt/completion record in a file of Alpaca records (the first record, line 1, is one); "
        "one file holds one format"
    )
    sharegpt = read_records(FIXTURES / "sharegpt.jsonl", skip_invalid=True)
    assert sharegpt.format == "sharegpt" and len(sharegpt.records) == 6
    assert sharegpt.records[0]["messages"][0] == user("Where is my order 4417?")
    assert [(r["line"], r["code"]) for r in sharegpt.rejects] == [
        (5, "malformed_sharegpt"),
        (6, "malformed_sharegpt"),
    ]
    assert "turn 2: unknown 'from' 'bard'" in sharegpt.rejects[0]["reason"]


def test_an_explicit_format_applies_to_every_row(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl",
        {"prompt": "p", "instruction": "Say hi.", "output": "Hi."},
        {"instruction": "Say bye.", "output": "Bye."},
    )
    auto = read_records(path, skip_invalid=True)  # the first row has a prompt: a file of pairs
    assert auto.format == "pairs" and [r["code"] for r in auto.rejects] == ["missing_field", "mixed_formats"]
    forced = read_records(path, input_format="alpaca")
    assert [r["messages"] for r in forced.records] == [
        [user("Say hi."), bot("Hi.")],
        [user("Say bye."), bot("Bye.")],
    ]
    with pytest.raises(DataError, match=r"a\.jsonl:1: missing field 'conversations'"):
        read_records(path, input_format="sharegpt")
    with pytest.raises(ValueError, match="unknown input format 'yaml'"):
        read_records(path, input_format="yaml")


def test_mixed_formats_are_rejected_after_the_first_record(tmp_path: Path) -> None:
    chat = {"messages": [user("q"), bot("a")]}
    path = write_jsonl(
        tmp_path / "mixed.jsonl", {"id": 0}, chat, {"prompt": "p", "completion": "c"}, {"note": "x"}, chat
    )
    result = read_records(path, skip_invalid=True)
    assert [r["line"] for r in result.records] == [2, 5]
    assert [(r["line"], r["code"]) for r in result.rejects] == [
        (1, "missing_field"),  # nothing recognised yet: the reason lists the known formats
        (3, "mixed_formats"),
        (4, "missing_field"),  # unrecognised once the file is a chat file: read as one
    ]
    assert result.rejects[0]["reason"].startswith("no known record fields")
    assert "chat ('messages') records (the first record, line 2" in result.rejects[1]["reason"]
    assert result.rejects[2]["reason"] == "missing field 'messages'"


def test_lone_surrogates_in_chats_are_named(tmp_path: Path) -> None:
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_bytes(
        b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a \\udc80"}]}\n'
    )
    with pytest.raises(DataError) as info:
        read_records(sharegpt)
    assert str(info.value) == (
        f"{sharegpt}:1: field 'conversations': turn 2 (assistant) content holds a lone surrogate U+DC80 "
        "at character 3, which UTF-8 cannot encode"
    )
    assert info.value.code == "invalid_unicode"
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_bytes(b'{"instruction": "x\\ud800", "output": "y"}\n')
    with pytest.raises(
        DataError, match=r"alpaca\.jsonl:1: turn 1 \(user\) content holds a lone surrogate U\+D800"
    ):
        read_records(alpaca)


def test_csv_holds_pairs_only(tmp_path: Path) -> None:
    path = tmp_path / "raw.csv"
    path.write_text("instruction,output\nSay hi.,Hi.\n")
    for fmt in ("messages", "alpaca", "sharegpt"):
        with pytest.raises(
            DataError, match=rf"raw\.csv: CSV holds prompt/completion pairs only; input format '{fmt}'"
        ):
            read_records(path, input_format=fmt)
    assert read_records(path, prompt_field="instruction", completion_field="output").format == "pairs"


# --------------------------------------------------------------------------- the data command


def _run_data(fixture: str, out: Path, *extra: str) -> dict:
    argv = ["data", str(FIXTURES / fixture), "--out", str(out), "--skip-invalid", "--val-fraction", "0.25"]
    assert cli.main([*argv, *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _check_outputs(out: Path, report: dict) -> list[dict]:
    """Both splits hold whole chats only, the counts add up, and no opening is in both splits."""
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    assert all(set(r) == {"messages"} for r in train + val)
    assert all(validate_messages(r["messages"]) == r["messages"] for r in train + val)
    assert report["read"] == report["kept"] + sum(report["dropped"].values()) + report["rejected"]
    assert (len(train), len(val)) == (report["train"], report["val"]) and len(train) + len(val) == report[
        "kept"
    ]
    assert report["rejected"] == len(read_jsonl(out / "rejects.jsonl"))
    assert {json.dumps(r["messages"][:2]) for r in train}.isdisjoint(
        json.dumps(r["messages"][:2]) for r in val
    )
    return train + val


def test_data_command_on_alpaca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _run_data("alpaca.jsonl", tmp_path / "out")
    assert (report["read"], report["kept"], report["rejected"]) == (9, 5, 2)
    assert report["dropped"] == {"empty_message": 1, "duplicate": 1}
    assert report["rejected_reasons"] == {"malformed_alpaca": 1, "mixed_formats": 1}
    assert report["input_format"] == "alpaca"
    assert report["chats"] == {"conversations": 5, "turns": 11, "assistant_turns": 5}
    chats = _check_outputs(tmp_path / "out", report)
    assert [
        sys_("Answer in one sentence."),
        user("Summarise the text.\n\nThe parcel left the depot on Monday and arrived on Wednesday."),
        bot("It took two days."),
    ] in [c["messages"] for c in chats]
    printed = capsys.readouterr().out
    assert "format=alpaca" in printed and "assistant turns kept" in printed and "empty_message" in printed


def test_data_command_on_sharegpt_as_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lumorik_sft.cli", "data", str(FIXTURES / "sharegpt.jsonl"), "--out", str(out)]
        + ["--skip-invalid", "--input-format", "sharegpt", "--val-fraction", "0.25"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["read"], report["kept"], report["rejected"]) == (8, 4, 2)
    assert report["dropped"] == {"empty_message": 1, "duplicate": 1}
    assert report["chats"] == {"conversations": 4, "turns": 11, "assistant_turns": 5}
    chats = _check_outputs(out, report)
    assert {"messages": [user("Hi"), bot("Hello! How can I help?")]} in chats  # the first copy, cleaned
    assert "turns kept" in proc.stdout and "sharegpt" in proc.stdout


def test_data_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", str(FIXTURES / "sharegpt.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lumorik-sft: error: {FIXTURES / 'sharegpt.jsonl'}:5: field 'conversations': turn 2: unknown 'from' "
        "'bard' (expected system, human, gpt, user or assistant)"
    )
    csv = tmp_path / "raw.csv"
    csv.write_text("prompt,completion\na,b\n")
    assert cli.main(["data", str(csv), "--out", str(tmp_path / "o"), "--input-format", "alpaca"]) == 2
    assert "CSV holds prompt/completion pairs only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_data_help_lists_the_input_formats(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["data", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--input-format {auto,pairs,messages,alpaca,sharegpt}" in text
    assert "chats are not length-filtered" in text
