"""The chapter's loop as written trains on prompt and padding; the corrected loop on the completion only."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from lumorik_sft.course import chapter_loop
from lumorik_sft.encoding import IGNORE_INDEX, completion_ids, prompt_ids
from lumorik_sft.metrics import completion_nll
from lumorik_sft.models import build_model

RECORDS = [
    {"prompt": "Question: hi", "completion": "A fever."},
    {"prompt": "Question: what helps a cough?", "completion": "Rest and fluids help."},
    {"prompt": "Question: sore throat", "completion": "Warm drinks."},
    {"prompt": "Question: a cut", "completion": "Clean it and cover it."},
]


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off even in train mode, so two forward passes give the same loss."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture()
def short_tokenizer(toy_tokenizer):
    """The toy tokenizer with a 16-token maximum: the chapter pads every row to it."""
    tok = copy.deepcopy(toy_tokenizer)
    tok.model_max_length = 16
    return tok


def test_chapter_encode_glues_the_pair_and_pads_with_eos_to_the_maximum(short_tokenizer):
    tok = chapter_loop.gpt2_style(short_tokenizer)
    assert tok.pad_token_id == tok.eos_token_id != short_tokenizer.pad_token_id  # a copy, pad = EOS
    enc = chapter_loop.chapter_encode(tok, RECORDS[0])
    p = tok("Question: hi")["input_ids"]
    c = tok("A fever.")["input_ids"]
    n = len(p) + len(c)
    # no separator and no EOS of its own: the pad tokens (= EOS) follow the completion directly
    assert enc["input_ids"].tolist() == p + c + [tok.eos_token_id] * (16 - n)
    assert enc["attention_mask"].tolist() == [1] * n + [0] * (16 - n)


def test_chapter_loop_labels_are_the_inputs_prompt_and_padding_included(short_tokenizer):
    model = build_model("gpt2", short_tokenizer, n_layer=1, width=16, n_head=2, context=32, seed=0)
    seen: list[dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(dict(kw)), with_kwargs=True)
    losses = chapter_loop.train_as_chapter(model, short_tokenizer, RECORDS[:1], epochs=1, batch_size=1)
    assert len(losses) == 1 and losses[0] > 0
    eos = short_tokenizer.eos_token_id
    p = short_tokenizer("Question: hi")["input_ids"]
    c = short_tokenizer("A fever.")["input_ids"]
    expected = p + c + [eos] * (16 - len(p) - len(c))
    assert seen[0]["labels"].tolist() == [expected]  # every prompt and pad position is a target
    assert seen[0]["input_ids"].tolist() == [expected]


def test_corrected_batches_mask_prompt_and_padding_and_keep_eos(toy_tokenizer):
    tok = toy_tokenizer
    loader = chapter_loop.corrected_loader(tok, RECORDS[:2], batch_size=2, seed=0)
    (batch,) = list(loader)
    width = batch["input_ids"].shape[1]
    rows = {}
    for record in RECORDS[:2]:
        p, c = prompt_ids(tok, record["prompt"]), completion_ids(tok, record["completion"])
        assert c[-1] == tok.eos_token_id != tok.pad_token_id
        pad = width - len(p) - len(c)
        rows[tuple(p + c + [tok.pad_token_id] * pad)] = [IGNORE_INDEX] * len(p) + c + [IGNORE_INDEX] * pad
    assert width == max(len(r) - r.count(tok.pad_token_id) for r in map(list, rows))  # the longest row
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        assert labels == rows[tuple(ids)]


def test_corrected_loop_loss_is_the_reference_completion_loss(toy_tokenizer):
    """lr=0 keeps the weights, so each step's loss can be recomputed with `completion_nll`."""
    model = _no_dropout(build_model("gpt2", toy_tokenizer, n_layer=1, width=16, n_head=2, context=64, seed=0))
    run = {"batch_size": 2, "seed": 3}
    losses = chapter_loop.train_corrected(model, toy_tokenizer, RECORDS, epochs=1, lr=0.0, **run)
    batches = list(chapter_loop.corrected_loader(toy_tokenizer, RECORDS, **run))
    assert len(losses) == len(batches) == 2
    model.train()
    with torch.no_grad():
        for loss, batch in zip(losses, batches, strict=True):
            nll_sum, n_tokens = completion_nll(model, batch)
            assert loss == pytest.approx((nll_sum / n_tokens).item(), abs=1e-6)
            everything = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
            assert abs(loss - everything.item()) > 1e-3  # the chapter's labels give another loss


class _ScriptedModel(torch.nn.Module):
    """Stands in for a model: `generate` appends fixed tokens to the prompt batch."""

    def __init__(self, new_tokens: list[list[int]], context: int = 64):
        super().__init__()
        self.new_tokens = torch.tensor(new_tokens)
        self.config = SimpleNamespace(n_positions=context)  # what `context_length` reads
        self.device_anchor = torch.nn.Parameter(torch.zeros(1))  # where `generate_detailed` puts inputs

    def generate(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        return torch.cat([input_ids, self.new_tokens[: len(input_ids)]], dim=1)


def test_generate_checked_records_stops_and_echoes(toy_tokenizer):
    tok = toy_tokenizer
    echo = tok("Question: sore throat", add_special_tokens=False)["input_ids"]
    words = tok(" Warm drinks", add_special_tokens=False)["input_ids"]
    limit = max(len(echo), len(words)) + 1
    rows = [
        (words + [tok.eos_token_id] * limit)[:limit],  # stops after "Warm drinks"
        (echo * limit)[:limit],  # never stops, repeats the prompt's line
    ]
    model = _ScriptedModel(rows)
    out = chapter_loop.generate_checked(model, tok, ["Question: sore throat"] * 2, max_new_tokens=limit)
    assert [g.stopped for g in out] == [True, False]
    assert [g.echoed for g in out] == [False, True]
    assert out[0].text == "Warm drinks" and out[0].new_tokens == len(words)
    assert out[1].new_tokens == limit
    assert model.training  # left as it was found


@pytest.mark.parametrize(
    "text,echoed",
    [
        ("Category: tote bag, in mustard yellow.", True),
        ("A mustard yellow tote bag.", False),
        ("Write a product description. A bag.", True),
    ],
)
def test_echo_means_a_whole_prompt_line(text, echoed):
    prompt = "Write a product description.\nCategory: tote bag\nTone: calm"
    assert chapter_loop.echoes_prompt(prompt, text) is echoed


def test_masking_pad_labels_with_pad_eos_leaves_no_stop_target(short_tokenizer):
    """The usual patch (-100 where the input is the pad id) masks every EOS when pad = EOS."""
    model = build_model("gpt2", short_tokenizer, n_layer=1, width=16, n_head=2, context=32, seed=0)
    seen: list[dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(dict(kw)), with_kwargs=True)
    chapter_loop.train_as_chapter(
        model, short_tokenizer, RECORDS[:1], epochs=1, batch_size=1, mask_pad_labels=True
    )
    p = short_tokenizer("Question: hi")["input_ids"]
    c = short_tokenizer("A fever.")["input_ids"]
    assert seen[0]["labels"].tolist() == [p + c + [IGNORE_INDEX] * (16 - len(p) - len(c))]
    assert short_tokenizer.eos_token_id not in seen[0]["labels"].tolist()[0]
