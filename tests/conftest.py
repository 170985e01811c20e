"""Shared offline fixtures: a toy tokenizer trained in-process and tiny models of three architectures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lumorik_sft.course.checks import TOY_TEXTS  # noqa: E402  (one toy corpus for tests and checks)
from lumorik_sft.models import build_model, train_bpe_tokenizer  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True, scope="session")
def auto_precision_is_fp32():
    """precision='auto' resolves to fp32 in tests, on every CPU.

    'auto' means bf16 where the CPU has native bf16 (`defaults.resolve_precision`), so the same
    test would compare bf16 numbers on one machine and fp32 numbers on another. Tests of the bf16
    path ask for precision='bf16' explicitly, or patch this back.
    """
    from lumorik_sft import defaults

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(defaults, "_native_bf16", lambda device: False)
        yield


@pytest.fixture(scope="session")
def toy_tokenizer():
    """A byte-level BPE tokenizer with distinct EOS and pad tokens, trained in a second."""
    return train_bpe_tokenizer(TOY_TEXTS, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="session", params=["gpt2", "llama", "qwen2"])
def arch(request) -> str:
    return request.param


@pytest.fixture()
def tiny_model(toy_tokenizer):
    """A tiny seeded GPT-2 model sized to the toy tokenizer."""
    return build_model("gpt2", toy_tokenizer, n_layer=2, width=32, n_head=2, context=128, seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train several times faster on one thread than on two busy cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
