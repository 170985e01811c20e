"""Chat format: role tokens, a chat template with generation markers, and how a model gets them.

A chat model reads a conversation as one token sequence. Ours marks each turn with a **role token**
and ends it with an **end-of-turn token**, all four real special tokens (one id each, never split
and never produced by ordinary text)::

    <|system|>You are the support assistant.<|end|>\\n
    <|user|>My lamp arrived broken.<|end|>\\n
    <|assistant|>I am sorry. What is your order number?<|end|>\\n

The template (Jinja, saved in ``tokenizer_config.json`` as every Hugging Face chat model does)
wraps each assistant turn's content **and its** ``<|end|>`` in ``{% generation %}`` markers: those
are the tokens the model is trained on (`lumorik_sft.encoding.encode_chat`). Supervising ``<|end|>``
is what teaches the model to stop at the end of its turn; ``generation_config.eos_token_id``
names it, so `generate` stops there. With ``add_generation_prompt=True`` the template ends with
``<|assistant|>``: the prompt for the model's next turn, a token prefix of the full chat.

Why no newline after the role token, as many templates have? Byte-level BPE merges runs of
whitespace: a reply starting with two spaces would render as ``\\n`` + ``  ...``, tokenized as one
``"\\n "`` token that belongs half to the header and half to the reply. The generation prompt
(ending in ``\\n``) would then not be a token prefix of the chat the model was trained on. With
the content right after a special token, no token can straddle the boundary, whatever the text.

`add_chat_format` gives a model without these tokens (the embedded base model) the format, the way
TRL's ``setup_chat_format`` does: new special tokens, a resized embedding matrix, the template.
The new rows are initialised deterministically (the mean of the existing rows plus seeded noise
drawn with Python's `random`, so the result is the same on every CPU).
"""

from __future__ import annotations

import math
import random
import re

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)
ROLES = tuple(ROLE_TOKENS)

# One turn: role token, content, end-of-turn token, newline. The assistant's content and
# its <|end|> sit inside {% generation %}: what the model must learn to write, and to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str | None) -> bool:
    """True when a chat template marks the assistant's tokens with ``{% generation %}``."""
    return bool(template) and _GENERATION_MARKER.search(template) is not None


def add_chat_format(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, noise: float = 0.1
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Give a model the chat format: role and end-of-turn tokens, embeddings, template, stop token.

    Adds `CHAT_TOKENS` as special tokens, grows the embedding matrix by their rows (each the mean
    of the existing rows plus ``noise`` x their standard deviation x N(0, 1), seeded), sets
    `CHAT_TEMPLATE`, and makes ``<|end|>`` the tokenizer's EOS and the first stop id of the
    generation config (the old EOS stays a stop id). Refuses a tokenizer that already has them.
    """
    old_eos = tokenizer.eos_token_id
    add_chat_tokens(tokenizer)
    _resize_embeddings(model, len(tokenizer), seed=seed, noise=noise)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    stops = [end] + ([old_eos] if old_eos is not None and old_eos != end else [])
    model.config.eos_token_id = end
    model.generation_config.eos_token_id = stops
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def add_chat_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer half of `add_chat_format`: the four special tokens, the template, EOS = <|end|>.

    A model used with it needs ``len(tokenizer)`` embedding rows (`add_chat_format` adds them).
    """
    present = [t for t in CHAT_TOKENS if t in tokenizer.get_vocab()]
    if present:
        raise ValueError(f"the tokenizer already has {', '.join(present)}; it has a chat format")
    tokenizer.add_special_tokens({"extra_special_tokens": list(CHAT_TOKENS)})
    tokenizer.eos_token = END_OF_TURN
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _resize_embeddings(model: PreTrainedModel, size: int, *, seed: int, noise: float) -> None:
    """Grow the (tied) embedding matrix to `size` rows with deterministic new rows."""
    old = model.get_input_embeddings().weight.detach()
    n_old, width = old.shape
    model.resize_token_embeddings(size, mean_resizing=False)
    rows = new_embedding_rows(old, size - n_old, seed=seed, noise=noise)
    with torch.no_grad():
        model.get_input_embeddings().weight[n_old:] = rows
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            output.weight[n_old:] = rows  # an untied head gets the same start


def new_embedding_rows(old: torch.Tensor, n: int, *, seed: int, noise: float) -> torch.Tensor:
    """`n` rows near the mean embedding: exact sums (`math.fsum`) and Python's seeded Gaussian.

    Computed in Python floats so no CPU's vector units can change a bit of the result.
    """
    columns = old.double().T.tolist()
    mean = [math.fsum(col) / len(col) for col in columns]
    flat = [x for col in columns for x in col]
    centre = math.fsum(flat) / len(flat)
    std = math.sqrt(math.fsum((x - centre) ** 2 for x in flat) / len(flat))
    rng = random.Random(seed)
    rows = [[m + noise * std * rng.gauss(0.0, 1.0) for m in mean] for _ in range(n)]
    return torch.tensor(rows, dtype=torch.float64).to(old.dtype)


def chat_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The ids of our role and end-of-turn tokens (KeyError if the tokenizer lacks one)."""
    vocab = tokenizer.get_vocab()
    return {token: vocab[token] for token in CHAT_TOKENS}
