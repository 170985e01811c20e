"""LoRA in the training loop: only the adapter trains, checkpoints resume exactly, outputs load back.

Tiny models on toy pairs (as in `test_packing`), plus the CLI on the embedded model.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import torch

from lumorik_sft import cli, lora
from lumorik_sft.encoding import encode_records
from lumorik_sft.lora import add_lora_from_config, lora_token_ids
from lumorik_sft.models import build_model, load_model_and_tokenizer
from lumorik_sft.training import TrainConfig, train
from tests.test_distributed import TORCHRUN, _assert_same_training, _run_launcher, _write_jsonl
from tests.test_packing import _pairs

SIZE = {"n_layer": 2, "width": 32, "n_head": 2, "context": 128}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples(toy_tokenizer):
    encoded, _ = encode_records(_pairs(20), toy_tokenizer)
    return encoded


def _model(tokenizer, arch="gpt2", seed=0):
    """Without dropout in the base model: packed and padded rows would draw different masks."""
    model = build_model(arch, tokenizer, seed=seed, **SIZE)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.eval()


def _config(**kw) -> TrainConfig:
    base = {"learning_rate": 3e-3, "batch_size": 8, "epochs": 2, "seed": 0, "log_every": 0, "lora_r": 4}
    return TrainConfig(**{**base, "progress": False, "device": "cpu", "precision": "fp32", **kw})


def test_config_validates_lora_settings():
    with pytest.raises(ValueError, match="rank must be a whole number"):
        TrainConfig(lora_r=0)
    with pytest.raises(ValueError, match="alpha"):
        TrainConfig(lora_r=8, lora_alpha=0)
    assert TrainConfig().lora_r is None  # full fine-tuning by default


def test_only_lora_parameters_change_and_the_optimizer_holds_only_them(toy_tokenizer, examples, arch):
    model = _model(toy_tokenizer, arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def record(event):
        if event["event"] == "step" and not seen:
            seen["state"] = event["result"]

    config = _config(lora_targets="all-linear")
    train(model, toy_tokenizer, examples[:16], examples[16:], config, callback=record)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    after = model.state_dict()
    for name, value in before.items():  # every base weight, renamed under base_layer, bit-identical
        key = (
            name
            if name in after
            else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(after[key], value), name
    changed = [n for n in trainable if not torch.equal(after[n], torch.zeros_like(after[n]))]
    assert any(".lora_B." in n for n in changed)  # B left zero would mean nothing trained
    n_trainable, _ = lora.trainable_parameters(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_optimizer_state_covers_only_trainable_parameters(toy_tokenizer, examples):
    from lumorik_sft.schedule import build_optimizer

    model = add_lora_from_config(_model(toy_tokenizer), toy_tokenizer, _config())
    optimizer = build_optimizer(model, _config())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in params) == lora.trainable_parameters(model)[0]


def test_lora_training_resumes_exactly(toy_tokenizer, examples, tmp_path):
    train_ex, val_ex = examples[:16], examples[16:]
    full_model = _model(toy_tokenizer)
    full = train(full_model, toy_tokenizer, train_ex, val_ex, _config(lora_dropout=0.1))

    def stop_at_3(event):
        if event["event"] == "step" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    config = _config(lora_dropout=0.1, output_dir=str(tmp_path))
    first = train(_model(toy_tokenizer), toy_tokenizer, train_ex, val_ex, config, callback=stop_at_3)
    assert first.interrupted and first.global_step == 3
    fresh = _model(toy_tokenizer, seed=7)  # another base init: the checkpoint restores everything
    second = train(fresh, toy_tokenizer, train_ex, val_ex, config, resume=True)
    assert second.losses == pytest.approx(full.losses, abs=1e-6)
    for (k, a), b in zip(fresh.state_dict().items(), full_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    with pytest.raises(ValueError, match="lora_r"):
        train(
            _model(toy_tokenizer),
            toy_tokenizer,
            train_ex,
            val_ex,
            _config(lora_r=8, output_dir=str(tmp_path)),
            resume=True,
        )


@pytest.mark.parametrize("packing", ["bfd", "length"])
def test_lora_with_packing_matches_padded(toy_tokenizer, examples, packing):
    padded = train(_model(toy_tokenizer), toy_tokenizer, examples[:16], examples[16:], _config())
    packed = train(
        _model(toy_tokenizer), toy_tokenizer, examples[:16], examples[16:], _config(packing=packing)
    )
    if packing == "bfd":  # same batches, same loss; 'length' reorders the batches
        assert packed.losses == pytest.approx(padded.losses, abs=1e-4)
    assert packed.final_val_loss == pytest.approx(padded.final_val_loss, abs=0.05)


def test_run_writes_adapter_and_merged_model_that_load_back(toy_tokenizer, examples, tmp_path):
    model = _model(toy_tokenizer)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    toy_tokenizer.save_pretrained(base_dir)
    model, tok = load_model_and_tokenizer(base_dir, device="cpu")
    train(model, tok, examples[:16], examples[16:], _config(output_dir=str(tmp_path / "run")))
    final, merged = tmp_path / "run" / "final", tmp_path / "run" / "merged"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["r"] == 4
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    batch = {"input_ids": torch.tensor([examples[0]["input_ids"]])}
    with torch.no_grad():
        want = model(**batch).logits
        from_adapter, _ = load_model_and_tokenizer(final, device="cpu")
        from_merged, _ = load_model_and_tokenizer(merged, device="cpu")
        torch.testing.assert_close(from_adapter(**batch).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(from_merged(**batch).logits, want, atol=1e-5, rtol=0)


def test_chat_tokens_train_with_lora_by_default():
    model, tok = load_model_and_tokenizer("embedded-chat", device="cpu")
    ids = lora_token_ids(tok, "auto")
    assert sorted(ids) == [4096, 4097, 4098, 4099]
    _, base_tok = load_model_and_tokenizer(device="cpu")
    assert lora_token_ids(base_tok, "auto") == ()  # the base model has no chat tokens
    with pytest.raises(ValueError, match="not tokens"):
        lora_token_ids(base_tok, "<|nope|>")
    add_lora_from_config(model, tok, TrainConfig(lora_r=8))
    n, total = lora.trainable_parameters(model)
    assert n == 32_768 + 4 * 256  # c_attn's A and B in 4 blocks, and the 4 chat rows


def test_cli_lora_train_eval_generate_on_final_and_merged(tmp_path, capsys):
    rows = _pairs(24)
    for name, part in (("train", rows[:20]), ("val", rows[20:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    args = ["train", "--train", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.jsonl")]
    args += [
        "--out",
        str(tmp_path / "run"),
        "--lora-r",
        "8",
        "--lora-targets",
        "all-linear",
        "--max-steps",
        "3",
    ]
    assert cli.main(args) == 0
    config = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "embedded"  # not this machine's path
    outputs = []
    for folder in ("final", "merged"):
        capsys.readouterr()
        model = str(tmp_path / "run" / folder)
        assert (
            cli.main(["generate", "--model", model, "--prompt", rows[0]["prompt"], "--max-new-tokens", "8"])
            == 0
        )
        outputs.append(capsys.readouterr().out)
        assert (
            cli.main(["eval", "--model", model, "--data", str(tmp_path / "val.jsonl"), "--n-generate", "2"])
            == 0
        )
        outputs.append(json.loads(capsys.readouterr().out)["loss"])
    assert outputs[0] == outputs[2]  # the adapter and the merged model generate the same text
    assert outputs[1] == pytest.approx(outputs[3], abs=1e-5)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_lora_on_two_processes_matches_one(tmp_path, toy_tokenizer):
    model = build_model("gpt2", toy_tokenizer, **SIZE)
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    model.save_pretrained(tmp_path / "model")
    toy_tokenizer.save_pretrained(tmp_path / "model")
    _write_jsonl(tmp_path / "train.jsonl", 25)
    _write_jsonl(tmp_path / "val.jsonl", 6, offset=100)

    def args(out: str, batch: int) -> list[str]:
        return [
            "train", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.jsonl"),
            "--val", str(tmp_path / "val.jsonl"), "--out", str(tmp_path / out), "--lr", "3e-3",
            "--batch-size", str(batch), "--grad-accum", "2", "--epochs", "2", "--precision", "fp32",
            "--seed", "0", "--device", "cpu", "--lora-r", "4",
        ]  # fmt: skip

    assert cli.main(args("one", 8)) == 0
    launch = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29547", "--no-python"]
    _run_launcher([*launch, sys.executable, "-m", "lumorik_sft.cli", *args("two", 4)])
    # compare the merged models (plain HF folders) and the histories
    for name in ("one", "two"):
        (tmp_path / name / "final").rename(tmp_path / name / "adapter")
        (tmp_path / name / "merged").rename(tmp_path / name / "final")
    _assert_same_training(tmp_path, "one", "two")
