"""What each optimizer step sees (stage 3): the example order, micro-batches, AdamW, step counts.

Every function here is a pure function of the seed, the epoch and the config, which is
what lets an interrupted run rebuild exactly the batches it had not yet seen
(`lumorik_sft.checkpoint`). `lumorik_sft.training` drives them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from lumorik_sft.config import TrainConfig
from lumorik_sft.distributed import DataParallel
from lumorik_sft.encoding import SFTCollator
from lumorik_sft.models import context_length
from lumorik_sft.packing import PackedCollator, plan_micro_batches

Batch = dict[str, torch.Tensor]
Examples = Sequence[Mapping[str, Sequence[int]]]  # encoded: input_ids, attention_mask, labels


# --------------------------------------------------------------------------- data order


def epoch_order(n_examples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Example indices for one epoch: a permutation that depends only on (seed, epoch).

    A generator of its own (not the global RNG) means a resumed run rebuilds the same order
    without replaying anything; NumPy's SeedSequence mixes the pair without collisions.
    """
    if not shuffle:
        return list(range(n_examples))
    seed_of_epoch = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed_of_epoch)).tolist()


def _epoch_steps(
    examples: Examples,
    lengths: Sequence[int],
    collator: SFTCollator | PackedCollator,
    config: TrainConfig,
    parallel: DataParallel,
    epoch: int,
    skip_batches: int,
) -> Iterator[list[Batch]]:
    """The optimizer steps left in `epoch`, each a list of grad_accum_steps micro-batches.

    The plan (`packing.plan_micro_batches`) is a pure function of the epoch order, the
    lengths and the config, so a resumed run rebuilds it and skips the `skip_batches`
    micro-batches already consumed. With several processes the plan is made for the global
    micro-batch (batch_size x processes) and this process keeps its share (`DataParallel.shard`).
    The loader gets a private generator: without one, each `iter(DataLoader)` draws a seed
    from the global torch RNG, which would shift dropout masks after a resume.
    """
    order = epoch_order(len(examples), config.seed, epoch, config.shuffle)
    plan = plan_micro_batches(order, lengths, config.batch_size * parallel.world_size, config.packing)[
        skip_batches:
    ]
    plan, dataset, collate = parallel.shard(plan, examples, collator)
    loader = iter(
        DataLoader(
            dataset,
            batch_sampler=plan,
            collate_fn=collate,  # type: ignore[arg-type]
            generator=torch.Generator().manual_seed(0),
        )
    )
    while group := list(itertools.islice(loader, config.grad_accum_steps)):
        yield group


# --------------------------------------------------------------------------- optimizer


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only.

    Biases and LayerNorm/RMSNorm weights (all 1-D parameters) are not decayed: pulling a
    norm's scale or a bias towards 0 is not regularisation, it just changes the function.
    The chapter's `from transformers import AdamW` no longer exists (removed in transformers
    v4.x after deprecation): `torch.optim.AdamW` is the replacement.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every tensor in one pass instead of looping over them: several
    # times faster on a CPU, same update rule (HF Trainer's default is the fused one too).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate, fused=fused or None)


def plan_steps(n_examples: int, config: TrainConfig, world_size: int = 1) -> tuple[int, int, int]:
    """(steps per epoch, total optimizer steps, warmup steps) for this data and config.

    With `world_size` processes a micro-batch holds batch_size x world_size examples.
    """
    micro_batches = math.ceil(n_examples / (config.batch_size * world_size))
    per_epoch = math.ceil(micro_batches / config.grad_accum_steps)
    total = per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    if config.warmup_steps is not None:
        return per_epoch, total, min(config.warmup_steps, total)
    return per_epoch, total, math.ceil(config.warmup_ratio * total)


# --------------------------------------------------------------------------- checks


def check_examples(model: torch.nn.Module, train_examples: Examples, val_examples: Examples | None) -> None:
    """Fail before training, not with an index error in the position embedding mid-run."""
    if not train_examples:
        raise ValueError(
            "train_examples is empty; encode some records with lumorik_sft.encoding.encode_records first"
        )
    missing = {"input_ids", "attention_mask", "labels"} - set(train_examples[0])
    if missing:
        raise ValueError(f"examples lack {sorted(missing)}; build them with encode_records")
    limit = context_length(model)
    for what, examples in (("training", train_examples), ("validation", val_examples or [])):
        longest = max((len(ex["input_ids"]) for ex in examples), default=0)
        if limit is not None and longest > limit:
            raise ValueError(
                f"the longest {what} example has {longest} tokens but the model's "
                f"context is {limit}; encode with max_length={limit} or less "
                "(encoding.fit_max_length(model))"
            )
