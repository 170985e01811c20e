"""Any causal LM works: tiny GPT-2, Llama and Qwen2 models saved and reopened from a path."""

from __future__ import annotations

import json

import pytest
import torch

from lumorik_sft.encoding import SFTCollator, encode_example
from lumorik_sft.models import (
    build_model,
    count_parameters,
    load_model_and_tokenizer,
    model_config,
    prepare_tokenizer,
    resolve_device,
    train_bpe_tokenizer,
)


def test_save_and_load_any_architecture_from_a_path(toy_tokenizer, arch, tmp_path):
    model = build_model(arch, toy_tokenizer, n_layer=1, width=32, n_head=2, context=64, seed=3)
    model.save_pretrained(tmp_path)
    toy_tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model_and_tokenizer(tmp_path, device="cpu")
    expected = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    assert type(loaded).__name__ == expected[arch]
    assert tok.pad_token_id == toy_tokenizer.pad_token_id != tok.eos_token_id
    batch = SFTCollator(tok.pad_token_id)([encode_example(tok, "Question: hi", "A fever.")])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-6)


def test_build_model_is_seeded(toy_tokenizer):
    a = build_model("llama", toy_tokenizer, n_layer=1, width=32, n_head=2, seed=0)
    b = build_model("llama", toy_tokenizer, n_layer=1, width=32, n_head=2, seed=0)
    c = build_model("llama", toy_tokenizer, n_layer=1, width=32, n_head=2, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert count_parameters(a) > 0


def test_unknown_architecture_and_missing_eos(toy_tokenizer):
    with pytest.raises(ValueError, match="unknown architecture"):
        model_config("bert", toy_tokenizer)
    tok = train_bpe_tokenizer(["abc abc"] * 3, vocab_size=260)
    tok.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        prepare_tokenizer(tok)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises((OSError, ValueError)):
        load_model_and_tokenizer(tmp_path / "nope", device="cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


@pytest.mark.parametrize("name", ["/no/such/folder", "./nope", "~/nope", "runs/demo/final"])
def test_a_path_with_no_folder_is_named_as_a_path(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as exc:
        load_model_and_tokenizer(name, device="cpu")
    assert str(exc.value) == (
        f"no model folder at {name} (give a local folder with config.json, or a Hugging Face model name)"
    )


def test_a_folder_without_config_json_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config\.json, so it is not a saved model"):
        load_model_and_tokenizer(tmp_path / "empty", device="cpu")


def test_an_owner_slash_name_is_left_to_hugging_face(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # offline in tests: the hub lookup fails, with Hugging Face's message
    with pytest.raises(OSError) as exc:
        load_model_and_tokenizer("no-such-owner/no-such-model", device="cpu")
    assert "no model folder" not in str(exc.value)


def test_a_home_relative_folder_opens(toy_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    build_model("gpt2", toy_tokenizer, n_layer=1, width=32, n_head=2, context=64).save_pretrained(
        tmp_path / "m"
    )
    toy_tokenizer.save_pretrained(tmp_path / "m")
    model, _ = load_model_and_tokenizer("~/m", device="cpu")
    assert model.name_or_path == str(tmp_path / "m")


def test_gpt2_declares_its_causal_lm_loss_so_labels_warn_nothing(toy_tokenizer, capfd):
    """transformers 5 cannot map `GPT2LMHeadModel` to a loss by name and warns on the first
    `model(labels=...)`; our models name it, and the loss is the causal-LM loss."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    model = build_model("gpt2", toy_tokenizer, n_layer=1, width=16, n_head=2, context=32).eval()
    assert model.loss_type == "ForCausalLM"
    assert model.loss_function is LOSS_MAPPING["ForCausalLM"]
    ids = torch.tensor([[5, 6, 7, 8]])
    loss = model(input_ids=ids, labels=ids).loss
    logits = model(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(loss, expected)
    assert "loss_type" not in capfd.readouterr().err


def test_paths_are_shown_without_this_machines_absolute_path(tmp_path, monkeypatch):
    from lumorik_sft import models

    assert models.shown_path(models.EMBEDDED_MODEL_DIR) == "embedded"
    assert models.shown_path(str(models.EMBEDDED_CHAT_MODEL_DIR) + "/") == "embedded-chat"
    course = tmp_path / "course"
    (course / "runs").mkdir(parents=True)
    monkeypatch.chdir(course)
    assert models.shown_path(course / "runs" / "final") == "runs/final"
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "tmp"))
    assert (
        models.shown_path(tmp_path / "tmp" / "lumorik-03-x" / "checkpoint.pt")
        == "$TMPDIR/lumorik-03-x/checkpoint.pt"
    )
    assert models.shown_path("gpt2") == "gpt2"  # a hub name, or a path the student typed
    assert models.shown_path("/elsewhere/model") == "/elsewhere/model"


def test_the_embedded_model_is_named_by_its_alias_and_its_card_still_read():
    from lumorik_sft import defaults, models
    from lumorik_sft.pipeline import model_and_tokenizer

    if not models.has_embedded_model():
        pytest.skip("this checkout has no embedded model")
    _, _, source = model_and_tokenizer(None, device="cpu")
    assert source == "embedded"
    card = json.loads((models.EMBEDDED_MODEL_DIR / "card.json").read_text())
    assert defaults.recommended_learning_rate(source) == card["recommended_sft_learning_rate"]
