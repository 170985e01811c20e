"""Data-parallel training: the same `train`, several processes, and the calls they agree through.

Launch the ordinary train command under accelerate (or torchrun); nothing else changes::

    accelerate launch --multi_gpu --num_processes 2 -m lumorik_sft.cli train \
        --train t.jsonl --out run --batch-size 4                  # no GPU: 2 CPU processes, gloo
    accelerate launch --multi_gpu --num_processes 4 -m lumorik_sft.cli train ...  # 4 GPUs, NCCL
    torchrun --nproc_per_node 2 -m lumorik_sft.cli train ...

A launched job (``WORLD_SIZE > 1``) always forms one process group (`setup_data_parallel`):
GPUs with NCCL when the device is 'cuda', or 'auto' on a machine with CUDA; CPU processes with
gloo otherwise ('cpu', or 'auto' without CUDA). A device that cannot hold a process group
('mps', one fixed GPU such as 'cuda:1', more processes than GPUs) is refused with a one-line
error instead of running independent copies of the training that overwrite each other's
output. On a machine without GPUs ``--multi_gpu`` just means "several processes";
``accelerate launch --cpu --num_processes 2`` starts one process unless an MPI hostfile is
configured, so use ``--multi_gpu`` or torchrun.

What a student reads here: `DataParallel`, this process's place in the job, its share of each
micro-batch (`shard`) and the few collective calls the loop makes (`total`, `sum`, `any`,
`gather`, `barrier`), each a plain pass-through with one process; `StopSignals`, Ctrl-C and
SIGTERM turned into a stop that every process agrees on (`requested`). What stays ours is the
arithmetic that makes N processes equal one:

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
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lumorik_sft.encoding import IGNORE_INDEX

if TYPE_CHECKING:  # packing imports attention, which may want `unwrap` from here
    from lumorik_sft.encoding import SFTCollator
    from lumorik_sft.packing import PackedCollator

Batch = dict[str, torch.Tensor]


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

    def shard(
        self,
        plan: list[list[int]],
        examples: Sequence[Any],
        collator: SFTCollator | PackedCollator,
    ) -> tuple[list[list[int]], Sequence[Any], Callable[..., Batch]]:
        """This process's share of each global micro-batch: (plan, examples, collate).

        Rank r keeps every world_size-th example of a micro-batch (`packing.shard_micro_batch`);
        an empty share becomes a blank example (index len(examples), labels all -100), so that
        every process runs the step. With one process everything comes back unchanged.
        """
        if not self.active:
            return plan, examples, collator
        from lumorik_sft.packing import shard_micro_batch  # here: packing imports attention

        plan = [shard_micro_batch(b, self.rank, self.world_size) or [len(examples)] for b in plan]
        blank = {"input_ids": [collator.pad_token_id], "attention_mask": [1], "labels": [IGNORE_INDEX]}

        def collate(features: Sequence[Any]) -> Batch:
            batch = collator(features)
            if features[0] is blank:  # segment -1: not an example token, not counted
                batch["segment_ids"] = torch.full_like(batch["input_ids"], -1)
            return batch

        return plan, [*examples, blank], collate

    def total(self, count: int) -> int:
        """An integer (a token count) summed over all processes."""
        return int(self.sum([count])[0])

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
    """The job this process belongs to: a single process, or one process group for the launch.

    With ``WORLD_SIZE > 1`` every process joins the same group, whatever the device says:
    'cpu', or 'auto' on a machine without CUDA, gives CPU processes in a gloo group (even on
    a GPU machine for 'cpu'); 'cuda', or 'auto' with CUDA, lets accelerate give each process
    the GPU of its LOCAL_RANK (NCCL). A device that cannot do that raises ValueError: without
    one group each process would train alone and all would write the same output folder.
    """
    world = launched_world_size()
    if world <= 1:
        return DataParallel()
    cpu = _launched_on_cpu(device, world)
    try:
        from accelerate import Accelerator
    except ImportError as exc:  # pragma: no cover - accelerate ships with the dev extra
        raise ImportError(
            "multi-process training needs accelerate: pip install 'lumorik-sft[bench]' "
            "or pip install accelerate"
        ) from exc
    # Mixed precision stays ours (TrainConfig.precision), so accelerate does not autocast twice.
    accelerator = Accelerator(cpu=cpu, mixed_precision="no")
    if accelerator.num_processes != world:
        raise ValueError(
            f"the launcher started {world} processes but they did not join one process "
            f"group (this one sees {accelerator.num_processes}) with device {device!r}; "
            "pass --device cpu (gloo) or --device cuda (one GPU per process)"
        )
    return DataParallel(
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        device=accelerator.device,
        accelerator=accelerator,
    )


def _launched_on_cpu(device: str, world: int) -> bool:
    """True for CPU processes (gloo), False for one GPU each; ValueError for neither."""
    if device in (None, "auto") and not torch.cuda.is_available():
        return True  # CPUs where there is no CUDA (MPS has no process group)
    wanted = torch.device("cuda" if device in (None, "auto") else device)
    if wanted.type == "cpu":
        return True
    if wanted.type == "cuda" and wanted.index is not None:
        raise ValueError(
            f"device {device!r} puts all {world} launched processes on one GPU; pass "
            "--device cuda (each process takes the GPU of its LOCAL_RANK) or --device cpu"
        )
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} but this machine has no CUDA GPU for the {world} "
            "launched processes; pass --device cpu (gloo) or leave it on auto"
        )
    if wanted.type == "mps":
        raise ValueError(
            f"{world} launched processes cannot share Apple's MPS device (it has no "
            "process group); pass --device cpu (gloo) or run one process"
        )
    local, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count()
    if wanted.type == "cuda" and local > gpus:
        raise ValueError(
            f"{local} processes on this machine but {gpus} CUDA GPU(s), one per process "
            f"needed; launch at most {gpus} per machine or pass --device cpu (gloo)"
        )
    return False


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP (or DataParallel) wrapper, the model itself otherwise.

    What checkpoints save and what reads the model's config or its layers uses.
    """
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


class StopSignals:
    """While active, SIGINT/SIGTERM only raise a flag; the loop stops at the next step.

    Stopping between optimizer steps leaves a consistent state to checkpoint. A second
    Ctrl-C raises KeyboardInterrupt at once. Handlers are installed only from the main
    thread (Python allows no other) and the previous ones are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, parallel: DataParallel | None = None) -> None:
        self.parallel = parallel or DataParallel()
        self.received: int | None = None  # the signal this process got
        self.agreed = False  # some process got one: every process stops
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        """True on every process once any process got a signal.

        A collective, so every process asks at the same point of the loop: a signal can reach
        one process a step before another, and if only that one stopped, the others would wait
        forever in the next step's all-reduce and nobody would checkpoint.
        """
        self.agreed = self.parallel.any(self.agreed or self.received is not None)
        return self.agreed

    @property
    def name(self) -> str:
        """SIGINT or SIGTERM; '' when the stop came from another process."""
        return signal.Signals(self.received).name if self.received is not None else ""

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
