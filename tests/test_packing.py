"""Packing: same loss as padding, no attention across examples, deterministic and resumable.

Tiny GPT-2 / Llama / Qwen2 models on toy pairs; every test runs in about a second on a CPU.
"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from lumorik_sft.attention import block_causal_mask, mask_kind_for
from lumorik_sft.encoding import IGNORE_INDEX, SFTCollator, encode_records
from lumorik_sft.metrics import completion_nll
from lumorik_sft.models import build_model
from lumorik_sft.packing import (
    PackedCollator,
    best_fit_decreasing,
    count_input_tokens,
    layout_cost,
    length_grouped_batches,
    make_collator,
    plan_micro_batches,
)
from lumorik_sft.schedule import epoch_order
from lumorik_sft.training import TrainConfig, count_target_tokens, train

SIZE = {"n_layer": 2, "width": 32, "n_head": 2, "context": 128}
TEXT = (
    "the court found for the tenant and ordered the deposit returned "
    "with interest a sturdy navy canvas backpack with a padded laptop sleeve"
)
WORDS = TEXT.split()


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n: int) -> list[dict[str, str]]:
    """Mixed lengths: 1- to 24-word completions after 2- to 6-word prompts."""
    out = []
    for i in range(n):
        p = (WORDS[i % 7 :] + WORDS)[: 2 + i % 5]
        c = (WORDS[i % 5 :] + WORDS)[: [1, 24, 3, 17, 2, 9][i % 6]]
        out.append({"prompt": " ".join(p), "completion": " ".join(c)})
    return out


@pytest.fixture(scope="module")
def examples(toy_tokenizer):
    encoded, _ = encode_records(_pairs(20), toy_tokenizer)
    return encoded


def _model(tokenizer, arch="gpt2", seed=0, attn=None, dropout=0.0):
    model = build_model(arch, tokenizer, seed=seed, **SIZE)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    if attn is not None:
        model.config._attn_implementation = attn
    return model.eval()


# --------------------------------------------------------------------------- planning


def test_best_fit_decreasing_fills_rows_without_overflow():
    lengths = [9, 3, 4, 5, 1, 8, 2, 6]
    rows = best_fit_decreasing(lengths, capacity=10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == math.ceil(sum(lengths) / 10)  # 38 tokens: 4 rows is optimal here
    assert rows == best_fit_decreasing(lengths, capacity=10)  # deterministic
    assert best_fit_decreasing([9, 3, 4, 5], 9) == [[0], [3, 2], [1]]


def test_best_fit_decreasing_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="more than the row capacity"):
        best_fit_decreasing([3, 12], capacity=10)


def test_length_grouping_keeps_batch_count_and_cuts_padding():
    lengths = [5, 200, 7, 180, 6, 190, 8, 170] * 25
    order = epoch_order(len(lengths), seed=0, epoch=1)
    plain = plan_micro_batches(order, lengths, 8, "none")
    grouped = length_grouped_batches(order, lengths, 8)
    assert len(grouped) == len(plain) == 25
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))
    assert grouped == plan_micro_batches(order, lengths, 8, "length")
    assert plan_micro_batches(order, lengths, 8, "bfd") == plain  # bfd keeps the batches
    padded = layout_cost(lengths, plain, "none")
    assert padded.padding_fraction > 0.4
    assert layout_cost(lengths, grouped, "length").padding_fraction < 0.05
    assert layout_cost(lengths, plain, "bfd").padding_fraction < padded.padding_fraction / 2


# --------------------------------------------------------------------------- the collator


def test_packed_collator_golden_rows():
    features = [  # lengths 9, 3, 4 -> rows [9] and [4, 3]; pad = 1
        {"input_ids": [5, 6, 7, 8, 9, 7, 8, 9, 0], "labels": [-100, -100, 7, 8, 9, 7, 8, 9, 0]},
        {"input_ids": [5, 7, 0], "labels": [-100, 7, 0]},
        {"input_ids": [5, 6, 7, 0], "labels": [5, -100, 7, 0]},  # supervised first token
    ]
    batch = PackedCollator(pad_token_id=1)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 8, 9, 0], [5, 6, 7, 0, 5, 7, 0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 0, 1, 2, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0] * 9, [0, 0, 0, 0, 1, 1, 1, -1, -1]]
    # Each example's first label is never predicted: -100 even where it was supervised.
    assert batch["labels"].tolist() == [
        [-100, -100, 7, 8, 9, 7, 8, 9, 0],
        [-100, -100, 7, 0, -100, 7, 0, -100, -100],
    ]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.bool
    assert mask[1, 0, 5].tolist() == [False] * 4 + [True, True] + [False] * 3  # own example
    assert mask[1, 0, 8].tolist() == [False] * 7 + [True, True]  # padding sees padding only
    assert count_input_tokens(batch) == 16 and count_target_tokens(batch) == 11


def test_float_mask_is_additive_and_mask_kind_follows_attention():
    seg = torch.tensor([[0, 0, 1, -1]])
    f = block_causal_mask(seg, "float")
    assert f.dtype == torch.float32
    assert torch.equal(f == 0, block_causal_mask(seg, "bool"))
    assert mask_kind_for(None) == "bool"

    class Cfg:
        _attn_implementation = "eager"

    class M(torch.nn.Module):
        config = Cfg()

    assert mask_kind_for(M()) == "float"
    Cfg._attn_implementation = "flash_attention_2"
    assert mask_kind_for(M()) == "none"
    assert "attention_mask" not in PackedCollator(1, mask="none")(
        [{"input_ids": [3, 4], "labels": [-100, 4]}]
    )
    assert isinstance(make_collator(1, "none"), SFTCollator)
    with pytest.raises(ValueError, match="packing must be one of"):
        make_collator(1, "greedy")


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(("attn", "mask"), [("sdpa", "varlen"), ("sdpa", "bool"), ("eager", "float")])
def test_packed_nll_equals_unpacked(toy_tokenizer, examples, arch, attn, mask):
    """In float64, so that float32 summation order (different matmul shapes) cannot hide
    or fake a difference: the sums agree to ~1e-10, far inside the 1e-4 asked for."""
    model = _model(toy_tokenizer, arch, attn=attn).double()
    pad = toy_tokenizer.pad_token_id
    padded = SFTCollator(pad)
    assert make_collator(pad, "bfd", model).mask == ("float" if attn == "eager" else "varlen")
    packed = PackedCollator(pad, mask=mask)
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            chunk = examples[i : i + 8]
            ref, n_ref = completion_nll(model, padded(chunk))
            batch = packed(chunk)
            assert batch["input_ids"].numel() < padded(chunk)["input_ids"].numel()
            if mask == "varlen":  # one row, not a single padding token
                assert batch["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in chunk))
            got, n_got = completion_nll(model, batch)
            assert n_got == n_ref
            assert float(got) == pytest.approx(float(ref), abs=1e-8)
    assert model.config._attn_implementation == attn  # restored after each varlen batch


def test_varlen_row_golden_offsets():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = PackedCollator(1, mask="varlen")(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1]]
    rounded = PackedCollator(1, mask="varlen", pad_to_multiple_of=4)(features)
    assert rounded["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 1, 1]]
    assert rounded["cu_seq_lens_q"].tolist() == [0, 3, 5, 8]  # padding: a segment of its own
    assert rounded["labels"][0, 5:].tolist() == [-100] * 3
    assert rounded["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]


def test_evaluation_slices_block_masked_rows_and_keeps_a_padding_free_row_whole(toy_tokenizer, examples):
    """Block-masked packed rows are independent, so evaluation may run them a row at a time;
    a padding-free row (all examples in one) is never cut."""
    from lumorik_sft.metrics import _row_slices, evaluate_loss

    model = _model(toy_tokenizer).double()
    pad = toy_tokenizer.pad_token_id
    rows = PackedCollator(pad, capacity=48)(examples[:10])
    flat = PackedCollator(pad, mask="varlen")(examples[:10])
    assert rows["input_ids"].shape[0] > 1 and rows["attention_mask"].dim() == 4
    assert len(list(_row_slices(rows, 1))) == rows["input_ids"].shape[0]
    assert len(list(_row_slices(flat, 1))) == 1
    whole = evaluate_loss(model, [rows], tokens_per_forward=None)
    for batch in (rows, flat):
        sliced = evaluate_loss(model, [batch], tokens_per_forward=1)
        assert sliced.n_tokens == whole.n_tokens
        assert sliced.nll_sum == pytest.approx(whole.nll_sum, rel=1e-10)


# --------------------------------------------------------------------------- training


def _config(**overrides) -> TrainConfig:
    base = {
        "learning_rate": 3e-3,
        "batch_size": 4,
        "grad_accum_steps": 2,
        "epochs": 2,
        "warmup_steps": 1,
        "progress": False,
        "log_every": 0,
        "eval_batch_size": 8,
    }
    return TrainConfig(**{**base, **overrides})


def test_train_packed_matches_padded_loss_curve(toy_tokenizer, examples):
    train_ex, val_ex = examples[:16], examples[16:]
    padded = train(_model(toy_tokenizer), toy_tokenizer, train_ex, val_ex, _config())
    packed = train(_model(toy_tokenizer), toy_tokenizer, train_ex, val_ex, _config(packing="bfd"))
    assert packed.losses == pytest.approx(padded.losses, abs=1e-4)
    assert packed.final_val_loss == pytest.approx(padded.final_val_loss, abs=1e-4)
    assert [s["tokens"] for s in packed.steps] == [s["tokens"] for s in padded.steps]
    assert [s["input_tokens"] for s in packed.steps] == [s["input_tokens"] for s in padded.steps]


@pytest.mark.parametrize("packing", ["bfd", "length"])
def test_packed_training_is_deterministic_and_resumes_exactly(toy_tokenizer, examples, tmp_path, packing):
    train_ex, val_ex = examples[:16], examples[16:]
    full_model = _model(toy_tokenizer, dropout=0.1)  # dropout on: resume restores the RNG too
    model_b = _model(toy_tokenizer, dropout=0.1)
    full = train(full_model, toy_tokenizer, train_ex, val_ex, _config(packing=packing, epochs=2))
    assert len(full.steps) == 4

    def stop_at_3(event):
        if event["event"] == "step" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    config = _config(packing=packing, epochs=2, output_dir=str(tmp_path))
    first = train(model_b, toy_tokenizer, train_ex, val_ex, config, callback=stop_at_3)
    assert first.interrupted and first.global_step == 3
    fresh = _model(toy_tokenizer, seed=7, dropout=0.1)
    second = train(fresh, toy_tokenizer, train_ex, val_ex, config, resume=True)
    assert second.losses == pytest.approx(full.losses, abs=1e-6)
    for (k, a), b in zip(fresh.state_dict().items(), full_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    with pytest.raises(ValueError, match="packing"):
        train(
            _model(toy_tokenizer),
            toy_tokenizer,
            train_ex,
            val_ex,
            _config(packing="none", epochs=2, output_dir=str(tmp_path)),
            resume=True,
        )


def test_packed_step_without_supervised_tokens_is_skipped(toy_tokenizer, examples):
    blank = [{**ex, "labels": [IGNORE_INDEX] * len(ex["labels"])} for ex in examples[:4]]
    with pytest.warns(UserWarning, match="no supervised token"):
        result = train(
            _model(toy_tokenizer),
            toy_tokenizer,
            blank + examples[4:8],
            None,
            _config(packing="bfd", epochs=1, grad_accum_steps=1, shuffle=False),
        )
    assert result.skipped_steps == 1 and result.global_step == 1
    assert all(math.isfinite(loss) for loss in result.losses)


def test_config_rejects_unknown_packing():
    with pytest.raises(ValueError, match="packing must be one of"):
        TrainConfig(packing="greedy")


def test_wider_rows_hold_more_examples_and_keep_the_loss(toy_tokenizer, examples):
    model = _model(toy_tokenizer).double()  # float64: layouts must agree beyond fp32 rounding
    chunk = examples[:8]
    narrow = PackedCollator(toy_tokenizer.pad_token_id, mask="bool")(chunk)
    wide = PackedCollator(toy_tokenizer.pad_token_id, mask="bool", capacity=128)(chunk)
    assert wide["input_ids"].shape[0] < narrow["input_ids"].shape[0]
    with torch.no_grad():
        a, n_a = completion_nll(model, narrow)
        b, n_b = completion_nll(model, wide)
    assert n_a == n_b and float(a) == pytest.approx(float(b), abs=1e-4)
    with pytest.raises(ValueError, match="pack_length"):
        TrainConfig(pack_length=0)


def test_pad_to_multiple_of_rounds_training_batches(toy_tokenizer, examples):
    model = _model(toy_tokenizer).double()  # float64: layouts must agree beyond fp32 rounding
    chunk = examples[:8]
    real = sum(len(ex["input_ids"]) for ex in chunk)
    for mode in ("none", "bfd", "length"):
        batch = make_collator(toy_tokenizer.pad_token_id, mode, model, pad_to_multiple_of=32)(chunk)
        assert batch["input_ids"].shape[1] % 32 == 0
        if mode == "bfd":  # varlen: one row, padded only up to the multiple
            assert batch["input_ids"].shape == (1, -(-real // 32) * 32)
        assert count_input_tokens(batch) == real
    padded = PackedCollator(toy_tokenizer.pad_token_id, mask="bool")(chunk)
    rounded = PackedCollator(toy_tokenizer.pad_token_id, mask="bool", pad_to_multiple_of=32)(chunk)
    with torch.no_grad():
        assert float(completion_nll(model, rounded)[0]) == pytest.approx(
            float(completion_nll(model, padded)[0]), abs=1e-4
        )
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        TrainConfig(pad_to_multiple_of=0)
