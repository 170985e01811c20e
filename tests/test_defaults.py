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
    assert (settings.epochs, settings.seed, settings.n_generate) == (3, 7, 100)
