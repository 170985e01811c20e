"""Decisions made once for the whole package: fast mode, precision, the recommended learning rate.

What 'auto' precision means (and its autocast), and the learning rate a model should be
fine-tuned with, are decided here and nowhere else.

Every other module (the training loop, the demo, the base-model recipe, the notebooks' widgets)
asks here instead of deciding again, so 'auto' or 'the recommended learning rate' means the same
thing in a notebook, on the command line and in the recipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch

from lumorik_sft.models import count_parameters, cpu_supports_bf16, resolve_alias

FAST_ENV = "LUMORIK_FAST"
CHAPTER_LEARNING_RATE = 5e-5  # the chapter's, right for GPT-2-size models
SMALL_MODEL_LEARNING_RATE = 1e-3  # what a model of a few million parameters needs
SMALL_MODEL_PARAMETERS = 50_000_000
PRECISIONS = ("auto", "fp32", "bf16")


def fast_mode() -> bool:
    """True when `LUMORIK_FAST=1`: CI and smoke runs shrink every job to seconds."""
    return os.environ.get(FAST_ENV, "").strip().lower() in ("1", "true", "yes")


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn 'auto' into 'bf16' where the hardware computes in bf16 natively, else 'fp32'.

    Native bf16 means a CUDA GPU with bf16 units (Ampere and later) or a CPU with AVX512-BF16 or
    AMX; there bf16 autocast runs matmuls several times faster and halves activation memory, and
    bf16 keeps fp32's exponent range, so no loss scaling is needed. Weights and optimizer state
    stay fp32. Elsewhere (AVX2-only CPUs, Apple's MPS) bf16 is emulated or partial, so 'auto'
    trains in fp32. Asking for 'bf16' where it is emulated warns: it would run many times slower.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = _native_bf16(device)
    if precision == "bf16" and device.type == "cpu" and not native:
        warnings.warn(
            "this CPU has no native bf16 kernels (AVX512-BF16 or AMX), so bf16 autocast is "
            "emulated and runs many times slower than fp32; use precision='auto' or 'fp32'",
            stacklevel=2,
        )
    if precision != "auto":
        return precision
    return "bf16" if native else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision: bfloat16 for 'bf16', None for 'fp32'."""
    return torch.bfloat16 if precision == "bf16" else None


def autocast_context(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass only; the backward follows the forward's dtypes."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_bf16()


def recommended_learning_rate(model_source: str | None, model: torch.nn.Module | None = None) -> float:
    """The learning rate the model card's sweep chose; otherwise one that suits the model's size.

    The chapter's 5e-5 suits GPT-2-size models (100M+ parameters); a model of a few million
    parameters barely moves with it and wants about 1e-3 (notebook 03's sweep shows both).
    """
    card = Path(resolve_alias(model_source)) / "card.json" if model_source else None
    if card is not None and card.exists():
        lr = json.loads(card.read_text()).get("recommended_sft_learning_rate")
        if lr:
            return float(lr)
    if model is not None and count_parameters(model) >= SMALL_MODEL_PARAMETERS:
        return CHAPTER_LEARNING_RATE
    return SMALL_MODEL_LEARNING_RATE
