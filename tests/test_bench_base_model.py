"""The base-model benchmark's choice of learning rate (the model card records it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_base_model.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_base_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _rows(pairs):
    return [{"learning_rate": lr, "completion_perplexity": ppl} for lr, ppl in pairs]


def test_best_lr_takes_the_clear_winner(bench):
    assert bench.best_lr(_rows([(5e-5, 14.6), (3e-4, 1.54), (1e-3, 1.30), (3e-3, 1.11)])) == 3e-3


def test_best_lr_breaks_a_tie_towards_the_smaller_step(bench):
    # the card's sweep: 1e-3 and 3e-3 within 0.1% of each other; the smaller is the safer choice
    assert bench.best_lr(_rows([(5e-5, 14.6), (3e-4, 1.539), (1e-3, 1.112), (3e-3, 1.111)])) == 1e-3


def test_best_lr_never_picks_a_diverged_run(bench):
    assert bench.best_lr(_rows([(1e-3, 1.2), (1e-2, float("inf"))])) == 1e-3
