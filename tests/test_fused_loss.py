"""The fast loss (`lumorik_sft.fused_loss`) gives the reference's loss and every gradient.

Each test compares `fused_loss.completion_nll` with the plain `metrics.completion_nll` (or with
an independent loop over positions): GPT-2 and Llama, padded and packed, the fused head and
its fallbacks (soft-capped and hooked heads, models that cannot select rows), the last-MLP skip.

Run: ``.venv/bin/pytest tests/test_fused_loss.py -q`` (no network, tiny in-process models).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_metrics import PAD_ID, VOCAB, _gpt2, _llama, make_batch, manual_nll
from transformers import GPT2LMHeadModel

from lumorik_sft import fused_loss as FL
from lumorik_sft import metrics as M
from lumorik_sft.attention import accepts
from lumorik_sft.packing import PackedCollator


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    return _gpt2()


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _nll_and_grads(loss_fn, model, batch) -> tuple[float, int, list[torch.Tensor]]:
    """Summed NLL, token count and the gradient of every parameter under `loss_fn`."""
    model.zero_grad()
    nll, n = loss_fn(model, batch)
    nll.backward()
    return nll.item(), n, [p.grad.clone() for p in model.parameters()]


def _assert_same_grads(got: list[torch.Tensor], want: list[torch.Tensor], **tolerance) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


# --------------------------------------------------------------------------- fused equals reference


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["padded", "varlen", "bool"])
def test_fused_equals_the_reference_loss_and_every_gradient_fp64(name, layout, request) -> None:
    """In float64, so no float32 summation order can hide a difference: same NLL, count and
    gradients, for a padded batch and for the same examples packed (one padding-free row, or
    rows with a 4-D block mask)."""
    model = copy.deepcopy(request.getfixturevalue(name)).double()
    batch = make_batch([20, 5, 30, 12], [6, 20, 4, 15], seq_len=40, seed=3)
    if layout != "padded":
        batch = _packed(batch, layout)
    fused = _nll_and_grads(FL.completion_nll, model, batch)
    reference = _nll_and_grads(M.completion_nll, model, batch)
    assert fused[1] == reference[1] == 45
    assert fused[0] == pytest.approx(reference[0], abs=1e-9)
    _assert_same_grads(fused[2], reference[2], atol=1e-10, rtol=1e-9)


def _packed(batch: dict[str, torch.Tensor], mask: str = "varlen") -> dict[str, torch.Tensor]:
    """The examples of a right-padded batch, packed: one padding-free row ('varlen', attention
    per example) or best-fit rows with a 4-D block-diagonal mask ('bool')."""
    rows = [
        {k: v[b][batch["attention_mask"][b].bool()].tolist() for k, v in batch.items()}
        for b in range(batch["input_ids"].shape[0])
    ]
    return PackedCollator(PAD_ID, mask=mask)(rows)


@pytest.mark.parametrize("case", ["uneven", "unmasked-prompt-token", "no-supervised-token"])
def test_fused_equals_the_reference_on_the_reference_cases(gpt2, llama, case) -> None:
    batch = {
        "uneven": make_batch([3, 1, 6], [5, 9, 2], seq_len=12, seed=1),
        "unmasked-prompt-token": make_batch([4], [3], seq_len=10, seed=3),
        "no-supervised-token": make_batch([4], [0], seq_len=6, seed=20),
    }[case]
    if case == "unmasked-prompt-token":
        batch["labels"][0, 3] = 17
    for model in (gpt2, llama):
        with torch.no_grad():
            fused, n = FL.completion_nll(model, batch)
            reference, ref_n = M.completion_nll(model, batch)
        assert n == ref_n and fused.dtype == reference.dtype == torch.float32
        assert fused.item() == pytest.approx(reference.item(), abs=1e-4)


def test_fused_is_float32_for_a_bf16_model_and_needs_labels(gpt2) -> None:
    model = copy.deepcopy(gpt2).to(torch.bfloat16)
    batch = make_batch([2, 3], [5, 4], seq_len=10, seed=4)
    nll, _ = FL.completion_nll(model, batch)
    assert nll.dtype == torch.float32
    assert nll.item() == pytest.approx(M.completion_nll(model, batch)[0].item(), rel=1e-2)
    del batch["labels"]
    with pytest.raises(KeyError, match="labels"):
        FL.completion_nll(gpt2, batch)


def test_evaluate_loss_with_the_fused_loss_equals_the_reference(gpt2) -> None:
    batches = [
        make_batch([3, 1, 6, 2], [5, 9, 2, 7], seq_len=12, seed=5),
        make_batch([1, 2], [15, 14], seq_len=20, seed=11),
    ]
    reference = M.evaluate_loss(gpt2, batches)
    fused = M.evaluate_loss(gpt2, batches, loss_fn=FL.completion_nll)
    assert fused.n_tokens == reference.n_tokens
    assert fused.nll_sum == pytest.approx(reference.nll_sum, rel=1e-5)


# --------------------------------------------------------------------------- the head on kept rows


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
def test_only_the_selected_head_rows_run_and_give_the_reference_nll(gpt2, wrap) -> None:
    """Only supervised positions go through the LM head; the NLL is the reference's (full logits),
    also after rounding the kept rows up to a multiple of 64, and for models that cannot
    select rows (they get the full logits, indexed)."""
    model = gpt2 if wrap is None else wrap(gpt2)
    batch = make_batch([3, 1, 6, 2], [5, 9, 2, 7], seq_len=12, seed=5)
    nll, n = FL.completion_nll(model, batch)
    ref, ref_n = M.completion_nll(model, batch)
    assert n == ref_n == 23
    assert nll.item() == pytest.approx(ref.item(), abs=1e-5)
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        rows = FL.completion_logits(model, batch, keep)
        full = gpt2(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert rows.shape == (23, VOCAB)
    torch.testing.assert_close(rows, full[keep], atol=1e-5, rtol=1e-5)
    grown = FL._round_up_kept(keep)
    assert int(grown.sum()) == 48 and bool((grown & keep).eq(keep).all())  # all 48 positions
    assert accepts(model, "logits_to_keep") == (wrap is not _FullLogitsOnly)
    if wrap is None:  # the head really ran on the kept rows only
        assert FL._HEAD_KEEPS_MASK[type(gpt2)] is True


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_last_block_mlp_runs_on_kept_rows_only_and_changes_nothing(name, layout, request) -> None:
    """The last block's MLP sees the 45 kept rows (rounded up to 64) instead of all 160
    positions, and the loss and every gradient stay the reference's (float32)."""
    model = request.getfixturevalue(name)
    batch = make_batch([20, 5, 30, 12], [6, 20, 4, 15], seq_len=40, seed=3)  # 160 positions
    ref_nll, ref_n = manual_nll(model, batch)
    if layout == "packed":  # one padding-free row, attention per example
        batch = _packed(batch)
    _, _, reference = _nll_and_grads(M.completion_nll, model, batch)
    first = FL._last_block(model).mlp
    first = first.c_fc if name == "gpt2" else first.gate_proj
    seen: list[int] = []
    handle = first.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        nll, n, grads = _nll_and_grads(FL.completion_nll, model, batch)
    finally:
        handle.remove()
    assert seen[-1] == 64  # the 45 rows that predict a completion token, rounded up to 64
    assert n == ref_n == 45 and nll == pytest.approx(ref_nll, abs=1e-4)
    _assert_same_grads(grads, reference, atol=1e-5, rtol=1e-4)
    assert not isinstance(FL._last_block(model).mlp, FL._KeptRowsMLP)  # put back after the call


def test_kept_rows_mlp_falls_back_to_the_whole_input_when_it_cannot_scatter() -> None:
    keep = torch.tensor([[True, False, True]])
    x = torch.arange(6.0).view(1, 3, 2)
    pair = FL._KeptRowsMLP(lambda h: (2 * h, "router logits"), keep)  # not a plain tensor
    assert torch.equal(pair(x)[0], 2 * x)
    other_layout = FL._KeptRowsMLP(lambda h: 2 * h, keep)
    assert torch.equal(other_layout(x.view(3, 1, 2)), 2 * x.view(3, 1, 2))
    kept = FL._KeptRowsMLP(lambda h: 2 * h, keep)(x)
    assert torch.equal(kept, torch.tensor([[[0.0, 2.0], [0.0, 0.0], [8.0, 10.0]]]))


def test_last_block_mlp_runs_whole_under_activation_checkpointing() -> None:
    model = _gpt2().train()
    model.activation_checkpointing_enable()  # the recompute in backward would run the MLP whole
    batch = make_batch([20, 5, 30, 12], [6, 20, 4, 15], seq_len=40, seed=3)
    seen: list[int] = []
    FL._last_block(model).mlp.c_fc.register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[:-1].numel())
    )
    FL.completion_nll(model, batch)[0].backward()
    assert seen[-2:] == [160, 160]  # the forward and its recompute, both whole


class _OutOfMemory(_FullLogitsOnly):
    """Takes logits_to_keep, then runs out of memory (a RuntimeError subclass)."""

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_out_of_memory_on_the_first_call_is_raised_not_remembered(gpt2) -> None:
    model = _OutOfMemory(gpt2)
    batch = make_batch([3, 1], [5, 9], seq_len=12, seed=5)
    with pytest.raises(torch.OutOfMemoryError):
        FL.completion_nll(model, batch)
    assert type(model) not in FL._HEAD_KEEPS_MASK  # the next call probes the head again


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
@given(
    rows=st.integers(0, 200),
    vocab=st.sampled_from([7, 64, 300]),
    chunk=st.sampled_from([1, 5, 64, 1000]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
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
    fused = _loss_and_grads(
        lambda h, w, b, t: FL.linear_cross_entropy(h, w, b, t, chunk=chunk),
        hidden,
        weight,
        bias,
        targets,
        scale=0.37,
    )
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
        fused = _loss_and_grads(
            lambda h, w, b, t: FL.linear_cross_entropy(h, w, b, t, chunk=64), hidden, weight, None, targets
        )
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
        loss = FL.linear_cross_entropy(hidden, weight, None, targets)
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
    value and gradients equal the reference's (float64). A soft-capped head is detected on
    a freshly initialised model (logits near 0, where the cap is nearly the identity) and
    keeps the unfused path, so its NLL is still that of its own logits."""
    batch = make_batch([3, 1, 6, 2], [5, 9, 2, 7], seq_len=12, seed=5)
    for base in (gpt2, llama):
        model = copy.deepcopy(base).double()
        nll, n, fused = _nll_and_grads(FL.completion_nll, model, batch)
        assert FL._PLAIN_HEAD[model] is True and n == 23
        ref_nll, _, reference = _nll_and_grads(M.completion_nll, model, batch)
        assert nll == pytest.approx(ref_nll, abs=1e-9)
        _assert_same_grads(fused, reference, atol=1e-10, rtol=1e-9)
    torch.manual_seed(0)
    capped = _SoftCapped(_gpt2(initializer_range=0.002).config).eval()  # logits within +-0.1
    weight = capped.lm_head.weight.detach().clone()
    nll, _ = FL.completion_nll(capped, batch)
    assert FL._PLAIN_HEAD[capped] is False
    assert torch.equal(capped.lm_head.weight, weight)  # the probe restored the head exactly
    assert nll.item() == pytest.approx(M.completion_nll(capped, batch)[0].item(), abs=1e-5)


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
        nll, _ = FL.completion_nll(model, batch)
        assert FL._PLAIN_HEAD[model] is verdict
        assert nll.item() == pytest.approx(M.completion_nll(model, batch)[0].item(), abs=1e-5)

    def broken(*args, **kwargs):
        raise TypeError("forward() missing 1 required argument: 'pixel_values'")

    monkeypatch.setattr(FL, "completion_hidden", broken)
    fresh = _MaybeCapped(cfg).eval()
    nll, _ = FL.completion_nll(fresh, batch)
    assert FL._PLAIN_HEAD[fresh] is False
    assert nll.item() == pytest.approx(M.completion_nll(fresh, batch)[0].item(), abs=1e-5)


def test_a_hooked_head_keeps_the_plain_path(gpt2) -> None:
    """The fused loss never calls the head module, so a hook that edits the logits (notebook 05
    replaces them with the chapter's probabilities) must switch it off, even for a model class
    already found plain: the NLL is that of the hooked logits, as in the reference."""
    batch = make_batch([3, 1, 6, 2], [5, 9, 2, 7], seq_len=12, seed=5)
    FL.completion_nll(gpt2, batch)
    assert FL._PLAIN_HEAD[gpt2] is True
    head = gpt2.get_output_embeddings()
    assert not FL._hooked(gpt2, head)
    handle = head.register_forward_hook(lambda module, inputs, output: output * 0.0)  # uniform logits
    try:
        assert FL._hooked(gpt2, head)
        with torch.no_grad():
            nll, n = FL.completion_nll(gpt2, batch)
            reference, _ = M.completion_nll(gpt2, batch)
    finally:
        handle.remove()
    assert nll.item() == pytest.approx(n * math.log(VOCAB), rel=1e-6)
    assert nll.item() == pytest.approx(reference.item(), rel=1e-6)
    assert not FL._hooked(gpt2, head)
