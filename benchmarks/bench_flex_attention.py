"""Packed attention on a CPU: our per-example kernel against `flex_attention` with block masks.

Issue 21 asks for per-example attention through `flex_attention` "where it helps". This measures
whether it helps on the course's shapes before anything is wired in: padding-free rows of 8
examples (the training batch) of 100-256 tokens, 4 heads of 64 (the embedded model), forward and
backward, fp32 and bf16. Contestants, all on the same rows:

- ``segment``: `attention.SegmentAttention`, what `ours_packed` trains with (one causal kernel per
  example, a hand-written backward);
- ``dense``: SDPA with the materialised [T, T] block-causal mask (`attention.block_causal_mask`),
  the plain reference;
- ``flex``: `flex_attention` compiled by inductor, with a block mask built per row by
  `create_block_mask` (its time is inside the step: every batch has other boundaries);
- ``flex*``: the same kernel with each row's block mask built once and reused (the kernel alone).

It first checks that each contestant's output (and gradients, where it has a backward) equals
the dense reference's in fp32, then prints the median time per row, forward and backward, and
forward only, with flex's compile time. Measured answer (torch 2.13, 2-core CPU, recorded in
`benchmarks/runs/flex-attention/`): flex_attention has no backward on a CPU ("FlexAttention does
not support backward on CPU"), so it cannot train here at all; the script says so and times the
forward pass alone. There, with a block mask built per row as training would need, it took 1.9x
our kernel's time in fp32 and 2.6x in bf16 (the kernel alone, mask reused: 1.1x and 1.6x). So
the course keeps its own kernel; flex_attention is for a GPU. Usage:
``python benchmarks/bench_flex_attention.py [--rows 12] [--repeats 3]``. To emulate an AVX2 CPU
on an AVX512 one, give inductor its own cache (``TORCHINDUCTOR_CACHE_DIR``): a kernel cached by a
native run crashed the emulated one.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from lumorik_sft.attention import SegmentAttention, block_causal_mask

HEADS, HEAD_DIM, PER_ROW = 4, 64, 8
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]], torch.Tensor]


def make_rows(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Example boundaries of `n` padding-free rows of 8 examples of 100-256 tokens each."""
    rng = random.Random(seed)
    return [tuple(accumulate((rng.randint(100, 256) for _ in range(PER_ROW)), initial=0)) for _ in range(n)]


def segment_ids(bounds: tuple[int, ...]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())


def segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    return SegmentAttention.apply(q, k, v, bounds, HEAD_DIM**-0.5)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    mask = block_causal_mask(segment_ids(bounds)[None])  # [1, 1, T, T]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]


# Static shapes: one compile per row length. With dynamic=True the CPU kernel ran ~20x slower
# (105 ms against 5 ms per row here), and automatic dynamic shapes (dynamic=None) failed to
# build its C++ on the second length (torch 2.13).
_compiled_flex = torch.compile(flex_attention, dynamic=False)
torch._dynamo.config.recompile_limit = 64  # one graph per row length; the default 8 falls back to eager


def document_block_mask(bounds: tuple[int, ...]):
    """flex_attention's BlockMask for one packed row: causal inside each example, nothing across."""
    doc = segment_ids(bounds)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(
        document_causal, B=None, H=None, Q_LEN=bounds[-1], KV_LEN=bounds[-1], device="cpu"
    )


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    return _compiled_flex(q[None], k[None], v[None], block_mask=document_block_mask(bounds))[0]


_MASKS: dict[tuple[int, ...], object] = {}


def flex_mask_reused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...]
) -> torch.Tensor:
    """The kernel alone: each row's block mask is built on its first call only."""
    if bounds not in _MASKS:
        _MASKS[bounds] = document_block_mask(bounds)
    return _compiled_flex(q[None], k[None], v[None], block_mask=_MASKS[bounds])[0]


CONTESTANTS: dict[str, Attention] = {
    "segment": segment,
    "dense": dense,
    "flex": flex,
    "flex*": flex_mask_reused,
}


def inputs(bounds: tuple[int, ...], dtype: torch.dtype, grad: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (HEADS, bounds[-1], HEAD_DIM)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def step(
    fn: Attention, bounds: tuple[int, ...], dtype: torch.dtype, backward: bool = True
) -> tuple[torch.Tensor, ...]:
    """Forward (and backward) of one row; the output, then the three input gradients if any."""
    q, k, v = inputs(bounds, dtype, grad=backward)
    if not backward:
        with torch.no_grad():
            return (fn(q, k, v, bounds),)
    out = fn(q, k, v, bounds)
    grad = torch.ones_like(out) / out.numel() ** 0.5
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def has_backward(name: str, bounds: tuple[int, ...]) -> str | None:
    """None if the contestant can back-propagate on this device, else the error it raises."""
    try:
        step(CONTESTANTS[name], bounds, torch.float32)
    except NotImplementedError as err:
        torch._dynamo.reset()  # after an error inside a compiled call, dynamo would run it eager
        return str(err)
    return None


def check(rows: list[tuple[int, ...]], backward: dict[str, bool]) -> dict[str, float]:
    """Largest absolute difference from the dense reference (fp32), output and gradients."""
    worst = {name: 0.0 for name in CONTESTANTS if name != "dense"}
    for bounds in rows[:2]:
        for name in worst:
            ref = step(dense, bounds, torch.float32, backward[name])
            got = step(CONTESTANTS[name], bounds, torch.float32, backward[name])
            diff = max((a - b).abs().max().item() for a, b in zip(got, ref, strict=True))
            worst[name] = max(worst[name], diff)
    return worst


def time_contestant(
    name: str, rows: list[tuple[int, ...]], dtype: torch.dtype, repeats: int, backward: bool
) -> tuple[float, float]:
    """(median seconds per row after the first pass, seconds of the first pass over all rows)."""
    fn = CONTESTANTS[name]
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        for bounds in rows:
            step(fn, bounds, dtype, backward)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            for bounds in rows:
                t0 = time.perf_counter()
                step(fn, bounds, dtype, backward)
                times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=12, help="packed rows (batches of 8 examples)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the rows")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = make_rows(args.rows)
    tokens = statistics.mean(b[-1] for b in rows)
    print(
        f"{args.rows} rows of {PER_ROW} examples, {tokens:.0f} tokens on average; "
        f"{HEADS} heads of {HEAD_DIM}; {args.threads} threads; torch {torch.__version__}"
    )
    missing = {name: has_backward(name, rows[0]) for name in CONTESTANTS}
    backward = {name: err is None for name, err in missing.items()}
    for name, err in missing.items():
        if err:
            print(f"{name}: no backward on this device ({err}): timed forward only")
    for name, diff in check(rows, backward).items():
        what = "output and gradients" if backward[name] else "output"
        print(f"fp32, max |{name} - dense| over {what}: {diff:.2e}")
    for train in (True, False):
        names = [n for n in CONTESTANTS if backward[n] or not train]
        for dtype in (torch.float32, torch.bfloat16):
            base = None
            for name in names:
                median, first = time_contestant(name, rows, dtype, args.repeats, train)
                base = base or median
                extra = (
                    f"; first pass over the rows {first:.1f} s (compiling)" if name.startswith("flex") else ""
                )
                print(
                    f"{str(dtype).removeprefix('torch.'):8s} {name:8s} "
                    f"{'forward+backward' if train else 'forward only':16s} {1e3 * median:7.1f} ms per row "
                    f"({median / base:.2f}x segment){extra}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
