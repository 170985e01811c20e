"""The command line: help everywhere, one clear line on bad input, and the demo end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from lumorik_sft import cli as core_cli
from lumorik_sft.config import TrainConfig, add_dataclass_arguments, config_from_args
from lumorik_sft.course.cli import build_parser, main

CORE_COMMANDS = ["data", "train", "eval", "generate"]
COMMANDS = ["demo", *CORE_COMMANDS, "pretrain", "notebooks", "exercises", "grade"]


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
        capture_output=True,
        text=True,
        check=False,
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


def test_core_command_line_has_the_core_commands_only(capsys):
    parser = core_cli.build_parser()
    assert all(c in parser.format_help() for c in CORE_COMMANDS)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["demo"])
    assert exc.value.code == 2 and "invalid choice: 'demo'" in capsys.readouterr().err


def test_console_script_is_the_front_door():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lumorik-sft"]
    assert script.value == "lumorik_sft.course.cli:main"


def test_help_does_not_import_torch():
    code = (
        "import contextlib, io, sys\n"
        "from lumorik_sft.course.cli import build_parser\n"
        "for argv in ([], ['--help'], ['train', '--help'], ['data', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        build_parser().parse_args(argv)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]


def test_pretrain_help_lists_the_recipe_settings(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "usage: lumorik-sft pretrain" in out and "--vocab-size" in out and "--max-steps" in out


def test_train_has_a_flag_for_every_train_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, f"train --help lacks {flag}"
        if f.type == "bool":
            assert f"--no-{flag[2:]}" in out


def _train_config(*flags: str) -> TrainConfig:
    args = build_parser().parse_args(["train", "--train", "t.jsonl", "--out", "run", *flags])
    return config_from_args(TrainConfig, args)


def test_train_flags_today_s_names_and_generated_ones():
    assert _train_config() == TrainConfig(output_dir="run")  # the dataclass's defaults, lr None
    old = _train_config(
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--epochs",
        "1",
        "--warmup-ratio",
        "0.1",
        "--max-steps",
        "5",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--packing",
        "bfd",
        "--pack-length",
        "64",
        "--pad-to-multiple-of",
        "8",
    )
    assert old == TrainConfig(
        learning_rate=1e-3,
        batch_size=4,
        grad_accum_steps=2,
        epochs=1,
        warmup_ratio=0.1,
        max_steps=5,
        seed=3,
        device="cpu",
        precision="fp32",
        packing="bfd",
        pack_length=64,
        pad_to_multiple_of=8,
        output_dir="run",
    )
    new = _train_config(
        "--learning-rate",
        "2e-4",
        "--grad-accum-steps",
        "3",
        "--no-shuffle",
        "--no-progress",
        "--max-grad-norm",
        "none",
        "--weight-decay",
        "0.01",
        "--warmup-steps",
        "10",
        "--log-every",
        "0",
        "--no-fused-loss",
    )
    assert (
        new.learning_rate,
        new.grad_accum_steps,
        new.shuffle,
        new.progress,
        new.max_grad_norm,
        new.weight_decay,
        new.warmup_steps,
        new.log_every,
        new.fused_loss,
    ) == (2e-4, 3, False, False, None, 0.01, 10, 0, False)


def test_bad_train_settings_are_one_line_before_any_model_loads(tmp_path, capsys):
    common = ["train", "--model", "/no/such/folder", "--train", "t.jsonl", "--out", str(tmp_path)]
    assert main([*common, "--precision", "fp16"]) == 2
    assert "precision must be one of auto, fp32, bf16, got 'fp16'" in _one_error_line(capsys)
    assert main([*common, "--warmup-steps", "5", "--warmup-ratio", "0.1"]) == 2
    assert "set warmup_steps or warmup_ratio, not both" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        main([*common, "--batch-size", "eight"])
    assert exc.value.code == 2 and "invalid int value: 'eight'" in capsys.readouterr().err


@dataclass
class _Settings:
    name: str = field(default="x", metadata={"help": "A name; 100% free text."})
    size: int | None = field(default=None, metadata={"help": "A size."})
    rate: float = 0.5
    tags: tuple[str, ...] = ("a",)
    loud: bool = False


def test_add_dataclass_arguments_works_for_any_settings_dataclass():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Settings, aliases={"size": ["-n"]}, required=["name"])
    text = parser.format_help()
    assert "A name; 100% free text. (required)" in text and "A size. (default: none)" in text
    assert "--loud, --no-loud" in text and "(default: --no-loud)" in text
    args = parser.parse_args(["--name", "y", "-n", "3", "--tags", "b", "c", "--loud"])
    assert config_from_args(_Settings, args) == _Settings("y", 3, 0.5, ("b", "c"), True)
    args = parser.parse_args(["--name", "y", "--size", "None"])
    assert config_from_args(_Settings, args) == _Settings("y")
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --name is required

    @dataclass
    class Unflaggable:
        table: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="'table'"):
        add_dataclass_arguments(argparse.ArgumentParser(), Unflaggable)


def test_a_model_path_with_no_model_is_one_line(tmp_path, capsys):
    assert main(["generate", "--model", "/no/such/folder", "--prompt", "hi"]) == 2
    assert _one_error_line(capsys) == (
        "lumorik-sft: error: no model folder at /no/such/folder (give a local folder with "
        "config.json, or a Hugging Face model name)"
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "v.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["eval", "--model", str(tmp_path / "empty"), "--data", str(tmp_path / "v.jsonl")]) == 2
    assert f"{tmp_path / 'empty'} has no config.json" in _one_error_line(capsys)


def test_front_door_train_with_a_missing_model_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lumorik_sft.course.cli",
            "train",
            "--model",
            "/no/such/folder",
            "--train",
            str(tmp_path / "t.jsonl"),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "lumorik-sft: error: no model folder at /no/such/folder (give a local folder with config.json, "
        "or a Hugging Face model name)"
    ]


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
    facts = summary["after"]["fidelity"]  # products: every feature checked through the course's aliases
    assert 0 <= facts["fidelity"] <= 1 and facts["unchecked_facts"] == 0
    assert "fidelity" in printed.split("4b. Evaluation after SFT")[1]
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
    assert (
        main(
            [
                "train",
                "--model",
                str(base),
                "--train",
                str(tmp_path / "train.jsonl"),
                "--val",
                str(tmp_path / "val.jsonl"),
                "--out",
                str(run),
                "--lr",
                "1e-2",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "learning rate 0.01\n" in printed
    epochs = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert [e["epoch"] for e in epochs] == [0, 1] and epochs[1]["val_loss"] < epochs[0]["val_loss"]
    assert (run / "checkpoint.pt").exists() and (run / "final" / "tokenizer.json").exists()

    assert (
        main(
            [
                "eval",
                "--model",
                str(run / "final"),
                "--data",
                str(tmp_path / "val.jsonl"),
                "--n-generate",
                "2",
                "--max-new-tokens",
                "8",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["loss"] == pytest.approx(epochs[1]["val_loss"], rel=1e-4)
    assert 0 <= shown["chrf"] <= 100 and 0 <= shown["stop_rate"] <= 1
    assert set(shown["fidelity"]) >= {"fidelity", "foreign_per_output", "dosing_flagged"}  # health prompts
    assert len(json.loads((tmp_path / "e.json").read_text())["predictions"]) == 2

    assert (
        main(
            [
                "generate",
                "--model",
                str(run / "final"),
                "--prompt",
                records[0]["prompt"],
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
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


def test_max_length_fits_the_model_context_and_cuts_are_reported(tmp_path, short_context_model, capsys):
    from lumorik_sft import data

    text = "the tenant sued the landlord over an unreturned deposit with interest"
    records = [
        {"prompt": "the tenant sued", "completion": " ".join([text] * 12)},  # EOS lost
        {"prompt": " ".join([text] * 12), "completion": "settled"},
    ]  # prompt cut only
    data.write_jsonl(tmp_path / "t.jsonl", records)
    common = [
        "train",
        "--model",
        str(short_context_model),
        "--train",
        str(tmp_path / "t.jsonl"),
        "--epochs",
        "1",
        "--precision",
        "fp32",
    ]
    assert main([*common, "--out", str(tmp_path / "r1"), "--max-length", "65"]) == 2
    assert "max length 65 is longer than the model's context of 64 tokens" in _one_error_line(capsys)
    assert main([*common, "--out", str(tmp_path / "r2")]) == 0  # the default: 256 capped to 64
    out, err = capsys.readouterr()
    assert "max length 64 tokens" in out
    assert "learning rate 0.001 (the model's recommended rate)" in out  # no card, a tiny model
    assert "encoded 2 of 2 training examples" in out and "2 truncated, 1 of them into" in out
    assert "1 training example(s) lost the end of their completion and its EOS" in err


def test_the_course_front_door_gives_eval_the_product_feature_aliases():
    from lumorik_sft.course.cli import build_parser
    from lumorik_sft.course.synthetic import FEATURE_ALIASES

    args = build_parser().parse_args(["eval", "--data", "val.jsonl"])
    assert args.fact_aliases() == FEATURE_ALIASES
