"""Notebook 10's LoRA lab (`lumorik_sft.course.lora_lab`): counts, optimizer memory, forgetting, runs.

Tiny seeded models built in-process; the embedded model's numbers are checked when it is present.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lumorik_sft import encoding
from lumorik_sft.config import TrainConfig
from lumorik_sft.course import lora_lab, synthetic
from lumorik_sft.course.plots import figure_problems
from lumorik_sft.lora import LoraSettings, add_lora, lora_layers, merged_copy, save_adapter
from lumorik_sft.models import (
    build_model,
    count_parameters,
    embedded_model_path,
    has_embedded_model,
    load_model_and_tokenizer,
    train_bpe_tokenizer,
)

WIDTH = 32


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread."""


def _model(tokenizer, arch="gpt2", seed=0):
    return build_model(arch, tokenizer, n_layer=2, width=WIDTH, n_head=2, context=64, seed=seed)


# --------------------------------------------------------------------------- parameter arithmetic


def test_parameter_arithmetic_counts_equal_the_formula_and_hand_computed_numbers(toy_tokenizer):
    model = _model(toy_tokenizer)
    rows = lora_lab.parameter_arithmetic(
        model, [LoraSettings(r=4), LoraSettings(r=4, targets=("all-linear",)), LoraSettings(r=2)]
    )
    # GPT-2 width 32, 2 blocks: c_attn 32 -> 96 gives 4 * (32 + 96) = 512 per block;
    # all-linear adds attn.c_proj 4 * 64, mlp.c_fc 4 * (32 + 128) and mlp.c_proj 4 * (128 + 32).
    assert [r["trainable"] for r in rows] == [1024, 2 * (512 + 256 + 640 + 640), 512]
    assert [r["formula"] for r in rows] == [r["trainable"] for r in rows]
    assert [r["layers"] for r in rows] == [2, 8, 2]
    assert rows[0]["base"] == count_parameters(model)
    assert rows[0]["percent"] == pytest.approx(100 * 1024 / count_parameters(model))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched


def test_formula_handles_separate_projections(toy_tokenizer):
    model = _model(toy_tokenizer, "llama")  # q, k, v as three nn.Linear, stored [out, in]
    expected = sum(
        4 * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if n.endswith("_proj") and "self_attn" in n and not n.endswith("o_proj")
    )
    assert lora_lab.formula_trainable(model, LoraSettings(r=4)) == expected
    (row,) = lora_lab.parameter_arithmetic(model, [LoraSettings(r=4)])
    assert row["trainable"] == expected


@pytest.mark.skipif(not has_embedded_model(), reason="the embedded base model is not installed")
def test_embedded_model_numbers_quoted_by_the_notebook():
    model, _ = load_model_and_tokenizer()
    attention, all_linear = lora_lab.parameter_arithmetic(
        model, [LoraSettings(r=8), LoraSettings(r=8, targets=("all-linear",))]
    )
    assert (attention["trainable"], round(attention["percent"], 2)) == (32768, 0.77)
    assert (all_linear["trainable"], round(all_linear["percent"], 2)) == (131072, 3.07)


# --------------------------------------------------------------------------- optimizer memory


def test_optimizer_state_is_two_fp32_moments_per_trainable_parameter(toy_tokenizer):
    model = _model(toy_tokenizer)
    full = lora_lab.optimizer_state_bytes(model, TrainConfig(learning_rate=1e-3))
    low = lora_lab.optimizer_state_bytes(model, TrainConfig(learning_rate=1e-3, lora_r=4))
    n_tensors = len(list(model.parameters()))
    assert full["trainable"] == count_parameters(model) and low["trainable"] == 1024
    assert full["formula"] == 8 * count_parameters(model) and low["formula"] == 8 * 1024
    # Measured from the state: the moments plus one small step counter per parameter tensor.
    assert full["formula"] <= full["measured"] <= full["formula"] + 8 * n_tensors
    assert low["formula"] <= low["measured"] <= low["formula"] + 8 * 2 * 2  # A and B in 2 blocks
    assert not lora_layers(model)  # measured on a copy


# --------------------------------------------------------------------------- forgetting


def _reference_perplexity(model, blocks) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            ids = torch.tensor([b["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def test_forgetting_perplexity_is_token_weighted_over_blocks_of_any_length(toy_tokenizer):
    model = _model(toy_tokenizer).eval()
    texts = ["def parse(text):\n    return text.split()\n", "class Widget:\n    size = 3\n"] * 3
    ids = [toy_tokenizer(t)["input_ids"] for t in texts]
    blocks = [{"input_ids": x, "attention_mask": [1] * len(x), "labels": x} for x in ids]
    assert len({len(x) for x in ids}) > 1  # padding is exercised
    got = lora_lab.forgetting_perplexity(model, blocks=blocks, batch_size=4)
    assert got == pytest.approx(_reference_perplexity(model, blocks), rel=1e-5)
    model.train()
    lora_lab.forgetting_perplexity(model, blocks=blocks)
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="no documentation blocks"):
        lora_lab.forgetting_perplexity(model, blocks=[])
    with pytest.raises(ValueError, match="tokenizer"):
        lora_lab.forgetting_perplexity(model)


@pytest.mark.skipif(not has_embedded_model(), reason="the embedded base model is not installed")
def test_held_out_documentation_is_what_the_recipe_held_out(toy_tokenizer):
    manifest = json.loads((embedded_model_path() / "corpus_manifest.json").read_text())
    from lumorik_sft.basemodel.corpus import DEFAULT_SOURCES

    # The language reference alone (one module to parse; the stdlib takes seconds): its held-out topics.
    modules = [d.module for d in lora_lab.held_out_documents(sources=DEFAULT_SOURCES[1:2])]
    assert modules and set(modules) <= set(manifest["val_modules"])
    texts = [d.text for d in lora_lab.held_out_documents(sources=DEFAULT_SOURCES[1:2])]
    blocks = lora_lab.documentation_blocks(toy_tokenizer, 64, n_blocks=5, texts=texts)
    assert len(blocks) == 5 and all(
        len(b["input_ids"]) == 64 and b["labels"] == b["input_ids"] for b in blocks
    )


# --------------------------------------------------------------------------- the comparison


@pytest.fixture(scope="module")
def products():
    records = synthetic.product_descriptions(28, seed=0)
    tokenizer = train_bpe_tokenizer([r["prompt"] + "\n" + r["completion"] for r in records], vocab_size=400)
    examples, _ = encoding.encode_records(records, tokenizer, max_length=64)
    return records, tokenizer, examples


def test_best_recorded_rate_is_the_lowest_recorded_validation_loss():
    """Notebook 10 trains each setting once, at the rate this returns: it must be the sweep's winner."""
    assert list(lora_lab.RECORDED_SWEEP) == [
        "full FT",
        "LoRA r=8 attention",
        "LoRA r=8 all-linear",
        "LoRA r=32 all-linear",
    ]
    for label, sweep in lora_lab.RECORDED_SWEEP.items():
        assert len(sweep) >= 2 and all(math.isfinite(v) for v in sweep.values()), label
        assert sweep[lora_lab.best_recorded_rate(label)] == min(sweep.values()), label
    assert lora_lab.best_recorded_rate("LoRA r=8 attention") == 1e-2


def test_compare_runs_picks_each_settings_best_rate_and_measures_it(products):
    records, tokenizer, examples = products
    base = build_model("gpt2", tokenizer, n_layer=1, width=16, n_head=2, context=64, seed=0)
    before_weights = {k: v.clone() for k, v in base.state_dict().items()}
    specs = [
        lora_lab.RunSpec("full FT", (1e-4, 3e-3)),
        lora_lab.RunSpec("LoRA r=2", (1e-4, 3e-2), lora_r=2, lora_targets="all-linear"),
    ]
    rows = lora_lab.compare_runs(
        lambda: _copy(base),
        tokenizer,
        examples[:20],
        examples[20:],
        records[20:],
        specs,
        n_generate=2,
        max_new_tokens=4,
        doc_blocks=examples[20:],
        epochs=1,
        batch_size=4,
        seed=0,
    )
    full, low = rows
    for row in rows:
        assert row["learning_rate"] == min(row["sweep"], key=row["sweep"].get)
        assert row["val_loss"] == row["sweep"][row["learning_rate"]] < row["val_loss_before"]
        assert row["steps"] == 5 and row["seconds_per_step"] > 0
        assert row["forgetting"] == pytest.approx(row["doc_ppl_after"] / row["doc_ppl_before"] - 1)
        assert row["fidelity"] is not None and 0 <= row["fidelity"] <= 1
    assert full["trainable"] == count_parameters(base) and full["percent"] == pytest.approx(100)
    assert low["trainable"] == lora_lab.formula_trainable(base, LoraSettings(r=2, targets=("all-linear",)))
    assert low["optimizer_bytes"] < full["optimizer_bytes"]
    assert len(lora_layers(low["model"])) == 4 and not lora_layers(full["model"])
    assert full["doc_ppl_before"] == low["doc_ppl_before"]
    # The winner's perplexity after training is the returned model's own.
    assert lora_lab.forgetting_perplexity(low["model"], blocks=examples[20:]) == pytest.approx(
        low["doc_ppl_after"]
    )
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before_weights.items())  # factory copies
    table = lora_lab.comparison_table(rows)
    assert "full FT" in table and "LoRA r=2" in table and len(table.splitlines()) == 4
    with pytest.raises(ValueError, match="specs is empty"):
        lora_lab.compare_runs(base, tokenizer, examples, examples, records, [])


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_run_spec_defaults_alpha_to_twice_the_rank():
    assert lora_lab.RunSpec("full", (1e-3,)).config(epochs=2) == {"epochs": 2}
    lora = lora_lab.RunSpec("r8", (1e-2,), lora_r=8, lora_targets="all-linear").config(epochs=2)
    assert lora == {"epochs": 2, "lora_r": 8, "lora_targets": "all-linear", "lora_alpha": 16.0}


def _row(label, **values):
    row = {
        "label": label,
        "learning_rate": 1e-3,
        "trainable": 10,
        "percent": 1.0,
        "optimizer_bytes": 2**20,
        "peak_rss_mb": 12.0,
        "seconds_per_step": 0.1,
        "val_loss": 1.5,
        "bleu": 20.0,
        "fidelity": 0.9,
        "doc_ppl_after": 30.0,
        "forgetting": 0.05,
    }
    row.update(values)
    return row


def test_plot_comparison_draws_four_labelled_panels():
    rows = [
        _row("full FT"),
        _row("LoRA r=8 attention", optimizer_bytes=2**14, fidelity=None, forgetting=-0.01),
    ]
    fig = lora_lab.plot_comparison(rows)
    assert figure_problems(fig) == []
    axes = fig.axes
    assert len(axes) == 4 and all(ax.get_ylabel() and ax.get_xlabel() for ax in axes)
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["full FT", "LoRA r=8 attention"]
    assert [b.get_height() for b in axes[0].patches] == [1.0, 2**14 / 2**20]
    assert "n/a" in [t.get_text() for t in axes[2].texts]  # a missing fidelity is said, not drawn as 0


def test_merged_model_gives_the_same_logits_and_the_adapter_is_small(toy_tokenizer, tmp_path):
    model = add_lora(_model(toy_tokenizer), LoraSettings(r=4))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)  # B = 0 would make the test trivially pass
    ids = torch.randint(0, len(toy_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    merged = merged_copy(model)
    assert lora_lab.max_logit_difference(model, merged, ids) < 1e-5
    assert lora_lab.max_logit_difference(model, _model(toy_tokenizer), ids) > 1e-3
    adapter = lora_lab.folder_bytes(save_adapter(model, tmp_path / "adapter"))
    merged.save_pretrained(tmp_path / "merged")
    assert 1024 * 4 < adapter < lora_lab.folder_bytes(tmp_path / "merged") / 5
