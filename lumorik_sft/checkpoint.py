"""Checkpoints and run records (stage 3): what a run saves, and how a resumed run gets back.

A run with an output folder writes OUT_DIR/checkpoint.pt (`save_run`, at every epoch end and on
Ctrl-C), OUT_DIR/history.json (its `TrainResult`: every step and epoch record, `write_history`)
and, once finished, OUT_DIR/final/ (the model, from `lumorik_sft.training`). `restore_run` is
what `train(resume=True)` calls; read it with `checkpoint_payload` to see what "resume exactly"
takes:

- the weights, the optimizer's moments and the LR schedule (`checkpoint_payload`);
- where the run is (`Progress`: epoch, micro-batches consumed, step) and its history so far;
- every random number generator a step draws from (`rng_state`): dropout masks come from
  torch's, so without it a resumed run would drop other units. Each data-parallel process
  draws its own masks, so each process's states are saved and restored (`rank_rng_state`);
- the settings that change the run's arithmetic (`RESUME_MUST_MATCH`), the precision and a
  fingerprint of the training data (`data_fingerprint`): `check_resumable` refuses to
  "continue" a run with other ones.

`save_checkpoint` writes atomically (a temporary file, then `os.replace`), so a run killed
while writing leaves the previous checkpoint intact; `load_checkpoint` turns a damaged file
into a one-line error that says what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lumorik_sft import lora
from lumorik_sft.config import TrainConfig
from lumorik_sft.distributed import DataParallel
from lumorik_sft.models import model_source_name

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
HISTORY_NAME = "history.json"
FINAL_DIR_NAME = "final"
MERGED_DIR_NAME = "merged"  # LoRA runs: the adapter merged into the base weights, a plain model

# Settings that change the arithmetic of a run: resuming with different values would not
# continue the same run, so `train(resume=...)` refuses them.
RESUME_MUST_MATCH = (
    "learning_rate",
    "batch_size",
    "grad_accum_steps",
    "epochs",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "shuffle",
    "max_steps",
    "packing",
    "fused_activations",
    "fused_loss",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "lora_dropout",
    "lora_tokens",
)

_START_AFRESH = "run again without --resume (resume=False in Python) to begin a new run"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or cannot continue this run; the message says why."""


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
    compile: dict[str, Any] = field(default_factory=dict)  # compiled.CompileDecision: what, when, cost

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
class Progress:
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


# --------------------------------------------------------------------------- a run's state


def save_run(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    progress: Progress,
    result: Mapping[str, Any],
    config: TrainConfig,
    fingerprint: str,
    parallel: DataParallel,
    device: torch.device,
) -> None:
    """Rank 0 writes the checkpoint, with every rank's RNG states; all return once it is on disk."""
    rng_per_rank = parallel.gather(rng_state(device))
    if parallel.is_main:
        save_checkpoint(
            path,
            checkpoint_payload(
                model,
                optimizer,
                scheduler,
                progress=dataclasses.asdict(progress),
                result=result,
                config=config,
                fingerprint=fingerprint,
                rng_per_rank=rng_per_rank,
            ),
        )
    parallel.barrier()  # a rank that exits first must not end the job mid-write


def restore_run(
    ckpt: Mapping[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    config: TrainConfig,
    fingerprint: str,
    result: TrainResult,
    parallel: DataParallel,
) -> Progress:
    """Check the checkpoint continues this run, load it into the pieces, return where it was.

    `result` gets the saved history. The RNG states come back last: nothing may draw a random
    number before the next step.
    """
    check_resumable(ckpt, config, fingerprint, result.precision)
    saved = TrainResult.from_dict(ckpt["result"])
    result.steps, result.epochs = saved.steps, saved.epochs
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(rank_rng_state(ckpt, parallel.rank, parallel.world_size))
    return Progress(**ckpt["progress"])


# --------------------------------------------------------------------------- files


def save_final(model: torch.nn.Module, tokenizer: Any, output_dir: str | Path) -> Path:
    """A finished run's model, ready for from_pretrained, in OUT/final/ (returned).

    Full fine-tuning: the whole model. LoRA: final/ holds the adapter in PEFT's format (loadable by
    `models.load_model_and_tokenizer` and by PEFT) and merged/ the adapter merged into a plain copy
    of the model; both hold the tokenizer.
    """
    out = Path(output_dir)
    final = out / FINAL_DIR_NAME
    if lora.lora_layers(model):
        lora.save_adapter(model, final, base_name_or_path=model_source_name(model))
        lora.merged_copy(model).save_pretrained(out / MERGED_DIR_NAME)
        tokenizer.save_pretrained(out / MERGED_DIR_NAME)
    else:
        model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    return final


def write_history(output_dir: str | Path, result: TrainResult) -> None:
    """OUT_DIR/history.json: every step and epoch record, for plots (`course.plots`)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / HISTORY_NAME).write_text(json.dumps(result.to_dict(), indent=2))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temp file in the same folder, fsynced, then `os.replace`.

    A crash or a second signal mid-write leaves the previous checkpoint intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `train` (a file, or the folder holding checkpoint.pt).

    weights_only=True is enough: RNG states are stored as plain tuples, lists and tensors.
    A missing file raises FileNotFoundError, a damaged one `CheckpointError`, each in one line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        where = (
            f"no {CHECKPOINT_NAME} in {path.parent}"
            if path.name == CHECKPOINT_NAME
            else f"no checkpoint at {path}"
        )
        raise FileNotFoundError(f"nothing to resume: {where}; {_START_AFRESH}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is damaged: cut short or corrupted ({type(exc).__name__} reading "
            "it), e.g. the run was killed while it was written or copied; delete it and "
            f"{_START_AFRESH}, or put back a copy of the previous checkpoint"
        ) from exc
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path} is not a lumorik_sft training checkpoint; {_START_AFRESH}")
    return ckpt


def resume_path(resume: bool | str | Path | None, output_dir: str | None) -> Path | None:
    """The checkpoint `train(resume=...)` continues from: OUT_DIR/checkpoint.pt or a given path."""
    if resume is False or resume is None:
        return None
    if resume is True:
        if output_dir is None:
            raise ValueError(
                "resuming reads OUT_DIR/checkpoint.pt, but no output folder is set; "
                "pass --out (config.output_dir) or the checkpoint's path"
            )
        return Path(output_dir) / CHECKPOINT_NAME
    return Path(resume)


# --------------------------------------------------------------------------- contents


def checkpoint_payload(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    progress: Mapping[str, Any],
    result: Mapping[str, Any],
    config: TrainConfig,
    fingerprint: str,
    rng_per_rank: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything a resumed run needs, in types `torch.load(weights_only=True)` accepts."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": dict(progress),
        "result": dict(result),
        "config": config.to_dict(),
        "data_fingerprint": fingerprint,
        "rng": rng_per_rank[0],
        # Each process draws its own dropout masks, so each resumes its own RNG streams.
        "rng_per_rank": rng_per_rank,
    }


def data_fingerprint(examples: Sequence[Mapping[str, Sequence[int]]]) -> str:
    """Hash of the training examples, so a resume on different data is caught."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        digest.update(np.asarray(ex["labels"], dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def check_resumable(ckpt: Mapping[str, Any], config: TrainConfig, fingerprint: str, precision: str) -> None:
    """Refuse to 'continue' a run whose arithmetic would differ from the one saved."""
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"cannot resume: checkpoint format {ckpt.get('format')!r}, this version "
            f"of lumorik_sft reads format {CHECKPOINT_FORMAT}; start a new run"
        )
    saved_precision = ckpt["result"].get("precision", precision)
    if saved_precision != precision:
        raise CheckpointError(
            f"cannot resume: the run trained in {saved_precision} and would go on "
            f"in {precision}; pass precision={saved_precision!r}"
        )
    saved = ckpt["config"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changed = [k for k in RESUME_MUST_MATCH if saved.get(k, defaults[k]) != getattr(config, k)]
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k, defaults[k])!r} -> {getattr(config, k)!r}" for k in changed)
        raise CheckpointError(
            f"cannot resume with changed settings ({detail}); pass the saved "
            "TrainConfig(**checkpoint['config']) or start a new run"
        )
    if ckpt["data_fingerprint"] != fingerprint:
        raise CheckpointError(
            "cannot resume: the training examples differ from the checkpoint's; "
            "pass the same train_examples in the same order"
        )


# --------------------------------------------------------------------------- random states


def rng_state(device: torch.device) -> dict[str, Any]:
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


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Put every RNG back where `rng_state` found it."""
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def rank_rng_state(ckpt: Mapping[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This process's saved RNG states.

    The same number of processes resumes exactly; another number goes on from rank 0's streams.
    """
    per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    return per_rank[rank] if len(per_rank) == world_size else ckpt["rng"]
