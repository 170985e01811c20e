"""Tests for lumorik_sft.metrics and the offline evaluate metric modules.

Run: ``.venv/bin/pytest tests/test_metrics.py -q`` (no network, tiny in-process models).
"""

from __future__ import annotations

import ast
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lumorik_sft import metrics as M

VOCAB = 64
PAD_ID = 0

# --------------------------------------------------------------------------- fixtures


def _gpt2(initializer_range: float = 0.02) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        initializer_range=initializer_range,
    )
    return GPT2LMHeadModel(cfg).eval()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    return _gpt2()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return _llama()


def make_batch(
    prompt_lens: list[int], completion_lens: list[int], seq_len: int, seed: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch: labels = ids on completion tokens, -100 on prompt and padding."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(prompt_lens)
    input_ids = torch.randint(1, VOCAB, (rows, seq_len), generator=gen)
    attention_mask = torch.zeros(rows, seq_len, dtype=torch.long)
    labels = torch.full((rows, seq_len), -100)
    for b, (p, c) in enumerate(zip(prompt_lens, completion_lens, strict=True)):
        assert p >= 1 and p + c <= seq_len
        input_ids[b, p + c :] = PAD_ID
        attention_mask[b, : p + c] = 1
        labels[b, p : p + c] = input_ids[b, p : p + c]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def manual_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Independent reference: loop over supervised positions, -log_softmax of the previous logit."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    total, count = 0.0, 0
    rows, seq_len = batch["labels"].shape
    for b in range(rows):
        for t in range(1, seq_len):
            y = int(batch["labels"][b, t])
            if y != -100:
                total -= float(logp[b, t - 1, y])
                count += 1
    return total, count


# --------------------------------------------------------------------------- chapter numbers

CHAPTER_PROBS = [0.1, 0.6, 0.3]


def test_chapter_worked_example_numbers() -> None:
    assert [round(x, 3) for x in M.token_nll(CHAPTER_PROBS)] == [2.303, 0.511, 1.204]
    assert round(M.sequence_nll(CHAPTER_PROBS), 3) == 4.017  # the chapter's 4.01 is wrong
    assert round(M.mean_nll(CHAPTER_PROBS), 3) == 1.339
    assert round(M.perplexity_from_probs(CHAPTER_PROBS), 2) == 3.82
    logprobs = [math.log(p) for p in CHAPTER_PROBS]
    assert M.perplexity_from_logprobs(logprobs) == pytest.approx(M.perplexity_from_probs(CHAPTER_PROBS))


def test_cross_entropy_on_logits_reproduces_chapter_sum() -> None:
    """Logits whose softmax gives p_true to each true token: summed cross-entropy = 4.017."""
    vocab, targets = 5, torch.tensor([3, 0, 2])
    probs = torch.empty(3, vocab, dtype=torch.float64)
    for row, (p, y) in enumerate(zip(CHAPTER_PROBS, targets.tolist(), strict=True)):
        probs[row] = (1 - p) / (vocab - 1)
        probs[row, y] = p
    logits = probs.log() + 7.0  # softmax is shift invariant: these are real logits, not log-probs
    ce = F.cross_entropy(logits, targets, reduction="sum").item()
    assert round(ce, 3) == 4.017
    assert ce == pytest.approx(M.sequence_nll(CHAPTER_PROBS), abs=1e-9)


@pytest.mark.parametrize(
    ("fn", "bad"),
    [
        (M.token_nll, [0.5, 0.0]),
        (M.token_nll, [1.5]),
        (M.sequence_nll, [-0.1]),
        (M.mean_nll, [float("nan")]),
        (M.perplexity_from_probs, [0.2, 2.0]),
        (M.perplexity_from_logprobs, [-1.0, 0.5]),
        (M.perplexity_from_logprobs, [float("nan")]),
    ],
)
def test_formulas_reject_invalid_values(fn, bad) -> None:
    with pytest.raises(ValueError, match="index"):
        fn(bad)


@pytest.mark.parametrize(
    "fn",
    [M.token_nll, M.sequence_nll, M.mean_nll, M.perplexity_from_probs, M.perplexity_from_logprobs],
)
def test_formulas_reject_empty_input(fn) -> None:
    with pytest.raises(ValueError, match="zero"):
        fn([])


# --------------------------------------------------------------------------- perplexity properties

LOGPROBS = st.lists(st.floats(min_value=-30.0, max_value=0.0), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(logprobs=LOGPROBS, data=st.data())
def test_perplexity_from_logprobs_properties(logprobs: list[float], data) -> None:
    ppl = M.perplexity_from_logprobs(logprobs)
    assert ppl == pytest.approx(math.exp(-sum(logprobs) / len(logprobs)), rel=1e-12)
    assert 1.0 <= ppl < math.inf
    shuffled = data.draw(st.permutations(logprobs))
    assert M.perplexity_from_logprobs(shuffled) == ppl  # exactly: fsum is order-free


@given(n=st.integers(min_value=1, max_value=50))
def test_perplexity_is_one_when_model_is_certain(n: int) -> None:
    assert M.perplexity_from_logprobs([0.0] * n) == 1.0
    assert M.perplexity_from_probs([1.0] * n) == 1.0


def test_perplexity_overflow_gives_inf_not_error() -> None:
    assert M.perplexity_from_logprobs([-1000.0]) == math.inf


# --------------------------------------------------------------------------- completion_nll


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_completion_nll_matches_hf_loss_times_tokens(model_name: str, request) -> None:
    model = request.getfixturevalue(model_name)
    batch = make_batch([3, 1, 6], [5, 9, 2], seq_len=12, seed=1)
    nll, n = M.completion_nll(model, batch)
    assert n == 5 + 9 + 2
    assert nll.dtype == torch.float32 and nll.ndim == 0
    with torch.no_grad():
        hf_loss = model(**batch).loss  # HF averages over the same shifted, unmasked tokens
    assert nll.item() == pytest.approx(hf_loss.item() * n, abs=1e-4)
    ref_total, ref_count = manual_nll(model, batch)
    assert n == ref_count
    assert nll.item() == pytest.approx(ref_total, abs=1e-4)


class _FullLogitsOnly(torch.nn.Module):
    """A causal LM that knows nothing of logits_to_keep (older transformers, plain modules)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class _BrokenKeep(torch.nn.Module):
    """Takes logits_to_keep but only understands an int (the transformers 4.x behaviour)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        return type("Out", (), {"logits": logits[:, slice(-logits_to_keep, None)]})()


@pytest.mark.parametrize("wrap", [None, _FullLogitsOnly, _BrokenKeep])
def test_completion_nll_selected_head_rows_equal_full_logits(gpt2, wrap) -> None:
    """Only supervised positions go through the LM head; the NLL is that of the full logits,
    also after rounding the kept rows up to a multiple of 64, and for models that cannot
    select rows (they get the full logits, indexed)."""
    model = gpt2 if wrap is None else wrap(gpt2)
    batch = make_batch([3, 1, 6, 2], [5, 9, 2, 7], seq_len=12, seed=5)
    nll, n = M.completion_nll(model, batch)
    ref, ref_n = manual_nll(gpt2, batch)
    assert n == ref_n == 23
    assert nll.item() == pytest.approx(ref, abs=1e-4)
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        rows = M.completion_logits(model, batch, keep)
        full = gpt2(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert rows.shape == (23, VOCAB)
    torch.testing.assert_close(rows, full[keep], atol=1e-5, rtol=1e-5)
    grown = M._round_up_kept(keep)
    assert int(grown.sum()) == 48 and bool((grown & keep).eq(keep).all())  # all 48 positions
    assert M._accepts(model, "logits_to_keep") == (wrap is not _FullLogitsOnly)
    if wrap is None:  # the head really ran on the kept rows only
        assert M._HEAD_KEEPS_MASK[type(gpt2)] is True


def _full_loss_grads(model, batch) -> list[torch.Tensor]:
    """Gradients of the summed completion NLL from the model's own full forward (reference)."""
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                    ignore_index=-100, reduction="sum").backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_last_block_mlp_runs_on_kept_rows_only_and_changes_nothing(name, layout, request) -> None:
    from lumorik_sft.packing import PackedCollator

    model = request.getfixturevalue(name)
    batch = make_batch([20, 5, 30, 12], [6, 20, 4, 15], seq_len=40, seed=3)  # 160 positions
    reference = _full_loss_grads(model, batch)
    ref_nll, ref_n = manual_nll(model, batch)
    if layout == "packed":  # one padding-free row, attention per example
        rows = [{k: v[b][batch["attention_mask"][b].bool()].tolist() for k, v in batch.items()}
                for b in range(4)]
        batch = PackedCollator(PAD_ID, mask="varlen")(rows)
    first = M._last_block(model).mlp
    first = first.c_fc if name == "gpt2" else first.gate_proj
    seen: list[int] = []
    handle = first.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        model.zero_grad()
        nll, n = M.completion_nll(model, batch)
        nll.backward()
    finally:
        handle.remove()
    assert seen[-1] == 64  # the 45 rows that predict a completion token, rounded up to 64
    assert n == ref_n == 45 and nll.item() == pytest.approx(ref_nll, abs=1e-4)
    for p, g in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
    assert not isinstance(M._last_block(model).mlp, M._KeptRowsMLP)  # put back after the call


def test_kept_rows_mlp_falls_back_to_the_whole_input_when_it_cannot_scatter() -> None:
    keep = torch.tensor([[True, False, True]])
    x = torch.arange(6.0).view(1, 3, 2)
    pair = M._KeptRowsMLP(lambda h: (2 * h, "router logits"), keep)  # not a plain tensor
    assert torch.equal(pair(x)[0], 2 * x)
    other_layout = M._KeptRowsMLP(lambda h: 2 * h, keep)
    assert torch.equal(other_layout(x.view(3, 1, 2)), 2 * x.view(3, 1, 2))
    kept = M._KeptRowsMLP(lambda h: 2 * h, keep)(x)
    assert torch.equal(kept, torch.tensor([[[0.0, 2.0], [0.0, 0.0], [8.0, 10.0]]]))


def test_last_block_mlp_runs_whole_under_activation_checkpointing() -> None:
    model = _gpt2().train()
    model.activation_checkpointing_enable()  # the recompute in backward would run the MLP whole
    batch = make_batch([20, 5, 30, 12], [6, 20, 4, 15], seq_len=40, seed=3)
    seen: list[int] = []
    M._last_block(model).mlp.c_fc.register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    M.completion_nll(model, batch)[0].backward()
    assert seen[-2:] == [160, 160]  # the forward and its recompute, both whole


class _OutOfMemory(_FullLogitsOnly):
    """Takes logits_to_keep, then runs out of memory (a RuntimeError subclass)."""

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_out_of_memory_on_the_first_call_is_raised_not_remembered(gpt2) -> None:
    model = _OutOfMemory(gpt2)
    batch = make_batch([3, 1], [5, 9], seq_len=12, seed=5)
    with pytest.raises(torch.OutOfMemoryError):
        M.completion_nll(model, batch)
    assert type(model) not in M._HEAD_KEEPS_MASK  # the next call probes the head again


def _unfused_ce(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100)


def _loss_and_grads(fn, hidden, weight, bias, targets, scale=1.0):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    loss = fn(*leaves, b, targets)
    (loss * scale).backward()
    return loss.detach(), leaves[0].grad, leaves[1].grad, None if b is None else b.grad


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 200), vocab=st.sampled_from([7, 64, 300]), chunk=st.sampled_from([1, 5, 64, 1000]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_cross_entropy_equals_unfused_head_and_loss_fp64(rows, vocab, chunk, with_bias, seed) -> None:
    """The fused, chunked head + loss gives the loss and all three gradients of
    ``cross_entropy(linear(h, W, b))`` in float64, for any row count and chunk size,
    with ignored rows anywhere."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, 16, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < 0.3] = -100
    fused = _loss_and_grads(lambda h, w, b, t: M.linear_cross_entropy(h, w, b, t, chunk=chunk),
                            hidden, weight, bias, targets, scale=0.37)
    ref = _loss_and_grads(_unfused_ce, hidden, weight, bias, targets, scale=0.37)
    assert fused[0].dtype == torch.float64
    for got, want in zip(fused, ref, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_head() -> None:
    """Under bf16 autocast the fused head runs its matmuls in bf16 like F.linear would and
    its softmax in float32: same loss to float32 rounding, gradients to bf16 rounding."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 32, generator=gen)
    weight = torch.randn(500, 32, generator=gen) * 0.2
    targets = torch.randint(0, 500, (300,), generator=gen)
    targets[::5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _loss_and_grads(lambda h, w, b, t: M.linear_cross_entropy(h, w, b, t, chunk=64),
                                hidden, weight, None, targets)
        ref = _loss_and_grads(_unfused_ce, hidden, weight, None, targets)
    assert fused[0].dtype == torch.float32
    assert fused[0].item() == pytest.approx(ref[0].item(), rel=1e-6)
    for got, want in zip(fused[1:3], ref[1:3], strict=True):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_linear_cross_entropy_without_gradients_computes_none() -> None:
    hidden, weight = torch.randn(10, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (10,))
    with torch.inference_mode():
        loss = M.linear_cross_entropy(hidden, weight, None, targets)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(_unfused_ce(hidden, weight, None, targets).item(), rel=1e-6)


class _SoftCapped(GPT2LMHeadModel):
    """GPT-2 with Gemma 2's final-logit soft cap: its logits are not lm_head(body)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)
        return out


def test_completion_nll_fuses_a_plain_head_and_not_a_soft_capped_one(gpt2, llama) -> None:
    """GPT-2 and Llama heads are plain: the loss goes through linear_cross_entropy and its
    value and gradients equal the unfused loss (float64). A soft-capped head is detected on
    a freshly initialised model (logits near 0, where the cap is nearly the identity) and
    keeps the unfused path, so its NLL is still that of its own logits."""
    batch = make_batch([3, 1, 6, 2], [5, 9, 2, 7], seq_len=12, seed=5)
    for base in (gpt2, llama):
        model = copy.deepcopy(base).double()
        nll, n = M.completion_nll(model, batch)
        assert M._PLAIN_HEAD[model] is True and n == 23
        assert nll.item() == pytest.approx(manual_nll(model, batch)[0], abs=1e-9)
        nll.backward()
        fused = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        keep = M._round_up_kept(torch.nn.functional.pad(batch["labels"][:, 1:] != -100, (0, 1)))
        logits = M.completion_logits(model, batch, keep)
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)[keep]
        F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100).backward()
        for got, p in zip(fused, model.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, atol=1e-10, rtol=1e-9)
    torch.manual_seed(0)
    capped = _SoftCapped(_gpt2(initializer_range=0.002).config).eval()  # logits within +-0.1
    weight = capped.lm_head.weight.detach().clone()
    nll, _ = M.completion_nll(capped, batch)
    assert M._PLAIN_HEAD[capped] is False
    assert torch.equal(capped.lm_head.weight, weight)  # the probe restored the head exactly
    assert nll.item() == pytest.approx(manual_nll(capped, batch)[0], abs=1e-4)


class _MaybeCapped(GPT2LMHeadModel):
    """Soft-caps its logits when its config says so, like Gemma 2's final_logit_softcapping."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            out.logits = cap * torch.tanh(out.logits / cap)
        return out


def test_the_fused_head_is_decided_per_model_not_per_class(monkeypatch) -> None:
    """Two models of one class, one capped by its config: each gets its own verdict. A probe
    that fails (a body needing more than token ids) means the plain path, not an error."""
    batch = make_batch([3, 1, 6, 2], [5, 9, 2, 7], seq_len=12, seed=5)
    cfg = _gpt2(initializer_range=0.002).config
    plain = _MaybeCapped(cfg).eval()
    capped = _MaybeCapped(copy.deepcopy(cfg)).eval()
    capped.config.final_logit_softcapping = 30.0
    for model, verdict in ((plain, True), (capped, False)):
        nll, _ = M.completion_nll(model, batch)
        assert M._PLAIN_HEAD[model] is verdict
        assert nll.item() == pytest.approx(manual_nll(model, batch)[0], abs=1e-4)

    def broken(*args, **kwargs):
        raise TypeError("forward() missing 1 required argument: 'pixel_values'")

    monkeypatch.setattr(M, "completion_hidden", broken)
    fresh = _MaybeCapped(cfg).eval()
    nll, _ = M.completion_nll(fresh, batch)
    assert M._PLAIN_HEAD[fresh] is False
    assert nll.item() == pytest.approx(manual_nll(fresh, batch)[0], abs=1e-4)


def test_a_hooked_head_keeps_the_plain_path(gpt2) -> None:
    """The fused loss never calls the head module, so a hook that edits the logits (notebook 05
    replaces them with the chapter's probabilities) must switch it off, even for a model class
    already found plain: the NLL is that of the hooked logits."""
    batch = make_batch([3, 1, 6, 2], [5, 9, 2, 7], seq_len=12, seed=5)
    M.completion_nll(gpt2, batch)
    assert M._PLAIN_HEAD[gpt2] is True
    head = gpt2.get_output_embeddings()
    assert not M._hooked(gpt2, head)
    handle = head.register_forward_hook(lambda module, inputs, output: output * 0.0)  # uniform logits
    try:
        assert M._hooked(gpt2, head)
        with torch.no_grad():
            nll, n = M.completion_nll(gpt2, batch)
    finally:
        handle.remove()
    assert nll.item() == pytest.approx(n * math.log(VOCAB), rel=1e-6)
    assert not M._hooked(gpt2, head)


def test_completion_nll_ignores_tokens_after_last_supervised_position(gpt2) -> None:
    batch = make_batch([3, 2], [4, 6], seq_len=12, seed=2)
    before, n_before = M.completion_nll(gpt2, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, 7:] = torch.tensor([5, 6, 7, 8, 9])  # row 0 padding, labels -100
    changed["input_ids"][1, 8:] = torch.tensor([11, 12, 13, 14])
    assert not torch.equal(changed["input_ids"], batch["input_ids"])
    after, n_after = M.completion_nll(gpt2, changed)
    assert n_after == n_before
    assert after.item() == pytest.approx(before.item(), abs=1e-5)


def test_completion_nll_counts_a_label_once_it_is_unmasked(gpt2) -> None:
    batch = make_batch([4], [3], seq_len=10, seed=3)
    before, n_before = M.completion_nll(gpt2, batch)
    unmasked = {k: v.clone() for k, v in batch.items()}
    unmasked["labels"][0, 3] = 17  # was -100 (prompt); now supervised with an arbitrary id
    after, n_after = M.completion_nll(gpt2, unmasked)
    assert n_after == n_before + 1
    with torch.no_grad():
        logits = gpt2(input_ids=batch["input_ids"]).logits
    extra = -torch.log_softmax(logits[0, 2].float(), dim=-1)[17].item()  # position 2 predicts 3
    assert after.item() - before.item() == pytest.approx(extra, abs=1e-4)


def test_completion_nll_is_float32_for_bf16_model(gpt2) -> None:
    model = copy.deepcopy(gpt2).to(torch.bfloat16)
    batch = make_batch([2, 3], [5, 4], seq_len=10, seed=4)
    nll, n = M.completion_nll(model, batch)
    assert nll.dtype == torch.float32
    ref, _ = M.completion_nll(gpt2, batch)
    assert nll.item() == pytest.approx(ref.item(), rel=0.05)


def test_completion_nll_needs_labels(gpt2) -> None:
    batch = make_batch([2], [3], seq_len=8, seed=5)
    del batch["labels"]
    with pytest.raises(KeyError, match="labels"):
        M.completion_nll(gpt2, batch)


# --------------------------------------------------------------------------- evaluate_loss


@pytest.fixture(scope="module")
def peaky_gpt2() -> GPT2LMHeadModel:
    """Large init so per-token NLL varies a lot between batches (and the wrong mean shows)."""
    return _gpt2(initializer_range=0.3)


def uneven_batches() -> list[dict[str, torch.Tensor]]:
    """3 batches with 2, 60 and 5 supervised tokens."""
    return [
        make_batch([5, 7], [1, 1], seq_len=16, seed=10),
        make_batch([1, 2, 1, 3], [15, 14, 16, 15], seq_len=20, seed=11),
        make_batch([2], [5], seq_len=9, seed=12),
    ]


def test_evaluate_loss_is_token_weighted(peaky_gpt2) -> None:
    batches = uneven_batches()
    per_batch = [manual_nll(peaky_gpt2, b) for b in batches]
    assert [n for _, n in per_batch] == [2, 60, 5]
    total_nll = sum(nll for nll, _ in per_batch)
    total_n = sum(n for _, n in per_batch)
    expected_ppl = math.exp(total_nll / total_n)

    peaky_gpt2.train()  # evaluate_loss must switch to eval, then restore this
    result = M.evaluate_loss(peaky_gpt2, (b for b in batches), device="cpu")
    assert peaky_gpt2.training
    peaky_gpt2.eval()

    assert result.n_tokens == total_n
    assert result.nll_sum == pytest.approx(total_nll, rel=1e-5)
    assert result.loss == pytest.approx(total_nll / total_n, rel=1e-5)
    assert result.perplexity == pytest.approx(expected_ppl, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)

    wrong = M.mean_of_batch_perplexities(peaky_gpt2, batches)
    expected_wrong = sum(math.exp(nll / n) for nll, n in per_batch) / len(per_batch)
    assert wrong == pytest.approx(expected_wrong, rel=1e-5)
    assert abs(wrong - result.perplexity) > 0.01 * result.perplexity


@pytest.mark.parametrize("tokens", [1, 24, 50])
def test_evaluate_loss_in_row_slices_equals_whole_batches(gpt2, monkeypatch, tokens) -> None:
    """A batch larger than tokens_per_forward runs a few rows at a time (at least one row):
    same NLL sum and token count as whole batches (float64), fewer positions per forward."""
    model = copy.deepcopy(gpt2).double()
    batches = [make_batch([3, 1, 6, 2, 4], [5, 9, 2, 7, 3], seq_len=12, seed=5), *uneven_batches()]
    whole = M.evaluate_loss(model, batches, tokens_per_forward=None)
    widths = []
    real = M.completion_nll

    def spy(m, batch):
        widths.append(batch["input_ids"].numel())
        return real(m, batch)

    monkeypatch.setattr(M, "completion_nll", spy)
    sliced = M.evaluate_loss(model, batches, tokens_per_forward=tokens)
    assert sliced.n_tokens == whole.n_tokens
    assert sliced.nll_sum == pytest.approx(whole.nll_sum, rel=1e-12)
    widest = max(b["input_ids"].shape[1] for b in batches)
    assert max(widths) <= max(tokens, widest) and len(widths) > len(batches)


def test_evaluate_loss_keeps_eval_mode_and_uses_model_device(gpt2) -> None:
    result = M.evaluate_loss(gpt2, [make_batch([2], [4], seq_len=8, seed=13)])
    assert not gpt2.training
    assert result.n_tokens == 4 and result.perplexity > 1.0


@pytest.mark.parametrize(
    "batches",
    [
        [make_batch([4], [0], seq_len=6, seed=20)],  # all labels -100
        [{**make_batch([4], [0], seq_len=6, seed=21), "labels": torch.tensor([[7] + [-100] * 5])}],
        [],  # no batches at all
    ],
    ids=["all-masked", "only-position-0", "no-batches"],
)
def test_zero_supervised_tokens_raise(gpt2, batches) -> None:
    gpt2.train()
    with pytest.raises(ValueError, match="No supervised tokens"):
        M.evaluate_loss(gpt2, batches)
    assert gpt2.training  # mode restored even on error
    gpt2.eval()


def test_mean_of_batch_perplexities_refuses_empty_batch(gpt2) -> None:
    batches = [make_batch([2], [3], seq_len=6, seed=22), make_batch([4], [0], seq_len=6, seed=23)]
    with pytest.raises(ValueError, match="No supervised tokens"):
        M.mean_of_batch_perplexities(gpt2, batches)


# --------------------------------------------------------------------------- BLEU / ROUGE

PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),  # identical
    ("the cat sat on a mat", "the cat sat on the mat"),  # partial overlap
    ("", "a non-empty reference"),  # empty prediction
    ("short", "a much longer reference sentence with many words in it"),
    ("a very long prediction that keeps going well past the end of the reference", "a long one"),
    ("Hello, world!", "Hello world"),  # punctuation
    ("He is running fast.", "He runs fast."),  # stemming-sensitive
    ("The dogs were barking loudly", "the dog barked loudly"),  # stemming + case
    ("First sentence here.\nSecond sentence there.", "Second sentence there.\nFirst sentence here."),
    ("One line only", "One line\nonly"),
    ("Café crème brûlée", "café crème brûlée"),  # unicode
    ("東京は日本の首都です", "東京は日本の首都である"),  # CJK
    ("naïve résumé", "naive resume"),
    ("42 is the answer", "the answer is 42"),  # reordering
    ("completely different words", "nothing shared here"),
    ("the the the the", "the cat"),  # clipped repetition
    (
        "Polymorphism allows objects to be treated as instances of their parent class.",
        "Polymorphism lets objects be treated as instances of a parent class.",
    ),
    ("Numbers: 3.14, 2.71 and 1.41", "numbers 3.14 2.71 1.41"),
    ("Don't stop believing", "do not stop believing"),
    ("emoji 🙂 test", "emoji test 🙂"),
    ("  leading and trailing spaces  ", "leading and trailing spaces"),
    ("tab\tseparated\twords", "tab separated words"),
]
PREDS = [p for p, _ in PAIRS]
REFS = [r for _, r in PAIRS]
# Second references: some equal the prediction (so they add matches), others match nothing.
ALT_REFS = [p if i % 3 == 0 else r.upper() for i, (p, r) in enumerate(PAIRS)]


def mean_rouge_f1(preds, refs, types, use_stemmer) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    scores = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in types}


def test_corpus_bleu_matches_sacrebleu() -> None:
    assert M.corpus_bleu(PREDS, REFS) == sacrebleu.corpus_bleu(PREDS, [REFS]).score
    lower = M.corpus_bleu(PREDS, REFS, lowercase=True)  # kwargs reach sacrebleu
    assert lower == sacrebleu.corpus_bleu(PREDS, [REFS], lowercase=True).score
    assert lower != M.corpus_bleu(PREDS, REFS)
    assert M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert 0 < M.corpus_bleu(PREDS, REFS) < 100


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_matches_mean_rouge_score_f1(use_stemmer: bool) -> None:
    got = M.rouge(PREDS, REFS, use_stemmer=use_stemmer)
    expected = mean_rouge_f1(PREDS, REFS, M.DEFAULT_ROUGE_TYPES, use_stemmer)
    assert got.keys() == expected.keys()
    for t in expected:
        assert got[t] == pytest.approx(expected[t], abs=1e-12)
        assert 0.0 <= got[t] <= 1.0


def test_rouge_hand_values_stemming_and_newlines() -> None:
    assert M.rouge(["the cat sat"], ["the cat sat on the mat"])["rouge1"] == pytest.approx(2 / 3)
    # stemmed: he is run fast / he run fast -> P 3/4, R 1; unstemmed overlap is only 2.
    assert M.rouge(["He is running fast."], ["He runs fast."])["rouge1"] == pytest.approx(6 / 7)
    plain = M.rouge(["He is running fast."], ["He runs fast."], use_stemmer=False)["rouge1"]
    assert plain == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    # rougeLsum splits on "\n": swapped sentences match fully; rougeL sees one LCS of 3/6.
    swapped = M.rouge(["a b c\nd e f"], ["d e f\na b c"], rouge_types=("rougeL", "rougeLsum"))
    assert swapped == {"rougeL": pytest.approx(0.5), "rougeLsum": pytest.approx(1.0)}


@pytest.mark.parametrize("fn", [M.corpus_bleu, M.rouge])
def test_generation_metrics_reject_mismatched_or_empty_lists(fn) -> None:
    with pytest.raises(ValueError, match="same length, got 2 predictions and 1 references"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        fn([], [])
    with pytest.raises(TypeError, match="lists of strings"):
        fn("a b", "a b")


# --------------------------------------------------------------------------- evaluate modules


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline flags as env vars, plus evaluate's own flag, which it reads only at import."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)


def load(name: str, tmp_path: Path) -> evaluate.EvaluationModule:
    return M.load_metric(name, cache_dir=str(tmp_path / "metrics"), keep_in_memory=True)


def test_metric_module_paths_are_absolute_self_contained_scripts() -> None:
    for name in M.METRIC_MODULE_NAMES:
        path = Path(M.metric_module_path(name))
        assert path.is_absolute() and path.is_file() and path.name == f"{name}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}.py has a relative import; evaluate copies it alone"
                assert not (node.module or "").startswith("lumorik_sft")
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("lumorik_sft") for a in node.names)
    with pytest.raises(ValueError, match="choose one of"):
        M.metric_module_path("meteor")


def test_bleu_module_offline_matches_direct(offline, tmp_path: Path) -> None:
    out = load("bleu", tmp_path).compute(predictions=PREDS, references=REFS)
    direct = sacrebleu.corpus_bleu(PREDS, [REFS])
    assert out["score"] == M.corpus_bleu(PREDS, REFS) == direct.score
    assert out["bp"] == direct.bp and out["precisions"] == direct.precisions
    assert (out["sys_len"], out["ref_len"]) == (direct.sys_len, direct.ref_len)


def test_bleu_module_multiple_references_transposes_streams(offline, tmp_path: Path) -> None:
    multi = [[r, alt] for r, alt in zip(REFS, ALT_REFS, strict=True)]
    out = load("bleu", tmp_path).compute(predictions=PREDS, references=multi)
    assert out["score"] == sacrebleu.corpus_bleu(PREDS, [REFS, ALT_REFS]).score
    assert out["score"] > M.corpus_bleu(PREDS, REFS)  # the second reference really counted
    with pytest.raises(ValueError, match="same, non-zero number of references"):
        load("bleu", tmp_path).compute(predictions=["a", "b"], references=[["a", "x"], ["b"]])


def test_rouge_module_offline_matches_direct(offline, tmp_path: Path) -> None:
    metric = load("rouge", tmp_path)
    assert metric.compute(predictions=PREDS, references=REFS) == pytest.approx(M.rouge(PREDS, REFS))
    out = metric.compute(
        predictions=PREDS, references=REFS, rouge_types=["rouge1", "rougeLsum"], use_stemmer=False
    )
    expected = M.rouge(PREDS, REFS, rouge_types=("rouge1", "rougeLsum"), use_stemmer=False)
    assert out == pytest.approx(expected)
    multi = metric.compute(predictions=["He runs fast."], references=[["no", "He runs fast."]])
    assert multi["rouge1"] == 1.0  # best of several references


@pytest.mark.parametrize("name", M.METRIC_MODULE_NAMES)
def test_metric_modules_reject_mismatched_lengths(offline, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="Mismatch in the number of predictions"):
        load(name, tmp_path).compute(predictions=["a", "b"], references=["a"])


def test_load_metric_in_fresh_offline_process(tmp_path: Path) -> None:
    """A new process with an empty HF_HOME and every offline flag set before import."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
    }
    env.pop("HF_MODULES_CACHE", None)
    env.pop("HF_METRICS_CACHE", None)
    script = (
        "import json, sys\n"
        "from lumorik_sft.metrics import load_metric\n"
        "p, r = json.loads(sys.argv[1])\n"
        "b = load_metric('bleu').compute(predictions=p, references=r)['score']\n"
        "g = load_metric('rouge').compute(predictions=p, references=r)\n"
        "print(json.dumps({'bleu': b, 'rouge': g}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps([PREDS, REFS])],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bleu"] == M.corpus_bleu(PREDS, REFS)
    assert out["rouge"] == pytest.approx(M.rouge(PREDS, REFS))
    copied = list((tmp_path / "hf" / "modules" / "evaluate_modules" / "metrics").rglob("*.py"))
    assert {p.name for p in copied} >= {"bleu.py", "rouge.py"}  # evaluate copies scripts here
