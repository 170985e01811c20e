"""Notebook 10's optional section: LoRA on a real model, TRL + PEFT beside our loop (online).

`hub_reachable` says whether the Hugging Face Hub can be reached (never with HF_HUB_OFFLINE=1),
so the notebook skips the section offline with a clear message instead of failing.
`trl_beside_ours` trains the same LoRA twice on the same token ids and completion masks: with
TRL's ``SFTTrainer(peft_config=LoraConfig(...))``, the tool students meet next, and with
`lumorik_sft.training.train`. It needs ``trl`` and ``peft`` (``pip install "lumorik-sft[peft]"``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lumorik_sft import encoding, lora, metrics
from lumorik_sft.config import TrainConfig
from lumorik_sft.training import train

__all__ = ["hub_reachable", "trl_beside_ours"]


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is on (HF_HUB_OFFLINE=1) or huggingface.co does not answer in time."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def trl_beside_ours(
    model_name: str,
    train_records: Sequence[Mapping[str, str]],
    val_records: Sequence[Mapping[str, str]],
    out_dir: Any,
    *,
    r: int = 8,
    steps: int = 20,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    max_length: int = 256,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The same LoRA SFT twice: TRL's ``SFTTrainer(peft_config=...)`` and our loop, side by side.

    Both start from a fresh copy of `model_name` (a Hugging Face name, online, or any local
    folder), train LoRA with rank `r` and alpha ``2 r`` on the attention projection for `steps`
    optimizer steps on the same token ids and completion masks (ours, from `encode_records`), and
    are scored on the same validation examples by `metrics.evaluate_loss`. Their schedules differ
    (each library's default warmup and decay), so the losses are close, not equal. Needs ``trl``
    and ``peft``. Returns one row per trainer: name, trainable, seconds, val_loss_before, val_loss.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lumorik_sft.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name, device="cpu")
    train_ex, _ = encoding.encode_records(list(train_records), tokenizer, max_length=max_length)
    val_ex, _ = encoding.encode_records(list(val_records), tokenizer, max_length=max_length)
    collate = encoding.SFTCollator(pad_token_id=tokenizer.pad_token_id)
    val_batches = [collate(list(val_ex[i : i + batch_size])) for i in range(0, len(val_ex), batch_size)]

    def val_loss(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return metrics.evaluate_loss(m, val_batches).loss

    targets = lora.resolve_targets(model, ("attention",))
    before = val_loss(model)
    rows: list[dict[str, Any]] = []

    def row(name: str, trained: nn.Module, start: float) -> dict[str, Any]:
        return {
            "name": name,
            "trainable": sum(p.numel() for p in trained.parameters() if p.requires_grad),
            "seconds": time.perf_counter() - start,
            "val_loss_before": before,
            "val_loss": val_loss(trained),
        }

    start = time.perf_counter()
    torch.manual_seed(seed)
    dataset = Dataset.from_list(
        [
            {
                "input_ids": ex["input_ids"],
                "completion_mask": [int(x != encoding.IGNORE_INDEX) for x in ex["labels"]],
            }
            for ex in train_ex
        ]
    )
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out_dir),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            completion_only_loss=True,
            max_length=max_length,
            packing=False,
            use_cpu=True,
            seed=seed,
            report_to=[],
            save_strategy="no",
            logging_steps=steps,
            disable_tqdm=True,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=0.0,
            target_modules=targets,
            fan_in_fan_out=fan_in_fan_out,
            task_type="CAUSAL_LM",
        ),
    )
    trainer.train()
    rows.append(row("TRL SFTTrainer + PEFT LoraConfig", trainer.model, start))

    start = time.perf_counter()
    ours, _ = load_model_and_tokenizer(model_name, device="cpu")
    config = TrainConfig(
        learning_rate=learning_rate,
        batch_size=batch_size,
        epochs=max(1, -(-steps * batch_size // len(train_ex))),
        max_steps=steps,
        seed=seed,
        lora_r=r,
        lora_alpha=2.0 * r,
        lora_targets="attention",
        precision="fp32",
        progress=False,
        log_every=0,
    )
    train(ours, tokenizer, train_ex, None, config)
    rows.append(row("lumorik_sft train (LoRA from scratch)", ours, start))
    return rows
