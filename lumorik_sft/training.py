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
  data-parallel processes under ``accelerate launch`` or ``torchrun``.

Where to read what: `train_step` is one optimizer step top to bottom (forward and backward
through `accumulate_gradients`, clip, step, schedule, zero_grad); `train` and the `_train_loop`
below it are the epochs around it (evaluate, log, checkpoint, stop); the example order, the
micro-batches of a step and AdamW come from `lumorik_sft.schedule`. What a checkpoint holds
and how a run resumes exactly is in `lumorik_sft.checkpoint`; how several processes agree
(token counts, the stop vote) in `lumorik_sft.distributed`; the loss itself in
`lumorik_sft.metrics.completion_nll` (the reference) and `lumorik_sft.fused_loss` (the fast
path training uses by default).

`chapter_loop` keeps the chapter's loop for the errata lesson and for benchmarks. Smoke run
from a shell (a tiny GPT-2 on toy pairs, a few seconds on a CPU): ``python -m lumorik_sft.training``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup, set_seed

from lumorik_sft import checkpoint, lora
from lumorik_sft.checkpoint import CHECKPOINT_NAME, TrainResult, load_checkpoint  # re-exported
from lumorik_sft.compiled import StepCompiler
from lumorik_sft.config import TrainConfig
from lumorik_sft.defaults import autocast_context as _autocast
from lumorik_sft.defaults import autocast_dtype, recommended_learning_rate, resolve_precision
from lumorik_sft.distributed import DataParallel, StopSignals, setup_data_parallel, unwrap
from lumorik_sft.encoding import IGNORE_INDEX, SFTCollator
from lumorik_sft.fused_loss import completion_nll as fused_completion_nll
from lumorik_sft.metrics import LossFn, completion_nll, evaluate_loss
from lumorik_sft.models import (
    fused_activations,
    prepare_tokenizer,
    resolve_device,
    shown_path,
)
from lumorik_sft.packing import count_input_tokens, make_collator
from lumorik_sft.progress import progress_quiet
from lumorik_sft.schedule import Batch, Examples, _epoch_steps, build_optimizer, check_examples, plan_steps

Callback = Callable[[dict[str, Any]], Any]


@dataclass
class StepLoss:
    """Outcome of one accumulated optimizer step: sum NLL over N supervised tokens.

    `train_step` also fills in the learning rate the step used and the gradient norm before
    clipping; both stay None when the step had no supervised token and was skipped.
    """

    nll_sum: float
    n_tokens: int
    input_tokens: int
    lr: float | None = None
    grad_norm: float | None = None

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
    loss_fn: LossFn = completion_nll,
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
    ``loss_fn(model, batch) -> (nll_sum, n_tokens)`` is the loss (`loss_function`);
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
                nll_sum, _ = loss_fn(model, batch)
            (nll_sum * grad_scale / n_total).backward()
        nll_total += float(nll_sum.detach())
    return StepLoss(nll_total, n_total, input_tokens)


def loss_function(config: TrainConfig) -> LossFn:
    """The loss training backpropagates: `fused_loss.completion_nll` (fast) or the reference.

    Both compute `metrics.completion_nll`'s summed NLL over supervised tokens; the fused one
    runs the LM head on supervised positions only, fused with the cross-entropy.
    """
    return fused_completion_nll if config.fused_loss else completion_nll


def train_step(
    model: torch.nn.Module,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
    *,
    parallel: DataParallel | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> StepLoss:
    """One optimizer step, top to bottom: forward and backward, clip, step, schedule, zero_grad.

    ``model`` is what runs the forward pass (DDP's wrapper when `parallel` has several
    processes). The returned StepLoss covers every process; ``n_tokens == 0`` means nothing
    was supervised, so no update was made and the schedule did not move.
    """
    parallel = parallel or DataParallel()
    # 1. Forward and backward, token-weighted: every process divides by the global token count.
    n_total = parallel.total(sum(count_target_tokens(b) for b in micro_batches))
    local = accumulate_gradients(
        model,
        micro_batches,
        loss_fn=loss_function(config),
        autocast_dtype=autocast_dtype,
        n_total=n_total,
        grad_scale=parallel.world_size,
        no_sync=parallel.no_sync(model),
    )
    nll_sum, input_tokens = parallel.sum([local.nll_sum, local.input_tokens])
    step = StepLoss(nll_sum, n_total, int(input_tokens))
    if n_total == 0:
        optimizer.zero_grad(set_to_none=True)
        return step
    if not math.isfinite(step.loss):
        raise FloatingPointError(
            f"non-finite loss {step.loss} at step {scheduler.last_epoch + 1}; lower learning_rate, "
            "keep max_grad_norm on, or try precision='fp32'"
        )
    # 2. Clip the global gradient norm (max_grad_norm None or 0: measure it, do not clip).
    step.grad_norm = float(
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
    )
    # 3. Step with this step's learning rate, move the schedule on, clear the gradients.
    step.lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step


# --------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """One call of `train`: what the loop around `train_step` reads and updates."""

    model: torch.nn.Module  # what runs forward: DDP's wrapper with several processes (`unwrap`)
    config: TrainConfig
    parallel: DataParallel
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_of_epoch: Callable[[int, int], Iterator[list[Batch]]]  # (epoch, batches done) -> steps
    val_batches: list[Batch] | None
    fingerprint: str  # of the training data, saved with checkpoints
    total_steps: int
    result: TrainResult
    callback: Callback | None
    compiler: StepCompiler  # TrainConfig.compile: eager, compiled, or compiled once it pays
    progress: checkpoint.Progress = field(default_factory=checkpoint.Progress)
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.progress.elapsed + time.perf_counter() - self.started

    def log(self, line: str) -> None:
        """Print a line under the progress bar (rank 0 only; log_every=0 silences it)."""
        if self.config.log_every > 0 and self.parallel.is_main:
            from tqdm.auto import tqdm

            tqdm.write(line)

    def notify(self, event: str, record: Mapping[str, Any]) -> None:
        if self.callback is not None:
            self.callback({"event": event, **record, "result": self.result})


def _train_loop(run: _Run, stop: StopSignals) -> None:
    """Epochs of optimizer steps; each epoch ends with an evaluation and a checkpoint."""
    from tqdm.auto import tqdm

    prog, cfg = run.progress, run.config
    bar = tqdm(
        total=run.total_steps,
        initial=prog.global_step,
        desc="train",
        unit="step",
        disable=progress_quiet(cfg.progress) or not run.parallel.is_main,
        dynamic_ncols=True,
    )
    with bar:
        while prog.epoch <= cfg.epochs and not prog.finished:
            ended_early = _run_epoch(run, stop, bar)
            if stop.requested():
                return
            # The epoch is complete, or max_steps ended the run inside it: either way evaluate.
            _finish_epoch(run, prog.epoch)
            prog.finished = ended_early or prog.epoch == cfg.epochs
            prog.next_epoch()
            _save(run)
            if stop.requested():
                return
        prog.finished = True


def _run_epoch(run: _Run, stop: StopSignals, bar: Any) -> bool:
    """Train the rest of the current epoch; True when the run must stop early."""
    prog, dtype = run.progress, autocast_dtype(run.result.precision)
    tick = time.perf_counter()  # epoch seconds: loading + steps, not evaluation or callbacks
    for group in run.steps_of_epoch(prog.epoch, prog.batches_done):
        if prog.global_step >= run.total_steps:
            return True
        batches = [{k: v.to(run.device, non_blocking=True) for k, v in b.items()} for b in group]
        step_started = time.perf_counter()
        step = train_step(
            run.model,
            batches,
            run.optimizer,
            run.scheduler,
            run.config,
            parallel=run.parallel,
            autocast_dtype=dtype,
        )
        prog.epoch_seconds += time.perf_counter() - tick
        run.compiler.after_step(prog.global_step + 1, time.perf_counter() - step_started)
        prog.batches_done += len(group)
        prog.epoch_input_tokens += step.input_tokens
        if step.n_tokens == 0:
            prog.skipped_steps += 1
            warnings.warn(
                f"skipped an optimizer step in epoch {prog.epoch}: its {len(group)} "
                f"micro-batch(es) have no supervised token ({prog.skipped_steps} skipped "
                "so far); check that completions survive truncation",
                stacklevel=2,
            )
        else:
            prog.global_step += 1
            prog.epoch_nll += step.nll_sum
            prog.epoch_tokens += step.n_tokens
            record = {
                "step": prog.global_step,
                "epoch": prog.epoch,
                "loss": step.loss,
                "lr": step.lr,
                "grad_norm": step.grad_norm,
                "tokens": step.n_tokens,
                "input_tokens": step.input_tokens,
                "elapsed": run.elapsed(),
            }
            run.result.steps.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{step.lr:.2e}")
            if run.config.log_every and prog.global_step % run.config.log_every == 0:
                run.log(
                    f"step {prog.global_step}/{run.total_steps}  loss {step.loss:.4f}  "
                    f"lr {step.lr:.2e}  grad_norm {step.grad_norm:.3f}"
                )
            run.notify("step", record)
        if stop.requested():
            return True
        tick = time.perf_counter()
    return prog.global_step >= run.total_steps


def _finish_epoch(run: _Run, epoch: int) -> None:
    """Evaluate, and record the epoch (epoch 0: the base model, before any step)."""
    prog, val_loss, val_ppl = run.progress, None, None
    if run.val_batches:  # token-weighted validation loss and perplexity, with the training loss
        with _autocast(autocast_dtype(run.result.precision), run.device):
            ev = evaluate_loss(
                unwrap(run.model), run.val_batches, device=run.device, loss_fn=loss_function(run.config)
            )
        val_loss, val_ppl = ev.loss, ev.perplexity
    train_loss = prog.epoch_nll / prog.epoch_tokens if epoch > 0 and prog.epoch_tokens else None
    seconds = prog.epoch_seconds if epoch > 0 else 0.0
    record = {
        "epoch": epoch,
        "step": prog.global_step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_perplexity": val_ppl,
        "seconds": seconds,
        "tokens_per_second": prog.epoch_input_tokens / seconds if seconds > 0 else None,
    }
    run.result.epochs.append(record)
    run.log(
        f"epoch {epoch}: train_loss {_fmt(train_loss)}  val_loss {_fmt(val_loss)}  val_ppl {_fmt(val_ppl)}"
    )
    run.notify("epoch", record)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# --------------------------------------------------------------------------- saving


def _save(run: _Run) -> Path | None:
    """Write the checkpoint (rank 0; every process waits until it is on disk)."""
    if run.config.output_dir is None:
        return None
    path = Path(run.config.output_dir) / CHECKPOINT_NAME
    run.progress.elapsed, run.started = run.elapsed(), time.perf_counter()
    checkpoint.save_run(
        path,
        unwrap(run.model),
        run.optimizer,
        run.scheduler,
        progress=run.progress,
        result=run.result.to_dict(),
        config=run.config,
        fingerprint=run.fingerprint,
        parallel=run.parallel,
        device=run.device,
    )
    run.result.checkpoint_path = str(path)
    return path


def _interrupt(run: _Run, stop: StopSignals) -> None:
    """Checkpoint at this step boundary and say how to continue."""
    run.result.interrupted = True
    path = _save(run)
    if not run.parallel.is_main:
        return
    stopped = f"Stopped by {stop.name or 'a signal to another process'} after step {run.progress.global_step}"
    if path is None:
        print(
            f"{stopped}; no checkpoint (no output folder was set): the model in memory holds "
            "the weights so far."
        )
    else:
        checkpoint.write_history(path.parent, run.result)
        print(
            f"{stopped}; checkpoint saved to {shown_path(path)}. Resume with the same command plus "
            "--resume (in Python: train(..., resume=True) with the same arguments)."
        )


def _finalize(run: _Run, tokenizer: PreTrainedTokenizerBase) -> None:
    """OUT_DIR/final/ (and merged/ for LoRA), ready for from_pretrained: `checkpoint.save_final`."""
    if run.config.output_dir is None:
        return
    run.result.final_dir = str(Path(run.config.output_dir) / checkpoint.FINAL_DIR_NAME)
    if run.parallel.is_main:
        checkpoint.save_final(unwrap(run.model), tokenizer, run.config.output_dir)
        checkpoint.write_history(run.config.output_dir, run.result)


# --------------------------------------------------------------------------- train


def _setup(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Examples,
    val_examples: Examples | None,
    config: TrainConfig,
    callback: Callback | None,
) -> _Run:
    check_examples(model, train_examples, val_examples)
    if config.learning_rate is None:  # one rule for every caller: the model's recommended rate
        lr = recommended_learning_rate(getattr(model, "name_or_path", None), model)
        config = dataclasses.replace(config, learning_rate=lr)
    set_seed(config.seed)
    parallel = setup_data_parallel(config.device)
    device = parallel.device if parallel.active else resolve_device(config.device)
    model.to(device)
    pad_id = prepare_tokenizer(tokenizer).pad_token_id
    collator = make_collator(
        pad_id,
        config.packing,
        model,
        capacity=config.pack_length,
        pad_to_multiple_of=config.pad_to_multiple_of,
    )
    val_batches = None
    if val_examples:  # validation is the same whatever the packing
        ebs, val_collator = config.eval_batch_size, SFTCollator(pad_id)
        val_batches = [
            val_collator(list(val_examples[i : i + ebs])) for i in range(0, len(val_examples), ebs)
        ]
    lora.add_lora_from_config(model, tokenizer, config)
    optimizer = build_optimizer(model, config)  # the trainable parameters only: with LoRA, A, B and rows
    _, total, warmup = plan_steps(len(train_examples), config, parallel.world_size)
    lengths = [len(ex["input_ids"]) for ex in train_examples]
    return _Run(
        model=parallel.wrap(model),
        config=config,
        parallel=parallel,
        device=device,
        optimizer=optimizer,
        scheduler=get_linear_schedule_with_warmup(optimizer, warmup, total),
        steps_of_epoch=functools.partial(_epoch_steps, train_examples, lengths, collator, config, parallel),
        val_batches=val_batches,
        fingerprint=checkpoint.data_fingerprint(train_examples),
        total_steps=total,
        result=TrainResult(
            device=str(device), precision=resolve_precision(config.precision, device), config=config.to_dict()
        ),
        callback=callback,
        compiler=StepCompiler(model, config.compile, device, total),
    )


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Examples,
    val_examples: Examples | None = None,
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
    ckpt_path = checkpoint.resume_path(resume, config.output_dir)
    if ckpt_path is not None:  # weights, optimizer, schedule, position, history, RNG states
        run.progress = checkpoint.restore_run(
            load_checkpoint(ckpt_path),
            unwrap(run.model),
            run.optimizer,
            run.scheduler,
            config=run.config,
            fingerprint=run.fingerprint,
            result=run.result,
            parallel=run.parallel,
        )
    model.train()
    with (
        StopSignals(run.parallel) as stop,
        fused_activations(model, config.fused_activations),
        run.compiler,
    ):
        if not run.result.epochs and not run.progress.finished:
            _finish_epoch(run, 0)  # epoch 0: the base model, so curves start before training
        _train_loop(run, stop)
        if stop.agreed:
            _interrupt(run, stop)
    run.result.global_step = run.progress.global_step
    run.result.skipped_steps = run.progress.skipped_steps
    run.result.compile = run.compiler.decision.to_dict()
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

    pairs = [{"prompt": f"Add {i} and {i}.", "completion": f"{i} plus {i} is {2 * i}."} for i in range(32)]
    tokenizer = train_bpe_tokenizer([p["prompt"] + p["completion"] for p in pairs] * 5, vocab_size=300)
    examples, _ = encode_records(pairs, tokenizer)
    model = build_model("gpt2", tokenizer, n_layer=2, width=32, n_head=2, context=64)
    result = train(
        model,
        tokenizer,
        examples[:28],
        examples[28:],
        TrainConfig(learning_rate=3e-3, batch_size=4, epochs=2, log_every=4),
    )
    print(json.dumps(result.epochs, indent=2))
    return result


if __name__ == "__main__":
    smoke_run()
