"""The CUDA path: our loop padded and packed on a GPU, against the HF Trainer, in bf16.

    python benchmarks/bench_cuda.py --out benchmarks/bench_cuda.json   # needs a CUDA device

What it checks on the GPU (and exits 1 if one fails):
1. ``precision="auto"`` resolves to bf16 autocast on a GPU that supports it.
2. A padding-free packed micro-batch (one row, SDPA per example) gives the padded batch's
   summed completion NLL, in fp32 (relative 1e-5).
   Under bf16 autocast the packed batch runs PyTorch's variable-length flash attention
   (``torch.nn.attention.varlen``): relative 1e-2.
3. One epoch of the embedded model on the benchmark's mixed-length pairs, same seed,
   padded and packed: the training loss falls, and the two runs end within 2% of each other.

What it measures: completion tokens/s of our padded and packed loops and of the HF Trainer
with our collator (same data, hyperparameters and seed), peak GPU memory, and which LM-head
path the installed transformers allowed. The CPU benchmark (bench_sft.py) holds the
comparison with TRL; this one is the GPU counterpart, run where a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_sft import make_records  # noqa: E402


def _encode(tok, max_length: int = 256) -> tuple[list[dict], list[dict]]:
    from lumorik_sft import encoding

    train, val = make_records(False, 0)
    train_ex, _ = encoding.encode_records(train, tok, max_length=max_length)
    val_ex, _ = encoding.encode_records(val, tok, max_length=max_length)
    return train_ex, val_ex


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def check_packed_nll(model, tok, examples, device: str, bf16: bool = False) -> dict[str, float]:
    """Summed completion NLL of padded and packed batches (eval mode; fp32, or bf16 autocast,
    where the packed batch runs PyTorch's variable-length flash attention)."""
    import contextlib

    from lumorik_sft.encoding import SFTCollator
    from lumorik_sft.fused_loss import completion_nll
    from lumorik_sft.packing import PackedCollator

    pad = tok.pad_token_id
    padded = packed = 0.0
    model.eval()
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for i in range(0, min(64, len(examples)), 8):
            chunk = examples[i : i + 8]
            layouts = (("padded", SFTCollator(pad)), ("packed", PackedCollator(pad, mask="varlen")))
            for name, collate in layouts:
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                nll = float(completion_nll(model, batch)[0])
                if name == "padded":
                    padded += nll
                else:
                    packed += nll
    return {"padded": padded, "packed": packed, "relative_gap": abs(packed - padded) / padded}


def train_ours(model_dir: str, train_ex, packing: str, device: str) -> dict[str, Any]:
    from lumorik_sft import training
    from lumorik_sft.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir, device=device)
    config = training.TrainConfig(
        learning_rate=1e-3,
        batch_size=8,
        epochs=1,
        seed=0,
        device=device,
        precision="auto",
        packing=packing,
        log_every=0,
        progress=False,
    )
    _sync(device)
    t0 = time.perf_counter()
    result = training.train(model, tok, train_ex, None, config)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    losses = result.losses
    return {
        "seconds": seconds,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "mean_last_10": sum(losses[-10:]) / len(losses[-10:]),
        "precision": training.resolve_precision("auto", torch.device(device)),
        "peak_gpu_mb": _peak_mb(device),
    }


def train_hf(model_dir: str, train_ex, work: str, device: str) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    from lumorik_sft.encoding import SFTCollator
    from lumorik_sft.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir, device=device)
    args = TrainingArguments(
        use_cpu=device == "cpu",
        output_dir=work,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        num_train_epochs=1,
        seed=0,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=device == "cuda",
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ex, data_collator=SFTCollator(tok.pad_token_id)
    )
    _sync(device)
    t0 = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "peak_gpu_mb": _peak_mb(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "bench_cuda.json"))
    p.add_argument("--limit", type=int, default=None, help="train on the first N pairs (dry runs)")
    p.add_argument("--device", default="cuda", help="'cpu' only to dry-run this script")
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (the CPU benchmark is bench_sft.py)")
        return 0
    import tempfile

    import transformers

    from lumorik_sft import fused_loss
    from lumorik_sft.models import embedded_model_path, load_model_and_tokenizer

    model_dir = str(embedded_model_path())
    model, tok = load_model_and_tokenizer(model_dir, device=device)
    train_ex, _ = _encode(tok)
    train_ex = train_ex[: args.limit]
    completion_tokens = sum(sum(1 for lab in ex["labels"][1:] if lab != -100) for ex in train_ex)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "examples": len(train_ex),
        "completion_tokens": completion_tokens,
        "nll_check": check_packed_nll(model, tok, train_ex, device),
        "nll_check_bf16": check_packed_nll(model, tok, train_ex, device, bf16=True),
    }
    report["lm_head_keeps_rows"] = {k.__name__: v for k, v in fused_loss._HEAD_KEEPS_MASK.items()}
    report["fused_head_loss"] = {type(k).__name__: v for k, v in fused_loss._PLAIN_HEAD.items()}
    runs = {
        name: train_ours(model_dir, train_ex, packing, device)
        for name, packing in (("ours_padded", "none"), ("ours_packed", "bfd"), ("ours_length", "length"))
    }
    with tempfile.TemporaryDirectory() as work:
        runs["hf_trainer"] = train_hf(model_dir, train_ex, work, device)
    for r in runs.values():
        r["completion_tok_s"] = completion_tokens / r["seconds"]
    report["runs"] = runs
    pad, pack = runs["ours_padded"], runs["ours_packed"]
    failures = []
    if device == "cuda" and pad["precision"] != "bf16" and torch.cuda.is_bf16_supported():
        failures.append(f"precision auto resolved to {pad['precision']}, not bf16")
    if report["nll_check"]["relative_gap"] > 1e-5:
        failures.append(f"packed NLL differs from padded by {report['nll_check']['relative_gap']:.2e}")
    bf16_gap = report["nll_check_bf16"]["relative_gap"]
    if bf16_gap > 1e-2:
        failures.append(f"bf16 packed NLL differs from padded by {bf16_gap:.2e}")
    for name in ("ours_padded", "ours_packed"):
        if not runs[name]["last_loss"] < runs[name]["first_loss"]:
            failures.append(f"{name}: loss did not fall")
    gap = abs(pack["mean_last_10"] - pad["mean_last_10"]) / pad["mean_last_10"]
    report["packed_vs_padded_final_loss_gap"] = gap
    if gap > 0.02 or not math.isfinite(gap):
        failures.append(f"packed and padded runs end {gap:.1%} apart")
    report["failures"] = failures
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(
        f"{report['device']}: completion tok/s padded {pad['completion_tok_s']:,.0f}, packed "
        f"{pack['completion_tok_s']:,.0f} ({pack['completion_tok_s'] / pad['completion_tok_s']:.2f}x), "
        f"HF Trainer {runs['hf_trainer']['completion_tok_s']:,.0f}; "
        f"{'all checks passed' if not failures else 'FAILED: ' + '; '.join(failures)}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
