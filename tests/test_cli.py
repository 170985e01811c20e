"""The command line: help everywhere, one clear line on bad input, and the demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lumorik_sft.cli import build_parser, main

COMMANDS = ["demo", "data", "train", "eval", "generate", "pretrain", "notebooks", "exercises", "grade"]


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


def test_train_eval_generate_commands_on_a_local_model(tmp_path, toy_tokenizer, capsys):
    from lumorik_sft import data
    from lumorik_sft.course import synthetic
    from lumorik_sft.models import build_model

    base = tmp_path / "base"
    build_model("llama", toy_tokenizer, n_layer=1, width=32, n_head=2, context=256).save_pretrained(base)
    toy_tokenizer.save_pretrained(base)
    records = synthetic.health_qa(n=24, seed=0)
    data.write_jsonl(tmp_path / "train.jsonl", records[:20])
    data.write_jsonl(tmp_path / "val.jsonl", records[20:])
    run = tmp_path / "run"
    assert main(["train", "--model", str(base), "--train", str(tmp_path / "train.jsonl"),
                 "--val", str(tmp_path / "val.jsonl"), "--out", str(run), "--lr", "1e-2",
                 "--epochs", "1", "--batch-size", "4", "--precision", "fp32"]) == 0
    epochs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["epoch"] for e in epochs] == [0, 1] and epochs[1]["val_loss"] < epochs[0]["val_loss"]
    assert (run / "checkpoint.pt").exists() and (run / "final" / "tokenizer.json").exists()

    assert main(["eval", "--model", str(run / "final"), "--data", str(tmp_path / "val.jsonl"),
                 "--n-generate", "2", "--max-new-tokens", "8", "--out", str(tmp_path / "e.json")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["loss"] == pytest.approx(epochs[1]["val_loss"], rel=1e-4)
    assert len(json.loads((tmp_path / "e.json").read_text())["predictions"]) == 2

    assert main(["generate", "--model", str(run / "final"), "--prompt", records[0]["prompt"],
                 "--max-new-tokens", "8"]) == 0
    assert "### completion" in capsys.readouterr().out


@pytest.fixture
def short_context_model(tmp_path, toy_tokenizer):
    from lumorik_sft.models import build_model

    path = tmp_path / "short"
    build_model("gpt2", toy_tokenizer, n_layer=1, width=32, n_head=2, context=64).save_pretrained(path)
    toy_tokenizer.save_pretrained(path)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lumorik-sft: error: "), err
    return err[0]


def test_train_eval_generate_name_the_file_line_and_field(tmp_path, short_context_model, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "only a prompt"}\n')
    model = ["--model", str(short_context_model)]
    assert main(["train", *model, "--train", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert _one_error_line(capsys).endswith(f"{bad}:2: missing field 'completion'")
    assert main(["eval", *model, "--data", str(bad)]) == 2
    assert _one_error_line(capsys).endswith(f"{bad}:2: missing field 'completion'")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"text": "no prompt here"}\n')
    assert main(["generate", *model, "--prompt-file", str(prompts)]) == 2
    assert _one_error_line(capsys).endswith(f"{prompts}:2: missing field 'prompt'")


def test_max_length_fits_the_model_context_and_cuts_are_reported(tmp_path, short_context_model,
                                                                   capsys):
    from lumorik_sft import data

    text = "the tenant sued the landlord over an unreturned deposit with interest"
    records = [{"prompt": "the tenant sued", "completion": " ".join([text] * 12)},  # EOS lost
               {"prompt": " ".join([text] * 12), "completion": "settled"}]  # prompt cut only
    data.write_jsonl(tmp_path / "t.jsonl", records)
    common = ["train", "--model", str(short_context_model), "--train", str(tmp_path / "t.jsonl"),
              "--epochs", "1", "--precision", "fp32", "--lr", "1e-3"]
    assert main([*common, "--out", str(tmp_path / "r1"), "--max-length", "65"]) == 2
    assert "max length 65 is longer than the model's context of 64 tokens" in _one_error_line(capsys)
    assert main([*common, "--out", str(tmp_path / "r2")]) == 0  # the default: 256 capped to 64
    out, err = capsys.readouterr()
    assert "max length 64 tokens" in out
    assert "encoded 2 of 2 training examples" in out and "2 truncated, 1 of them into" in out
    assert "1 training example(s) lost the end of their completion and its EOS" in err
