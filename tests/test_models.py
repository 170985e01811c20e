"""Any causal LM works: tiny GPT-2, Llama and Qwen2 models saved and reopened from a path."""

from __future__ import annotations

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
