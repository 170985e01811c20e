"""The package's decisions made once: learning rate by model card or size, fast mode, precision."""

from __future__ import annotations

import json

import torch

from lumorik_sft import defaults
from lumorik_sft.course import demo


def test_learning_rate_comes_from_the_card_then_from_model_size(tmp_path, monkeypatch):
    (tmp_path / "card.json").write_text(json.dumps({"recommended_sft_learning_rate": 3e-4}))
    assert defaults.recommended_learning_rate(str(tmp_path)) == 3e-4
    small = torch.nn.Linear(10, 10)  # 110 parameters
    assert defaults.recommended_learning_rate("nowhere", small) == 1e-3
    monkeypatch.setattr(defaults, "SMALL_MODEL_PARAMETERS", 100)
    assert defaults.recommended_learning_rate("nowhere", small) == defaults.CHAPTER_LEARNING_RATE == 5e-5


def test_fast_mode_reads_the_environment(monkeypatch):
    monkeypatch.setenv("LUMORIK_FAST", "1")
    assert defaults.fast_mode()
    assert demo.DemoSettings.for_mode(True).epochs == 1
    monkeypatch.setenv("LUMORIK_FAST", "0")
    assert not defaults.fast_mode()
    settings = demo.DemoSettings.for_mode(False, epochs=None, seed=7)
    assert (settings.epochs, settings.seed, settings.n_generate) == (2, 7, 100)


def test_the_demo_asks_the_same_rule_as_training(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps({"recommended_sft_learning_rate": 3e-4}))
    small = torch.nn.Linear(10, 10)
    assert demo.DemoSettings().learning_rate is None  # like TrainConfig: None = the model's rate
    assert demo.DemoSettings().learning_rate_for(str(tmp_path), small) == 3e-4
    assert (
        demo.DemoSettings().learning_rate_for("nowhere", small)
        == defaults.recommended_learning_rate("nowhere", small)
        == 1e-3
    )
    assert demo.DemoSettings(learning_rate=2e-5).learning_rate_for(str(tmp_path), small) == 2e-5
    assert demo.DemoSettings.for_mode(True, learning_rate=None).learning_rate is None
