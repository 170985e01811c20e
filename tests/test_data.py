"""Tests for lumorik_sft.data: reading with exact error lines, cleaning, curation counts, splitting."""

from __future__ import annotations

import json
import tempfile
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_conversations import bot, sys_, user

from lumorik_sft.course.synthetic import product_descriptions
from lumorik_sft.data import (
    CHAT_DROP_REASONS,
    DROP_REASONS,
    CurationReport,
    DataError,
    clean_text,
    curate,
    from_hf_dataset,
    messages_to_prompt_completion,
    read_jsonl,
    read_records,
    run_curation,
    split_records,
    to_hf_dataset,
    write_csv,
    write_jsonl,
)


def words(record: dict) -> int:
    """A stand-in token count: whitespace words of prompt + completion."""
    return len((record["prompt"] + " " + record["completion"]).split())


def jsonl_bytes(*rows: object) -> bytes:
    """Rows as JSONL bytes; a bytes row is written verbatim (for broken lines)."""
    out = b""
    for row in rows:
        out += row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode()
        out += b"\n"
    return out


def pc(prompt: str, completion: str) -> dict:
    return {"prompt": prompt, "completion": completion}


# ------------------------------------------------------------------------------------ clean_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Cafe\u0301", "Café"),  # NFD -> NFC
        ("a \t b", "a b"),
        ("line1\n\n\n\nline2", "line1\n\nline2"),
        ("zero\u200bwidth\ufeff", "zerowidth"),
        ("  a\u00a0\u00a0b  \r\nc\rd ", "a b\nc\nd"),
        ("keep\nsingle \n newline", "keep\nsingle\nnewline"),
        ("bell\x07 and nul\x00", "bell and nul"),
        ("page\x0cbreak", "page\nbreak"),
        ("e\u200b\u0301", "é"),  # removing the zero-width space lets the accent compose
    ],
)
def test_clean_text_golden(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


_TRICKY = list("ab é\u0301\t\n\r\u200b\ufeff\u00a0\u2003\x07\x0b\u2028")
_messy_text = st.text(alphabet=st.sampled_from(_TRICKY) | st.characters(), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_messy_text)
def test_clean_text_properties(text: str) -> None:
    cleaned = clean_text(text)
    assert clean_text(cleaned) == cleaned
    assert unicodedata.is_normalized("NFC", cleaned)
    assert "  " not in cleaned and "\n\n\n" not in cleaned and "\t" not in cleaned
    assert " \n" not in cleaned and "\n " not in cleaned
    assert cleaned == cleaned.strip()
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Zs") and c not in "\n " for c in cleaned)


# --------------------------------------------------------------------------------------- reading


def test_read_jsonl_bom_crlf_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + b'{"prompt": "p1", "completion": "c1"}\r\n\r\n  \n'
        + b'{"prompt": "p2", "completion": "c2"}\r\n'
    )
    result = read_records(path)
    assert result.records == [pc("p1", "c1") | {"line": 1}, pc("p2", "c2") | {"line": 4}]
    assert result.n_read == 2 and result.rejects == []


def test_custom_field_names(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    path.write_bytes(jsonl_bytes({"question": "q", "answer": "a"}))
    result = read_records(path, prompt_field="question", completion_field="answer")
    assert result.records == [pc("q", "a") | {"line": 1}]


def _file_with_bad_line(tmp_path: Path, bad: bytes, at: int = 17) -> Path:
    rows: list[object] = [pc(f"p{i}", f"c{i}") for i in range(1, 21)]
    rows[at - 1] = bad
    path = tmp_path / "raw.jsonl"
    path.write_bytes(jsonl_bytes(*rows))
    return path


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b'{"prompt": "p" "completion": "c"}', "invalid JSON: Expecting ',' delimiter (column 16)"),
        (b'{"completion": "c"}', "missing field 'prompt'"),
        (b'{"prompt": "p", "completion": 3}', "field 'completion' must be a string, got int"),
        (b'["p", "c"]', "expected a JSON object, got list"),
        (b'{"prompt": "caf\xe9", "completion": "c"}', "invalid UTF-8: byte 0xe9 at column 16"),
        (
            b'{"prompt": "p", "completion": "ab\\udc80"}',
            "field 'completion' holds a lone surrogate U+DC80 at character 3",
        ),
        (b"\x1c", "invalid JSON: Expecting value (column 1)"),  # str.strip() calls it blank
        ("\u3000".encode(), "invalid JSON: Expecting value (column 1)"),
    ],
)
def test_error_names_file_line_and_problem(tmp_path: Path, bad: bytes, message: str) -> None:
    path = _file_with_bad_line(tmp_path, bad, at=17)
    with pytest.raises(DataError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}:17: {message}")
    assert "\n" not in str(info.value) and info.value.line == 17


def test_skip_invalid_collects_rejects_and_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    path.write_bytes(
        jsonl_bytes(
            pc("a", "1"), b"{oops", pc("b", "2"), b'{"prompt": "\xff"}', {"prompt": "c"}, pc("d", "4")
        )
    )
    result = read_records(path, skip_invalid=True)
    assert [r["line"] for r in result.records] == [1, 3, 6]
    assert [(r["line"], r["code"]) for r in result.rejects] == [
        (2, "invalid_json"),
        (4, "invalid_utf8"),
        (5, "missing_field"),
    ]
    assert result.rejects[0]["raw"] == "{oops"
    assert result.rejects[1]["raw"] == '{"prompt": "\\xff"}'
    assert result.n_read == 6


def test_csv_reads_quoted_multiline_and_reports_start_line(tmp_path: Path) -> None:
    path = tmp_path / "raw.csv"
    path.write_bytes(
        b"\xef\xbb\xbfprompt,completion\r\n"  # line 1
        b'"first\r\nsecond\r\nthird",ok\r\n'  # lines 2-4: one row
        b"\r\n"  # line 5: blank
        b'"x","y, with comma"\r\n'  # line 6
        b"one,two,three\r\n"  # line 7: bad
    )
    result = read_records(path, skip_invalid=True)
    assert result.records == [
        pc("first\r\nsecond\r\nthird", "ok") | {"line": 2},
        pc("x", "y, with comma") | {"line": 6},
    ]
    assert result.rejects == [
        {"line": 7, "code": "wrong_columns", "reason": "expected 2 columns, got 3", "raw": "one,two,three"}
    ]
    assert result.n_read == 3
    with pytest.raises(DataError, match=r"raw\.csv:7: expected 2 columns, got 3$"):
        read_records(path)


def test_csv_invalid_utf8_and_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "raw.csv"
    path.write_bytes(b'prompt,completion\n"a\nb\xff",c\nd,e\n')
    with pytest.raises(DataError, match=r"raw\.csv:3: invalid UTF-8"):
        read_records(path)
    assert read_records(path, skip_invalid=True).records == [pc("d", "e") | {"line": 4}]
    path.write_bytes(b"question,completion\nq,c\n")
    with pytest.raises(DataError, match=r"raw\.csv:1: CSV header has no column 'prompt'"):
        read_records(path, skip_invalid=True)  # a bad header is fatal even with skip_invalid


def test_csv_without_header_or_with_unclosed_quote(tmp_path: Path) -> None:
    path = tmp_path / "raw.csv"
    for empty in (b"", b"\n\r\n"):
        path.write_bytes(empty)
        with pytest.raises(DataError, match=r"raw\.csv: no CSV header"):
            read_records(path, skip_invalid=True)
    path.write_bytes(b'prompt,completion\na,b\n"c,d\ne,f\n')
    with pytest.raises(
        DataError,
        match=r"raw\.csv:3: expected 2 columns, got 1; a quote \(\"\) "
        r"opened here is never closed, so the row runs to line 4$",
    ):
        read_records(path)


def test_lone_surrogate_is_rejected_and_curation_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    path.write_bytes(jsonl_bytes(pc("ok", "fine"), b'{"prompt": "bad \\ud800 x", "completion": "x"}'))
    report = run_curation(path, tmp_path / "out", skip_invalid=True)
    assert (report.read, report.kept, report.rejected) == (2, 1, 1)
    assert read_jsonl(tmp_path / "out" / "rejects.jsonl")[0]["code"] == "invalid_unicode"
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(
        b'{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "yo"}]}\n'
    )
    with pytest.raises(
        DataError, match=r"chat\.jsonl:1: field 'messages': turn 1 \(user\) content holds a lone surrogate"
    ):
        read_records(chat)


def test_csv_round_trip(tmp_path: Path) -> None:
    records = [pc('multi\nline, "quoted"', "é ü"), pc("plain", "text")]
    write_csv(tmp_path / "data.csv", records)
    read = read_records(tmp_path / "data.csv")
    assert [pc(r["prompt"], r["completion"]) for r in read.records] == records
    assert [r["line"] for r in read.records] == [2, 4]


def test_messages_kept_whole(tmp_path: Path) -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Define SFT."},
            {"role": "assistant", "content": "Fine-tuning on labelled pairs."},
            {"role": "user", "content": "And DPO?"},
            {"role": "assistant", "content": "Preference tuning."},
        ]
    }
    path = tmp_path / "chat.jsonl"
    path.write_bytes(jsonl_bytes(chat, {"messages": [{"role": "user", "content": "hi"}]}))
    result = read_records(path, skip_invalid=True)
    assert result.records == [chat | {"line": 1}]  # every turn, not flattened
    assert result.rejects[0]["code"] == "malformed_messages"
    assert messages_to_prompt_completion(chat["messages"]) == (
        "System: Be brief.\n\nUser: Define SFT.\n\n"
        "Assistant: Fine-tuning on labelled pairs.\n\nUser: And DPO?",
        "Preference tuning.",
    )


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "not a list of messages: got str"),
        ([{"role": "user", "content": "q"}], "turn 1: the chat ends here with no assistant turn"),
        (
            [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}],
            "turn 1: 'content' must be a string, got int",
        ),
        (
            [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
            "turn 1: expected a user turn first, got assistant",
        ),
    ],
)
def test_malformed_messages(tmp_path: Path, messages: object, problem: str) -> None:
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "chat.jsonl"
    path.write_bytes(jsonl_bytes(ok, {"messages": messages}))
    with pytest.raises(DataError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}:2: field 'messages': {problem}")
    assert info.value.code == "malformed_messages"


# -------------------------------------------------------------------------------------- curation


def test_curate_reasons_and_order() -> None:
    records = [
        pc("p", "c"),
        pc(" p ", "c\u200b"),
        pc("\u200b", "c"),
        pc("q", " "),
        pc("long", "w " * 50),
        pc("long", "w " * 50),
        pc("r", "d"),
    ]
    result = curate(records, max_tokens=10, length_fn=words)
    assert result.kept == [pc("p", "c"), pc("r", "d")]
    assert result.counts == {"empty_prompt": 1, "empty_completion": 1, "duplicate": 2, "too_long": 1}
    assert [d["reason"] for d in result.dropped] == [
        "duplicate",
        "empty_prompt",
        "empty_completion",
        "too_long",
        "duplicate",
    ]
    with pytest.raises(ValueError, match="both max_tokens and length_fn"):
        curate(records, max_tokens=10)


def test_messy_file_counts_add_up(tmp_path: Path) -> None:
    long_answer = "blah " * 300
    body = jsonl_bytes(
        pc("Define SFT.", "Fine-tuning on pairs."),  # 1 kept
        pc("Define SFT.", "Fine-tuning on pairs."),  # 2 exact duplicate
        pc("Define  SFT.\t", "Fine-tuning\u00a0on pairs. "),  # 3 whitespace duplicate
        pc("Café?", "Oui."),  # 4 kept
        pc(unicodedata.normalize("NFD", "Café?"), "Oui."),  # 5 NFD duplicate
        pc("", "orphan answer"),  # 6 empty prompt
        pc("Unanswered?", "\u200b "),  # 7 empty completion
        pc("Essay?", long_answer),  # 8 too long
        pc("Define SFT.", "A different answer."),  # 9 kept: same prompt, new completion
    ).replace(b"\n", b"\r\n")
    path = tmp_path / "raw.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body + b"\r\n\r\n")
    report = run_curation(path, tmp_path / "out", max_tokens=100, length_fn=words, val_fraction=0.5)
    assert report.dropped == {"empty_prompt": 1, "empty_completion": 1, "duplicate": 3, "too_long": 1}
    assert (report.read, report.kept, report.rejected) == (9, 3, 0)
    assert report.train + report.val == 3
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    val = read_jsonl(tmp_path / "out" / "val.jsonl")
    assert all(set(r) == {"prompt", "completion"} for r in train + val)
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in val)
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report.to_dict()
    assert not (tmp_path / "out" / "rejects.jsonl").exists()


def test_run_curation_writes_nothing_on_error(tmp_path: Path) -> None:
    path = _file_with_bad_line(tmp_path, b"{not json", at=17)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"raw\.jsonl:17: invalid JSON:"):
        run_curation(path, out)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(DataError):
        run_curation(path, out)
    assert list(out.iterdir()) == []


def test_run_curation_skip_invalid_writes_rejects(tmp_path: Path) -> None:
    path = _file_with_bad_line(tmp_path, b'{"prompt": 5, "completion": "x"}', at=3)
    report = run_curation(path, tmp_path / "out", skip_invalid=True)
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert rejects == [
        {
            "line": 3,
            "code": "wrong_type",
            "reason": "field 'prompt' must be a string, got int",
            "raw": '{"prompt": 5, "completion": "x"}',
        }
    ]
    assert (report.read, report.kept, report.rejected) == (20, 19, 1)
    assert report.rejected_reasons == {"wrong_type": 1}
    assert "rejected (malformed)" in report.summary() and "19" in report.summary()


_line = st.one_of(
    st.tuples(
        st.sampled_from(["", " ", "a", "a ", "b\u200b", "Cafe\u0301", "Café", "x\n\ny"]),
        st.sampled_from(["", "c", "c ", "long " * 20, "d\r\n"]),
    ).map(lambda t: json.dumps(pc(*t)).encode()),
    st.sampled_from(
        [
            b"{broken",
            b'{"prompt": 1, "completion": "c"}',
            b'{"prompt": "p"}',
            b'{"prompt": "\xff", "completion": "c"}',
            b"[]",
            b"",
            b"  ",
            b'{"prompt": "a\\ud800", "completion": "c"}',
            b"\x1c",
            "\u3000".encode(),
        ]
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_line, max_size=25), st.integers(0, 3))
def test_invariant_on_random_messy_files(lines: list[bytes], seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        curate_accounted(Path(tmp), b"\r\n".join(lines), seed=seed, max_tokens=15, length_fn=words)


def curate_accounted(tmp: Path, data: bytes, **settings: object) -> CurationReport:
    """Curate `data` with skip_invalid and check that every data row is accounted for."""
    (tmp / "raw.jsonl").write_bytes(data)
    report = run_curation(tmp / "raw.jsonl", tmp / "out", skip_invalid=True, val_fraction=0.3, **settings)
    n_data = sum(1 for line in data.split(b"\n") if line.strip(b" \t\r\n"))  # JSON's blanks only
    assert report.read == n_data == report.kept + sum(report.dropped.values()) + report.rejected
    assert report.rejected == len(read_jsonl(tmp / "out" / "rejects.jsonl"))
    assert report.train + report.val == report.kept
    return report


def test_report_rejects_inconsistent_counts() -> None:
    with pytest.raises(AssertionError, match="lost rows"):
        CurationReport(
            source="x",
            read=3,
            kept=1,
            train=1,
            val=0,
            dropped={"duplicate": 1},
            rejected=0,
            rejected_reasons={},
            seed=0,
            val_fraction=0.1,
        )


# ------------------------------------------------------------------------------------- splitting


def test_split_1000_is_exactly_900_100_and_seeded() -> None:
    records = product_descriptions(1000, seed=0)
    train, val = split_records(records, val_fraction=0.1, seed=0)
    assert (len(train), len(val)) == (900, 100)
    assert sorted(map(str, train + val)) == sorted(map(str, records))
    assert split_records(records, val_fraction=0.1, seed=0) == (train, val)
    assert split_records(records, val_fraction=0.1, seed=1)[1] != val
    assert [records.index(r) for r in val] == sorted(records.index(r) for r in val)


def test_split_keeps_prompt_groups_together() -> None:
    records = [pc(f"q{i % 40}", f"answer {i}") for i in range(200)]  # each prompt 5 times
    records += [pc(" q1 ", "variant spacing")]  # cleans to the same prompt as q1
    for seed in range(5):
        train, val = split_records(records, val_fraction=0.2, seed=seed)
        val_prompts = {clean_text(r["prompt"]) for r in val}
        assert val_prompts.isdisjoint(clean_text(r["prompt"]) for r in train)
        assert abs(len(val) - 40) <= 5 and len(train) + len(val) == 201


def test_split_sizes_round_and_edges() -> None:
    records = [pc(f"q{i}", "a") for i in range(37)]
    assert len(split_records(records, val_fraction=0.1)[1]) == 4
    assert split_records(records, val_fraction=0.0)[1] == []
    assert split_records([], val_fraction=0.1) == ([], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_records(records, val_fraction=1.5)


# ------------------------------------------------------------------------------------ file helpers


def test_jsonl_and_hf_round_trip(tmp_path: Path) -> None:
    records = [pc("Café\nmenu", "ünïcode ✓"), pc("b", "c")]
    write_jsonl(tmp_path / "x.jsonl", records)
    assert "Café" in (tmp_path / "x.jsonl").read_text(encoding="utf-8")  # not \\u escaped
    assert read_jsonl(tmp_path / "x.jsonl") == records
    ds = to_hf_dataset([r | {"line": 1} for r in records])
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 2
    assert from_hf_dataset(ds) == records


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "raw.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(tmp_path / "raw.txt")


# ----------------------------------------------------------------------------------------- chats


def chat(*messages: dict) -> dict:
    return {"messages": list(messages)}


def pairs_only_words(record: dict) -> int:
    assert "messages" not in record, "chats are never length-filtered"
    return words(record)


def test_curate_chats_cleans_every_message_and_drops_whole_conversations() -> None:
    records = [
        chat(user(" Hi\u200b "), bot("Hello\t there")) | {"line": 1},  # kept, cleaned
        chat(user("Hi"), bot("Hello there")),  # duplicate
        chat(sys_(" \u200b"), user("Hi"), bot("Hello  there")),  # empty system removed: duplicate
        chat(sys_("Be kind."), user("Hi"), bot("Hello there")),  # kept: another conversation
        chat(user("Q"), bot("A"), user("\u200b"), bot("B")),  # empty_message (turn 3)
        chat(user("Q"), bot(" ")),  # empty_message
        chat(user("long " * 50), bot("x")),  # kept: no length filter for chats
        chat(user("Q"), bot("A"), user("Q2"), bot("B")),  # kept
        chat(user("Q"), bot("A")),  # kept: a prefix of the one above is another conversation
    ]
    result = curate(records, max_tokens=10, length_fn=pairs_only_words)
    assert result.kept == [
        chat(user("Hi"), bot("Hello there")) | {"line": 1},
        chat(sys_("Be kind."), user("Hi"), bot("Hello there")),
        chat(user("long " * 49 + "long"), bot("x")),
        chat(user("Q"), bot("A"), user("Q2"), bot("B")),
        chat(user("Q"), bot("A")),
    ]
    assert result.counts == {"empty_message": 2, "duplicate": 2}
    assert [d["reason"] for d in result.dropped] == [
        "duplicate",
        "duplicate",
        "empty_message",
        "empty_message",
    ]
    assert result.dropped[1]["messages"] == [user("Hi"), bot("Hello there")]


def test_curate_counts_the_reasons_of_each_kind_given() -> None:
    assert curate([]).counts == dict.fromkeys(DROP_REASONS, 0)  # no records: the pairs' reasons
    assert curate([pc("p", "c")]).counts == dict.fromkeys(DROP_REASONS, 0)
    assert curate([chat(user("q"), bot("a"))]).counts == dict.fromkeys(CHAT_DROP_REASONS, 0)
    mixed = curate([pc("p", ""), chat(user("q"), bot(""))]).counts
    assert mixed == {
        "empty_prompt": 0,
        "empty_completion": 1,
        "empty_message": 1,
        "duplicate": 0,
        "too_long": 0,
    }


def test_split_chats_by_their_opening() -> None:
    records = [
        chat(
            *([sys_("Be brief.")] if i % 3 == 0 else []),
            user(f"q{i % 10}"),
            bot(f"a{i}"),
            user("more?"),
            bot("no"),
        )
        for i in range(60)
    ]
    records += [chat(user(" q1 \u200b"), bot("variant spacing"))]  # cleans to q1's opening
    for seed in range(5):
        train, val = split_records(records, val_fraction=0.2, seed=seed)
        assert {_opening(r) for r in val}.isdisjoint(_opening(r) for r in train)
        assert abs(len(val) - 12) <= 4 and len(train) + len(val) == 61
    # same opening, different later turns: one group (the split has 20 groups of 3)
    by_opening = {}
    for r in records[:60]:
        by_opening.setdefault(_opening(r), []).append(r)
    assert len(by_opening) == 20


def _opening(record: dict) -> tuple[str, str]:
    """The cleaned (system, first user) pair a test expects a chat split by."""
    messages = record["messages"]
    system = clean_text(messages[0]["content"]) if messages[0]["role"] == "system" else ""
    return system, clean_text(next(m["content"] for m in messages if m["role"] == "user"))


def test_chat_report_and_summary(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_bytes(
        jsonl_bytes(
            chat(sys_("s"), user("a"), bot("b"), user("c"), bot("d")),
            chat(user("x"), bot("y")),
            chat(user("x "), bot("y")),
            pc("p", "c"),
        )
    )
    report = run_curation(path, tmp_path / "out", skip_invalid=True, max_tokens=5, length_fn=words)
    assert (report.read, report.kept, report.rejected) == (4, 2, 1)
    assert report.rejected_reasons == {"mixed_formats": 1} and report.dropped == {
        "empty_message": 0,
        "duplicate": 1,
    }
    assert report.input_format == "messages"
    assert report.chats == {"conversations": 2, "turns": 7, "assistant_turns": 3}
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report.to_dict()
    summary = report.summary()
    assert summary.splitlines()[0].endswith("(seed=0, val_fraction=0.1, format=messages)")
    rows = [line.split() for line in summary.splitlines()]
    assert rows[-4:-1] == [
        ["conversations", "kept", "2"],
        ["turns", "kept", "7"],
        ["assistant", "turns", "kept", "3"],
    ]
    assert (
        summary.splitlines()[-1]
        == "  chats are not length-filtered: the chat encoder drops earlier turns to fit"
    )
    written = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "val.jsonl")
    assert sorted(map(json.dumps, written)) == sorted(
        map(
            json.dumps, [chat(sys_("s"), user("a"), bot("b"), user("c"), bot("d")), chat(user("x"), bot("y"))]
        )
    )


def test_pairs_summary_has_no_chat_rows(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    path.write_bytes(jsonl_bytes(pc("p", "c")))
    report = run_curation(path, tmp_path / "out")
    assert report.chats is None and report.input_format == "pairs"
    assert report.summary().splitlines()[0] == f"Curation of {path} (seed=0, val_fraction=0.1)"
    assert "turns" not in report.summary()


def test_chat_jsonl_and_hf_round_trip(tmp_path: Path) -> None:
    chats = [
        chat(sys_("Sé bref."), user("Café?"), bot("Oui ✓")),
        chat(user("a"), bot("b"), user("c"), bot("d")),
    ]
    write_jsonl(tmp_path / "x.jsonl", chats)
    assert read_jsonl(tmp_path / "x.jsonl") == chats
    ds = to_hf_dataset([r | {"line": 3} for r in chats])
    assert ds.column_names == ["messages"] and len(ds) == 2
    assert from_hf_dataset(ds) == chats
    with pytest.raises(ValueError, match="mix chats and prompt/completion pairs"):
        to_hf_dataset([*chats, pc("p", "c")])


_valid_chat = st.builds(
    lambda system, exchanges: chat(*system, *[m for q, a in exchanges for m in (user(q), bot(a))]),
    st.sampled_from([[], [sys_("Be brief.")], [sys_(" ")], [sys_("Be brief. ")]]),
    st.lists(
        st.tuples(
            st.sampled_from(["q", " q", "r", "Cafe\u0301", "\u200b"]), st.sampled_from(["a", "a ", "b", ""])
        ),
        min_size=1,
        max_size=3,
    ),
)
_chat_line = st.one_of(
    _valid_chat.map(lambda c: json.dumps(c).encode()),
    st.sampled_from(
        [
            json.dumps(chat(user("q"), {"role": "bot", "content": "a"})).encode(),  # unknown role
            json.dumps(chat(user("q"), user("q"), bot("a"))).encode(),  # does not alternate
            json.dumps(chat(user("q"))).encode(),  # no assistant turn
            json.dumps(chat(user("q"), bot("a"), sys_("s"), user("q"), bot("a"))).encode(),  # late system
            json.dumps(chat(user("q"), bot(3))).encode(),  # content not a string
            b'{"messages": "q"}',
            b'{"messages": []}',
            json.dumps(pc("p", "c")).encode(),  # a pair among chats
            b"{broken",
            b"[]",
            b"",
            b"  ",
        ]
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_chat_line, max_size=25), st.integers(0, 3))
def test_invariant_on_random_chat_files(lines: list[bytes], seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = curate_accounted(Path(tmp), b"\n".join(lines), seed=seed)
        train = read_jsonl(Path(tmp) / "out" / "train.jsonl")
        val = read_jsonl(Path(tmp) / "out" / "val.jsonl")
        assert (len(train), len(val)) == (report.train, report.val)
        if report.input_format == "messages":
            assert all(set(r) == {"messages"} for r in train + val)
            assert report.chats["conversations"] == report.kept
            assert {_opening(r) for r in val}.isdisjoint(_opening(r) for r in train)
            kept = [json.dumps(r["messages"]) for r in train + val]
            assert len(kept) == len(set(kept))  # no duplicate conversation kept
            assert all(
                m["content"] and clean_text(m["content"]) == m["content"]
                for r in train + val
                for m in r["messages"]
            )
