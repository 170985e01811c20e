"""LoRA (`lumorik_sft.lora`): counts, training, merging, and interchange with Hugging Face PEFT.

Tiny seeded GPT-2, Llama and Qwen2 models built in-process; the PEFT tests skip when peft is not
installed (it is an optional extra: ``pip install -e .[peft]``).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from lumorik_sft.lora import (
    ADAPTER_CONFIG,
    ADAPTER_LAYERS,
    LoraLinear,
    LoraSettings,
    TrainableTokens,
    adapter_state_dict,
    add_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    merged_copy,
    resolve_targets,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)
from lumorik_sft.models import build_model, count_parameters, has_embedded_model, load_model_and_tokenizer

WIDTH = 32
TOKENS = (3, 7)  # not the pad id 1: Llama's embedding zeroes the pad row's gradient
# Per block, what each preset wraps (leaf names), and the names that must stay unwrapped.
WRAPPED = {
    ("gpt2", "attention"): ["c_attn"],
    ("gpt2", "all-linear"): ["c_attn", "c_proj", "c_fc", "c_proj"],
    ("llama", "attention"): ["q_proj", "k_proj", "v_proj"],
    ("llama", "all-linear"): ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
WRAPPED.update({("qwen2", t): WRAPPED["llama", t] for t in ("attention", "all-linear")})


# PEFT's own call into transformers 5 warns; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread."""


def _model(tokenizer, arch: str, seed: int = 0):
    return build_model(arch, tokenizer, n_layer=2, width=WIDTH, n_head=2, context=64, seed=seed)


def _lora(tokenizer, arch: str, **settings):
    """A tiny model with LoRA (r=4 unless told), trainable token rows `TOKENS` by default."""
    return add_lora(_model(tokenizer, arch), LoraSettings(**{"r": 4, "trainable_tokens": TOKENS, **settings}))


def _ids(tokenizer) -> torch.Tensor:
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, :2] = torch.tensor(TOKENS)  # the trainable tokens are read by the embedding
    return ids


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize(model, seed: int = 1) -> None:
    """Give every B (and the token rows) random values, in ours or PEFT's model: a non-trivial adapter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def _in_out(layer: torch.nn.Module) -> tuple[int, int]:
    return (layer.nx, layer.nf) if isinstance(layer, Conv1D) else (layer.in_features, layer.out_features)


# --------------------------------------------------------------------------- what is trained


@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_trainable_parameters_equal_the_formula(toy_tokenizer, arch, targets):
    model = _model(toy_tokenizer, arch)
    base_total = count_parameters(model)
    add_lora(model, LoraSettings(r=4, targets=(targets,), trainable_tokens=TOKENS))
    layers = lora_layers(model)
    assert sorted(n.rsplit(".", 1)[-1] for n in layers) == sorted(WRAPPED[arch, targets] * 2)  # 2 blocks
    expected = sum(4 * sum(_in_out(layer.base_layer)) for layer in layers.values()) + len(TOKENS) * WIDTH
    trainable, total = trainable_parameters(model)
    assert trainable == expected and total == base_total + expected
    if arch == "gpt2":  # the fused q, k, v projection: in = width, out = 3 * width
        c_attn = layers["transformer.h.0.attn.c_attn"]
        assert c_attn.fan_in_fan_out and _in_out(c_attn.base_layer) == (WIDTH, 3 * WIDTH)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n or n.endswith("trainable_tokens_delta") for n in names)
    assert not any("lm_head" in n for n in layers)


def test_embedded_model_numbers():
    """The issue's arithmetic, on the shipped model: r=8 on c_attn ~33k (0.8%), on all linear ~131k (3%)."""
    if not has_embedded_model():
        pytest.skip("the embedded model is not shipped in this checkout")
    counts = {}
    for targets in ("attention", "all-linear"):
        model, _ = load_model_and_tokenizer(device="cpu")
        base = count_parameters(model)
        counts[targets] = trainable_parameters(add_lora(model, LoraSettings(r=8, targets=(targets,))))[0]
        print(f"{targets}: {counts[targets]:,} trainable of {base:,} ({counts[targets] / base:.2%})")
    assert counts == {"attention": 8 * (256 + 768) * 4, "all-linear": 8 * (256 * 4 + 512 + 1280 * 2) * 4}
    assert counts == {"attention": 32_768, "all-linear": 131_072}


def test_presets_resolve_to_names(toy_tokenizer):
    assert resolve_targets(_model(toy_tokenizer, "gpt2"), ("all-linear",)) == ["c_attn", "c_fc", "c_proj"]
    llama = _model(toy_tokenizer, "llama")
    assert resolve_targets(llama, ("attention",)) == ["k_proj", "q_proj", "v_proj"]
    assert resolve_targets(llama, ("self_attn.o_proj",)) == ["self_attn.o_proj"]
    for bad in [("lm_head",), ("self_attn",), ("no_such_layer",)]:
        with pytest.raises(ValueError, match="LoRA wraps Linear/Conv1D layers other than the LM head"):
            resolve_targets(llama, bad)


def test_settings_say_how_to_fix_them():
    assert LoraSettings(targets="q_proj, v_proj").targets == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="rank must be a whole number >= 1"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="use one preset alone"):
        LoraSettings(targets=("attention", "c_fc"))
    with pytest.raises(ValueError, match=r"dropout=1\.0: must be in \[0, 1\)"):
        LoraSettings(dropout=1.0)
    with pytest.raises(ValueError, match="distinct token ids"):
        LoraSettings(trainable_tokens=(3, 3))


def test_adding_lora_twice_or_tokens_outside_the_vocabulary_is_refused(toy_tokenizer):
    model = add_lora(_model(toy_tokenizer, "gpt2"), LoraSettings())
    with pytest.raises(ValueError, match="has LoRA layers already"):
        add_lora(model, LoraSettings())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        add_lora(_model(toy_tokenizer, "gpt2"), LoraSettings(trainable_tokens=(len(toy_tokenizer),)))


def test_fresh_lora_leaves_the_logits_unchanged(toy_tokenizer, arch):
    ids = _ids(toy_tokenizer)
    model = _model(toy_tokenizer, arch)
    before = _logits(model, ids)
    add_lora(model, LoraSettings(r=4, targets=("all-linear",), trainable_tokens=TOKENS))
    assert all(torch.count_nonzero(layer.lora_B.weight) == 0 for layer in lora_layers(model).values())
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-6)


def test_training_changes_only_lora_and_the_chosen_rows(toy_tokenizer, arch):
    ids = _ids(toy_tokenizer)
    model = _lora(toy_tokenizer, arch)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter = set(adapter_state_dict(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == adapter, f"changed but not LoRA: {sorted(changed - adapter)}"
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, TrainableTokens)
    rows = embedding.weight_with_tokens().detach()
    untouched = [i for i in range(len(toy_tokenizer)) if i not in TOKENS]
    assert torch.equal(rows[untouched], embedding.base_layer.weight[untouched])
    assert not torch.equal(rows[list(TOKENS)], embedding.base_layer.weight[list(TOKENS)])


def test_a_seeded_init_gives_the_same_a_and_leaves_the_global_rng_alone(toy_tokenizer):
    def a_matrices(seed):
        model = add_lora(_model(toy_tokenizer, "llama"), LoraSettings(r=4, seed=seed))
        return [layer.lora_A.weight for layer in lora_layers(model).values()]

    rng = torch.get_rng_state()
    first, again, other = a_matrices(5), a_matrices(5), a_matrices(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert all(a.abs().max() <= 1 / WIDTH**0.5 for a in first)  # uniform in +-1/sqrt(in), as in PEFT
    model = _model(toy_tokenizer, "llama")  # build_model seeds the global RNG itself: restore ours
    torch.set_rng_state(rng)
    add_lora(model, LoraSettings(r=4, seed=5))
    assert torch.equal(torch.get_rng_state(), rng)


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    layer = LoraLinear(base, r=4, alpha=8, dropout=0.5, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    reference = base(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2.0
    layer.eval()
    torch.testing.assert_close(layer(x), reference)
    layer.train()
    assert not torch.allclose(layer(x), reference)
    assert not torch.allclose(layer(x), layer(x))


# --------------------------------------------------------------------------- merging


def test_merged_equals_unmerged_and_unmerge_restores_the_weights(toy_tokenizer, arch):
    ids = _ids(toy_tokenizer)
    model = _lora(toy_tokenizer, arch, targets=("all-linear",))
    _randomize(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if k not in adapter_state_dict(model)}
    unmerged = _logits(model, ids)
    assert not torch.allclose(unmerged, _logits(_model(toy_tokenizer, arch), ids), atol=1e-3)
    merge_lora(merge_lora(model))  # merging twice adds the update once
    merged = _logits(model, ids)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert not torch.equal(model.get_input_embeddings().base_layer.weight, base_weights[_embedding_key(arch)])
    unmerge_lora(model)
    for key, weight in model.state_dict().items():
        if key in base_weights:
            torch.testing.assert_close(weight, base_weights[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, ids), unmerged, rtol=0, atol=1e-5)


def _embedding_key(arch: str) -> str:
    return "transformer.wte.base_layer.weight" if arch == "gpt2" else "model.embed_tokens.base_layer.weight"


def test_a_merged_copy_saves_as_a_plain_hugging_face_model(toy_tokenizer, arch, tmp_path):
    ids = _ids(toy_tokenizer)
    model = _lora(toy_tokenizer, arch)
    _randomize(model)
    expected = _logits(model, ids)
    plain = merged_copy(model)
    assert not any(isinstance(m, ADAPTER_LAYERS) for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters())
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("lora" in k or "base_layer" in k for k in reloaded.state_dict())
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=0, atol=1e-5)
    assert lora_layers(model) and not any(layer.merged for layer in lora_layers(model).values())


# --------------------------------------------------------------------------- PEFT's format


def test_save_adapter_writes_peft_names_and_fields(toy_tokenizer, tmp_path):
    from safetensors.torch import load_file

    model = _lora(toy_tokenizer, "gpt2", alpha=8)
    save_adapter(model, tmp_path, base_name_or_path="embedded")
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules")} == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["c_attn"],
    }
    assert config["fan_in_fan_out"] and config["base_model_name_or_path"] == "embedded"
    assert config["bias"] == "none" and config["trainable_token_indices"] == list(TOKENS)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    shapes = {k.removeprefix("base_model.model.transformer."): tuple(v.shape) for k, v in tensors.items()}
    assert shapes == {
        "h.0.attn.c_attn.lora_A.weight": (4, WIDTH),
        "h.0.attn.c_attn.lora_B.weight": (3 * WIDTH, 4),
        "h.1.attn.c_attn.lora_A.weight": (4, WIDTH),
        "h.1.attn.c_attn.lora_B.weight": (3 * WIDTH, 4),
        "wte.token_adapter.trainable_tokens_delta": (len(TOKENS), WIDTH),  # PEFT's names
    }
    assert all(k.startswith("base_model.model.transformer.") for k in tensors)


def test_our_adapter_round_trips(toy_tokenizer, arch, tmp_path):
    ids = _ids(toy_tokenizer)
    model = _lora(toy_tokenizer, arch, alpha=12)
    _randomize(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(_model(toy_tokenizer, arch), tmp_path)
    assert loaded.lora_settings == model.lora_settings
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-6)


def test_an_adapter_using_what_we_do_not_implement_is_refused(toy_tokenizer, tmp_path):
    model = add_lora(_model(toy_tokenizer, "gpt2"), LoraSettings(r=4))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"uses \['use_dora'\]"):
        load_adapter(_model(toy_tokenizer, "gpt2"), tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["c_fc"]}))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(_model(toy_tokenizer, "gpt2"), tmp_path)


@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_peft_loads_our_adapter_with_the_same_logits(toy_tokenizer, arch, targets, tmp_path):
    peft = pytest.importorskip("peft")
    ids = _ids(toy_tokenizer)
    ours = _lora(toy_tokenizer, arch, alpha=8, targets=(targets,))
    _randomize(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_model(toy_tokenizer, arch), tmp_path)
    difference = (_logits(theirs, ids) - _logits(ours, ids)).abs().max().item()
    print(f"{arch} {targets}: ours -> peft, max logit difference {difference:.2e}")
    assert difference <= 1e-5


@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_we_load_an_adapter_peft_saved_with_the_same_logits(toy_tokenizer, arch, targets, tmp_path):
    peft = pytest.importorskip("peft")
    ids = _ids(toy_tokenizer)
    base = _model(toy_tokenizer, arch)
    names = targets if targets == "all-linear" else resolve_targets(base, ("attention",))
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=names,
        fan_in_fan_out=arch == "gpt2",
        trainable_token_indices=list(TOKENS),
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(base, config)
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(_model(toy_tokenizer, arch), tmp_path)
    assert sorted(n.rsplit(".", 1)[-1] for n in lora_layers(ours)) == sorted(WRAPPED[arch, targets] * 2)
    difference = (_logits(ours, ids) - _logits(theirs, ids)).abs().max().item()
    print(f"{arch} {targets}: peft -> ours, max logit difference {difference:.2e}")
    assert difference <= 1e-5
