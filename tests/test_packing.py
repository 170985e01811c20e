"""Packing: same loss as padding, no attention across examples, deterministic and resumable.

Tiny GPT-2 / Llama / Qwen2 models on toy pairs; every test runs in about a second on a CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from lumorik_sft.encoding import IGNORE_INDEX, SFTCollator, encode_records
from lumorik_sft.metrics import completion_nll
from lumorik_sft.models import build_model
from lumorik_sft.packing import (
    VARLEN_KEYS,
    PackedCollator,
    SegmentAttention,
    best_fit_decreasing,
    block_causal_mask,
    count_input_tokens,
    layout_cost,
    length_grouped_batches,
    make_collator,
    mask_kind_for,
    naive_packed_batch,
    plan_micro_batches,
    varlen_attention,
)
from lumorik_sft.training import TrainConfig, count_target_tokens, epoch_order, train

SIZE = {"n_layer": 2, "width": 32, "n_head": 2, "context": 128}
TEXT = ("the court found for the tenant and ordered the deposit returned "
        "with interest a sturdy navy canvas backpack with a padded laptop sleeve")
WORDS = TEXT.split()


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n: int) -> list[dict[str, str]]:
    """Mixed lengths: 1- to 24-word completions after 2- to 6-word prompts."""
    out = []
    for i in range(n):
        p = (WORDS[i % 7:] + WORDS)[: 2 + i % 5]
        c = (WORDS[i % 5:] + WORDS)[: [1, 24, 3, 17, 2, 9][i % 6]]
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
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9, 7, 8, 9, 0],
                                        [-100, -100, 7, 0, -100, 7, 0, -100, -100]]
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
        [{"input_ids": [3, 4], "labels": [-100, 4]}])
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
            chunk = examples[i:i + 8]
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
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                {"input_ids": [8, 9], "labels": [-100, 9]}]
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


@pytest.mark.parametrize("lengths", [[5, 16, 33, 1], [40], [17, 3, 64, 2, 9]])
def test_segment_attention_matches_sdpa_per_example_in_float64(lengths):
    """Forward and hand-written backward equal SDPA run on each example alone (float64),
    with segment lengths that are and are not multiples of the 16-token window."""
    torch.manual_seed(0)
    heads, dim, t = 3, 8, sum(lengths)
    bounds = (0, *itertools.accumulate(lengths))
    q, k, v = (torch.randn(heads, t, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(heads, t, dim, dtype=torch.float64)
    out = SegmentAttention.apply(q, k, v, bounds, dim ** -0.5)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    ref_out = torch.cat([F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True)
                         for s, e in zip(bounds, bounds[1:], strict=False)], dim=1)
    want = [ref_out, *torch.autograd.grad(ref_out, (q, k, v), grad)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_varlen_attention_handles_grouped_query_heads_and_bf16(toy_tokenizer, examples):
    """Llama with 2 key-value heads for 4 query heads, under bf16 autocast: the packed NLL and
    its gradients stay those of the padded batch (to bf16 precision)."""
    model = build_model("llama", toy_tokenizer, seed=0, n_layer=2, width=64, n_head=4, context=128)
    assert model.config.num_key_value_heads == 2
    chunk = examples[:6]
    results = []
    for batch in (SFTCollator(toy_tokenizer.pad_token_id)(chunk),
                  PackedCollator(toy_tokenizer.pad_token_id, mask="varlen", pad_to_multiple_of=16)(chunk)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll, n = completion_nll(model, batch)
        (nll / n).backward()
        results.append((float(nll.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (a, ga), (b, gb) = results
    assert b == pytest.approx(a, rel=2e-2)
    assert float(torch.nn.functional.cosine_similarity(ga, gb, dim=0)) > 0.99


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_varlen_attention_gets_the_longest_example_from_the_batch(toy_tokenizer, examples, arch_name,
                                                                  monkeypatch):
    """completion_nll reads the longest example once per batch and every layer's attention
    receives it as ``max_length_q`` (on a GPU the attention then never waits for the device)."""
    from transformers import AttentionInterface

    from lumorik_sft import packing

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((kwargs.get("max_length_q"), kwargs.get("max_length_k")))
        return packing.varlen_sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, packing.VARLEN_ATTENTION, spy)
    model = _model(toy_tokenizer, arch_name)
    features = examples[:5]
    batch = PackedCollator(toy_tokenizer.pad_token_id, mask="varlen", pad_to_multiple_of=64)(features)
    longest = max(max(len(f["input_ids"]) for f in features), int(batch["cu_seq_lens_q"][-1])
                  - sum(len(f["input_ids"]) for f in features))  # the padding is a segment too
    with torch.no_grad():
        completion_nll(model, batch)
    assert seen == [(longest, longest)] * model.config.num_hidden_layers


def test_cuda_varlen_passes_offsets_and_longest_to_pytorch(monkeypatch):
    """The GPU path's call into torch.nn.attention.varlen.varlen_attn, with a stand-in kernel
    (this machine has no GPU): [T, H, D] inputs in bf16, int32 offsets, the longest example."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    from lumorik_sft import packing

    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        calls.append((q.shape, q.dtype, cu_q.dtype, cu_q.tolist(), max_q, max_k, options))
        return torch.zeros_like(q)

    monkeypatch.setattr(varlen, "varlen_attn", fake)
    q, k, v = (torch.randn(1, 4, 12, 8) for _ in range(3))
    cu = torch.tensor([0, 5, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packing._cuda_varlen(q, k, v, cu, 7, 8 ** -0.5)
    assert out.shape == (1, 12, 4, 8)
    shape, dtype, cu_dtype, offsets, max_q, max_k, options = calls[0]
    assert (shape, dtype, cu_dtype, offsets, max_q, max_k) == ((12, 4, 8), torch.bfloat16, torch.int32,
                                                              [0, 5, 12], 7, 7)
    assert options.get("is_causal") is True or options.get("window_size") == (-1, 0)


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


def test_varlen_refuses_a_model_that_bypasses_the_attention_interface(toy_tokenizer, examples):
    """A model whose attention never sees the boundaries must fail loudly, not leak."""
    inner = _model(toy_tokenizer)

    class Opaque(torch.nn.Module):  # forwards ids and positions only: boundaries are lost
        config = inner.config

        def forward(self, input_ids, position_ids=None, **kwargs):
            return inner(input_ids=input_ids, position_ids=position_ids)

    batch = PackedCollator(toy_tokenizer.pad_token_id, mask="varlen")(examples[:4])
    with torch.no_grad(), pytest.raises(RuntimeError, match="did not call the varlen attention"):
        completion_nll(Opaque(), batch)
    assert inner.config._attn_implementation == "sdpa"


def _max_gap_to_unpacked(model, features, batch, use_cache):
    """Largest logit difference between each example alone and the same example in `batch`."""
    keys = ("input_ids", "attention_mask", "position_ids", *VARLEN_KEYS)
    varlen = varlen_attention(model) if "cu_seq_lens_q" in batch else contextlib.nullcontext()
    with torch.no_grad():
        inputs = {k: batch[k] for k in keys if k in batch}
        with varlen:
            logits = model(**inputs, use_cache=use_cache).logits
        gap = 0.0
        for f in features:
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            n = len(f["input_ids"])
            # Find the example in the packed rows by its token ids and positions.
            ids, pos = batch["input_ids"], batch["position_ids"]
            for r in range(ids.shape[0]):
                for s in range(ids.shape[1] - n + 1):
                    if pos[r, s] == 0 and ids[r, s:s + n].tolist() == list(f["input_ids"]):
                        gap = max(gap, float((logits[r, s:s + n] - alone).abs().max()))
                        break
                else:
                    continue
                break
            else:
                raise AssertionError("example not found in the packed batch")
        return gap


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_no_attention_across_examples_even_with_use_cache(toy_tokenizer, examples, arch_name):
    model = _model(toy_tokenizer, arch_name)
    features = examples[:4]
    pad = toy_tokenizer.pad_token_id
    ours = PackedCollator(pad, capacity=sum(len(f["input_ids"]) for f in features))(features)
    assert ours["input_ids"].shape[0] == 1  # all four share one row: attention could leak
    varlen = PackedCollator(pad, mask="varlen")(features)
    for use_cache in (True, False):
        assert _max_gap_to_unpacked(model, features, ours, use_cache) < 1e-4
        assert _max_gap_to_unpacked(model, features, varlen, use_cache) < 1e-4
    # The test bites: restarted position ids with a plain 2-D mask, and the use_cache=True
    # trap (no 2-D mask, but a KV cache switches Hugging Face's packing detection off).
    naive = naive_packed_batch(features, pad)
    assert _max_gap_to_unpacked(model, features, naive, use_cache=True) > 1e-2
    no_mask = {k: v for k, v in naive.items() if k != "attention_mask"}
    assert _max_gap_to_unpacked(model, features, no_mask, use_cache=True) > 1e-2


# --------------------------------------------------------------------------- training


def _config(**overrides) -> TrainConfig:
    base = {"learning_rate": 3e-3, "batch_size": 4, "grad_accum_steps": 2, "epochs": 2,
            "warmup_steps": 1, "progress": False, "log_every": 0, "eval_batch_size": 8}
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
def test_packed_training_is_deterministic_and_resumes_exactly(
    toy_tokenizer, examples, tmp_path, packing
):
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
        train(_model(toy_tokenizer), toy_tokenizer, train_ex, val_ex,
              _config(packing="none", epochs=2, output_dir=str(tmp_path)), resume=True)


def test_packed_step_without_supervised_tokens_is_skipped(toy_tokenizer, examples):
    blank = [{**ex, "labels": [IGNORE_INDEX] * len(ex["labels"])} for ex in examples[:4]]
    with pytest.warns(UserWarning, match="no supervised token"):
        result = train(_model(toy_tokenizer), toy_tokenizer, blank + examples[4:8], None,
                       _config(packing="bfd", epochs=1, grad_accum_steps=1, shuffle=False))
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
            float(completion_nll(model, padded)[0]), abs=1e-4)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        TrainConfig(pad_to_multiple_of=0)
