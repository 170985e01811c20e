"""Experiment drivers and widgets: tiny model, tiny data, a few seconds in all."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from matplotlib.figure import Figure

from lumorik_sft.course import experiments as E
from lumorik_sft.course import widgets as W
from lumorik_sft.course.synthetic import product_descriptions
from lumorik_sft.encoding import encode_records
from lumorik_sft.models import build_model, train_bpe_tokenizer
from lumorik_sft.pipeline import EvalReport

MAX_LEN = 64


@pytest.fixture(scope="module")
def records():
    return product_descriptions(24, seed=3)


@pytest.fixture(scope="module")
def factory(records):
    tok = train_bpe_tokenizer([r["prompt"] + "\n" + r["completion"] for r in records], vocab_size=300)
    base = build_model("gpt2", tok, n_layer=1, width=32, n_head=2, context=MAX_LEN, seed=0)
    return E.BaseModelFactory(base, tok, "random-init toy")


@pytest.fixture(scope="module")
def examples(factory, records):
    ex, _ = encode_records(records, factory.tokenizer, max_length=MAX_LEN)
    return ex[:16], ex[16:]


def test_factory_gives_independent_fresh_copies(factory):
    a, b = factory(), factory()
    assert a is not b and a is not factory.base
    next(a.parameters()).data.add_(1.0)
    assert not next(a.parameters()).equal(next(b.parameters()))
    assert next(b.parameters()).equal(next(factory.base.parameters()))
    assert not factory.pretrained


def test_run_sft_summary_is_plain_data(factory, examples):
    train_ex, val_ex = examples
    run = E.run_sft(factory, factory.tokenizer, train_ex, val_ex, learning_rate=3e-3, batch_size=4, epochs=2)
    assert run["steps"] == len(run["step_losses"]) == 8  # 16 examples / 4 x 2 epochs
    assert [e["epoch"] for e in run["epochs_log"]] == [0, 1, 2]
    assert run["val_loss_after"] == run["epochs_log"][-1]["val_loss"]
    assert run["improvement"] == pytest.approx(run["val_loss_before"] - run["val_loss_after"])
    assert not run["diverged"] and "model" not in run


def test_run_sft_reports_divergence_instead_of_raising(factory, examples, monkeypatch):
    def exploding_train(model, tokenizer, train_ex, val_ex, cfg, callback):
        callback({"event": "epoch", "epoch": 0, "val_loss": 5.0, "result": None})
        callback({"event": "step", "step": 1, "loss": 9.0, "result": None})
        raise FloatingPointError("non-finite loss")

    monkeypatch.setattr(E, "train", exploding_train)
    run = E.run_sft(factory, factory.tokenizer, *examples, learning_rate=10.0)
    assert run["diverged"] and run["val_loss_after"] == math.inf
    assert run["step_losses"] == [9.0] and run["val_loss_before"] == 5.0


def test_lr_sweep_starts_every_run_from_the_same_model(factory, examples):
    runs = E.lr_sweep(factory, factory.tokenizer, *examples, [1e-5, 3e-3], epochs=1, batch_size=8)
    assert [r["label"] for r in runs] == ["lr 1e-05", "lr 0.003"]
    assert runs[0]["val_loss_before"] == runs[1]["val_loss_before"]
    assert runs[1]["improvement"] > runs[0]["improvement"]  # a toy model barely moves at 1e-5
    with pytest.raises(ValueError, match="empty"):
        E.lr_sweep(factory, factory.tokenizer, *examples, [])


def test_epochs_curve_and_comparison(factory, examples):
    rows = E.epochs_curve(factory, factory.tokenizer, *examples, 3, learning_rate=3e-3, batch_size=8)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["gap"] is None and rows[3]["gap"] == pytest.approx(
        rows[3]["val_loss"] - rows[3]["train_loss"]
    )
    runs = E.epochs_comparison(factory, factory.tokenizer, *examples, (1, 2), batch_size=8)
    assert [r["label"] for r in runs] == ["1 epoch", "2 epochs"]
    assert [r["steps"] for r in runs] == [2, 4]


def test_batch_size_sweep_keeps_the_token_budget(factory, examples):
    runs = E.batch_size_sweep_fixed_tokens(
        factory, factory.tokenizer, *examples, [2, 8], learning_rate=1e-3, lr_scaling="sqrt", epochs=1
    )
    assert [r["steps"] for r in runs] == [8, 2]
    assert runs[0]["tokens"] == runs[1]["tokens"] > 0
    assert runs[1]["learning_rate"] == pytest.approx(2e-3)  # 1e-3 * sqrt(8 / 2)
    with pytest.raises(ValueError, match="lr_scaling"):
        E.batch_size_sweep_fixed_tokens(
            factory, factory.tokenizer, *examples, [2], learning_rate=1e-3, lr_scaling="cube"
        )


def test_shuffle_completions_moves_completions_to_other_prompts(records):
    noisy = E.shuffle_completions(records, 0.5, seed=1)
    changed = [
        i for i, (a, b) in enumerate(zip(records, noisy, strict=True)) if a["completion"] != b["completion"]
    ]
    assert len(changed) == 12 == sum(r.get("noisy") == "yes" for r in noisy)
    assert Counter(r["completion"] for r in noisy) == Counter(r["completion"] for r in records)
    assert [r["prompt"] for r in noisy] == [r["prompt"] for r in records]
    assert "noisy" not in records[0]  # input untouched
    assert E.shuffle_completions(records, 0.0) == [dict(r) for r in records]
    with pytest.raises(ValueError, match="fraction"):
        E.shuffle_completions(records, 1.5)


def test_noisy_vs_clean_variants(factory, records):
    runs = E.noisy_vs_clean(
        factory,
        factory.tokenizer,
        records[:16],
        records[16:],
        variants=[(8, 0.0), (16, 0.5)],
        max_length=MAX_LEN,
        epochs=1,
        batch_size=8,
    )
    assert [(r["n"], r["n_corrupted"], r["label"]) for r in runs] == [
        (8, 0, "8 clean"),
        (16, 8, "16, 50% noisy"),
    ]
    with pytest.raises(ValueError, match="more than"):
        E.noisy_vs_clean(factory, factory.tokenizer, records[:4], records[16:], variants=[(8, 0.0)])


def test_before_after_table_knows_which_direction_is_better():
    before = EvalReport(loss=3.0, perplexity=20.0, n_tokens=10, bleu=5.0, rouge={"rougeL": 0.2})
    after = EvalReport(loss=2.0, perplexity=7.4, n_tokens=10, bleu=30.0, rouge={"rougeL": 0.1})
    rows = {r["metric"]: r for r in E.before_after_table(before, after)}
    assert list(rows) == ["loss", "perplexity", "BLEU", "rougeL"]
    assert rows["loss"]["better"] and rows["BLEU"]["better"] and not rows["rougeL"]["better"]
    assert rows["BLEU"]["change"] == 25.0


def test_metric_pitfall_candidates_fool_bleu(factory):
    case = E.metric_pitfall_candidates(seed=7)
    assert case == E.metric_pitfall_candidates(seed=7)  # deterministic
    cands = case["candidates"]
    assert cands["wrong facts"] != cands["reference"] and cands["reference"] == case["reference"]
    rows = {
        r["name"]: r
        for r in E.score_candidates(factory(), factory.tokenizer, case["prompt"], case["reference"], cands)
    }
    assert rows["reference"]["bleu"] == pytest.approx(100.0)
    assert rows["wrong facts"]["bleu"] > 40 > rows["paraphrase"]["bleu"]
    assert rows["wrong facts"]["rougeL"] > rows["paraphrase"]["rougeL"]
    assert all(r["perplexity"] == pytest.approx(math.exp(r["loss"])) for r in rows.values())


# --------------------------------------------------------------------------- widgets


def test_widgets_off_outside_a_kernel(monkeypatch):
    monkeypatch.delenv(W.WIDGETS_ENV, raising=False)
    assert not W.widgets_enabled()  # plain Python: no frontend
    monkeypatch.setenv(W.WIDGETS_ENV, "0")
    assert not W.widgets_enabled()
    monkeypatch.setenv(W.WIDGETS_ENV, "maybe")
    with pytest.raises(ValueError, match="LUMORIK_WIDGETS"):
        W.widgets_enabled()


def test_interactive_or_static_calls_fn_with_defaults(monkeypatch, capsys):
    monkeypatch.setenv(W.WIDGETS_ENV, "0")
    calls = []

    def fn(lr, bs, name, fixed):
        calls.append((lr, bs, name, fixed))
        return f"{name}: lr={lr} bs={bs}"

    out = W.interactive_or_static(
        fn,
        lr=W.log_slider(1e-3, -5, -1),
        bs=W.slider(8, 1, 64),
        name=W.choice("a", ["a", "b"]),
        fixed=3,
        manual=True,
    )
    assert out == "a: lr=0.001 bs=8" and calls == [(1e-3, 8, "a", 3)]
    assert "a: lr=0.001 bs=8" in capsys.readouterr().out
    with pytest.raises(ValueError, match="outside"):
        W.slider(5, 0, 1)


def test_interactive_or_static_live_path_builds_controls(monkeypatch):
    pytest.importorskip("ipywidgets")
    import ipywidgets

    monkeypatch.setenv(W.WIDGETS_ENV, "1")
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objs, **kw: shown.extend(objs))
    out = W.interactive_or_static(
        lambda t, n, s, on: (t, n, s, on),
        t=W.slider(0.7, 0.0, 2.0, 0.1),
        n=W.slider(32, 1, 96),
        s=W.text("hi"),
        on=W.checkbox(True),
    )
    assert out == (0.7, 32, "hi", True)
    box = next(o for o in shown if isinstance(o, ipywidgets.VBox))
    kinds = [type(c).__name__ for c in box.children]
    # the controls, then the status line, the error area and the note on the checks' default values
    assert kinds == ["FloatSlider", "IntSlider", "Textarea", "Checkbox", "HTML", "Output", "HTML"]
    assert W.DEFAULTS_NOTE in box.children[-1].value


def test_live_loss_plot_draws_the_final_curve_when_not_live(factory, examples):
    from lumorik_sft.training import train

    live = W.LiveLossPlot(every=2, live=False)
    with pytest.raises(RuntimeError, match="callback"):
        live.finish()
    train(
        factory(),
        factory.tokenizer,
        *examples,
        E.quiet_config(learning_rate=1e-3, batch_size=8, epochs=1),
        callback=live,
    )
    fig = live.finish()
    assert isinstance(fig, Figure) and live.updates == 0
    assert len(live.result.steps) == 2


def test_plots_draw_runs_and_curves():
    runs = [
        {
            "label": "lr 1e-05",
            "step_losses": [5.0, 4.9],
            "diverged": False,
            "val_loss_before": 5.0,
            "val_loss_after": 4.9,
        },
        {
            "label": "lr 1",
            "step_losses": [5.0, 50.0],
            "diverged": True,
            "val_loss_before": 5.0,
            "val_loss_after": math.inf,
        },
    ]
    assert isinstance(E.plot_step_losses(runs), Figure)
    fig = E.plot_val_losses(runs)
    assert [t.get_text() for t in fig.axes[0].texts] == ["4.900", "diverged"]
    rows = [
        {"epoch": 0, "train_loss": None, "val_loss": 5.0},
        {"epoch": 1, "train_loss": 4.0, "val_loss": 4.5},
    ]
    assert "epoch 1" in E.plot_epochs_curve(rows).axes[0].get_legend().get_texts()[-1].get_text()
