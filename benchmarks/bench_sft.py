"""Side-by-side SFT benchmark: the chapter's loop, ours (padded, packed, length-grouped), TRL, HF Trainer.

    python benchmarks/bench_sft.py            # full run, ~10 minutes on 2 CPU cores
    python benchmarks/bench_sft.py --quick    # seconds: tiny model, few pairs (smoke test)

Every contestant trains the same model (the embedded base model, else a 4-layer width-256
GPT-2 with a 4,096-token vocabulary built from config) on the same mixed-length pairs
(product descriptions and the longer case summaries), encoded once by our contract (TRL and
the HF Trainer get the same token ids and completion masks), for one epoch with the same
learning rate, batch size, schedule (linear decay, no warmup), clipping and seed. Each runs
in its own subprocess, so peak RSS is its own. Evaluation, every tenth of the run and at the
end, is one function for all (`lumorik_sft.metrics.evaluate_loss`, fp32, same padded val
batches); its time is paused out of the training clock.

Throughput numerators are the same for every contestant: the completion (supervised) tokens
and the real (non-padding) tokens of the training set. Useful FLOPs, per example of n tokens:
``6 * N_matmul * n + 6 * n_layer * d_model * n**2`` (N_matmul = weights of every linear layer,
the LM head included; the second term is causal attention, QK^T and AV, forward + backward),
against the matmul peak this script measures with 2 threads in fp32 and bf16.

Writes RESULTS.md, bench_sft.json and bench_sft.png to --out (default: benchmarks/runs/<kind of
machine>-<precision>/, so a CPU with native bf16 and one without each keep their figures) and
rewrites benchmarks/RESULTS.md, the index of those runs; the last line printed gives the two
headline ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
CONTESTANTS = {
    "naive": "chapter's loop (max-length padding, labels = input_ids)",
    "ours_padded": "ours, dynamic padding",
    "ours_packed": "ours, packed (padding-free rows, attention per example)",
    "ours_length": "ours, length-grouped batches",
    "ours_padded_compiled": "ours, dynamic padding, compiled (torch.compile, compile time included)",
    "ours_packed_compiled": "ours, packed, compiled (torch.compile, compile time included)",
    "trl_default": "TRL SFTTrainer, defaults",
    "trl_packing": "TRL SFTTrainer, packing=True (bfd, padding-free)",
    "hf_trainer": "HF Trainer + our collator",
}
CORRECT = [c for c in CONTESTANTS if c != "naive"]
RERUN = ("ours_packed", "ours_padded", "trl_default")  # re-run at the extra seeds (--val-seeds)


# --------------------------------------------------------------------------- machine


def matmul_peak(dtype: torch.dtype, threads: int, seconds: float = 1.0) -> float:
    """Best FLOP/s of square matmuls (512..2048) with `threads` threads.

    Sizes grow only while one product takes under a tenth of the budget: on a CPU without
    native bf16 kernels oneDNN emulates bf16 at ~2 GFLOP/s, where one 2048² product alone
    takes ~10 s.
    """
    torch.set_num_threads(threads)
    best = 0.0
    for n in (512, 1024, 1536, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = time.perf_counter()
        torch.mm(a, b)  # warm up
        first = time.perf_counter() - t
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
        if first > seconds / 10:
            break
    return best


def machine() -> dict[str, Any]:
    from lumorik_sft.models import cpu_supports_bf16

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import accelerate
    import transformers
    import trl

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "cuda": torch.cuda.is_available(),
        "bf16_native": cpu_supports_bf16(),
        "isa": torch.backends.cpu.get_cpu_capability(),
    }


def run_tag(m: dict[str, Any], threads: int, precision: str) -> str:
    """The folder of a run's figures: one per kind of machine and precision."""
    device = "cuda" if m["cuda"] else "cpu"
    return f"{device}-{m['isa'].lower()}-{threads}threads-{precision}"


# --------------------------------------------------------------------------- data and model


def make_records(quick: bool, seed: int) -> tuple[list[dict], list[dict]]:
    from bench_cases import case_summaries  # frozen: the committed runs were measured on these

    from lumorik_sft.course.synthetic import product_descriptions

    n_prod, n_case = (48, 16) if quick else (700, 300)
    records = product_descriptions(n_prod, seed=seed) + case_summaries(n_case, seed=seed)
    random.Random(seed).shuffle(records)
    n_val = max(8, len(records) // 10)
    return records[n_val:], records[:n_val]


def prepare_model(work: Path, quick: bool, model: str | None, texts: list[str], seed: int) -> tuple[str, str]:
    """A model folder every worker loads: the embedded model, --model, or one built from config."""
    from lumorik_sft.models import build_model, embedded_model_path, has_embedded_model, train_bpe_tokenizer

    if model:
        return model, model
    if has_embedded_model() and not quick:
        return str(embedded_model_path()), "embedded base model"
    size = {"n_layer": 2, "width": 64, "n_head": 2} if quick else {"n_layer": 4, "width": 256, "n_head": 4}
    tokenizer = train_bpe_tokenizer(texts, vocab_size=512 if quick else 4096)
    m = build_model("gpt2", tokenizer, seed=seed, context=256, **size)
    out = work / "model"
    m.save_pretrained(out)
    tokenizer.save_pretrained(out)
    what = (
        f"GPT-2 built from config ({size['n_layer']} layers, width {size['width']}, vocab {len(tokenizer)})"
    )
    return str(out), what + (", random init" if quick else ", random init (no embedded model)")


# --------------------------------------------------------------------------- worker side


class Probe:
    """Training clock with evaluation paused out, and the validation curve."""

    def __init__(self, model, val_batches, every: int):
        self.model, self.val_batches, self.every = model, val_batches, every
        self.t0 = 0.0
        self.paused = 0.0
        self.curve: list[tuple[int, float, float]] = []

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.paused = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.t0 - self.paused

    def step(self, step: int, force: bool = False) -> None:
        if not force and (self.every <= 0 or step % self.every):
            return
        if self.curve and self.curve[-1][0] == step:
            return
        t = time.perf_counter()
        elapsed = t - self.t0 - self.paused
        from lumorik_sft import fused_loss
        from lumorik_sft.metrics import evaluate_loss
        from lumorik_sft.models import fused_activations

        with fused_activations(self.model):  # the same code for every contestant
            loss = evaluate_loss(self.model, self.val_batches, loss_fn=fused_loss.completion_nll).loss
        self.curve.append((step, elapsed, loss))
        self.paused += time.perf_counter() - t


def _autocast(precision: str):
    import contextlib

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _hf_args(spec: dict, out: str, **extra):
    common = dict(
        output_dir=out,
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"],
        num_train_epochs=1,
        seed=spec["seed"],
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
        bf16=spec["precision"] == "bf16",
        use_cpu=not torch.cuda.is_available(),
    )
    return {**common, **extra}


def _trainer_callback(probe: Probe, marks: dict):
    from transformers import TrainerCallback

    class Cb(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            probe.start()

        def on_step_end(self, args, state, control, **kw):
            probe.step(state.global_step)
            marks["steps"] = state.global_step

        def on_train_end(self, args, state, control, **kw):
            marks["seconds"] = probe.seconds()

    return Cb()


def run_contestant(name: str, spec: dict) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    from torch.utils.data import DataLoader

    from lumorik_sft import encoding, training
    from lumorik_sft.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(spec["model_dir"], device="cpu")
    train_ex, _ = encoding.encode_records(spec["train"], tok, max_length=spec["max_length"])
    val_ex, _ = encoding.encode_records(spec["val"], tok, max_length=spec["max_length"])
    collate = encoding.SFTCollator(tok.pad_token_id)
    val_batches = [collate(val_ex[i : i + 16]) for i in range(0, len(val_ex), 16)]
    steps = math.ceil(len(train_ex) / spec["batch_size"])
    probe = Probe(model, val_batches, max(1, steps // 10))
    marks: dict[str, Any] = {}
    torch.manual_seed(spec["seed"])

    if name == "naive":
        rows = [
            encoding.naive_encode(tok, r["prompt"], r["completion"], max_length=spec["max_length"])
            for r in spec["train"]
        ]
        data = [{k: torch.tensor(v) for k, v in r.items()} for r in rows]
        loader = DataLoader(
            data,
            batch_size=spec["batch_size"],
            shuffle=True,
            generator=torch.Generator().manual_seed(spec["seed"]),
        )

        class Probed:
            def __iter__(self):
                for i, batch in enumerate(loader):
                    if i:
                        probe.step(i)  # i batches done
                    yield batch

        probe.start()
        with _autocast(spec["precision"]):
            losses = training.chapter_loop(model, Probed(), epochs=1, lr=spec["lr"], device="cpu")
        marks["seconds"], marks["steps"] = probe.seconds(), len(losses)
    elif name.startswith("ours"):
        packing = {"padded": "none", "packed": "bfd", "length": "length"}[name.split("_")[1]]
        config = training.TrainConfig(
            learning_rate=spec["lr"],
            batch_size=spec["batch_size"],
            epochs=1,
            seed=spec["seed"],
            device="cpu",
            precision=spec["precision"],
            packing=packing,
            log_every=0,
            progress=False,
            pad_to_multiple_of=spec["pad_multiple"] or None,
            # 'on' for the compiled contestants from their first step; never 'auto' here, so
            # that each contestant is one known code path
            compile="on" if name.endswith("_compiled") else "off",
        )

        def cb(event):
            if event["event"] == "step":
                probe.step(event["step"])
                marks["steps"] = event["step"]

        probe.start()
        result = training.train(model, tok, train_ex, None, config, callback=cb)
        marks["seconds"] = probe.seconds()
        if result.compile.get("compiled"):  # within "seconds": the first compiled step's extra time
            marks["compile_seconds"] = result.compile["seconds"]
    elif name.startswith("trl"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        ignore = encoding.IGNORE_INDEX
        ds = Dataset.from_list(
            [
                {
                    "input_ids": ex["input_ids"],
                    "completion_mask": [int(lab != ignore) for lab in ex["labels"]],
                }
                for ex in train_ex
            ]
        )
        # Our token ids and completion masks; completion_only_loss=True is what TRL's default
        # (None) means for prompt-completion data, which is what these pairs are.
        extra = {"max_length": spec["max_length"], "completion_only_loss": True}
        if name == "trl_packing":
            extra["packing"] = True
        args = SFTConfig(**_hf_args(spec, spec["work"] + "/" + name, **extra))
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[_trainer_callback(probe, marks)],
        )
        marks["trl_gradient_checkpointing"] = args.gradient_checkpointing
        trainer.train()
    elif name == "hf_trainer":
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(**_hf_args(spec, spec["work"] + "/" + name, remove_unused_columns=False))
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_ex,
            data_collator=collate,
            callbacks=[_trainer_callback(probe, marks)],
        )
        trainer.train()
    else:
        raise ValueError(f"unknown contestant {name!r}; choose from {', '.join(CONTESTANTS)}")

    model.eval()
    probe.step(marks.get("steps", steps), force=True)
    final = probe.curve[-1][2]
    return {
        "name": name,
        "seconds": marks["seconds"],
        "steps": marks.get("steps"),
        "final_val_loss": final,
        "curve": probe.curve,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": spec["precision"],
        "threads": torch.get_num_threads(),
        **{k: v for k, v in marks.items() if k not in ("seconds", "steps")},
    }


# --------------------------------------------------------------------------- parent side


def executed_work(
    lengths: list[int],
    completion_tokens: int,
    batches: list[list[int]],
    *,
    linear: int,
    head: int,
    n_layer: int,
    d: int,
    multiple: int = 0,
    checkpointing: bool = True,
    last_mlp: int = 0,
) -> dict[str, float]:
    """Nominal FLOPs of one epoch as each loop actually runs it, for compute-bound ceilings.

    6·linear per token and 6·n_layer·d per query-key pair (forward + backward), over the tokens
    and pairs `packing.layout_cost` counts for each layout. Packed: every example at its own
    length, the head only on the positions that predict a completion token. Padded: every row
    of a batch at its longest example, head as packed. TRL default: padded, the head on every
    position, and gradient checkpointing recomputes the blocks' forward (2 of the body's 6
    FLOPs again). Our loops round each row up to a `multiple` of tokens (pad_to_multiple_of);
    those positions run through the linear layers too. ``last_mlp``: weights of the last
    block's MLP, which our loops run only where the head runs (`fused_loss._last_mlp_on_kept_rows`;
    0 for runs recorded before they did). The ratios are the speed-ups at equal FLOP/s; the rest
    of a measured ratio is speed per FLOP.
    """
    from lumorik_sft.encoding import round_up
    from lumorik_sft.packing import LayoutCost, layout_cost

    def flops(cost: LayoutCost, tokens: int) -> int:
        return 6 * linear * tokens + 6 * n_layer * d * cost.attention_pairs

    widths = [max(lengths[i] for i in b) for b in batches]
    packed_cost = layout_cost(lengths, batches, "bfd", varlen=True)
    padded_cost = layout_cost(lengths, batches, "none")
    packed_rows = sum(round_up(sum(lengths[i] for i in b), multiple or 1) for b in batches)
    padded_rows = sum(len(b) * round_up(w, multiple or 1) for b, w in zip(batches, widths, strict=True))
    ours_skip = 6 * (head + last_mlp)  # per position that predicts no completion token
    packed = flops(packed_cost, packed_rows) - ours_skip * (packed_rows - completion_tokens)
    padded = flops(padded_cost, padded_rows) - ours_skip * (padded_rows - completion_tokens)
    padded_all = flops(padded_cost, padded_cost.computed_tokens)  # TRL: no rounding
    body = padded_all - 6 * head * padded_cost.computed_tokens
    trl = padded_all + (body / 3 if checkpointing else 0)
    return {
        "ours_packed": packed,
        "ours_padded": padded,
        "trl_default": trl,
        "padded_tokens": padded_cost.computed_tokens,
    }


def useful_work(spec: dict) -> dict[str, Any]:
    """Token counts and the useful-FLOP count of one epoch over the training set."""
    from lumorik_sft import encoding
    from lumorik_sft.models import count_parameters, load_model_and_tokenizer
    from lumorik_sft.packing import plan_micro_batches
    from lumorik_sft.schedule import epoch_order

    model, tok = load_model_and_tokenizer(spec["model_dir"], device="cpu")
    train_ex, report = encoding.encode_records(spec["train"], tok, max_length=spec["max_length"])
    linear = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is not None and w.ndim == 2 and not isinstance(m, torch.nn.Embedding):
            linear += w.numel()  # nn.Linear and GPT-2's Conv1D; the LM head counts (tied or not)
    cfg = model.config
    n_layer = getattr(cfg, "n_layer", None) or cfg.num_hidden_layers
    d = getattr(cfg, "n_embd", None) or cfg.hidden_size
    lengths = [len(ex["input_ids"]) for ex in train_ex]
    flops = sum(6 * linear * n + 6 * n_layer * d * n * n for n in lengths)
    # Our loops run the LM head only where a completion token is predicted (fused_loss.
    # linear_cross_entropy): the hardware does less than the nominal count above.
    head = model.get_output_embeddings().weight.numel()
    head_skipped = 6 * head * (sum(lengths) - report.completion_tokens)
    # Our padded loop's batches (epoch 1; TRL's sampler makes its own, of the same size).
    batches = plan_micro_batches(epoch_order(len(lengths), spec["seed"], 1), lengths, spec["batch_size"])
    last_mlp = 0
    if spec.get("last_mlp_kept_rows", True):
        from lumorik_sft.fused_loss import _last_block

        last_mlp = sum(p.numel() for p in _last_block(model).mlp.parameters() if p.ndim == 2)
    executed = executed_work(
        lengths,
        report.completion_tokens,
        batches,
        linear=linear,
        head=head,
        n_layer=n_layer,
        d=d,
        multiple=spec["pad_multiple"],
        last_mlp=last_mlp,
    )
    return {
        "executed": executed,
        "last_mlp_params_skipped": last_mlp,
        "examples": len(train_ex),
        "completion_tokens": report.completion_tokens,
        "head_flops_skipped_by_ours": head_skipped,
        "real_tokens": sum(lengths),
        "useful_flops": flops,
        "matmul_params": linear,
        "parameters": count_parameters(model),
        "n_layer": n_layer,
        "d_model": d,
        "vocab": cfg.vocab_size,
        "mean_length": sum(lengths) / len(lengths),
        "max_len": max(lengths),
    }


def _run_worker(name: str, spec_path: Path, out: Path) -> dict[str, Any]:
    """One contestant in a fresh process: its peak RSS is its own."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--spec", str(spec_path), "--result", str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(f"{name}: FAILED\n{proc.stderr[-3000:]}", flush=True)
        return {"name": name, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(out.read_text())


def run_all(names: list[str], spec: dict) -> list[dict]:
    results = []
    spec_path = Path(spec["work"]) / "spec.json"
    spec_path.write_text(json.dumps(spec))
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    for name in names:
        out = Path(spec["work"]) / f"{name}.json"
        # This machine's speed drifts (its bf16 peak measured 830-1,040 GFLOP/s within one
        # session): measure it again right before each contestant, which then runs alone.
        peak_now = matmul_peak(dtype, spec["threads"], spec["peak_seconds"])
        t0 = time.perf_counter()
        if spec.get("in_process"):  # --quick: no process per contestant (RSS is then the run's)
            r = run_contestant(name, spec)
        else:
            r = _run_worker(name, spec_path, out)
            if "error" in r:
                results.append(r)
                continue
        r["wall_seconds"] = time.perf_counter() - t0
        r["peak_now"] = peak_now
        results.append(r)
        print(
            f"{name:12s} {r['seconds']:8.1f} s train  val {r['final_val_loss']:.4f}  "
            f"rss {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    return results


def summarise(results: list[dict], work: dict, peaks: dict, precision: str) -> dict[str, Any]:
    ok = {r["name"]: r for r in results if "error" not in r}
    ref = ok.get("trl_default")
    target_from = [ok[c]["final_val_loss"] for c in CORRECT if c in ok]
    target = 1.02 * ref["final_val_loss"] if ref else (max(target_from) if target_from else math.nan)
    peak = peaks[precision]
    for r in ok.values():
        s = r["seconds"]
        r["completion_tok_s"] = work["completion_tokens"] / s
        r["all_tok_s"] = work["real_tokens"] / s
        r["useful_flop_s"] = work["useful_flops"] / s
        r["peak_fraction"] = r["useful_flop_s"] / peak
        r["peak_fraction_now"] = r["useful_flop_s"] / r["peak_now"]
        reached = [t for _, t, loss in r["curve"] if loss <= target]
        r["time_to_target"] = reached[0] if reached else None
    executed = dict(work["executed"])
    for name in ("ours_packed", "ours_padded"):  # compiling changes the speed, not the work
        if name in executed:
            executed[f"{name}_compiled"] = executed[name]
    for name in executed.keys() & ok.keys():  # FLOP/s the hardware ran, padding and recomputation included
        ok[name]["executed_flop_s"] = executed[name] / ok[name]["seconds"]
        ok[name]["executed_fraction"] = ok[name]["executed_flop_s"] / ok[name]["peak_now"]

    def ratio(a: str, b: str) -> float | None:
        return ok[a]["completion_tok_s"] / ok[b]["completion_tok_s"] if a in ok and b in ok else None

    return {
        "target_val_loss": target,
        "ceilings": {
            "packed_vs_padded": executed["ours_padded"] / executed["ours_packed"],
            "packed_vs_trl_default": executed["trl_default"] / executed["ours_packed"],
        },
        "ratios": {
            "packed_vs_trl_default": ratio("ours_packed", "trl_default"),
            "packed_vs_padded": ratio("ours_packed", "ours_padded"),
            "length_vs_trl_default": ratio("ours_length", "trl_default"),
            "length_vs_padded": ratio("ours_length", "ours_padded"),
            "packed_compiled_vs_trl_default": ratio("ours_packed_compiled", "trl_default"),
            "packed_compiled_vs_hf_trainer": ratio("ours_packed_compiled", "hf_trainer"),
            "packed_compiled_vs_packed": ratio("ours_packed_compiled", "ours_packed"),
            "padded_compiled_vs_padded": ratio("ours_padded_compiled", "ours_padded"),
            "packed_vs_hf_trainer": ratio("ours_packed", "hf_trainer"),
            "rss_packed_vs_trl_default": (
                ok["ours_packed"]["peak_rss_mb"] / ok["trl_default"]["peak_rss_mb"]
                if "ours_packed" in ok and ref
                else None
            ),
            "val_packed_vs_trl_default": (
                ok["ours_packed"]["final_val_loss"] / ref["final_val_loss"] - 1
                if "ours_packed" in ok and ref
                else None
            ),
        },
    }


def val_over_seeds(results: list[dict], reruns: list[dict], seed: int) -> dict[str, Any] | None:
    """Final validation loss and training time of the rerun contestants over all seeds.

    One seed's final loss moves by several % with the data order alone, and one run's time
    with the machine's drift: the means over seeds are the steadier comparison. Every seed
    trains on the same tokens, so a ratio of summed times is a ratio of mean throughputs.
    """
    rows = [dict(r, seed=seed) for r in results] + list(reruns)
    losses: dict[str, dict[int, float]] = {}
    seconds: dict[str, dict[int, float]] = {}
    for r in rows:
        if "error" not in r and r["name"] in RERUN:
            losses.setdefault(r["name"], {})[r["seed"]] = r["final_val_loss"]
            seconds.setdefault(r["name"], {})[r["seed"]] = r["seconds"]
    common = sorted(set(losses.get("ours_packed", {})) & set(losses.get("trl_default", {})))
    if len(common) < 2:
        return None
    names = [n for n in RERUN if n in losses and set(common) <= set(losses[n])]
    mean = {n: sum(losses[n][s] for s in common) / len(common) for n in names}
    total = {n: sum(seconds[n][s] for s in common) for n in names}

    def speed(a: str, b: str) -> float | None:
        return total[b] / total[a] if a in total and b in total else None

    return {
        "seeds": common,
        "losses": {n: [losses[n][s] for s in common] for n in names},
        "seconds": {n: [seconds[n][s] for s in common] for n in names},
        "mean": mean,
        "packed_vs_trl_default": mean["ours_packed"] / mean["trl_default"] - 1,
        "speed": {
            "packed_vs_trl_default": speed("ours_packed", "trl_default"),
            "packed_vs_padded": speed("ours_packed", "ours_padded"),
        },
    }


# Issue 21: useful FLOP/s at least 60% of the bf16 matmul peak (AVX512-BF16), 80% of the fp32 peak (AVX2)
_PEAK_TARGET = {"bf16": 60, "fp32": 80}


def _f(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _compile_note(r: dict) -> str:
    """' (12.3)': the compile time inside a compiled contestant's training seconds."""
    return f" ({r['compile_seconds']:.1f})" if r.get("compile_seconds") is not None else ""


def _dot(speed: dict[str, float | None], key: str) -> str:
    """' · 1.23x': a ratio over all seeds after the main seed's, where there is one."""
    return f" · {_x(speed[key])}" if speed.get(key) is not None else ""


def write_report(out: Path, payload: dict) -> str:
    m, w, s = payload["machine"], payload["work"], payload["summary"]
    pad_note = f" (rounded up to a multiple of {payload['pad_multiple']})" if payload["pad_multiple"] else ""
    bf16_note = "" if m.get("bf16_native", True) else " (emulated: this CPU has no native bf16 kernels)"
    lines = [
        "# SFT benchmark: our loop vs the chapter's, TRL and the HF Trainer",
        "",
        f"Generated by `python benchmarks/bench_sft.py{' --quick' if payload['quick'] else ''}` "
        f"on {payload['date']}"
        + (
            f"; derived figures recomputed on {payload['resummarised']} with `--resummarise`."
            if payload.get("resummarised")
            else "."
        ),
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {payload['threads']} torch threads; CUDA: {m['cuda']}.",
        f"- Versions: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"trl {m['trl']}, accelerate {m['accelerate']}.",
        f"- Measured matmul peak ({payload['threads']} threads): fp32 {payload['peaks']['fp32'] / 1e9:.0f} "
        f"GFLOP/s, bf16 {payload['peaks']['bf16'] / 1e9:.0f} GFLOP/s{bf16_note} at the start of the run, "
        'and again just before each contestant ("peak before its run"; this machine\'s speed drifts). '
        f"Precision used by every contestant: **{payload['precision']}**.",
        f"- Model: {payload['model']}; {w['parameters']:,} parameters ({w['matmul_params']:,} in matmuls), "
        f"{w['n_layer']} layers, width {w['d_model']}, vocab {w['vocab']:,}.",
        f"- Data: {w['examples']} training pairs (product descriptions + case summaries, mean "
        f"{w['mean_length']:.0f} tokens, max {w['max_len']}), {payload['n_val']} validation pairs; "
        f"{w['completion_tokens']:,} completion tokens, {w['real_tokens']:,} real tokens per epoch.",
        f"- One epoch, batch {payload['batch_size']}, lr {payload['lr']:g} (linear decay, no warmup), "
        f"clip 1.0, seed {payload['seed']}, max length {payload['max_length']}; our loops round "
        f"batch widths to a multiple of {payload['pad_multiple'] or 1} (`TrainConfig.pad_to_multiple_of`).",
        "- Throughput numerators are the same for everyone (the training set's completion / real tokens);"
        " the clock excludes model loading, tokenization and the periodic evaluation.",
        "- Useful FLOPs per example of n tokens: 6·N_matmul·n + 6·n_layer·d·n² (causal attention, "
        "forward + backward); padding and recomputation are not counted as useful. This is model-FLOP "
        "utilization: the same nominal count for every contestant, whatever it computes. Our loops "
        "run the LM head only on positions that predict a completion token, so they execute "
        f"{1 - w['head_flops_skipped_by_ours'] / w['useful_flops']:.0%} of it (the hardware share is "
        "that fraction of the % shown).",
        f"- Time to target: training seconds until the validation loss is <= {s['target_val_loss']:.4f} "
        "(1.02 x TRL default's final loss), evaluated every tenth of the run.",
        "- Validation loss: `lumorik_sft.metrics.evaluate_loss` with `fused_loss.completion_nll`, fp32, "
        "same padded batches and same code for all (fused head + loss and fused GELU included).",
        "",
        "| contestant | steps | train s (compile s) | completion tok/s | all tok/s | useful GFLOP/s "
        "| % of peak | peak before its run, GFLOP/s | % of it | peak RSS MB | time to target s "
        "| final val loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        label = CONTESTANTS[r["name"]]
        if "error" in r:
            lines.append(f"| {label} | failed: {' '.join(r['error'])} |||||||||||")
            continue
        lines.append(
            f"| {label} | {r['steps']} | {r['seconds']:.1f}{_compile_note(r)} | "
            f"{r['completion_tok_s']:,.0f} | "
            f"{r['all_tok_s']:,.0f} | {r['useful_flop_s'] / 1e9:.1f} | {100 * r['peak_fraction']:.1f}% | "
            f"{r['peak_now'] / 1e9:.0f} | {100 * r['peak_fraction_now']:.1f}% | "
            f"{r['peak_rss_mb']:.0f} | {_f(r['time_to_target'], '.1f')} | {r['final_val_loss']:.4f} |"
        )
    rt = s["ratios"]
    vs = s.get("val_over_seeds")
    sp = vs.get("speed", {}) if vs else {}

    def over_seeds(key: str) -> str:
        if sp.get(key) is None:
            return ""
        return f"; over training seeds {', '.join(map(str, vs['seeds']))} (summed times): {_x(sp[key])}"

    lines += [
        "",
        "## Against the issue's targets",
        "",
        f"- Packed vs TRL default, completion tokens/s: {_x(rt['packed_vs_trl_default'])} at seed "
        f"{payload['seed']}{over_seeds('packed_vs_trl_default')} (target >= 3x).",
        f"- Packed vs our padded loop: {_x(rt['packed_vs_padded'])} at seed {payload['seed']}"
        f"{over_seeds('packed_vs_padded')} (target >= 1.3x).",
        f"- Length-grouped vs TRL default: {_x(rt['length_vs_trl_default'])}; vs padded: "
        f"{_x(rt['length_vs_padded'])}.",
        f"- Final val loss, packed vs TRL default: {_f(rt['val_packed_vs_trl_default'], '+.2%')} "
        f"at seed {payload['seed']}"
        + (
            f"; mean over training seeds {', '.join(map(str, vs['seeds']))}: "
            f"{vs['packed_vs_trl_default']:+.2%} (ours "
            f"{', '.join(f'{x:.4f}' for x in vs['losses']['ours_packed'])}; TRL "
            f"{', '.join(f'{x:.4f}' for x in vs['losses']['trl_default'])})"
            if vs
            else ""
        )
        + " (target within 2%).",
        f"- Peak RSS, packed / TRL default: {_f(rt['rss_packed_vs_trl_default'], '.2f')} (target <= 0.6).",
        f"- Packed and compiled vs TRL default: {_x(rt.get('packed_compiled_vs_trl_default'))} "
        f"(target >= 3.5x); vs the HF Trainer: {_x(rt.get('packed_compiled_vs_hf_trainer'))} (target >= 2x; "
        f"packed eager: {_x(rt.get('packed_vs_hf_trainer'))}). Compiled vs eager: packed "
        f"{_x(rt.get('packed_compiled_vs_packed'))}, padded {_x(rt.get('padded_compiled_vs_padded'))}, "
        'compile time included (the column "train s" holds it in brackets).',
    ]
    ce = s["ceilings"]
    ran = {r["name"]: r for r in payload["results"] if "executed_flop_s" in r}
    lines += [
        f"- Arithmetic behind the two speed ratios: padding makes the padded loop execute "
        f"{ce['packed_vs_padded']:.2f}x the FLOPs of the packed one, and TRL's default "
        f"{ce['packed_vs_trl_default']:.2f}x (padding, the LM head on every position, gradient "
        "checkpointing's second forward; `executed_work`). These are the ratios at equal FLOP/s; "
        "the rest is speed per FLOP. FLOP/s executed, against the peak measured before each run: "
        + "; ".join(
            f"{CONTESTANTS[n].split(' (')[0]} {r['executed_flop_s'] / 1e9:.1f} GFLOP/s "
            f"({100 * r['executed_fraction']:.0f}%)"
            for n, r in ran.items()
        )
        + "."
    ]
    best = max(
        (r for r in payload["results"] if "error" not in r), key=lambda r: r["peak_fraction"], default=None
    )
    if best is not None:
        lines.append(
            f"- Best useful-FLOP share of the {payload['precision']} matmul peak: "
            f"{100 * best['peak_fraction']:.1f}% of the run-start peak, "
            f"{100 * best['peak_fraction_now']:.1f}% of the peak measured just before its "
            f"run ({CONTESTANTS[best['name']]}; target >= {_PEAK_TARGET.get(payload['precision'], 60)}%)."
        )
    lines += [
        "",
        "## Notes",
        "",
        "- TRL runs with its own defaults (gradient checkpointing on, its collator, "
        "its sampler) except for what every contestant shares: learning rate, batch size, one epoch, "
        "seed, max length 256, no warmup, no logging or saving, and the precision (bf16 "
        "autocast or fp32). It receives our token ids and "
        "completion masks with `completion_only_loss=True`, which is what its default does for "
        "prompt-completion data, so all contestants learn the same tokens.",
        "- `trl_packing` is TRL's `packing=True`: best-fit decreasing into rows of max length, then "
        "padding-free (all rows of a batch in one sequence with restarted position ids).",
        "- The HF Trainer gets our encoded examples and `SFTCollator` (completion-only labels).",
        "- `ours_packed` keeps the padded loop's micro-batches and lays each out as one padding-free "
        f"row{pad_note}, attention per example with `SegmentAttention` "
        "(same loss as `ours_padded`); `ours_length` groups examples of similar length "
        "(`TrainConfig(packing='length')`).",
        "- All our loops run the LM head on supervised positions only, fused with the loss "
        "(`fused_loss.linear_cross_entropy`: 256 rows at a time, the [rows, vocab] logits never held "
        "whole)"
        + (
            ", and the last block's MLP on those positions only (`fused_loss._last_mlp_on_kept_rows`)"
            if payload.get("last_mlp_kept_rows")
            else ""
        )
        + ", use PyTorch's fused AdamW and swap GPT-2's Python GELU for the fused tanh GELU "
        "while training (`TrainConfig.fused_activations`); the padded loop keeps the model's SDPA "
        "attention.",
        "- Peak RSS is each subprocess's own `ru_maxrss`; most of it is the imported libraries.",
        (
            "- This machine has no GPU: every figure here is CPU-only. The CUDA path is checked and timed "
            "by `benchmarks/bench_cuda.py` (last run, on an H100: `benchmarks/bench_cuda.json`)."
        )
        if not m["cuda"]
        else "- A GPU was present but every contestant ran on the CPU (device='cpu').",
        "",
        "![throughput and validation curves](bench_sft.png)",
        "",
    ]
    text = "\n".join(lines)
    (out / "RESULTS.md").write_text(text)
    return text


def write_index(root: Path) -> str:
    """`root`/RESULTS.md: the headline figures of every full run under `root`/runs, one line each."""
    lines = [
        "# SFT benchmark runs",
        "",
        "`python benchmarks/bench_sft.py` keeps one folder per kind of machine and precision under "
        "`runs/`, with the full report (`RESULTS.md`: machine, versions, every contestant), "
        "`bench_sft.json` and a plot, and rewrites this index from them. Targets (issue #7): "
        "packed >= 3x TRL default and >= 1.3x our padded loop in completion tokens/s, final "
        "validation loss within 2% of TRL's, >= 40% of the matmul peak in useful FLOP/s, peak RSS "
        "<= 0.6x TRL's. \"Ceiling\" is the ratio of FLOPs the two loops execute (padding, TRL's "
        "full LM head and recomputation): the speed-up at equal FLOP/s.",
        "",
        "Speed ratios are given at the main seed and, after the dot, over all training seeds "
        "(summed times, steadier on a machine whose speed drifts).",
        "",
        "| run | date | machine | precision, matmul peak | packed / TRL (ceiling) | packed / padded "
        "(ceiling) | useful FLOP/s, % of peak | RSS packed / TRL | val loss vs TRL, mean of seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted((root / "runs").glob("*/bench_sft.json")):
        run = json.loads(path.read_text())
        if run.get("quick"):
            continue
        m, s, tag = run["machine"], run["summary"], path.parent.name
        rt, ce = s["ratios"], s.get("ceilings", {})
        packed = next((r for r in run["results"] if r["name"] == "ours_packed" and "error" not in r), None)
        vs = s.get("val_over_seeds")
        speed = (vs or {}).get("speed", {})
        lines.append(
            f"| [{tag}](runs/{tag}/RESULTS.md) | {run['date']} | {m['cpu']}, {m['cores']} cores; torch "
            f"{m['torch']}, transformers {m['transformers']}, trl {m['trl']} | {run['precision']}, "
            f"{run['peaks'][run['precision']] / 1e9:.0f} GFLOP/s | "
            f"{_x(rt['packed_vs_trl_default'])}{_dot(speed, 'packed_vs_trl_default')} "
            f"({_x(ce.get('packed_vs_trl_default'))}) | "
            f"{_x(rt['packed_vs_padded'])}{_dot(speed, 'packed_vs_padded')} "
            f"({_x(ce.get('packed_vs_padded'))}) | "
            f"{_f(packed and packed['peak_fraction'], '.1%')} | "
            f"{_f(rt['rss_packed_vs_trl_default'], '.2f')} | "
            f"{_f(vs['packed_vs_trl_default'] if vs else rt['val_packed_vs_trl_default'], '+.2%')} |"
        )
    text = "\n".join(lines) + "\n"
    (root / "RESULTS.md").write_text(text)
    return text


def plot(out: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in payload["results"] if "error" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in ok]
    ax1.barh(names, [r["completion_tok_s"] for r in ok], color="tab:green")
    ax1.invert_yaxis()
    ax1.set_xlabel("completion tokens / s (one epoch)")
    ax1.set_title(f"Throughput, {payload['threads']} CPU threads, {payload['precision']}")
    for r in ok:
        curve = r["curve"]
        ax2.plot([c[1] for c in curve], [c[2] for c in curve], marker=".", label=r["name"])
    ax2.axhline(payload["summary"]["target_val_loss"], color="grey", ls="--", lw=1, label="target")
    ax2.set_xlabel("training seconds")
    ax2.set_ylabel("validation completion loss")
    ax2.set_title("Validation loss against training time")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_sft.png", dpi=110)
    plt.close(fig)


def resummarise(run_dir: Path) -> dict:
    """Recompute a recorded run's derived figures (work, ceilings, ratios) with today's code.

    The timings stay as measured; only what follows from the data, the batches and the model is
    computed again, and only if the recomputed token and FLOP counts equal the recorded ones (the
    same data and model), so figures added after a run was made can be filled in for it.
    """
    payload = json.loads((run_dir / "bench_sft.json").read_text())
    if payload["model"] != "embedded base model":
        raise SystemExit(f"{run_dir}: only runs of the embedded model can be re-summarised")
    train, _ = make_records(payload["quick"], payload["seed"])
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        model_dir, _ = prepare_model(Path(tmp), payload["quick"], None, [], payload["seed"])
        spec = {
            "model_dir": model_dir,
            "train": train,
            "max_length": payload["max_length"],
            "batch_size": payload["batch_size"],
            "seed": payload["seed"],
            "pad_multiple": payload["pad_multiple"],
            "last_mlp_kept_rows": payload.get("last_mlp_kept_rows", False),
        }
        work = useful_work(spec)
    derived = {"executed", "last_mlp_params_skipped"}  # what today's code computes from the rest
    changed = [k for k, v in payload["work"].items() if k not in derived and work.get(k) != v]
    if changed:
        raise SystemExit(f"{run_dir}: the data or model differ from the recorded run ({changed})")
    payload["work"] = work
    payload["summary"] = _summary(payload)
    payload["resummarised"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return payload


def _summary(payload: dict) -> dict[str, Any]:
    """Ceilings, ratios and the over-seeds figures of a run, from its timings and work."""
    summary = summarise(payload["results"], payload["work"], payload["peaks"], payload["precision"])
    summary["val_over_seeds"] = val_over_seeds(payload["results"], payload["val_reruns"], payload["seed"])
    return summary


def _write_run(out: Path, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sft.json").write_text(json.dumps(payload, indent=2))
    print(write_report(out, payload))
    if any("error" not in r for r in payload["results"]):
        plot(out, payload)
    if out.resolve().parent == RUNS.resolve():
        write_index(HERE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and data: a smoke run in seconds")
    p.add_argument(
        "--out",
        default=None,
        help="where RESULTS.md, bench_sft.json/png go "
        "(default: benchmarks/runs/<machine>-<precision>/, then benchmarks/RESULTS.md "
        "indexes every run there)",
    )
    p.add_argument("--model", default=None, help="model folder or name (default: the embedded model)")
    p.add_argument(
        "--contestants",
        default=",".join(CONTESTANTS),
        help=f"comma-separated subset of {', '.join(CONTESTANTS)}",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast when the measured bf16 matmul peak is 1.3x fp32's",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="default: the model card's, else 1e-3")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pad-multiple",
        type=int,
        default=None,
        help="our loops round batch widths to this (default: 64 in bf16, where oneDNN "
        "caches kernels per shape; none in fp32)",
    )
    p.add_argument(
        "--val-seeds",
        default="1,2",
        help="extra training seeds (data order) on which ours_packed, ours_padded and "
        "trl_default are re-run: one seed's final loss moves by several %% with the "
        "order alone, one run's time with the machine (default: 1,2; '' for none)",
    )
    p.add_argument(
        "--resummarise",
        default=None,
        metavar="RUN_DIR",
        help="recompute a recorded run's derived figures (ceilings, executed FLOP/s) "
        "without re-timing it, then rewrite its report and the index",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.resummarise:
        _write_run(Path(args.resummarise), resummarise(Path(args.resummarise)))
        return 0
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        result = run_contestant(args.worker, spec)
        Path(args.result).write_text(json.dumps(result))
        return 0

    names = [n.strip() for n in args.contestants.split(",") if n.strip()]
    unknown = set(names) - set(CONTESTANTS)
    if unknown:
        p.error(f"unknown contestants {sorted(unknown)}; choose from {', '.join(CONTESTANTS)}")
    peaks = {
        "fp32": matmul_peak(torch.float32, args.threads, 0.3 if args.quick else 1.5),
        "bf16": matmul_peak(torch.bfloat16, args.threads, 0.3 if args.quick else 1.5),
    }
    print(
        f"matmul peak, {args.threads} threads: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if peaks["bf16"] >= 1.3 * peaks["fp32"] else "fp32"

    from lumorik_sft.defaults import recommended_learning_rate

    train, val = make_records(args.quick, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        model_dir, model_label = prepare_model(
            Path(tmp),
            args.quick,
            args.model,
            [r["prompt"] + "\n" + r["completion"] for r in train],
            args.seed,
        )
        lr = args.lr if args.lr is not None else recommended_learning_rate(model_dir)
        pad_multiple = (
            args.pad_multiple if args.pad_multiple is not None else (64 if precision == "bf16" else 0)
        )
        spec = {
            "pad_multiple": pad_multiple,
            "last_mlp_kept_rows": True,
            "model_dir": model_dir,
            "train": train,
            "val": val,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "lr": lr,
            "seed": args.seed,
            "precision": precision,
            "threads": args.threads,
            "work": tmp,
            "peak_seconds": 0.3 if args.quick else 1.5,
            "in_process": args.quick,  # a smoke run: importing torch and TRL nine times cost 40 s
        }
        work = useful_work(spec)
        results = run_all(names, spec)
        seeds = [int(x) for x in args.val_seeds.split(",") if x.strip()]
        pair = [n for n in RERUN if n in names]
        reruns = []
        for extra_seed in seeds if {"ours_packed", "trl_default"} <= set(pair) else []:
            print(f"validation-loss rerun, training seed {extra_seed}:", flush=True)
            seed_dir = Path(tmp) / f"seed{extra_seed}"
            seed_dir.mkdir()
            reruns += [
                dict(r, seed=extra_seed)
                for r in run_all(pair, {**spec, "seed": extra_seed, "work": str(seed_dir)})
            ]
    payload = {
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "threads": args.threads,
        "peaks": peaks,
        "precision": precision,
        "model": model_label,
        "work": work,
        "n_val": len(val),
        "batch_size": args.batch_size,
        "lr": lr,
        "seed": args.seed,
        "max_length": args.max_length,
        "results": results,
        "pad_multiple": spec["pad_multiple"],
        "val_reruns": reruns,
        "last_mlp_kept_rows": True,
    }
    payload["summary"] = _summary(payload)
    out = Path(args.out) if args.out else RUNS / run_tag(payload["machine"], args.threads, precision)
    _write_run(out, payload)
    rt = payload["summary"]["ratios"]
    print(
        f"packed vs TRL default: {_x(rt['packed_vs_trl_default'])} completion tokens/s; "
        f"packed vs our padded loop: {_x(rt['packed_vs_padded'])} "
        f"(length-grouped: {_x(rt['length_vs_trl_default'])} and {_x(rt['length_vs_padded'])})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
