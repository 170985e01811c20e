"""The compiled step (`lumorik_sft.compiled`) computes what the eager step computes.

Loss and every gradient, compiled against eager, for GPT-2 and Llama, on a padded batch and on
the same examples packed into one padding-free row; then batches of other widths through the
same compiled blocks (no recompile per width); then `train` with compile='on' against 'off',
and what compile='auto' decides.

Run: ``.venv/bin/pytest tests/test_compiled.py -q`` (tiny in-process models; compiling takes
a few seconds per model).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_fused_loss import _assert_same_grads, _nll_and_grads, _packed
from test_metrics import _gpt2, _llama, make_batch

from lumorik_sft import compiled, training
from lumorik_sft.config import TrainConfig
from lumorik_sft.fused_loss import completion_nll
from lumorik_sft.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch: no graph cached by an earlier test hides a recompile."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_compiled_step_equals_eager_padded_and_packed(name) -> None:
    """Same NLL and gradients within float32 tolerance, padded and packed, at three widths."""
    model = _gpt2() if name == "gpt2" else _llama()
    batches = [
        make_batch([20, 5, 30, 12], [6, 20, 4, 15], seq_len=40, seed=3),
        make_batch([8, 3], [9, 30], seq_len=48, seed=4),
    ]
    batches += [_packed(b) for b in batches]
    eager = [_nll_and_grads(completion_nll, model, b) for b in batches]
    with compiled.compiled_blocks(model) as blocks:
        assert blocks == compiled.repeated_blocks(model)[:-1]  # the last stays eager (its MLP is swapped)
        assert all(b._compiled_call_impl is not None for b in blocks)
        got = [_nll_and_grads(completion_nll, model, b) for b in batches]
    assert all(b._compiled_call_impl is None for b in blocks)  # eager again after the context
    for (nll, n, grads), (want_nll, want_n, want_grads) in zip(got, eager, strict=True):
        assert n == want_n
        assert nll == pytest.approx(want_nll, rel=1e-5)
        _assert_same_grads(grads, want_grads, atol=1e-5, rtol=1e-4)


def test_compiled_step_equals_eager_under_bf16_autocast() -> None:
    """Under bf16 autocast the compiled step matches eager within bf16's precision."""
    model = _gpt2()
    batch = make_batch([20, 5, 30, 12], [6, 20, 4, 15], seq_len=40, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, n, grads = _nll_and_grads(completion_nll, model, batch)
        with compiled.compiled_blocks(model):
            c_nll, c_n, c_grads = _nll_and_grads(completion_nll, model, batch)
    assert c_n == n and c_nll == pytest.approx(nll, rel=2e-2)
    for a, b in zip(c_grads, grads, strict=True):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


def test_repeated_blocks_are_the_decoder_layers() -> None:
    gpt2, llama = _gpt2(), _llama()
    assert compiled.repeated_blocks(gpt2) == list(gpt2.transformer.h)
    assert compiled.repeated_blocks(llama) == list(llama.model.layers)
    with pytest.raises(ValueError, match="no list of repeated blocks"):
        compiled.repeated_blocks(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- in train()


def _examples(tokenizer, n: int = 24) -> list[dict[str, list[int]]]:
    from lumorik_sft.encoding import encode_records

    pairs = [{"prompt": f"Add {i} and {i}.", "completion": f" {i} plus {i} is {2 * i}."} for i in range(n)]
    return encode_records(pairs, tokenizer)[0]


def test_train_with_compile_on_matches_off(toy_tokenizer) -> None:
    """Four steps compiled and eager from the same seed: the same losses and weights, the same
    state-dict names (checkpoints load anywhere), and the compile recorded in the result.
    (Packed batches through compiled blocks: the first test.)

    Dropout is off: compiled dropout draws its masks from its own (seeded) generator, so with
    dropout on the two runs differ by their masks, not by their arithmetic."""
    examples = _examples(toy_tokenizer)
    base = build_model("gpt2", toy_tokenizer, n_layer=2, width=32, n_head=2, context=128, seed=0)
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    runs = {}
    for mode in ("off", "on"):
        model = copy.deepcopy(base)
        cfg = TrainConfig(learning_rate=3e-3, batch_size=6, epochs=1, compile=mode, progress=False)
        runs[mode] = (training.train(model, toy_tokenizer, examples, None, cfg), model)
    (off, eager_model), (on, compiled_model) = runs["off"], runs["on"]
    assert on.losses == pytest.approx(off.losses, rel=1e-4)
    assert list(compiled_model.state_dict()) == list(eager_model.state_dict())
    for a, b in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert off.compile == {
        "mode": "off",
        "compiled": False,
        "at_step": None,
        "seconds": None,
        "reason": "compile='off'",
    }
    assert on.compile["compiled"] and on.compile["at_step"] == 1 and on.compile["seconds"] > 0
    assert all(b._compiled_call_impl is None for b in compiled.repeated_blocks(compiled_model))


def _auto(total_steps: int, step_seconds: float) -> compiled.StepCompiler:
    """A StepCompiler in 'auto' mode fed eager steps of a known duration until it decides."""
    model = _gpt2()
    compiler = compiled.StepCompiler(model, "auto", torch.device("cpu"), total_steps)
    with compiler:
        for step in range(1, compiled.TIMED_STEPS + 1):
            compiler.after_step(step, step_seconds)
        decision = compiler.decision.to_dict()
    return decision


def test_auto_compiles_only_when_the_saving_exceeds_the_compile_time() -> None:
    cpu = torch.device("cpu")
    gain, cost = compiled.expected_gain(cpu), compiled.expected_compile_seconds(cpu)
    # The break-even run: saving = remaining x step x gain = cost.
    step_seconds = 0.1
    break_even = cost / (step_seconds * gain) + compiled.TIMED_STEPS
    short = _auto(int(break_even * 0.9), step_seconds)
    assert not short["compiled"] and short["reason"].startswith("compile='auto' stayed eager")
    long = _auto(int(break_even * 1.1) + 1, step_seconds)
    assert long["compiled"] and long["at_step"] == compiled.TIMED_STEPS + 1
    assert "compiling would save" in long["reason"]


def test_config_rejects_an_unknown_compile_mode() -> None:
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        TrainConfig(compile="yes")
