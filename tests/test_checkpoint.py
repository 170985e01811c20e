"""Checkpoints: atomic writes, one-line errors for damaged or missing files, RNG states per rank."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from lumorik_sft import cli
from lumorik_sft.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    rank_rng_state,
    resume_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lumorik_sft.models import build_model


def _payload(value: float) -> dict:
    return {"format": 1, "model": {"w": torch.full((64, 64), value)}}


def test_save_is_atomic_and_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "run" / CHECKPOINT_NAME
    save_checkpoint(path, _payload(1.0))
    assert [p.name for p in path.parent.iterdir()] == [CHECKPOINT_NAME]  # no temp file left
    with pytest.raises(Exception):  # noqa: B017  # whatever torch.save raises on a lambda
        save_checkpoint(path, {**_payload(2.0), "bad": lambda: None})
    assert [p.name for p in path.parent.iterdir()] == [CHECKPOINT_NAME]
    assert float(load_checkpoint(path.parent)["model"]["w"][0, 0]) == 1.0


@pytest.mark.parametrize("keep", [0, 10, 1000, -30])
def test_damaged_checkpoint_is_one_line_that_says_what_to_do(tmp_path, keep):
    save_checkpoint(tmp_path / CHECKPOINT_NAME, _payload(1.0))
    data = (tmp_path / CHECKPOINT_NAME).read_bytes()
    (tmp_path / CHECKPOINT_NAME).write_bytes(data[:keep])  # a run killed mid-copy
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    assert f"{tmp_path / CHECKPOINT_NAME} is damaged" in message
    assert "delete it and run again without --resume" in message
    assert "put back a copy of the previous checkpoint" in message


def test_missing_checkpoint_speaks_to_the_command_line_and_to_python(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=(
            rf"^nothing to resume: no checkpoint.pt in {tmp_path}; run again without --resume "
            r"\(resume=False in Python\) to begin a new run$"
        ),
    ):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing to resume: no checkpoint at .*other.pt"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="pass --out .config.output_dir. or the checkpoint's path"):
        resume_path(True, None)
    assert resume_path(False, str(tmp_path)) is None
    assert resume_path(True, str(tmp_path)) == tmp_path / CHECKPOINT_NAME


def test_train_resume_on_a_truncated_checkpoint_prints_one_line(tmp_path, toy_tokenizer, capsys):
    model = build_model("gpt2", toy_tokenizer, n_layer=1, width=16, n_head=2, context=64)
    model.save_pretrained(tmp_path / "model")
    toy_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"prompt": f"say {i}", "completion": f"number {i}"}) + "\n" for i in range(4))
    )
    out = tmp_path / "out"
    save_checkpoint(out / CHECKPOINT_NAME, _payload(1.0))
    (out / CHECKPOINT_NAME).write_bytes((out / CHECKPOINT_NAME).read_bytes()[:500])
    code = cli.main(
        [
            "train",
            "--model",
            str(tmp_path / "model"),
            "--train",
            str(tmp_path / "t.jsonl"),
            "--out",
            str(out),
            "--resume",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lumorik-sft: error: checkpoint ") and "is damaged" in err
    assert "Traceback" not in err and "PytorchStreamReader" not in err


def test_rng_states_come_back_and_each_rank_gets_its_own(tmp_path):
    state = rng_state(torch.device("cpu"))
    save_checkpoint(tmp_path / CHECKPOINT_NAME, {"format": 1, "rng": state})
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(load_checkpoint(tmp_path)["rng"])  # weights_only=True reads it back
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws

    ckpt = {"rng": "rank0", "rng_per_rank": ["rank0", "rank1"]}
    assert rank_rng_state(ckpt, 1, 2) == "rank1"
    assert rank_rng_state(ckpt, 2, 3) == "rank0"  # another number of processes: rank 0's streams
    assert rank_rng_state({"rng": "old"}, 0, 1) == "old"  # written before per-rank states
