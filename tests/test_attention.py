"""Attention for packed batches: each example attends to itself only, on every kernel.

The varlen kernel (`SegmentAttention` on a CPU, PyTorch's variable-length flash attention on a
GPU) against SDPA per example, the model inputs of a packed batch, and the proof that no
example sees another, with or without a KV cache. Tiny GPT-2 / Llama models on toy pairs.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from test_packing import _model, _pairs

from lumorik_sft import attention, fused_loss
from lumorik_sft.attention import VARLEN_KEYS, SegmentAttention, model_inputs, varlen_attention
from lumorik_sft.encoding import SFTCollator, encode_records
from lumorik_sft.metrics import completion_nll
from lumorik_sft.models import build_model
from lumorik_sft.packing import PackedCollator, naive_packed_batch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples(toy_tokenizer):
    return encode_records(_pairs(20), toy_tokenizer)[0]


# --------------------------------------------------------------------------- model inputs


def test_model_inputs_pass_model_keys_and_switch_attention_for_a_padding_free_batch(toy_tokenizer, examples):
    """Bookkeeping (labels, segment_ids) stays out of the forward call; a padding-free batch
    adds its offsets and longest example and runs on the varlen attention, restored after."""
    model = _model(toy_tokenizer)
    padded = SFTCollator(toy_tokenizer.pad_token_id)(examples[:3])
    with model_inputs(model, padded) as inputs:
        assert set(inputs) == {"input_ids", "attention_mask", "use_cache"} and not inputs["use_cache"]
        assert model.config._attn_implementation == "sdpa"
    flat = PackedCollator(toy_tokenizer.pad_token_id, mask="varlen")(examples[:3])
    longest = max(len(f["input_ids"]) for f in examples[:3])
    with torch.no_grad(), model_inputs(model, flat) as inputs:
        assert "segment_ids" not in inputs and "labels" not in inputs
        assert inputs["max_length_q"] == inputs["max_length_k"] == longest
        assert model.config._attn_implementation == attention.VARLEN_ATTENTION
        model(**inputs)
    assert model.config._attn_implementation == "sdpa"
    assert attention.accepts(model, "use_cache") and not attention.accepts(model, "pixel_values")


# --------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("lengths", [[5, 16, 33, 1], [40], [17, 3, 64, 2, 9]])
def test_segment_attention_matches_sdpa_per_example_in_float64(lengths):
    """Forward and hand-written backward equal SDPA run on each example alone (float64),
    with segment lengths that are and are not multiples of the 16-token window."""
    torch.manual_seed(0)
    heads, dim, t = 3, 8, sum(lengths)
    bounds = (0, *itertools.accumulate(lengths))
    q, k, v = (torch.randn(heads, t, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(heads, t, dim, dtype=torch.float64)
    out = SegmentAttention.apply(q, k, v, bounds, dim**-0.5)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    ref_out = torch.cat(
        [
            F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True)
            for s, e in zip(bounds, bounds[1:], strict=False)
        ],
        dim=1,
    )
    want = [ref_out, *torch.autograd.grad(ref_out, (q, k, v), grad)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("loss_fn", [completion_nll, fused_loss.completion_nll], ids=["reference", "fused"])
def test_varlen_attention_handles_grouped_query_heads_and_bf16(toy_tokenizer, examples, loss_fn):
    """Llama with 2 key-value heads for 4 query heads, under bf16 autocast: the packed NLL and
    its gradients stay those of the padded batch (to bf16 precision), with either loss."""
    model = build_model("llama", toy_tokenizer, seed=0, n_layer=2, width=64, n_head=4, context=128)
    assert model.config.num_key_value_heads == 2
    chunk = examples[:6]
    results = []
    for batch in (
        SFTCollator(toy_tokenizer.pad_token_id)(chunk),
        PackedCollator(toy_tokenizer.pad_token_id, mask="varlen", pad_to_multiple_of=16)(chunk),
    ):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll, n = loss_fn(model, batch)
        (nll / n).backward()
        results.append((float(nll.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (a, ga), (b, gb) = results
    assert b == pytest.approx(a, rel=2e-2)
    assert float(torch.nn.functional.cosine_similarity(ga, gb, dim=0)) > 0.99


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_varlen_attention_gets_the_longest_example_from_the_batch(
    toy_tokenizer, examples, arch_name, monkeypatch
):
    """model_inputs reads the longest example once per batch and every layer's attention
    receives it as ``max_length_q`` (on a GPU the attention then never waits for the device)."""
    from transformers import AttentionInterface

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((kwargs.get("max_length_q"), kwargs.get("max_length_k")))
        return attention.varlen_sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.VARLEN_ATTENTION, spy)
    model = _model(toy_tokenizer, arch_name)
    features = examples[:5]
    batch = PackedCollator(toy_tokenizer.pad_token_id, mask="varlen", pad_to_multiple_of=64)(features)
    longest = max(
        max(len(f["input_ids"]) for f in features),
        int(batch["cu_seq_lens_q"][-1]) - sum(len(f["input_ids"]) for f in features),
    )  # the padding is a segment too
    with torch.no_grad():
        completion_nll(model, batch)
    assert seen == [(longest, longest)] * model.config.num_hidden_layers


def test_cuda_varlen_passes_offsets_and_longest_to_pytorch(monkeypatch):
    """The GPU path's call into torch.nn.attention.varlen.varlen_attn, with a stand-in kernel
    (this machine has no GPU): [T, H, D] inputs in bf16, int32 offsets, the longest example."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        calls.append((q.shape, q.dtype, cu_q.dtype, cu_q.tolist(), max_q, max_k, options))
        return torch.zeros_like(q)

    monkeypatch.setattr(varlen, "varlen_attn", fake)
    q, k, v = (torch.randn(1, 4, 12, 8) for _ in range(3))
    cu = torch.tensor([0, 5, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention._cuda_varlen(q, k, v, cu, 7, 8**-0.5)
    assert out.shape == (1, 12, 4, 8)
    shape, dtype, cu_dtype, offsets, max_q, max_k, options = calls[0]
    assert (shape, dtype, cu_dtype, offsets, max_q, max_k) == (
        (12, 4, 8),
        torch.bfloat16,
        torch.int32,
        [0, 5, 12],
        7,
        7,
    )
    assert options.get("is_causal") is True or options.get("window_size") == (-1, 0)


# --------------------------------------------------------------------------- no leaks


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
                    if pos[r, s] == 0 and ids[r, s : s + n].tolist() == list(f["input_ids"]):
                        gap = max(gap, float((logits[r, s : s + n] - alone).abs().max()))
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
