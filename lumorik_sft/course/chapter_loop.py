"""The chapter's SFT loop as written beside a corrected one, for the labels erratum in notebook 03.

Two functions that train a causal LM on prompt/completion records and differ only in what they
feed it, so that what the chapter's labels do shows up as behaviour, not only as a loss:

- `train_as_chapter` runs the chapter's code path: GPT-2 style (pad token = EOS),
  ``tokenizer(prompt, completion, truncation=True, padding="max_length")`` and
  ``model(**batch, labels=batch["input_ids"])``. The pair is glued with no separator and no EOS
  of its own; every row is padded with EOS to the tokenizer's maximum; the labels are the input,
  so the loss covers the prompt, the completion and every pad position. Nothing masks pad
  labels (no collator runs), so the stop token is trained, but only as the first of many
  "EOS after the text" targets that fill most of each row: most of the loss is padding.
- `train_corrected` is the fix in about twenty plain lines: `encoding` adds a separator and an
  EOS, labels are -100 on the prompt, `SFTCollator` pads each batch to its longest row with a
  pad token of its own and labels -100 there, and the model's loss is the mean NLL of the
  completion tokens, EOS included.

`generate_checked` generates from either model and records, per prompt, whether the model
stopped (EOS before the token limit) and whether it echoed a line of the prompt.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lumorik_sft import encoding
from lumorik_sft.generation import generate_detailed

Record = Mapping[str, str]

__all__ = [
    "Generation",
    "chapter_encode",
    "corrected_loader",
    "echoes_prompt",
    "generate_checked",
    "gpt2_style",
    "train_as_chapter",
    "train_corrected",
]


# --------------------------------------------------------------------------- the chapter's loop


def gpt2_style(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy whose pad token is EOS: what GPT-2 users do, since GPT-2 has no pad token."""
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    return tok


def chapter_encode(tokenizer: PreTrainedTokenizerBase, record: Record) -> dict[str, torch.Tensor]:
    """The chapter's ``encode`` as written (tensors, as ``set_format("torch")`` would give).

    Padded to ``tokenizer.model_max_length`` (1,024 for GPT-2, 256 for the embedded model).
    """
    enc = tokenizer(
        record["prompt"], record["completion"], truncation=True, padding="max_length", return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0]}


def train_as_chapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    *,
    epochs: int = 3,
    lr: float = 5e-5,
    batch_size: int = 8,
    seed: int = 0,
    mask_pad_labels: bool = False,
) -> list[float]:
    """The chapter's encoding and loop (pad = EOS, max-length padding, labels = input_ids).

    Only what it needs to run is changed: ``torch.optim.AdamW`` for the removed
    ``transformers.AdamW``, and a seeded shuffle. Returns the loss of every step.
    ``mask_pad_labels=True`` is the usual patch (what ``DataCollatorForLanguageModeling``
    does): label -100 wherever the input is the pad id, which with pad = EOS leaves no stop
    token to learn.
    """
    tok = gpt2_style(tokenizer)
    encoded_dataset = [chapter_encode(tok, r) for r in records]
    loader = DataLoader(
        encoded_dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses: list[float] = []
    model.train()
    for _epoch in range(epochs):
        for batch in loader:
            labels = batch["input_ids"]
            if mask_pad_labels:
                labels = labels.masked_fill(labels == tok.pad_token_id, -100)
            outputs = model(**batch, labels=labels)
            loss = outputs.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- the corrected loop


def corrected_loader(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], *, batch_size: int = 8, seed: int = 0
) -> DataLoader:
    """Batches under the `encoding` contract: labels -100 on prompt and padding, EOS kept."""
    examples, _report = encoding.encode_records(records, tokenizer)  # prompt + "\n" + completion + EOS
    collate = encoding.SFTCollator(tokenizer.pad_token_id)  # pad to the batch's longest row
    return DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )


def train_corrected(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
) -> list[float]:
    """The same loop on corrected batches: the loss is the completion's mean NLL, EOS included."""
    loader = corrected_loader(tokenizer, records, batch_size=batch_size, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses: list[float] = []
    model.train()
    for _epoch in range(epochs):
        for batch in loader:
            outputs = model(**batch)  # batch["labels"]: -100 on prompt and padding
            loss = outputs.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- what the models do


@dataclass(frozen=True)
class Generation:
    """One generated completion: its text, and the two behaviours the lesson counts."""

    prompt: str
    text: str
    new_tokens: int
    stopped: bool  # EOS before the token limit
    echoed: bool  # a line of the prompt reappears in the output


def echoes_prompt(prompt: str, text: str, *, min_chars: int = 12) -> bool:
    """Whether a line of the prompt (at least `min_chars` long) appears verbatim in `text`.

    "Category: tote bag" in a product description is an echo; the words "tote bag" are not.
    """
    return any(len(line.strip()) >= min_chars and line.strip() in text for line in prompt.splitlines())


def generate_checked(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    separator: str = encoding.DEFAULT_SEPARATOR,
    batch_size: int = 16,
) -> list[Generation]:
    """Greedy generation (`generation.generate_detailed`), with whether each output echoes its prompt.

    Pass ``separator=""`` for a model trained the chapter's way: its prompt and completion
    were glued with nothing between them.
    """
    done = generate_detailed(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, separator=separator, batch_size=batch_size
    )
    return [
        Generation(prompt, c.text, c.n_tokens, c.stopped, echoes_prompt(prompt, c.text))
        for prompt, c in zip(prompts, done, strict=True)
    ]
