"""Batched generation: left padding must not change what a model generates."""

from __future__ import annotations

import pytest
import torch

from lumorik_sft.encoding import SFTCollator, completion_ids, encode_records
from lumorik_sft.generation import _cut_at_eos, generate_completions, generate_detailed, generate_with_stops
from lumorik_sft.models import build_model

PROMPTS = ["Question: What is a fever?", "Write a product description.\nCategory: backpack", "Q"]


@pytest.fixture()
def memorised(toy_tokenizer, arch):
    """A tiny model of each architecture that has memorised three short completions."""
    records = [
        {"prompt": p, "completion": c}
        for p, c in zip(PROMPTS, ["A fever is high.", "A navy backpack.", "def add"], strict=True)
    ]
    model = build_model(arch, toy_tokenizer, n_layer=2, width=64, n_head=4, context=128, seed=1)
    examples, _ = encode_records(records, toy_tokenizer, max_length=64)
    batch = SFTCollator(toy_tokenizer.pad_token_id)(examples)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, records


def test_batched_greedy_equals_one_at_a_time_and_stops_at_eos(memorised, toy_tokenizer):
    model, records = memorised
    batched = generate_completions(model, toy_tokenizer, PROMPTS, max_new_tokens=20, batch_size=3)
    single = [generate_completions(model, toy_tokenizer, [p], max_new_tokens=20)[0] for p in PROMPTS]
    assert batched == single
    assert batched == [r["completion"] for r in records]  # memorised, and stopped at EOS


def test_stop_flags_say_whether_eos_came_before_the_limit(memorised, toy_tokenizer):
    model, records = memorised
    texts, stopped = generate_with_stops(model, toy_tokenizer, PROMPTS, max_new_tokens=20)
    assert texts == [r["completion"] for r in records] and stopped == [True, True, True]
    shortest = min(len(toy_tokenizer(r["completion"])["input_ids"]) for r in records)
    cut, stopped = generate_with_stops(model, toy_tokenizer, PROMPTS, max_new_tokens=shortest - 1)
    assert stopped == [False, False, False]  # no completion fits: every one hit the limit
    assert all(r["completion"].startswith(c) for c, r in zip(cut, records, strict=True))


def test_n_tokens_counts_the_new_tokens_before_eos_at_every_limit(memorised, toy_tokenizer):
    """At every limit, below, at and past each memorised completion's length: ``n_tokens`` is the
    number of ids the text was decoded from (EOS excluded), and an output did not stop exactly
    when it ran to the limit."""
    model, records = memorised
    memorised_ids = [completion_ids(toy_tokenizer, r["completion"])[:-1] for r in records]  # EOS cut
    for limit in range(1, max(map(len, memorised_ids)) + 3):
        done = generate_detailed(model, toy_tokenizer, PROMPTS, max_new_tokens=limit)
        for c, ids in zip(done, memorised_ids, strict=True):
            kept = ids[:limit]
            assert c.n_tokens == len(kept), (limit, c)
            assert c.text == toy_tokenizer.decode(kept, skip_special_tokens=True).strip()
            assert c.stopped == (limit > len(ids)), (limit, c)  # EOS is new token len(ids) + 1
            assert (not c.stopped) == (c.n_tokens == limit), (limit, c)
        texts, stopped = generate_with_stops(model, toy_tokenizer, PROMPTS, max_new_tokens=limit)
        assert (texts, stopped) == ([c.text for c in done], [c.stopped for c in done])


def test_sampling_is_seeded(tiny_model, toy_tokenizer):
    kw = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5}
    a = generate_completions(tiny_model, toy_tokenizer, PROMPTS, seed=3, **kw)
    b = generate_completions(tiny_model, toy_tokenizer, PROMPTS, seed=3, **kw)
    c = generate_completions(tiny_model, toy_tokenizer, PROMPTS, seed=4, **kw)
    assert a == b and a != c


def test_generation_restores_training_mode_and_guards_lengths(tiny_model, toy_tokenizer):
    tiny_model.train()
    generate_completions(tiny_model, toy_tokenizer, ["Q"], max_new_tokens=2)
    assert tiny_model.training
    with pytest.raises(ValueError, match="no room"):
        generate_completions(tiny_model, toy_tokenizer, ["Q"], max_new_tokens=128)
    with pytest.raises(ValueError, match="at least 1"):
        generate_completions(tiny_model, toy_tokenizer, ["Q"], max_new_tokens=0)


def test_cut_at_eos():
    assert _cut_at_eos([5, 6, 0, 7], {0}) == ([5, 6], True)
    assert _cut_at_eos([5, 6], {0}) == ([5, 6], False)


def test_the_elided_mask_false_alarm_is_dropped_only_while_generating(tiny_model, toy_tokenizer, monkeypatch):
    """transformers drops an all-ones mask at decoding steps, then warns that it is missing when a
    finished row's last token is EOS (= pad). We pass the mask, so that warning is noise while we
    generate; outside `generate_completions` the same message still reaches its logger."""
    import logging

    from transformers import PreTrainedModel

    from lumorik_sft import generation

    seen: list[str] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    message = "We strongly recommend passing in an `attention_mask` since your input_ids may be padded."

    def warn(self, input_ids, attention_mask):  # what transformers does at such a step
        generation._MODELING_LOGGER.warning(message)

    monkeypatch.setattr(PreTrainedModel, "warn_if_padding_and_no_attention_mask", warn)
    handler = Spy()
    generation._MODELING_LOGGER.addHandler(handler)
    try:
        generate_completions(tiny_model, toy_tokenizer, ["a prompt", "another"], max_new_tokens=2)
        assert seen == []
        generation._MODELING_LOGGER.warning(message)
        assert seen == [message]
        generation._MODELING_LOGGER.warning("another warning")
        assert seen[-1] == "another warning"
    finally:
        generation._MODELING_LOGGER.removeHandler(handler)
