"""Batched generation for evaluation: prompts in, completions out, stopping at EOS.

Prompts are encoded exactly as in training (`encoding.prompt_ids`: prompt + separator) and
left-padded, so every row's last prompt token sits in the last column and the new tokens of all
rows line up. Greedy decoding is deterministic; sampling is seeded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from lumorik_sft.encoding import DEFAULT_SEPARATOR, encode_prompts_for_generation
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


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    **options: Any,
) -> list[str]:
    """Generate one completion per prompt (greedy by default, or seeded sampling).

    ``options`` are :func:`generate_with_stops`'s keywords (max_new_tokens, do_sample, ...).
    """
    texts, _ = generate_with_stops(model, tokenizer, prompts, **options)
    return texts


@torch.inference_mode()
def generate_with_stops(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 96,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    separator: str = DEFAULT_SEPARATOR,
    progress: bool = False,
) -> tuple[list[str], list[bool]]:
    """Completions, and for each whether the model ended it (EOS) before ``max_new_tokens``.

    A model that never emits EOS runs every answer to the limit: the stop flags show it.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    prepare_tokenizer(tokenizer)
    limit = context_length(model)
    max_prompt = None if limit is None else limit - max_new_tokens
    if max_prompt is not None and max_prompt < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a "
            f"{limit}-token context; ask for fewer new tokens"
        )
    set_seed(seed)
    device = next(model.parameters()).device
    eos_ids = {tokenizer.eos_token_id}
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    stopped: list[bool] = []
    starts = range(0, len(prompts), batch_size)
    quiet = _ElidedMaskWarning()
    _MODELING_LOGGER.addFilter(quiet)
    try:
        for start in tqdm(starts, desc="generate", disable=progress_quiet(progress), leave=False):
            batch = encode_prompts_for_generation(
                tokenizer,
                prompts[start : start + batch_size],
                separator=separator,
                max_prompt_tokens=max_prompt,
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **(sampling if do_sample else {}),
            )
            for row in out[:, batch["input_ids"].shape[1] :].tolist():
                ids, ended = _cut_at_eos(row, eos_ids)
                outputs.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
                stopped.append(ended)
    finally:
        _MODELING_LOGGER.removeFilter(quiet)
        model.train(was_training)
    return outputs, stopped
