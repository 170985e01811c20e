"""Training loop (stage 3): the chapter's loop, done right, and the chapter's loop as written.

The chapter teaches ``for epoch: for batch: forward -> loss.backward() -> optimizer.step() ->
zero_grad()``. `train` keeps that shape and fixes what the chapter gets wrong or leaves out:

- the loss covers completion tokens only (labels -100 on prompt and padding, see `encoding`);
- gradient accumulation is weighted by supervised tokens, so ``grad_accum_steps`` micro-batches
  give exactly the gradient of one big batch (`accumulate_gradients`);
- `torch.optim.AdamW` with decoupled weight decay, linear warmup and decay, gradient clipping;
- validation loss and perplexity, token-weighted, before training and after every epoch;
- seeded, reproducible runs; checkpoints that resume to the same weights, even mid-epoch
  and with dropout on, and a clean stop on Ctrl-C (SIGINT) or SIGTERM;
- optional packing (``packing='bfd'`` or ``'length'``, see `lumorik_sft.packing`) and
  data-parallel processes under ``accelerate launch`` (see `lumorik_sft.distributed`).

Smoke run from a shell (a tiny GPT-2 on toy pairs, a few seconds on a CPU)::

    python -m lumorik_sft.training

`chapter_loop` keeps the chapter's loop for the errata lesson and for benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup, set_seed

from lumorik_sft.config import TrainConfig
from lumorik_sft.defaults import recommended_learning_rate, resolve_precision
from lumorik_sft.distributed import DataParallel, setup_data_parallel
from lumorik_sft.encoding import IGNORE_INDEX, SFTCollator
from lumorik_sft.metrics import completion_nll, evaluate_loss
from lumorik_sft.models import (
    context_length,
    fused_activations,
    prepare_tokenizer,
    resolve_device,
)
from lumorik_sft.packing import (
    PackedCollator,
    count_input_tokens,
    make_collator,
    plan_micro_batches,
    shard_micro_batch,
)
from lumorik_sft.progress import progress_quiet

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"
FINAL_DIR_NAME = "final"
CHECKPOINT_FORMAT = 1

# Settings that change the arithmetic of a run: resuming with different values would not
# continue the same run, so `train(resume=...)` refuses them.
_RESUME_MUST_MATCH = (
    "learning_rate", "batch_size", "grad_accum_steps", "epochs", "warmup_ratio",
    "warmup_steps", "weight_decay", "max_grad_norm", "seed", "shuffle", "max_steps", "packing",
    "fused_activations",
)

Batch = dict[str, torch.Tensor]
Callback = Callable[[dict[str, Any]], Any]


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision: bfloat16 for 'bf16', None for 'fp32'."""
    return torch.bfloat16 if precision == "bf16" else None


def _autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass only; the backward follows the forward's dtypes."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What a run did: per-step and per-epoch records, JSON-serialisable via `to_dict`.

    steps: one record per optimizer step: step, epoch, loss (token-weighted), lr (used for
    that step), grad_norm (before clipping), tokens (supervised), input_tokens (non-pad),
    elapsed (training seconds since the run began, across resumes).
    epochs: one record per epoch, epoch 0 being the base model before training: epoch, step,
    train_loss (token-weighted over the epoch), val_loss, val_perplexity, seconds (training
    time), tokens_per_second (non-pad input tokens per training second).
    """

    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    global_step: int = 0
    skipped_steps: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: str | None = None
    final_dir: str | None = None

    @property
    def losses(self) -> list[float]:
        """Training loss of every optimizer step."""
        return [s["loss"] for s in self.steps]

    @property
    def final_val_loss(self) -> float | None:
        return self.epochs[-1]["val_loss"] if self.epochs else None

    @property
    def final_train_loss(self) -> float | None:
        trained = [e for e in self.epochs if e["train_loss"] is not None]
        return trained[-1]["train_loss"] if trained else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainResult:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass
class StepLoss:
    """Outcome of one accumulated optimizer step: sum NLL over N supervised tokens."""

    nll_sum: float
    n_tokens: int
    input_tokens: int

    @property
    def loss(self) -> float:
        """Mean NLL per supervised token; 0.0 when there is nothing to supervise."""
        return self.nll_sum / self.n_tokens if self.n_tokens else 0.0


# --------------------------------------------------------------------------- the core step


def count_target_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Supervised tokens the loss will see: labels != -100 after the causal shift.

    Position 0 is never predicted (nothing precedes it), exactly as in `completion_nll`.
    """
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum().item())


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    autocast_dtype: torch.dtype | None = None,
    n_total: int | None = None,
    grad_scale: float = 1.0,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> StepLoss:
    """Backprop the micro-batches of one optimizer step so they equal one big batch.

    Count the supervised tokens N over *all* micro-batches first, then backprop each
    micro-batch's summed NLL / N. The gradients add up to d(sum NLL / N), the gradient of
    the big batch; averaging per-micro-batch mean losses instead would overweight tokens in
    micro-batches with short completions. Micro-batches with no supervised token are skipped
    (no forward, no 0/0). Gradients are added to ``.grad``; the caller zeroes them.
    ``autocast_dtype=torch.bfloat16`` runs the forward passes under autocast.

    Data parallel (`lumorik_sft.distributed`): ``n_total`` is the step's supervised-token
    count summed over all processes, ``grad_scale`` the number of processes (DDP averages
    gradients, we want their sum over N), and ``no_sync`` DDP's context that holds the
    gradient all-reduce back until the last micro-batch; with it every micro-batch runs,
    even one without supervised tokens, so all processes make the same collective calls.
    The returned StepLoss then holds this process's NLL and input tokens, and ``n_total``.
    """
    if n_total is None:
        n_total = sum(count_target_tokens(b) for b in micro_batches)
    input_tokens = sum(count_input_tokens(b) for b in micro_batches)
    nll_total = 0.0
    if n_total == 0:
        return StepLoss(0.0, 0, input_tokens)
    for k, batch in enumerate(micro_batches):
        if no_sync is None and count_target_tokens(batch) == 0:
            continue
        sync = no_sync is None or k == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else no_sync():
            with _autocast(autocast_dtype, batch["input_ids"].device):
                nll_sum, _ = completion_nll(model, batch)
            (nll_sum * grad_scale / n_total).backward()
        nll_total += float(nll_sum.detach())
    return StepLoss(nll_total, n_total, input_tokens)


# --------------------------------------------------------------------------- data order


def epoch_order(n_examples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Example indices for one epoch: a permutation that depends only on (seed, epoch).

    A generator of its own (not the global RNG) means a resumed run rebuilds the same order
    without replaying anything; NumPy's SeedSequence mixes the pair without collisions.
    """
    if not shuffle:
        return list(range(n_examples))
    return _permutation(n_examples, _epoch_seed(seed, epoch))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _permutation(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


def _epoch_loader(
    examples: Sequence[Mapping[str, Sequence[int]]],
    order: list[int],
    skip_batches: int,
    config: TrainConfig,
    collator: SFTCollator | PackedCollator,
    lengths: Sequence[int] | None = None,
    parallel: DataParallel | None = None,
) -> DataLoader:
    """Micro-batches of one epoch, starting after the `skip_batches` already consumed.

    The plan (`packing.plan_micro_batches`) is a pure function of the epoch order, the
    lengths and the config, so a resumed run rebuilds it and skips what was done. With
    several processes the plan is made for the global micro-batch (batch_size x processes)
    and this process keeps its share; an empty share becomes a blank example (index
    len(examples), labels all -100) so that every process runs the step.
    The loader gets a private generator: without one, each `iter(DataLoader)` draws a seed
    from the global torch RNG, which would shift dropout masks after a resume.
    """
    parallel = parallel or DataParallel()
    if lengths is None:
        lengths = [len(ex["input_ids"]) for ex in examples]
    plan = plan_micro_batches(order, lengths, config.batch_size * parallel.world_size,
                              config.packing)[skip_batches:]
    dataset: Sequence[Mapping[str, Sequence[int]]] = examples
    collate: Callable[..., Batch] = collator
    if parallel.active:
        plan = [shard_micro_batch(b, parallel.rank, parallel.world_size) or [len(examples)]
                for b in plan]
        blank = {"input_ids": [collator.pad_token_id], "attention_mask": [1],
                 "labels": [IGNORE_INDEX]}
        dataset = [*examples, blank]

        def collate(features: Sequence[Mapping[str, Sequence[int]]]) -> Batch:
            batch = collator(features)
            if features[0] is blank:  # segment -1: not an example token, not counted
                batch["segment_ids"] = torch.full_like(batch["input_ids"], -1)
            return batch

    return DataLoader(
        dataset,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_sampler=plan,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )


def _step_groups(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Group micro-batches into optimizer steps of `size` (the last one may be shorter)."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------- optimizer


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only.

    Biases and LayerNorm/RMSNorm weights (all 1-D parameters) are not decayed: pulling a
    norm's scale or a bias towards 0 is not regularisation, it just changes the function.
    The chapter's `from transformers import AdamW` no longer exists (removed in transformers
    v4.x after deprecation): `torch.optim.AdamW` is the replacement.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel updates every tensor in one pass: ~5x faster than the default
    # per-tensor loop on a CPU, same update rule (HF Trainer's default is the fused one too).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                             fused=fused or None)


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
        warmup = min(config.warmup_steps, total)
    else:
        warmup = math.ceil(config.warmup_ratio * total)
    return per_epoch, total, warmup


# --------------------------------------------------------------------------- RNG, signals


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG a step can draw from (dropout uses torch's), in weights_only-safe types."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


class StopSignals:
    """While active, SIGINT/SIGTERM only raise a flag; the loop stops at the next step.

    Stopping between optimizer steps leaves a consistent state to checkpoint. A second
    Ctrl-C raises KeyboardInterrupt at once. Handlers are installed only from the main
    thread (Python allows no other) and the previous ones are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

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

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""


# --------------------------------------------------------------------------- checkpoints


@dataclass
class _Progress:
    """Where the run is: enough, with the RNG states, to continue it exactly."""

    epoch: int = 1  # epoch in progress, 1-based
    batches_done: int = 0  # micro-batches of that epoch already consumed
    global_step: int = 0
    epoch_nll: float = 0.0
    epoch_tokens: int = 0
    epoch_input_tokens: int = 0
    epoch_seconds: float = 0.0
    elapsed: float = 0.0  # training seconds over all calls
    skipped_steps: int = 0
    finished: bool = False

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done = 0
        self.epoch_nll, self.epoch_tokens, self.epoch_input_tokens = 0.0, 0, 0
        self.epoch_seconds = 0.0


def data_fingerprint(examples: Sequence[Mapping[str, Sequence[int]]]) -> str:
    """Hash of the training examples, so a resume on different data is caught."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        digest.update(np.asarray(ex["labels"], dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temp file in the same folder, fsynced, then `os.replace`.

    A crash or a second signal mid-write leaves the previous checkpoint intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `train` (a file, or the folder holding checkpoint.pt).

    weights_only=True is enough: RNG states are stored as plain tuples, lists and tensors.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {path}; train with config.output_dir set to write one, or "
            "call train(..., resume=False) to start from scratch"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoint_payload(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    progress: _Progress, result: TrainResult, config: TrainConfig, fingerprint: str,
    rng_per_rank: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": dataclasses.asdict(progress),
        "result": result.to_dict(),
        "config": config.to_dict(),
        "data_fingerprint": fingerprint,
        "rng": rng_per_rank[0],
        # Each process draws its own dropout masks, so each resumes its own RNG streams.
        "rng_per_rank": rng_per_rank,
    }


def _resume_path(resume: bool | str | Path, config: TrainConfig) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        if config.output_dir is None:
            raise ValueError("resume=True reads output_dir/checkpoint.pt, but "
                             "config.output_dir is None; set it or pass the checkpoint path")
        return Path(config.output_dir) / CHECKPOINT_NAME
    return Path(resume)


def _check_resumable(
    ckpt: Mapping[str, Any], config: TrainConfig, fingerprint: str, precision: str
) -> None:
    """Refuse to 'continue' a run whose arithmetic would differ from the one saved."""
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"cannot resume: checkpoint format {ckpt.get('format')!r}, this version of "
                         f"lumorik_sft reads format {CHECKPOINT_FORMAT}; start a new run")
    saved_precision = ckpt["result"].get("precision", precision)
    if saved_precision != precision:
        raise ValueError(f"cannot resume: the run trained in {saved_precision} and would go on in "
                         f"{precision}; pass precision={saved_precision!r}")
    saved = ckpt["config"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = [k for k in _RESUME_MUST_MATCH if saved.get(k, defaults[k]) != getattr(config, k)]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k, defaults[k])!r} -> {getattr(config, k)!r}"
                           for k in changed)
        raise ValueError(f"cannot resume with changed settings ({detail}); pass the saved "
                         "TrainConfig(**checkpoint['config']) or start a new run")
    if ckpt["data_fingerprint"] != fingerprint:
        raise ValueError("cannot resume: the training examples differ from the checkpoint's; "
                         "pass the same train_examples in the same order")


# --------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """The pieces of one training call, so the loop's helpers take one argument."""

    model: torch.nn.Module
    config: TrainConfig
    device: torch.device
    precision: str
    optimizer: torch.optim.Optimizer
    scheduler: Any
    collator: SFTCollator | PackedCollator
    train_examples: Sequence[Mapping[str, Sequence[int]]]
    val_batches: list[Batch] | None
    fingerprint: str
    total_steps: int
    progress: _Progress
    result: TrainResult
    callback: Callback | None
    started: float = field(default_factory=time.perf_counter)
    parallel: DataParallel = field(default_factory=DataParallel)
    stop_agreed: bool = False  # some process received SIGINT/SIGTERM: all of them stop
    forward_model: torch.nn.Module | None = None  # the DDP wrapper with several processes
    lengths: list[int] = field(default_factory=list)

    def elapsed(self) -> float:
        return self.progress.elapsed + time.perf_counter() - self.started

    def autocast(self) -> contextlib.AbstractContextManager:
        return _autocast(autocast_dtype(self.precision), self.device)

    def checkpoint_path(self) -> Path | None:
        if self.config.output_dir is None:
            return None
        return Path(self.config.output_dir) / CHECKPOINT_NAME

    def stopping(self, stop: StopSignals) -> bool:
        """True once any process got a stop signal; a collective, so every rank asks at once.

        A signal can reach one rank a step before another; if only that rank stopped, the
        others would wait forever in the next step's all-reduce and nobody would checkpoint.
        """
        self.stop_agreed = self.parallel.any(self.stop_agreed or stop.received is not None)
        return self.stop_agreed

    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint; every rank returns only once it is on disk."""
        path = self.checkpoint_path()
        if path is None:
            return None
        rng_per_rank = self.parallel.gather(_rng_state(self.device))
        self.progress.elapsed = self.elapsed()
        self.started = time.perf_counter()
        if self.parallel.is_main:
            save_checkpoint(path, _checkpoint_payload(
                self.model, self.optimizer, self.scheduler, self.progress, self.result,
                self.config, self.fingerprint, rng_per_rank))
        self.parallel.barrier()  # a rank that exits first must not end the job mid-write
        self.result.checkpoint_path = str(path)
        return path

    def notify(self, event: str, record: Mapping[str, Any]) -> None:
        if self.callback is not None:
            self.callback({"event": event, **record, "result": self.result})


def _validate(run: _Run) -> tuple[float | None, float | None]:
    """Token-weighted validation loss and perplexity (None without a validation set)."""
    if not run.val_batches:
        return None, None
    with run.autocast():
        ev = evaluate_loss(run.model, run.val_batches, device=run.device)
    return ev.loss, ev.perplexity


def _optimizer_step(run: _Run, group: list[Batch]) -> dict[str, Any] | None:
    """One accumulated step: backprop, clip, step, schedule. None if it had no tokens."""
    cfg, prog, par = run.config, run.progress, run.parallel
    batches = [_to_device(b, run.device) for b in group]
    # Every process divides by the step's global supervised-token count (one all-reduce).
    n_total = int(par.sum([sum(count_target_tokens(b) for b in batches)])[0])
    step = accumulate_gradients(run.forward_model or run.model, batches,
                                autocast_dtype=autocast_dtype(run.precision), n_total=n_total,
                                grad_scale=par.world_size, no_sync=par.no_sync(run.forward_model))
    if par.active:
        nll_sum, input_tokens = par.sum([step.nll_sum, step.input_tokens])
        step = StepLoss(nll_sum, step.n_tokens, int(input_tokens))
    prog.batches_done += len(group)
    prog.epoch_input_tokens += step.input_tokens
    if step.n_tokens == 0:
        run.optimizer.zero_grad(set_to_none=True)
        prog.skipped_steps += 1
        warnings.warn(f"skipped an optimizer step in epoch {prog.epoch}: its {len(group)} "
                      f"micro-batch(es) have no supervised token ({prog.skipped_steps} skipped "
                      "so far); check that completions survive truncation", stacklevel=3)
        return None
    if not math.isfinite(step.loss):
        raise FloatingPointError(
            f"non-finite loss {step.loss} at step {prog.global_step + 1}; lower learning_rate, "
            "keep max_grad_norm on, or try precision='fp32'")
    clip = cfg.max_grad_norm if cfg.max_grad_norm else math.inf  # inf: measure, don't clip
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    prog.global_step += 1
    prog.epoch_nll += step.nll_sum
    prog.epoch_tokens += step.n_tokens
    return {"step": prog.global_step, "epoch": prog.epoch, "loss": step.loss, "lr": lr,
            "grad_norm": float(grad_norm), "tokens": step.n_tokens,
            "input_tokens": step.input_tokens, "elapsed": run.elapsed()}


def _epoch_record(run: _Run, epoch: int) -> dict[str, Any]:
    prog = run.progress
    val_loss, val_ppl = _validate(run)
    trained = epoch > 0 and prog.epoch_tokens > 0
    seconds = prog.epoch_seconds if epoch > 0 else 0.0
    return {
        "epoch": epoch, "step": prog.global_step,
        "train_loss": prog.epoch_nll / prog.epoch_tokens if trained else None,
        "val_loss": val_loss, "val_perplexity": val_ppl, "seconds": seconds,
        "tokens_per_second": prog.epoch_input_tokens / seconds if seconds > 0 else None,
    }


def _log(run: _Run, text: str) -> None:
    if run.config.log_every > 0 and run.parallel.is_main:
        from tqdm.auto import tqdm

        tqdm.write(text)


def _finish_epoch(run: _Run, epoch: int) -> None:
    record = _epoch_record(run, epoch)
    run.result.epochs.append(record)
    _log(run, f"epoch {epoch}: train_loss {_fmt(record['train_loss'])}  "
              f"val_loss {_fmt(record['val_loss'])}  val_ppl {_fmt(record['val_perplexity'])}")
    run.notify("epoch", record)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _progress_bar(run: _Run) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=run.progress.global_step,
                disable=progress_quiet(run.config.progress) or not run.parallel.is_main,
                desc="train", unit="step", dynamic_ncols=True)


def _run_epoch(run: _Run, stop: StopSignals, bar: Any) -> bool:
    """Train the rest of the current epoch; True when the run must stop early."""
    cfg, prog = run.config, run.progress
    order = epoch_order(len(run.train_examples), cfg.seed, prog.epoch, cfg.shuffle)
    loader = _epoch_loader(run.train_examples, order, prog.batches_done, cfg, run.collator,
                           run.lengths, run.parallel)
    tick = time.perf_counter()  # epoch seconds: loading + steps, not evaluation or callbacks
    for group in _step_groups(loader, cfg.grad_accum_steps):
        if prog.global_step >= run.total_steps:
            return True
        record = _optimizer_step(run, group)
        prog.epoch_seconds += time.perf_counter() - tick
        if record is not None:
            run.result.steps.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if cfg.log_every and record["step"] % cfg.log_every == 0:
                _log(run, f"step {record['step']}/{run.total_steps}  loss {record['loss']:.4f}"
                          f"  lr {record['lr']:.2e}  grad_norm {record['grad_norm']:.3f}")
            run.notify("step", record)
        if run.stopping(stop):
            return True
        tick = time.perf_counter()
    return prog.global_step >= run.total_steps


def _train_loop(run: _Run, stop: StopSignals) -> None:
    prog, cfg = run.progress, run.config
    bar = _progress_bar(run)
    try:
        while prog.epoch <= cfg.epochs and not prog.finished:
            stopped = _run_epoch(run, stop, bar)
            if run.stopping(stop):
                return
            # The epoch is complete, or max_steps ended the run inside it: either way evaluate.
            _finish_epoch(run, prog.epoch)
            prog.finished = stopped or prog.epoch == cfg.epochs
            prog.next_epoch()
            run.save()
            if run.stopping(stop):
                return
        prog.finished = True
    finally:
        bar.close()


def _interrupt(run: _Run, stop: StopSignals) -> None:
    """Checkpoint at this step boundary and say how to continue."""
    run.result.interrupted = True
    path = run.save()
    step = run.progress.global_step
    if not run.parallel.is_main:
        return
    by = stop.name or "a signal to another process"
    if path is None:
        print(f"Stopped by {by} after step {step}; no checkpoint (config.output_dir is "
              "None): the model in memory holds the weights so far.")
    else:
        _write_history(run)
        print(f"Stopped by {by} after step {step}; checkpoint saved to {path}. Resume "
              "with train(model, tokenizer, train_examples, val_examples, config, resume=True).")


def _write_history(run: _Run) -> None:
    if not run.parallel.is_main:
        return
    out = Path(run.config.output_dir)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    (out / HISTORY_NAME).write_text(json.dumps(run.result.to_dict(), indent=2))


def _finalize(run: _Run, tokenizer: PreTrainedTokenizerBase) -> None:
    if run.config.output_dir is None:
        return
    final = Path(run.config.output_dir) / FINAL_DIR_NAME
    run.result.final_dir = str(final)
    if not run.parallel.is_main:
        return
    run.model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    _write_history(run)


def _check_context(model: torch.nn.Module, examples: Sequence[Mapping[str, Sequence[int]]],
                   what: str) -> None:
    """Fail before training, not with an index error in the position embedding mid-run."""
    limit = context_length(model)
    longest = max((len(ex["input_ids"]) for ex in examples), default=0)
    if limit is not None and longest > limit:
        raise ValueError(f"the longest {what} example has {longest} tokens but the model's context "
                         f"is {limit}; encode with max_length={limit} or less "
                         "(encoding.fit_max_length(model))")


def _setup(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[Mapping[str, Sequence[int]]],
    val_examples: Sequence[Mapping[str, Sequence[int]]] | None,
    config: TrainConfig, callback: Callback | None,
) -> _Run:
    if not train_examples:
        raise ValueError("train_examples is empty; encode some records with "
                         "lumorik_sft.encoding.encode_records first")
    missing = {"input_ids", "attention_mask", "labels"} - set(train_examples[0])
    if missing:
        raise ValueError(f"examples lack {sorted(missing)}; build them with encode_records")
    for what, examples in (("training", train_examples), ("validation", val_examples or [])):
        _check_context(model, examples, what)
    if config.learning_rate is None:  # one rule for every caller: the model's recommended rate
        lr = recommended_learning_rate(getattr(model, "name_or_path", None), model)
        config = dataclasses.replace(config, learning_rate=lr)
    set_seed(config.seed)
    parallel = setup_data_parallel(config.device)
    device = parallel.device if parallel.active else resolve_device(config.device)
    model.to(device)
    pad_id = prepare_tokenizer(tokenizer).pad_token_id
    collator = make_collator(pad_id, config.packing, model, capacity=config.pack_length,
                             pad_to_multiple_of=config.pad_to_multiple_of)
    val_collator = SFTCollator(pad_id)  # validation is the same whatever the packing
    val_batches = None
    if val_examples:
        ebs = config.eval_batch_size
        val_batches = [val_collator([val_examples[j] for j in range(i, min(i + ebs, len(val_examples)))])
                       for i in range(0, len(val_examples), ebs)]
    optimizer = build_optimizer(model, config)
    _, total, warmup = plan_steps(len(train_examples), config, parallel.world_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    precision = resolve_precision(config.precision, device)
    result = TrainResult(device=str(device), precision=precision, config=config.to_dict())
    return _Run(model=model, config=config, device=device, precision=precision,
                optimizer=optimizer, scheduler=scheduler, collator=collator,
                train_examples=train_examples, val_batches=val_batches,
                fingerprint=data_fingerprint(train_examples), total_steps=total,
                progress=_Progress(), result=result, callback=callback, parallel=parallel,
                forward_model=parallel.wrap(model),
                lengths=[len(ex["input_ids"]) for ex in train_examples])


def _restore(run: _Run, ckpt: Mapping[str, Any]) -> None:
    """Load weights, optimizer, schedule, position, history and RNG states from a checkpoint."""
    _check_resumable(ckpt, run.config, run.fingerprint, run.precision)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.progress = _Progress(**ckpt["progress"])
    saved = TrainResult.from_dict(ckpt["result"])
    run.result.steps, run.result.epochs = saved.steps, saved.epochs
    per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    # The same number of processes resumes exactly; another number goes on from rank 0's streams.
    rng = per_rank[run.parallel.rank] if len(per_rank) == run.parallel.world_size else ckpt["rng"]
    _set_rng_state(rng)  # last: nothing between here and the next step draws


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[Mapping[str, Sequence[int]]],
    val_examples: Sequence[Mapping[str, Sequence[int]]] | None = None,
    config: TrainConfig | None = None,
    *,
    resume: bool | str | Path = False,
    callback: Callback | None = None,
) -> TrainResult:
    """Fine-tune `model` on encoded examples: the chapter's loop, done right.

    Examples are dicts from `encode_records` (input_ids, attention_mask, labels). The model
    is trained in place and moved to the configured device. With ``config.output_dir`` set,
    a checkpoint is written after each epoch and on SIGINT/SIGTERM (the run then stops at
    the next optimizer step with ``interrupted=True``); ``resume=True`` (or a checkpoint
    path) continues such a run to the same weights an uninterrupted run reaches.
    ``callback(event)`` gets ``{"event": "step"|"epoch", **record, "result": TrainResult}``
    after every optimizer step and evaluation; its return value is ignored. The model is
    left in eval mode, ready to generate.
    """
    config = config or TrainConfig()
    run = _setup(model, tokenizer, train_examples, val_examples, config, callback)
    ckpt_path = _resume_path(resume, config)
    if ckpt_path is not None:
        _restore(run, load_checkpoint(ckpt_path))
    model.train()
    with StopSignals() as stop, fused_activations(model, config.fused_activations):
        if not run.result.epochs and not run.progress.finished:
            _finish_epoch(run, 0)  # epoch 0: the base model, so curves start before training
        _train_loop(run, stop)
        if run.stop_agreed:
            _interrupt(run, stop)
    run.result.global_step = run.progress.global_step
    run.result.skipped_steps = run.progress.skipped_steps
    if not run.result.interrupted:
        _finalize(run, tokenizer)
    model.eval()
    return run.result


# --------------------------------------------------------------------------- the chapter


def chapter_loop(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    *,
    epochs: int = 3,
    lr: float = 5e-5,
    device: str | torch.device | None = None,
) -> list[float]:
    """The chapter's loop, as written except for the optimizer import; returns step losses.

    Kept for the errata lesson and benchmarks. What is wrong with it:

    - ``labels=batch["input_ids"]`` supervises the prompt and every pad token, so the model
      learns to write prompts and to emit padding; the mean loss is dominated by them;
    - the model's mean loss is per batch, so batches with few real tokens weigh as much as
      long ones (and gradient accumulation, if added, would average means);
    - no warmup or LR decay, no gradient clipping, no validation, no seed, no checkpoint;
    - the batch never moves to the model's device (added here so it runs on a GPU);
    - ``from transformers import AdamW`` fails on current transformers: replaced by
      `torch.optim.AdamW`.
    """
    target = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(target)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses: list[float] = []
    model.train()
    for _epoch in range(epochs):
        for batch in loader:
            inputs = {k: v.to(target) for k, v in batch.items() if k != "labels"}
            outputs = model(**inputs, labels=inputs["input_ids"])
            loss = outputs.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    return losses


def smoke_run() -> TrainResult:
    """Train a tiny GPT-2 on toy pairs for a few steps: proves the loop runs end to end."""
    from lumorik_sft.encoding import encode_records
    from lumorik_sft.models import build_model, train_bpe_tokenizer

    pairs = [{"prompt": f"Add {i} and {i}.", "completion": f"{i} plus {i} is {2 * i}."}
             for i in range(32)]
    tokenizer = train_bpe_tokenizer([p["prompt"] + p["completion"] for p in pairs] * 5,
                                    vocab_size=300)
    examples, _ = encode_records(pairs, tokenizer)
    model = build_model("gpt2", tokenizer, n_layer=2, width=32, n_head=2, context=64)
    result = train(model, tokenizer, examples[:28], examples[28:],
                   TrainConfig(learning_rate=3e-3, batch_size=4, epochs=2, log_every=4))
    print(json.dumps(result.epochs, indent=2))
    return result


if __name__ == "__main__":
    smoke_run()
