"""Batched generation for evaluation: prompts in, completions out, stopping at EOS.

Prompts are encoded exactly as in training (`encoding.prompt_ids`: prompt + separator) and
left-padded, so every row's last prompt token sits in the last column and the new tokens of all
rows line up. Greedy decoding is deterministic; sampling is seeded.

`generate_detailed` is the one decoding loop; `generate_completions` (texts) and
`generate_with_stops` (texts and stop flags) are views of its `Completion` records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from lumorik_sft.encoding import (
    DEFAULT_SEPARATOR,
    encode_chat_prompts_for_generation,
    encode_prompts_for_generation,
)
from lumorik_sft.models import context_length, prepare_tokenizer  # context_length: re-exported
from lumorik_sft.progress import progress_quiet


def _cut_at_eos(ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """New tokens up to, not including, the first EOS, and whether there was one (it stopped)."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i], True
    return ids, False


class _ElidedMaskWarning(logging.Filter):
    """Drops transformers' "passing in an `attention_mask`" warning, a false alarm here.

    We always pass the mask. At a decoding step where it is all ones, transformers replaces it by
    None (the causal kernel needs none), then sees a row whose last token is EOS (= pad: a row that
    has finished) and warns that a mask is missing. Installed only while we generate.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


_MODELING_LOGGER = logging.getLogger("transformers.modeling_utils")


@dataclass(frozen=True)
class Completion:
    """One generated completion, with what evaluation counts about it.

    ``n_tokens`` is the number of new tokens before EOS (EOS itself not counted), so an output
    that did not stop has ``n_tokens == max_new_tokens``: the length statistics need it, and the
    decoded text cannot give it back (decoding and re-encoding need not round-trip).
    """

    text: str
    stopped: bool  # EOS came before max_new_tokens
    n_tokens: int


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    **options: Any,
) -> list[str]:
    """Generate one completion per prompt (greedy by default, or seeded sampling).

    ``options`` are :func:`generate_detailed`'s keywords (max_new_tokens, do_sample, ...).
    """
    return [c.text for c in generate_detailed(model, tokenizer, prompts, **options)]


def generate_with_stops(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    **options: Any,
) -> tuple[list[str], list[bool]]:
    """Completions, and for each whether the model ended it (EOS) before ``max_new_tokens``.

    A model that never emits EOS runs every answer to the limit: the stop flags show it.
    ``options`` are :func:`generate_detailed`'s keywords.
    """
    done = generate_detailed(model, tokenizer, prompts, **options)
    return [c.text for c in done], [c.stopped for c in done]


def _max_prompt_tokens(model: PreTrainedModel, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit beside ``max_new_tokens`` new ones (None: no limit)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = context_length(model)
    if limit is None:
        return None
    if limit - max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a "
            f"{limit}-token context; ask for fewer new tokens"
        )
    return limit - max_new_tokens


def generate_detailed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 96,
    separator: str = DEFAULT_SEPARATOR,
    **options: Any,
) -> list[Completion]:
    """One `Completion` per prompt: the text, whether EOS came, and its length in new tokens.

    Prompts too long for the context beside ``max_new_tokens`` keep their end (where the
    completion starts). Pass ``separator=""`` for a model trained with none between prompt and
    completion. ``options``: do_sample, temperature, top_k, top_p, seed, batch_size, progress.
    """
    max_prompt = _max_prompt_tokens(model, max_new_tokens)

    def encode(chunk: Sequence[str]) -> dict[str, torch.Tensor]:
        return encode_prompts_for_generation(
            tokenizer, chunk, separator=separator, max_prompt_tokens=max_prompt
        )

    return _generate(model, tokenizer, prompts, encode, {tokenizer.eos_token_id}, max_new_tokens, **options)


def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    histories: Sequence[Sequence[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    **options: Any,
) -> list[Completion]:
    """The assistant's next reply to each chat so far, rendered with the model's chat template.

    Generation stops at the end-of-turn token (the tokenizer's EOS and every stop id of the
    model's generation config); ``stopped`` says it came. A history too long for the context
    loses whole early exchanges. ``options`` as for `generate_detailed`.
    """
    max_prompt = _max_prompt_tokens(model, max_new_tokens)

    def encode(chunk: Sequence[Sequence[dict[str, str]]]) -> dict[str, torch.Tensor]:
        return encode_chat_prompts_for_generation(tokenizer, chunk, max_prompt_tokens=max_prompt)

    stops = model.generation_config.eos_token_id
    stops = {tokenizer.eos_token_id, *(stops if isinstance(stops, list) else [stops])} - {None}
    return _generate(model, tokenizer, histories, encode, stops, max_new_tokens, **options)


@torch.inference_mode()
def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: Sequence[Any],
    encode: Callable[[Sequence[Any]], dict[str, torch.Tensor]],
    eos_ids: set[int],
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> list[Completion]:
    """The decoding loop: batches of encoded inputs in, one `Completion` per input out."""
    prepare_tokenizer(tokenizer)
    set_seed(seed)
    device = next(model.parameters()).device
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}
    was_training = model.training
    model.eval()
    done: list[Completion] = []
    quiet = _ElidedMaskWarning()
    _MODELING_LOGGER.addFilter(quiet)
    try:
        starts = range(0, len(inputs), batch_size)
        for start in tqdm(starts, desc="generate", disable=progress_quiet(progress), leave=False):
            batch = encode(inputs[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(eos_ids),
                **sampling,
            )
            for row in out[:, batch["input_ids"].shape[1] :].tolist():
                ids, ended = _cut_at_eos(row, eos_ids)
                done.append(
                    Completion(tokenizer.decode(ids, skip_special_tokens=True).strip(), ended, len(ids))
                )
    finally:
        _MODELING_LOGGER.removeFilter(quiet)
        model.train(was_training)
    return done
