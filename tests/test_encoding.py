"""The encoding contract: golden ids and labels, truncation, padding, and TRL's masking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lumorik_sft.encoding import (
    IGNORE_INDEX,
    SFTCollator,
    completion_ids,
    encode_example,
    encode_prompts_for_generation,
    encode_records,
    naive_encode,
    pad_sequences,
    prompt_ids,
    render_supervision,
    truncate_pair,
)
from lumorik_sft.models import build_model, prepare_tokenizer, train_bpe_tokenizer


class CharTokenizerStub:
    """Just enough tokenizer to write golden rows by hand: one id per character."""

    eos_token_id = 0
    pad_token_id = 1
    bos_token_id = None
    all_special_ids = [0, 1]
    eos_token = "<eos>"
    pad_token = "<pad>"

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        return {"input_ids": [ord(c) - ord("a") + 2 for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join("|" if i < 2 else chr(i - 2 + ord("a")) for i in ids)


STUB = CharTokenizerStub()


def test_golden_row_masks_prompt_and_appends_eos():
    # prompt "ab" -> [2, 3]; completion "cd" -> [4, 5] then EOS 0; separator "" keeps it literal
    ex = encode_example(STUB, "ab", "cd", separator="", max_length=16)
    assert ex == {
        "input_ids": [2, 3, 4, 5, 0],
        "attention_mask": [1, 1, 1, 1, 1],
        "labels": [-100, -100, 4, 5, 0],
    }


def test_golden_batch_right_padded_with_masked_pad():
    rows = [encode_example(STUB, p, c, separator="", max_length=16) for p, c in [("ab", "cd"), ("a", "c")]]
    batch = SFTCollator(pad_token_id=1)(rows)
    assert batch["input_ids"].tolist() == [[2, 3, 4, 5, 0], [2, 4, 0, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 4, 5, 0], [-100, 4, 0, -100, -100]]


def test_left_padding_for_generation_puts_prompts_at_the_end():
    batch = encode_prompts_for_generation(STUB, ["abc", "a"], separator="")
    assert batch["input_ids"].tolist() == [[2, 3, 4], [1, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_truncation_cuts_prompt_from_the_left_first():
    ex = encode_example(STUB, "abcdef", "gh", separator="", max_length=5)
    # completion [8, 9, EOS] survives whole; the prompt keeps its last two tokens "ef"
    assert ex["input_ids"] == [6, 7, 8, 9, 0]
    assert ex["labels"] == [-100, -100, 8, 9, 0]


def test_truncation_cuts_completion_only_when_prompt_is_at_its_floor():
    ex = encode_example(STUB, "abcdef", "ghijkl", separator="", max_length=4)
    assert ex["input_ids"] == [7, 8, 9, 10]  # one prompt token, then the completion's head
    assert ex["labels"] == [-100, 8, 9, 10]


def test_report_tells_prompt_cuts_from_completion_cuts():
    records = [
        {"prompt": "ab", "completion": "c"},  # 2 + 1 + EOS = 4 tokens: fits
        {"prompt": "abcdef", "completion": "g"},  # prompt cut to 2, completion whole
        {"prompt": "abcdef", "completion": "ghijkl"},
    ]  # completion cut: EOS lost
    examples, report = encode_records(records, STUB, max_length=4, separator="")
    assert (report.encoded, report.truncated, report.completion_cut) == (3, 2, 1)
    assert [ex["input_ids"][-1] == STUB.eos_token_id for ex in examples] == [True, True, False]
    assert report.to_dict()["completion_cut"] == 1
    assert report.summary() == (
        "encoded 3 of 3 examples (5 prompt tokens, masked; 7 completion tokens, supervised); "
        "2 truncated, 1 of them into the completion (EOS lost); dropped: none"
    )


def test_example_left_without_completion_is_dropped_and_counted():
    assert encode_example(STUB, "abc", "d", separator="", max_length=3, min_prompt_tokens=3) is None
    records = [{"prompt": "abc", "completion": "d"}, {"prompt": "a", "completion": "b"}]
    examples, report = encode_records(records, STUB, max_length=2, separator="")
    assert len(examples) == 2 and report.dropped == {}
    examples, report = encode_records(records, STUB, max_length=1, separator="")
    assert report.read == 2
    assert report.dropped["no_completion_tokens"] == 2 and examples == []


def test_bos_is_kept_when_the_prompt_is_cut():
    prompt, completion = truncate_pair([99, 2, 3, 4, 5], [6, 0], 4, keep_head=1)
    assert prompt == [99, 5] and completion == [6, 0]


@settings(max_examples=200, deadline=None)
@given(
    p=st.integers(0, 30),
    c=st.integers(1, 30),
    max_length=st.integers(2, 40),
    head=st.integers(0, 1),
)
def test_truncation_invariants(p, c, max_length, head):
    prompt = list(range(100, 100 + p + head))
    completion = list(range(200, 200 + c))
    new_p, new_c = truncate_pair(prompt, completion, max_length, keep_head=head)
    assert len(new_p) + len(new_c) <= max(max_length, len(prompt[: head + 1]))
    assert new_c == completion[: len(new_c)]  # completion keeps its beginning
    assert new_p[head:] == prompt[len(prompt) - len(new_p) + head :] if len(new_p) > head else True
    if len(prompt) + len(completion) <= max_length:
        assert (new_p, new_c) == (prompt, completion)
    elif len(new_c) < len(completion):  # completion cut => prompt already at its floor
        assert len(new_p) <= head + 1


def test_real_tokenizer_labels_equal_completion_ids(toy_tokenizer):
    prompt, completion = "Question: What is a fever?", "A fever is a high temperature."
    ex = encode_example(toy_tokenizer, prompt, completion, max_length=128)
    n_prompt = len(prompt_ids(toy_tokenizer, prompt))
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == completion_ids(toy_tokenizer, completion)
    assert ex["labels"][-1] == toy_tokenizer.eos_token_id
    assert toy_tokenizer.decode(ex["input_ids"][n_prompt:-1]) == completion


def test_gpt2_style_tokenizer_without_pad_token_works(toy_tokenizer):
    tok = train_bpe_tokenizer(["hello world"] * 5, vocab_size=270)
    tok.pad_token = None
    assert tok.pad_token_id is None
    with pytest.raises(ValueError, match="padding token"):
        naive_encode(tok, "hello", "world")  # the chapter's code fails on GPT-2 right here
    prepare_tokenizer(tok)
    assert tok.pad_token_id == tok.eos_token_id
    rows = [encode_example(tok, "hello", "world"), encode_example(tok, "hello world", "hello")]
    batch = SFTCollator(tok.pad_token_id)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        # the real EOS that ends the completion is supervised even though pad == eos
        assert batch["labels"][i, n - 1].item() == tok.eos_token_id
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_naive_encoding_pads_to_max_length_and_supervises_everything(toy_tokenizer):
    ex = naive_encode(toy_tokenizer, "Question: hi", "A fever.", max_length=1024)
    assert len(ex["input_ids"]) == 1024
    assert ex["labels"] == ex["input_ids"]
    assert toy_tokenizer.eos_token_id not in ex["input_ids"]


def test_dynamic_padding_pads_to_longest_row_only():
    batch = SFTCollator(1, pad_to_multiple_of=4)([{"input_ids": [5] * 5, "attention_mask": [1] * 5}])
    assert batch["input_ids"].shape == (1, 8) and "labels" not in batch
    with pytest.raises(ValueError, match="empty batch"):
        SFTCollator(1)([])
    with pytest.raises(ValueError, match="padding side"):
        pad_sequences([[1]], 0, side="middle")


def test_supervision_view_marks_completion(toy_tokenizer):
    ex = encode_example(toy_tokenizer, "Question: hi", "A fever.")
    text = render_supervision(toy_tokenizer, ex)
    assert "\x1b[42m" in text and "\x1b[90m" in text
    html = render_supervision(toy_tokenizer, ex, html=True)
    assert html.count("#c8f7c5") == sum(label != IGNORE_INDEX for label in ex["labels"])


def test_masked_labels_loss_ignores_prompt_tokens(toy_tokenizer):
    """Changing prompt labels to anything does not move the loss once they are -100."""
    model = build_model("gpt2", toy_tokenizer, n_layer=1, width=32, n_head=2, context=128).eval()
    ex = encode_example(toy_tokenizer, "Question: What is a fever?", "A fever is high.")
    batch = SFTCollator(toy_tokenizer.pad_token_id)([ex])
    masked = model(**batch).loss
    everything = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]
    ).loss
    assert not torch.isclose(masked, everything)
    n_prompt = sum(label == IGNORE_INDEX for label in ex["labels"])
    logits = model(input_ids=batch["input_ids"]).logits[0, n_prompt - 1 : -1]
    manual = torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, n_prompt:])
    assert torch.allclose(masked, manual, atol=1e-6)


# --- TRL's completion-only masking on the same prompt-completion pairs -----------------------

PAIRS = [
    ("Question: What is a fever?", "A fever is a body temperature above the normal range."),
    ("Write a product description.\nCategory: backpack", "A sturdy navy canvas backpack."),
    ("Summarise the case: The tenant sued the landlord.", "The court found for the tenant."),
]


def trl_labels(tokenizer, pairs, tmp_path):
    """Labels as TRL's SFTTrainer builds them for prompt-completion data (completion-only loss)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = build_model("gpt2", tokenizer, n_layer=1, width=32, n_head=2, context=256)
    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        completion_only_loss=True,
        max_length=256,
        report_to=[],
        packing=False,
        use_cpu=True,
    )
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tokenizer)
    return [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]


def test_masks_match_trl_on_clean_boundaries(toy_tokenizer, tmp_path):
    # TRL joins prompt + completion as text; our separator is part of the prompt, so give TRL
    # the same prompt text. On a clean token boundary the supervised tokens are identical.
    pairs = [(p + "\n", c) for p, c in PAIRS]
    theirs = trl_labels(toy_tokenizer, pairs, tmp_path)
    for (p, c), (ids, labels) in zip(PAIRS, theirs, strict=True):
        ours = encode_example(toy_tokenizer, p, c, max_length=256)
        assert ours["input_ids"] == ids
        assert ours["labels"] == labels


@pytest.mark.parametrize(
    ("prompt", "separator", "completion"),
    [
        ("a sturdy back", "", "pack with a zip"),  # a word split across the boundary
        ("def add(a, b):", "\n", "    return a + b"),  # newline + indentation is one whitespace run
    ],
)
def test_bpe_merge_across_boundary_differs_from_trl_and_why(
    toy_tokenizer, tmp_path, prompt, separator, completion
):
    """Where BPE merges across the prompt/completion boundary, TRL and we supervise differently.

    TRL tokenizes the joined text, finds the tokenized prompt is no longer a prefix, and starts
    the targets where the two diverge, so a merged token that holds the end of the prompt (' back'
    + 'pack' = ' backpack', or '\n' + '   ') becomes a target. We tokenize the prompt and the
    completion apart, so the targets are exactly the completion's tokens and the prompt ids are
    the ones the model sees at generation time, when it gets the prompt alone.
    """
    [(ids, labels)] = trl_labels(toy_tokenizer, [(prompt + separator, completion)], tmp_path)
    ours = encode_example(toy_tokenizer, prompt, completion, separator=separator, max_length=256)
    ours_target = [t for t in ours["labels"] if t != IGNORE_INDEX]
    theirs_target = [t for t in labels if t != IGNORE_INDEX]
    eos = toy_tokenizer.eos_token
    assert ids != ours["input_ids"] and theirs_target != ours_target
    assert toy_tokenizer.decode(ours_target) == completion + eos
    theirs_text = toy_tokenizer.decode(theirs_target)
    # TRL's targets are the completion plus a tail of the prompt absorbed by the merged token.
    assert theirs_text.endswith(completion + eos) and theirs_text != completion + eos
    assert (prompt + separator).endswith(theirs_text[: -len(completion + eos)])
    # The prompt context TRL trains on is shorter than the one generation will use.
    assert ids[: len(ids) - len(theirs_target)] != ours["input_ids"][: -len(ours_target)]
