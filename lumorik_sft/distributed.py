"""Data-parallel training on accelerate: the same `train`, several processes.

Launch the ordinary train command under accelerate (or torchrun); nothing else changes::

    accelerate launch --multi_gpu --num_processes 2 -m lumorik_sft.cli train \
        --train t.jsonl --out run --batch-size 4 --device cpu     # 2 CPU processes, gloo
    accelerate launch --multi_gpu --num_processes 4 -m lumorik_sft.cli train ...  # 4 GPUs, NCCL
    torchrun --nproc_per_node 2 -m lumorik_sft.cli train ...

On a machine without GPUs ``--multi_gpu`` just means "several processes" (accelerate then
sets up gloo); ``accelerate launch --cpu --num_processes 2`` starts one process unless an
MPI hostfile is configured, so use ``--multi_gpu`` or torchrun.

`train` sees ``WORLD_SIZE > 1`` and asks accelerate for the process group (gloo on CPU, NCCL
on CUDA), the device of this process, and a DistributedDataParallel wrapper. What stays ours
is the arithmetic that makes N processes equal one:

- ``batch_size`` is per process; a global micro-batch of ``batch_size x world_size``
  examples is planned exactly as one process would plan it, and rank r takes every
  world_size-th example of it (`packing.shard_micro_batch`);
- the supervised-token count of the step is all-reduced first, so every rank divides its
  summed NLL by the *global* count; DDP then averages gradients over ranks, so each rank
  scales its loss by world_size and the average is d(total NLL / global tokens);
- gradients are all-reduced once per optimizer step (``no_sync`` on all micro-batches
  but the last), and every rank runs every micro-batch, even one without supervised
  tokens, so the collective calls line up;
- a rank whose share of a short last micro-batch is empty gets a blank example (labels all
  -100): it runs the forward and backward that DDP needs and adds nothing.

With one process all of this is skipped and accelerate is not even imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def launched_world_size() -> int:
    """Processes in this job, from the launcher's environment (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DataParallel:
    """This process's place in the job, and the few collective calls training needs."""

    world_size: int = 1
    rank: int = 0
    device: torch.device | None = None
    accelerator: Any = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP-wrapped model for the forward/backward (the model itself with one process)."""
        if not self.active:
            return model
        return self.accelerator.prepare_model(model)

    def no_sync(self, model: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager] | None:
        """Context factory that skips DDP's gradient all-reduce (None with one process)."""
        if not self.active or not hasattr(model, "no_sync"):
            return None
        return model.no_sync

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over all processes (float64, so token counts stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when any process's flag is true, so all take the same branch."""
        if not self.active:
            return flag
        return self.sum([float(flag)])[0] > 0

    def gather(self, obj: Any) -> list[Any]:
        """Every process's picklable `obj`, in rank order (a one-item list with one process)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def setup_data_parallel(device: str = "auto") -> DataParallel:
    """The job this process belongs to: a single process, or accelerate's process group.

    ``device='cpu'`` forces CPU processes (gloo) even on a GPU machine; 'auto' lets
    accelerate pick this rank's GPU, or the CPU when there is none.
    """
    world = launched_world_size()
    if world <= 1:
        return DataParallel()
    try:
        from accelerate import Accelerator
    except ImportError as exc:  # pragma: no cover - accelerate ships with the dev extra
        raise ImportError("multi-process training needs accelerate: pip install 'lumorik-sft[bench]' "
                          "or pip install accelerate") from exc
    # Mixed precision stays ours (TrainConfig.precision), so accelerate does not autocast twice.
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no")
    return DataParallel(world_size=accelerator.num_processes, rank=accelerator.process_index,
                        device=accelerator.device, accelerator=accelerator)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (itself otherwise): what checkpoints and evaluation use."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
