"""The training loop: exact token-weighted accumulation, schedules, determinism, resume.

Every test uses a tiny model on toy pairs and runs in seconds on a CPU.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from lumorik_sft.course.plots import plot_loss_curves
from lumorik_sft.encoding import IGNORE_INDEX, SFTCollator, encode_records
from lumorik_sft.metrics import completion_nll
from lumorik_sft.models import build_model
from lumorik_sft.schedule import build_optimizer, epoch_order
from lumorik_sft.training import (
    CHECKPOINT_NAME,
    TrainConfig,
    accumulate_gradients,
    chapter_loop,
    count_target_tokens,
    load_checkpoint,
    train,
    train_step,
)

TEXTS = [
    "Category: backpack. A sturdy navy canvas backpack with a padded laptop sleeve and a zip.",
    "Question: What is a fever? Answer: A fever is a body temperature above the normal range.",
    "Summarise the case: The tenant sued the landlord over an unreturned deposit with interest.",
    "def add(a, b): return a + b  # Python functions return values to their callers always.",
]
# Completion lengths in words: neighbours agree, so micro-batches of 2 hold very different
# token counts (1-word pairs next to 20-word pairs) and a mean of means is visibly wrong.
LENGTHS = [1, 1, 20, 20, 2, 2, 14, 14]
SIZE = {"n_layer": 2, "width": 32, "n_head": 2, "context": 128}


def _pairs(n: int) -> list[dict[str, str]]:
    pairs = []
    for i in range(n):
        words = TEXTS[i % len(TEXTS)].split()
        completion = (words[2:] * 4)[: LENGTHS[i % len(LENGTHS)]]
        pairs.append({"prompt": " ".join(words[:2]), "completion": " ".join(completion)})
    return pairs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples(toy_tokenizer) -> list[dict[str, list[int]]]:
    encoded, _ = encode_records(_pairs(20), toy_tokenizer)
    return encoded


@pytest.fixture(scope="module")
def train_ex(examples):
    return examples[:16]


@pytest.fixture(scope="module")
def val_ex(examples):
    return examples[16:]


def _model(tokenizer, seed: int = 0, arch: str = "gpt2", dropout: bool = True):
    model = build_model(arch, tokenizer, seed=seed, **SIZE)
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def _config(**overrides) -> TrainConfig:
    base = {
        "learning_rate": 3e-3,
        "batch_size": 2,
        "grad_accum_steps": 2,
        "epochs": 3,
        "warmup_steps": 2,
        "weight_decay": 0.01,
        "progress": False,
        "log_every": 0,
        "eval_batch_size": 8,
    }
    return TrainConfig(**{**base, **overrides})


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _assert_same_weights(a, b, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


# --------------------------------------------------------------------------- accumulation


def test_accumulation_equals_one_big_batch(toy_tokenizer, train_ex):
    model = _model(toy_tokenizer, dropout=False)
    # A little training first, so per-token losses differ between short and long completions.
    train(
        model,
        toy_tokenizer,
        train_ex[4:8],
        config=_config(learning_rate=3e-2, batch_size=2, grad_accum_steps=1, epochs=3, warmup_steps=0),
    )
    model.eval()  # no dropout: both sides see the same function
    collate = SFTCollator(toy_tokenizer.pad_token_id)
    rows = train_ex[:8]
    big = collate(rows)
    micros = [collate(rows[i : i + 2]) for i in range(0, 8, 2)]
    assert sorted(count_target_tokens(m) for m in micros)[0] * 5 < max(
        count_target_tokens(m) for m in micros
    ), "micro-batches must differ in token count"

    model.zero_grad()
    one = accumulate_gradients(model, [big])
    g_one = _grads(model)
    model.zero_grad()
    acc = accumulate_gradients(model, micros)
    g_acc = _grads(model)

    assert acc.n_tokens == one.n_tokens == count_target_tokens(big)
    assert acc.loss == pytest.approx(one.loss, abs=1e-5)
    for a, b in zip(g_acc, g_one, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    # The test bites: the naive mean of per-micro-batch means is a different number.
    with torch.no_grad():
        means = [float(nll) / n for nll, n in (completion_nll(model, m) for m in micros)]
    mean_of_means = sum(means) / len(means)
    assert abs(mean_of_means - one.loss) > 1e-2  # 1000x the tolerance above


def test_step_loss_is_sum_nll_over_tokens(toy_tokenizer, train_ex):
    model = _model(toy_tokenizer, dropout=False)
    before = copy.deepcopy(model).eval()
    result = train(model, toy_tokenizer, train_ex, config=_config(shuffle=False, max_steps=1))
    step = result.steps[0]

    collate = SFTCollator(toy_tokenizer.pad_token_id)
    nll, n = 0.0, 0
    with torch.no_grad():
        for rows in (train_ex[0:2], train_ex[2:4]):  # the first step: 2 micro-batches of 2
            batch = collate(rows)
            logits = before(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll += float(
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum"
                )
            )
            n += int((labels != IGNORE_INDEX).sum())
    assert step["tokens"] == n
    assert step["loss"] == pytest.approx(nll / n, abs=1e-6)
    assert result.epochs[-1]["train_loss"] == pytest.approx(nll / n, abs=1e-6)


def test_train_step_is_backward_clip_step_schedule_zero_grad(toy_tokenizer, train_ex):
    """One `train_step` == the chapter's step done right, written out by hand."""
    collate = SFTCollator(toy_tokenizer.pad_token_id)
    micros = [collate(train_ex[i : i + 2]) for i in range(0, 6, 2)]
    config = _config(max_grad_norm=0.05, fused_loss=False)  # a small norm: clipping must act
    models = [_model(toy_tokenizer, dropout=False) for _ in range(2)]
    optimizers = [build_optimizer(m, config) for m in models]
    schedulers = [get_linear_schedule_with_warmup(o, 0, 10) for o in optimizers]

    step = train_step(models[0], micros, optimizers[0], schedulers[0], config)

    by_hand = accumulate_gradients(models[1], micros)
    norm = torch.nn.utils.clip_grad_norm_(models[1].parameters(), config.max_grad_norm)
    optimizers[1].step()
    schedulers[1].step()
    assert (step.n_tokens, step.lr) == (by_hand.n_tokens, config.learning_rate)
    assert step.loss == pytest.approx(by_hand.loss, abs=1e-6)
    assert step.grad_norm == pytest.approx(float(norm), rel=1e-5) and step.grad_norm > 0.05
    _assert_same_weights(models[0], models[1], atol=1e-6)
    assert schedulers[0].last_epoch == 1 and all(p.grad is None for p in models[0].parameters())

    # No supervised token: no update, and the schedule stays where it was.
    blank = [collate([{**ex, "labels": [IGNORE_INDEX] * len(ex["labels"])} for ex in train_ex[:2]])]
    before = copy.deepcopy(models[0].state_dict())
    skipped = train_step(models[0], blank, optimizers[0], schedulers[0], config)
    assert (skipped.n_tokens, skipped.lr, skipped.grad_norm) == (0, None, None)
    assert schedulers[0].last_epoch == 1
    for key, value in models[0].state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fused_loss_trains_the_same_run_as_the_reference(toy_tokenizer, train_ex, val_ex):
    # No dropout: the fused path runs the last MLP on fewer rows, so it draws other masks.
    runs = [
        train(
            _model(toy_tokenizer, dropout=False),
            toy_tokenizer,
            train_ex,
            val_ex,
            _config(epochs=1, fused_loss=fused),
        )
        for fused in (True, False)
    ]
    assert runs[0].losses == pytest.approx(runs[1].losses, abs=1e-5)
    assert runs[0].final_val_loss == pytest.approx(runs[1].final_val_loss, abs=1e-5)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_run_different_seed_different_run(toy_tokenizer, train_ex, val_ex):
    runs = []
    for seed in (0, 0, 1):
        model = _model(toy_tokenizer)  # dropout on: the seed must also fix the masks
        result = train(model, toy_tokenizer, train_ex, val_ex, _config(epochs=1, seed=seed))
        runs.append((model, result))
    (m0, r0), (m1, r1), (m2, r2) = runs
    assert r0.losses == r1.losses
    assert [e["val_loss"] for e in r0.epochs] == [e["val_loss"] for e in r1.epochs]
    _assert_same_weights(m0, m1)
    assert r0.losses != r2.losses
    assert not torch.equal(m0.transformer.wte.weight, m2.transformer.wte.weight)


def test_fused_activations_keep_the_run_and_restore_the_modules(toy_tokenizer, train_ex, val_ex):
    """The fused tanh GELU is GPT-2's gelu_new in one kernel: same losses (fp32), and the
    model gets its own activation modules back after training."""
    from transformers.activations import GELUTanh, NewGELUActivation

    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(GELUTanh()(x), NewGELUActivation()(x), atol=1e-6, rtol=0)
    results = []
    for fused in (True, False):
        model = _model(toy_tokenizer)
        seen: list[type] = []

        def spy(event, model=model, seen=seen):
            seen.extend(type(m) for m in model.modules() if "GELU" in type(m).__name__)

        results.append(
            train(
                model,
                toy_tokenizer,
                train_ex,
                val_ex,
                _config(epochs=1, fused_activations=fused),
                callback=spy,
            )
        )
        assert set(seen) == {GELUTanh if fused else NewGELUActivation}
        assert {type(m) for m in model.modules() if "GELU" in type(m).__name__} == {NewGELUActivation}
    assert results[0].losses == pytest.approx(results[1].losses, abs=1e-5)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1)
    assert sorted(epoch_order(10, 0, 1)) == list(range(10))
    assert epoch_order(10, 0, 1) != epoch_order(10, 0, 2)
    assert epoch_order(10, 0, 1) != epoch_order(10, 1, 1)
    assert epoch_order(5, 0, 1, shuffle=False) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def uninterrupted(toy_tokenizer, train_ex, val_ex, tmp_path_factory):
    model = _model(toy_tokenizer)
    out = tmp_path_factory.mktemp("full")
    result = train(model, toy_tokenizer, train_ex, val_ex, _config(output_dir=str(out)))
    return model, result, out


def _kill_at(step: int, sig: int):
    def callback(event: dict) -> None:
        if event["event"] == "step" and event["step"] == step:
            os.kill(os.getpid(), sig)

    return callback


@pytest.mark.parametrize(
    ("sig", "at_step"),
    [
        (signal.SIGINT, 6),  # mid-epoch 2 (4 optimizer steps per epoch)
        (signal.SIGTERM, 4),  # the last step of epoch 1, before its evaluation
    ],
)
def test_resume_after_signal_matches_uninterrupted_run(
    toy_tokenizer, train_ex, val_ex, uninterrupted, tmp_path, capsys, sig, at_step
):
    full_model, full, _ = uninterrupted
    assert len(full.steps) == 12 and not full.interrupted
    config = _config(output_dir=str(tmp_path))

    first = train(
        _model(toy_tokenizer), toy_tokenizer, train_ex, val_ex, config, callback=_kill_at(at_step, sig)
    )
    assert first.interrupted
    assert len(first.steps) == at_step
    assert (tmp_path / CHECKPOINT_NAME).exists()
    assert "resume=True" in capsys.readouterr().out
    assert not (tmp_path / "final").exists()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["progress"]["global_step"] == at_step
    assert {"model", "optimizer", "scheduler", "rng", "config", "result"} <= ckpt.keys()

    # A model built from another seed: the weights can only come from the checkpoint.
    fresh = _model(toy_tokenizer, seed=123)
    resume = True if sig == signal.SIGINT else tmp_path / CHECKPOINT_NAME  # both forms
    second = train(fresh, toy_tokenizer, train_ex, val_ex, config, resume=resume)
    assert not second.interrupted
    _assert_same_weights(fresh, full_model, atol=1e-6)
    assert second.final_val_loss == pytest.approx(full.final_val_loss, abs=1e-6)
    assert second.losses == pytest.approx(full.losses, abs=1e-6)
    assert [e["epoch"] for e in second.epochs] == [0, 1, 2, 3]
    assert (tmp_path / "final" / "config.json").exists()
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["steps"]) == 12


def test_interrupt_without_output_dir_stops_cleanly(toy_tokenizer, train_ex, capsys):
    result = train(
        _model(toy_tokenizer), toy_tokenizer, train_ex, config=_config(), callback=_kill_at(2, signal.SIGINT)
    )
    assert result.interrupted and result.global_step == 2 and result.checkpoint_path is None
    assert "no checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rate": 1e-3}, "learning_rate: 0.003 -> 0.001"),
        ({"fused_activations": False}, "fused_activations: True -> False"),
        ({"fused_loss": False}, "fused_loss: True -> False"),
        ({"precision": "bf16"}, "trained in fp32 and would go on in bf16"),  # 'auto' was fp32 here
    ],
)
def test_resume_refuses_changed_settings(toy_tokenizer, train_ex, val_ex, uninterrupted, change, message):
    _, _, out = uninterrupted
    with warnings.catch_warnings(), pytest.raises(ValueError, match=re.escape(message)):
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns first
        train(
            _model(toy_tokenizer),
            toy_tokenizer,
            train_ex,
            val_ex,
            _config(output_dir=str(out), **change),
            resume=True,
        )


def test_examples_longer_than_the_context_fail_before_training(toy_tokenizer, train_ex):
    long = {k: v * 40 for k, v in train_ex[0].items()}  # far past the toy model's context
    with pytest.raises(
        ValueError,
        match=r"longest validation example has \d+ tokens but the "
        r"model's context is \d+; encode with max_length=",
    ):
        train(_model(toy_tokenizer), toy_tokenizer, train_ex, [long], _config())


def test_resume_refuses_another_checkpoint_format(toy_tokenizer, train_ex, uninterrupted, tmp_path):
    _, _, out = uninterrupted
    ckpt = load_checkpoint(out)
    torch.save({**ckpt, "format": 99}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="checkpoint format 99, this version of lumorik_sft reads"):
        train(
            _model(toy_tokenizer),
            toy_tokenizer,
            train_ex,
            config=_config(),
            resume=tmp_path / CHECKPOINT_NAME,
        )


def test_signal_handlers_installed_only_while_training(toy_tokenizer, train_ex):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    during, events = {}, []

    def callback(event: dict) -> None:
        during.update({s: signal.getsignal(s) for s in before})
        events.append((event["event"], event["epoch"]))

    train(
        _model(toy_tokenizer),
        toy_tokenizer,
        train_ex,
        train_ex[:2],
        config=_config(max_steps=1),
        callback=callback,
    )
    assert all(during[s] is not before[s] for s in before)
    assert events == [("epoch", 0), ("step", 1), ("epoch", 1)]
    assert {s: signal.getsignal(s) for s in before} == before


def test_checkpoint_written_atomically_with_history_and_final(toy_tokenizer, uninterrupted):
    _, result, out = uninterrupted
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "final", "history.json"]
    assert (out / "final" / "tokenizer.json").exists()
    saved = json.loads((out / "history.json").read_text())
    assert saved == json.loads(json.dumps(result.to_dict()))
    assert load_checkpoint(out / CHECKPOINT_NAME)["progress"]["finished"]


# --------------------------------------------------------------------------- schedule, guards


def test_linear_warmup_then_linear_decay(toy_tokenizer, train_ex):
    # 12 examples, batch 2, no accumulation, 1 epoch: 6 steps, 2 of them warmup.
    result = train(
        _model(toy_tokenizer),
        toy_tokenizer,
        train_ex[:12],
        config=_config(learning_rate=1e-3, grad_accum_steps=1, epochs=1),
    )
    lrs = [s["lr"] for s in result.steps]
    expected = [0.0, 0.5e-3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_no_warmup_starts_at_peak_and_decays(toy_tokenizer, train_ex):
    result = train(
        _model(toy_tokenizer),
        toy_tokenizer,
        train_ex[:8],
        config=_config(learning_rate=1e-3, warmup_steps=None, grad_accum_steps=1, epochs=1),
    )
    assert [s["lr"] for s in result.steps] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def test_loss_goes_down_on_memorisation(toy_tokenizer, train_ex, arch):
    model = build_model(arch, toy_tokenizer, seed=0, **SIZE)
    result = train(
        model,
        toy_tokenizer,
        train_ex,
        config=_config(learning_rate=1e-2, batch_size=8, grad_accum_steps=1, epochs=15, warmup_steps=0),
    )
    assert len(result.steps) == 30
    first, last = result.epochs[1]["train_loss"], result.epochs[-1]["train_loss"]
    assert last < 0.5 * first, (arch, first, last)


def test_precision_auto_is_fp32_on_cpu_and_bf16_autocast_runs(toy_tokenizer, train_ex):
    auto = train(_model(toy_tokenizer), toy_tokenizer, train_ex, config=_config(max_steps=1))
    assert (auto.device, auto.precision) == ("cpu", "fp32")
    bf16 = train(
        _model(toy_tokenizer), toy_tokenizer, train_ex, train_ex[:4], _config(max_steps=2, precision="bf16")
    )
    assert bf16.precision == "bf16"
    assert all(math.isfinite(s["loss"]) for s in bf16.steps)
    assert bf16.steps[0]["loss"] != pytest.approx(auto.steps[0]["loss"], abs=1e-7)


def test_bf16_on_a_cpu_that_only_emulates_it_warns(monkeypatch):
    """Asked for bf16 on a CPU without AVX512-BF16/AMX (an AVX2 laptop), oneDNN emulates it,
    many times slower than fp32: say so instead of training slowly in silence. Native bf16 and
    'auto' (fp32 on a CPU) stay quiet."""
    from lumorik_sft import defaults

    cpu = torch.device("cpu")
    monkeypatch.setattr(defaults, "_native_bf16", lambda device: False)  # an AVX2-only CPU
    with pytest.warns(UserWarning, match="emulated"):
        assert defaults.resolve_precision("bf16", cpu) == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert defaults.resolve_precision("auto", cpu) == "fp32"
        monkeypatch.setattr(defaults, "_native_bf16", lambda device: True)  # AVX512-BF16 or AMX
        assert defaults.resolve_precision("bf16", cpu) == "bf16"


def test_zero_token_micro_batch_gives_no_nan(toy_tokenizer, train_ex):
    model = _model(toy_tokenizer, dropout=False).eval()
    collate = SFTCollator(toy_tokenizer.pad_token_id)
    empty = collate([{**ex, "labels": [IGNORE_INDEX] * len(ex["labels"])} for ex in train_ex[:2]])
    full = collate(train_ex[2:4])
    model.zero_grad()
    alone = accumulate_gradients(model, [full])
    g_alone = _grads(model)
    model.zero_grad()
    mixed = accumulate_gradients(model, [empty, full])
    assert math.isfinite(mixed.loss) and mixed.loss == pytest.approx(alone.loss, abs=1e-6)
    for a, b in zip(_grads(model), g_alone, strict=True):
        torch.testing.assert_close(a, b)

    model.zero_grad(set_to_none=True)
    nothing = accumulate_gradients(model, [empty])
    assert nothing.n_tokens == 0 and nothing.loss == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_step_without_supervised_tokens_is_skipped_with_warning(toy_tokenizer, train_ex):
    rows = [{**ex, "labels": [IGNORE_INDEX] * len(ex["labels"])} for ex in train_ex[:2]]
    rows += train_ex[2:6]
    model = _model(toy_tokenizer)
    with pytest.warns(UserWarning, match="no supervised token"):
        result = train(
            model,
            toy_tokenizer,
            rows,
            config=_config(shuffle=False, grad_accum_steps=1, epochs=1, warmup_steps=0),
        )
    assert result.skipped_steps == 1 and len(result.steps) == 2
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in result.steps)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_weight_decay_skips_biases_and_norms(tiny_model):
    groups = build_optimizer(tiny_model, _config(weight_decay=0.1)).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | plain == {id(p) for p in tiny_model.parameters()}  # every param trains
    assert id(tiny_model.transformer.ln_f.bias) in plain
    assert id(tiny_model.transformer.h[0].attn.c_attn.weight) in decayed
    assert id(tiny_model.transformer.h[0].attn.c_attn.bias) not in decayed
    assert id(tiny_model.transformer.ln_f.weight) not in decayed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": 0}, "learning_rate must be a positive number.*5e-5"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"grad_accum_steps": 0}, "grad_accum_steps must be an integer >= 1"),
        ({"warmup_ratio": 0.1, "warmup_steps": 3}, "set warmup_steps or warmup_ratio, not both"),
        ({"warmup_ratio": 1.5}, r"warmup_ratio must be in \[0, 1\)"),
        ({"max_grad_norm": -1.0}, "use None or 0 to disable clipping"),
        ({"precision": "fp16"}, "precision must be one of auto, fp32, bf16"),
        ({"device": "gpu"}, "is not a torch device; use 'auto'"),
        ({"max_steps": 0}, "max_steps must be an integer >= 1 or None"),
    ],
)
def test_config_validation_says_how_to_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_config_defaults_and_help():
    config = TrainConfig()
    # learning_rate None: train() uses the model's recommended rate (defaults.recommended_learning_rate)
    assert (config.learning_rate, config.batch_size, config.epochs) == (None, 8, 3)
    assert TrainConfig(batch_size=4, grad_accum_steps=4).effective_batch_size == 16
    assert all(TrainConfig.help().values())
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


# --------------------------------------------------------------------------- chapter, plots


def test_chapter_loop_runs_and_supervises_the_prompt(toy_tokenizer, train_ex):
    model = _model(toy_tokenizer, dropout=False)
    start = copy.deepcopy(model)
    loader = DataLoader(train_ex[:8], batch_size=4, collate_fn=SFTCollator(toy_tokenizer.pad_token_id))
    losses = chapter_loop(model, loader, epochs=2, lr=1e-3)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)

    batch = next(iter(loader))
    with torch.no_grad():
        naive = float(
            start(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["input_ids"],
            ).loss
        )
        nll, n = completion_nll(start, batch)
    assert losses[0] == pytest.approx(naive, abs=1e-5)  # labels = input_ids, prompt included
    assert abs(losses[0] - float(nll) / n) > 1e-3  # not the completion-only loss


def test_plot_loss_curves_returns_figure_and_writes_png(uninterrupted, tmp_path):
    from matplotlib.figure import Figure

    _, result, out = uninterrupted
    fig = plot_loss_curves(result, path=tmp_path / "loss.png")
    assert isinstance(fig, Figure)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["train loss (per step)", "train loss (epoch)", "validation loss"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(plot_loss_curves(Path(out) / "history.json"), Figure)
