"""The command line: help everywhere, one clear line on bad input, and the demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lumorik_sft.cli import build_parser, main

COMMANDS = ["demo", "data", "train", "eval", "generate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: lumorik-sft " + command in capsys.readouterr().out


def test_data_command_error_is_one_line_naming_file_and_line(tmp_path):
    raw = tmp_path / "raw.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(16)]
    lines.append('{"prompt": "p16" "completion": "c16"}')
    raw.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lumorik_sft.cli", "data", str(raw), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert err[0].startswith("lumorik-sft: error: ") and "raw.jsonl:17: invalid JSON" in err[0]
    assert not (out / "train.jsonl").exists()


def test_data_command_skip_invalid_writes_splits_and_rejects(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(20)] + ["{oops"]
    raw.write_text("\n".join(lines) + "\n")
    assert main(["data", str(raw), "--out", str(tmp_path / "d"), "--skip-invalid"]) == 0
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert (report["read"], report["kept"], report["rejected"]) == (21, 20, 1)
    assert (report["train"], report["val"]) == (18, 2)
    assert (tmp_path / "d" / "rejects.jsonl").exists()


def test_missing_file_is_one_clear_line(tmp_path, capsys):
    assert main(["data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jsonl" in err[0]


def test_generate_needs_a_prompt(capsys):
    assert main(["generate"]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_parser_lists_all_commands():
    text = build_parser().format_help()
    assert all(c in text for c in COMMANDS)


def test_demo_runs_end_to_end_in_fast_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUMORIK_FAST", "1")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("1. Data curation", "2. Tokenization", "3. Training", "4b. Evaluation after SFT"):
        assert stage in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["curation"]["train"], summary["curation"]["val"]) == (900, 100)
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert len(summary["after"]["predictions"]) == 8
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "model" / "final" / "config.json").exists()
