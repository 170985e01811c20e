"""Packing: fewer padding tokens per step, and no attention across example boundaries.

A micro-batch of mixed-length examples padded to its longest row wastes most of its compute
on padding when one long case summary sits next to seven short product descriptions. Two
layouts remove that waste; both are pure functions of (examples, config), so a seeded run and
its resume rebuild exactly the same batches.

``packing="bfd"``: each micro-batch keeps the same examples as the padded loop, but they are
laid out best-fit decreasing into as few rows as possible. Lengths 9, 3 and 4 with a row of
9 tokens (EOS = 0, pad = 1)::

    input_ids    = [[5, 6, 7, 8, 9, 7, 8, 9, 0], [5, 6, 7, 0, 5, 7, 0,  1,  1]]
    position_ids = [[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 0, 1, 2,  0,  0]]
    segment_ids  = [[0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, -1, -1]]

and ``attention_mask`` is a 4-D block-diagonal causal mask ``[rows, 1, T, T]``: a token sees
earlier tokens of its own example only. Position ids restart at 0 for every example (GPT-2's
learned positions and Llama's rotary ones both need that), and the label of each example's
first token is -100, since in a packed row it would be "predicted" from the previous
example. The same examples give the same summed completion NLL as the padded batch, so the
loss curve and the gradients are the padded loop's, only cheaper.

``mask="varlen"`` (the default for models on PyTorch's SDPA attention) goes one step
further and drops padding altogether: the whole micro-batch becomes *one* row of exactly the
sum of its lengths, with ``cu_seq_lens_q`` = [0, 9, 12, 16] marking where each example starts.
While such a batch runs, `varlen_attention` switches the model to `varlen_sdpa_attention`,
which calls SDPA's causal kernel once per example: no token is computed for padding, and the
attention of each example costs its own length squared, on CPU and GPU alike.

Why a 4-D mask and not just restarted ``position_ids``: Hugging Face detects packing from
position ids only when no 2-D mask is given *and* no KV cache is built, and a model called
in training mode builds a cache whenever ``config.use_cache`` is true (GPT-2's and Llama's
default). Then every example attends to the ones before it in the row (`naive_packed_batch`
shows the trap). A 4-D mask is used as given, cache or not. On CUDA with
``attn_implementation="flash_attention_2"`` the collator sends no mask: flash attention's
variable-length kernel reads the example boundaries from the restarted position ids and its
cost is then the sum of each example's own squared length.

``packing="length"``: length-grouped batching. Each row stays one example, but a micro-batch
is drawn from examples of similar length (shuffle, cut into mega-batches of
``batch_size x LENGTH_GROUP_MEGABATCHES``, sort each by length, slice). Padding nearly
vanishes and the attention of each row costs its own example's length squared with a plain
causal kernel, which is what pays most on a CPU; the price is that a micro-batch now holds
examples of similar length instead of a uniform draw.

Run the checks with ``pytest tests/test_packing.py``.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lumorik_sft.encoding import IGNORE_INDEX, SFTCollator, pad_sequences, round_up

PACKING_MODES = ("none", "bfd", "length")
MASK_KINDS = ("varlen", "bool", "float", "none")
LENGTH_GROUP_MEGABATCHES = 50
"""Micro-batches per mega-batch in length grouping (the value Hugging Face's sampler uses)."""

_VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
VARLEN_ATTENTION = "lumorik_sdpa_varlen"
"""Name under which `varlen_sdpa_attention` is registered with transformers' AttentionInterface."""
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")
"""Batch keys that carry example boundaries to the attention (Hugging Face's names for them)."""


# --------------------------------------------------------------------------- planning


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin-pack items of the given lengths into rows of `capacity`: best fit, longest first.

    Returns rows of item indices; each row's lengths sum to at most `capacity`. Items are
    placed longest first (ties by index, so the result is deterministic), each into the
    fullest row that still has room, else a new row.

    >>> best_fit_decreasing([9, 3, 4, 5], capacity=9)
    [[0], [3, 2], [1]]
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i = too_long[0]
        raise ValueError(f"example {i} has {lengths[i]} tokens, more than the row capacity "
                         f"{capacity}; raise the capacity or encode with max_length <= {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), kept sorted
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))  # the row with the least room that fits
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


def length_grouped_batches(
    order: Sequence[int], lengths: Sequence[int], batch_size: int,
    megabatches: int = LENGTH_GROUP_MEGABATCHES,
) -> list[list[int]]:
    """Micro-batches of similar-length examples, from an epoch's (shuffled) `order`.

    The order is cut into mega-batches of ``batch_size * megabatches`` examples; each is
    sorted by length (longest first, stable) and sliced into micro-batches. There are
    exactly ``ceil(len(order) / batch_size)`` of them, as without grouping, so step counts,
    schedules and resume positions do not change.

    >>> length_grouped_batches([0, 1, 2, 3, 4], [5, 90, 7, 80, 6], batch_size=2)
    [[1, 3], [2, 4], [0]]
    """
    if batch_size < 1 or megabatches < 1:
        raise ValueError("batch_size and megabatches must be >= 1")
    size = batch_size * megabatches
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        mega = sorted(order[start:start + size], key=lambda i: -lengths[i])
        batches += [mega[j:j + batch_size] for j in range(0, len(mega), batch_size)]
    return batches


def plan_micro_batches(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, packing: str = "none",
) -> list[list[int]]:
    """Example indices of every micro-batch of an epoch, in training order.

    'none' and 'bfd' take consecutive slices of `order` ('bfd' only changes how a slice is
    laid out in rows, see `PackedCollator`); 'length' groups by length. A pure function of
    its arguments: the epoch order comes from (seed, epoch), so a resume rebuilds the plan.
    """
    check_packing(packing)
    if packing == "length":
        return length_grouped_batches(order, lengths, batch_size)
    return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def shard_micro_batch(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This process's share of a global micro-batch: every `world_size`-th example.

    Strided, so with length grouping every rank gets rows of similar length.
    """
    return list(indices[rank::world_size])


def check_packing(packing: str) -> str:
    if packing not in PACKING_MODES:
        raise ValueError(f"packing must be one of {', '.join(PACKING_MODES)}, got {packing!r}; "
                         "'bfd' packs each micro-batch into block-diagonal rows, 'length' "
                         "batches examples of similar length")
    return packing


# --------------------------------------------------------------------------- attention


class _VarlenCalls:
    """How many attention calls saw example boundaries: proof the model routed them to us."""

    count = 0


def varlen_sdpa_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each example of a padding-free row; the AttentionInterface signature.

    query, key, value are [1, heads, T, head_dim] for one row holding several examples;
    ``cu_seq_lens_q`` gives where each starts and ``max_length_q`` the longest example
    (`metrics.completion_nll` passes both, the names of transformers' flash-attention
    kwargs). Each example attends only to itself, with the causal kernel, so the cost is
    sum(n_i^2) and no mask is ever built. Without boundaries (a padded batch, generation)
    this is plain SDPA.
    """
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a padding-free batch is one row, got {query.shape[0]} rows")
    _VarlenCalls.count += 1
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.device.type == "cuda" and dropout == 0.0:
        # given max_length_q, nothing here waits for the GPU (.tolist() would, in every layer)
        longest = int(cu_seq_lens_q.diff().max()) if max_length_q is None else max_length_q
        out = _cuda_varlen(query, key, value, cu_seq_lens_q, longest, scale)
        if out is not None:
            return out, None
    bounds = tuple(cu_seq_lens_q.tolist())
    if query.device.type == "cpu" and dropout == 0.0:
        dtype = _attention_dtype(query, key, value)
        # No .contiguous(): SegmentAttention copies its inputs once anyway (padded), and its
        # output takes the input's memory layout, [T, heads, head_dim] for GPT-2, so the
        # transpose below is then already contiguous.
        q, k, v = (x[0].to(dtype) for x in _repeat_kv(query, key, value))
        out = SegmentAttention.apply(q, k, v, bounds, scale)  # [heads, T, head_dim]
        return out.transpose(0, 1)[None].contiguous(), None
    gqa = key.shape[1] != query.shape[1]  # grouped-query attention (Llama, Qwen2)
    parts = [F.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, is_causal=True,
        scale=scale, enable_gqa=gqa) for s, e in zip(bounds, bounds[1:], strict=False) if e > s]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def _cuda_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                 longest: int, scale: float) -> torch.Tensor | None:
    """PyTorch's variable-length flash attention (torch >= 2.10, fp16/bf16): one kernel call
    for the whole row. None where it is missing or the dtype is not half precision; the
    caller then runs SDPA per example."""
    params = _varlen_attn_params()
    if params is None:
        return None
    from torch.nn.attention.varlen import varlen_attn

    dtype = _attention_dtype(query, key, value)
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    q, k, v = (x[0].transpose(0, 1).to(dtype) for x in _repeat_kv(query, key, value))  # [T, H, D]
    options: dict[str, Any] = ({"is_causal": True} if "is_causal" in params
                               else {"window_size": (-1, 0)})  # (-1, 0) is causal from 2.12
    if "scale" in params:
        options["scale"] = scale
    elif abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        return None  # this version cannot scale differently
    cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **options)
    return out[None]  # [1, T, H, D], as transformers' attention functions return


@functools.cache
def _varlen_attn_params() -> frozenset[str] | None:
    """Keyword names of this torch's `varlen_attn` (they changed between 2.10 and 2.12), or
    None where it does not exist. Looked up once: the attention runs in every layer."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def _attention_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (as SDPA would use), else the widest input's.

    Under autocast, rotary embeddings (Llama) leave query and key in float32 while value
    comes out of its projection in bf16.
    """
    device = xs[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _repeat_kv(query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give key and value as many heads as the query (grouped-query attention)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    return query, repeat_kv(key, groups), repeat_kv(value, groups)


class SegmentAttention(torch.autograd.Function):
    """Causal attention inside each segment of one row, with a hand-written backward.

    Why not SDPA per segment: on a CPU, PyTorch's flash kernel is slow for rows of a few
    hundred tokens (its backward ran at ~65 GFLOP/s here), and eight small calls per layer
    pay autograd overhead eight times. This is textbook attention, one segment at a time:

        S = scale * Q K^T + causal bias,  P = softmax(S),  O = P V
        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)),
        dQ = scale * dS K,  dK = scale * dS^T Q

    Everything runs in the input dtype (bf16 under autocast, like the flash kernels, which
    also round P and dS to bf16 for their matmuls); PyTorch's softmax and its backward
    accumulate in float32 inside the kernel. Inputs are [heads, T, head_dim]; ``bounds``
    are the segment offsets.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bounds: tuple[int, ...], scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        probs = []
        q_, k_, v_ = (F.pad(x, (0, 0, 0, SEGMENT_MULTIPLE)) for x in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            for s, e in zip(bounds, bounds[1:], strict=False):
                n, m = e - s, round_up(e - s, SEGMENT_MULTIPLE)
                scores = torch.baddbmm(_causal_bias(m, q), q_[:, s:s + m],
                                       k_[:, s:s + m].transpose(1, 2), alpha=scale)
                p = torch.softmax(scores, dim=-1)  # bf16 in and out, float32 inside
                p[:, n:] = 0  # rows of the next segment: no output, no gradient
                out[:, s:e] = torch.bmm(p, v_[:, s:s + m])[:, :n]
                probs.append(p)
        ctx.save_for_backward(q_, k_, v_, *probs)
        ctx.bounds, ctx.scale, ctx.length = bounds, scale, q.shape[1]
        return out

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q_, k_, v_, *probs = ctx.saved_tensors
        t, dtype = ctx.length, q_.dtype
        dq, dk, dv = (torch.empty_like(x[:, :t]) for x in (q_, k_, v_))
        do_ = F.pad(d_out.to(dtype), (0, 0, 0, SEGMENT_MULTIPLE))
        with torch.autocast(q_.device.type, enabled=False):
            for (s, e), p in zip(zip(ctx.bounds, ctx.bounds[1:], strict=False), probs, strict=True):
                n, m = e - s, p.shape[-1]
                do = do_[:, s:s + m]
                dv[:, s:e] = torch.bmm(p.transpose(1, 2), do)[:, :n]
                dp = torch.bmm(do, v_[:, s:s + m].transpose(1, 2))
                # P * (dP - rowsum(dP * P)) in one pass: the kernel autograd uses for softmax
                ds = torch._softmax_backward_data(dp, p, -1, dtype).mul_(ctx.scale)
                dq[:, s:e] = torch.bmm(ds, k_[:, s:s + m])[:, :n]
                dk[:, s:e] = torch.bmm(ds.transpose(1, 2), q_[:, s:s + m])[:, :n]
        return dq, dk, dv, None, None


SEGMENT_MULTIPLE = 16
"""Segment windows are rounded up to this many tokens, so oneDNN sees 16 matmul shapes for
rows up to 256 tokens instead of one per example length; it caches a kernel per shape, and
with a shape per length its cache held ~0.5 GB more here. The extra positions are later
tokens (causally invisible to the segment's queries) and extra query rows whose
probabilities are zeroed, so the result is exact."""


_BIAS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _causal_bias(n: int, like: torch.Tensor) -> torch.Tensor:
    """[n, n] additive causal mask (0 on and below the diagonal, -inf above), cached."""
    key = (like.dtype, like.device)
    bias = _BIAS.get(key)
    if bias is None or bias.shape[0] < n:
        size = max(n, 256)
        bias = torch.full((size, size), float("-inf"), dtype=like.dtype, device=like.device).triu(1)
        _BIAS[key] = bias
    return bias[:n, :n]


@contextlib.contextmanager
def varlen_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` on `varlen_sdpa_attention` inside the block, then restore its attention.

    Raises RuntimeError if a forward pass in the block never reached the varlen kernel
    (a model that does not route attention through transformers' AttentionInterface):
    its attention would silently cross example boundaries.
    """
    from transformers import AttentionInterface

    if VARLEN_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    config = getattr(model, "module", model).config
    previous = config._attn_implementation
    before = _VarlenCalls.count
    config._attn_implementation = VARLEN_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
    if _VarlenCalls.count == before:
        raise RuntimeError(
            f"{type(getattr(model, 'module', model)).__name__} did not call the varlen attention "
            "for a padding-free packed batch, so its examples would attend to each other; pack "
            "with PackedCollator(mask='bool') (4-D block masks) for this model instead")


# --------------------------------------------------------------------------- collation


def mask_kind_for(model: torch.nn.Module | None) -> str:
    """Which packed mask the model's attention implementation honours.

    A transformers model on sdpa that routes attention through the AttentionInterface gets
    'varlen' (one padding-free row, SDPA per example); other sdpa and flex models read a
    boolean 4-D mask (True = attend); eager *adds* the mask to the scores, so it needs a
    float one (0 / very negative); flash attention takes no 4-D mask and finds example
    boundaries in the restarted position ids instead.
    """
    base = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None) or "sdpa"
    if impl == "eager":
        return "float"
    if impl in _VARLEN_IMPLEMENTATIONS:
        return "none"
    if impl == "sdpa" and getattr(base, "_supports_attention_backend", False):
        return "varlen"
    return "bool"


def block_causal_mask(segment_ids: torch.Tensor, kind: str = "bool") -> torch.Tensor:
    """[rows, 1, T, T] mask: query t may attend key s iff s <= t and both are one example.

    Padding (segment -1) forms a segment of its own, so no query row is fully masked (which
    would give NaN in softmax) and no real token attends to padding.
    """
    if kind not in ("bool", "float"):
        raise ValueError(f"mask kind must be 'bool' or 'float', got {kind!r}")
    t = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@dataclass
class PackedCollator:
    """Lay a micro-batch out best-fit decreasing in rows with block-diagonal causal masks.

    ``mask`` is 'varlen', 'bool', 'float' or 'none' (see `mask_kind_for`). With 'varlen'
    and 'none' the kernel itself keeps examples apart, so the whole micro-batch is one row
    with no padding at all ('varlen' adds ``cu_seq_lens_q``/``cu_seq_lens_k``, the offsets
    where examples start, for `varlen_sdpa_attention`). With 'bool' and 'float' the rows
    carry a 4-D block-diagonal mask and ``capacity`` is the row length (None: the longest
    example of the micro-batch, so no row is longer than the padded batch would be; a
    larger one fits more examples per row at a higher attention cost on dense kernels).
    Each example keeps its tokens and labels, its positions restart at 0, and its first
    label becomes -100 (see the module docstring). Returned keys:
    input_ids, position_ids, labels, segment_ids (example number in the row, -1 on padding;
    bookkeeping, never passed to the model), and attention_mask (4-D for 'bool' and
    'float'; 2-D, 0 on padding, for 'varlen', which also adds cu_seq_lens_q/k).
    """

    pad_token_id: int
    mask: str = "bool"
    capacity: int | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {', '.join(MASK_KINDS)}, got {self.mask!r}")

    def rows(self, features: Sequence[Mapping[str, Sequence[int]]]) -> list[list[int]]:
        """Which features go in which row (indices into `features`)."""
        lengths = [len(f["input_ids"]) for f in features]
        if self.padding_free:
            return [list(range(len(features)))]
        return best_fit_decreasing(lengths, max(self.capacity or 0, max(lengths)))

    @property
    def padding_free(self) -> bool:
        """One row holding the whole micro-batch: the attention kernel separates examples."""
        return self.mask in ("varlen", "none")

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids, pos, labels, segs = [], [], [], []
        for row in self.rows(features):
            r_ids: list[int] = []
            r_pos: list[int] = []
            r_lab: list[int] = []
            r_seg: list[int] = []
            for k, i in enumerate(row):
                f = features[i]
                n = len(f["input_ids"])
                r_ids += f["input_ids"]
                r_pos += range(n)
                r_lab += [IGNORE_INDEX, *f["labels"][1:]]  # never predicted across a boundary
                r_seg += [k] * n
            ids.append(r_ids)
            pos.append(r_pos)
            labels.append(r_lab)
            segs.append(r_seg)
        width = round_up(max(len(r) for r in ids), self.pad_to_multiple_of)
        segment_ids = pad_sequences(segs, -1, length=width)
        batch = {
            "input_ids": pad_sequences(ids, self.pad_token_id, length=width),
            "position_ids": pad_sequences(pos, 0, length=width),
            "labels": pad_sequences(labels, IGNORE_INDEX, length=width),
            "segment_ids": segment_ids,
        }
        if self.mask == "varlen":
            # an example starts where its positions restart at 0; the padding is a segment of
            # its own, never attended to
            starts = [t for t, p in enumerate(pos[0]) if p == 0] + [len(pos[0])]
            if width > starts[-1]:
                starts.append(width)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor(starts, dtype=torch.int32)
            # 2-D, 0 on padding: bookkeeping for readers and for transformers' padding check;
            # the varlen attention builds no mask from it, it reads cu_seq_lens.
            batch["attention_mask"] = (segment_ids >= 0).long()
        elif self.mask != "none":
            batch["attention_mask"] = block_causal_mask(segment_ids, self.mask)
        return batch


def make_collator(pad_token_id: int, packing: str = "none", model: torch.nn.Module | None = None,
                  capacity: int | None = None,
                  pad_to_multiple_of: int | None = None) -> SFTCollator | PackedCollator:
    """The collator a packing mode trains with: `PackedCollator` for 'bfd', else padding."""
    if check_packing(packing) == "bfd":
        return PackedCollator(pad_token_id, mask=mask_kind_for(model), capacity=capacity,
                              pad_to_multiple_of=pad_to_multiple_of)
    return SFTCollator(pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def count_input_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a padded or a packed batch."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] >= 0).sum().item())
    return int(batch["attention_mask"].sum().item())


def naive_packed_batch(
    features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """WRONG on purpose: all examples in one row, restarted position ids, a 2-D mask of ones.

    Kept to show the trap: with a 2-D mask (or with ``use_cache=True``) Hugging Face does
    not turn the restarted position ids into example boundaries, so every example attends
    to all the ones before it in the row. Use `PackedCollator`.
    """
    del pad_token_id  # one row, nothing to pad
    ids = [t for f in features for t in f["input_ids"]]
    pos = [p for f in features for p in range(len(f["input_ids"]))]
    labels = [lab for f in features for lab in [IGNORE_INDEX, *f["labels"][1:]]]
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "position_ids": torch.tensor([pos]),
        "labels": torch.tensor([labels]),
    }


# --------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class LayoutCost:
    """What a batch layout computes, against what it needs."""

    real_tokens: int  # tokens of the examples themselves
    computed_tokens: int  # rows x width over all micro-batches (what the MLPs and head pay)
    attention_pairs: int  # query-key pairs the attention kernel evaluates (T^2 per row)
    useful_attention_pairs: int  # causal pairs inside one example: sum of n(n+1)/2

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "padding_fraction": self.padding_fraction}


def layout_cost(lengths: Sequence[int], micro_batches: Sequence[Sequence[int]],
                packing: str = "none", *, varlen: bool = False,
                capacity: int | None = None) -> LayoutCost:
    """Tokens and attention pairs an epoch plan computes under a packing mode.

    ``varlen=True`` models the padding-free layout ('bfd' with mask 'varlen' or flash
    attention): each micro-batch is one row of exactly its examples' tokens and each
    example's attention costs its own n^2. Otherwise 'bfd' lays out block-masked rows and
    a row pays its full T^2.
    """
    real = computed = pairs = 0
    useful = sum(n * (n + 1) // 2 for n in lengths)
    for batch in micro_batches:
        ls = [lengths[i] for i in batch]
        real += sum(ls)
        if packing == "bfd" and varlen:
            computed += sum(ls)
            pairs += sum(n * n for n in ls)
        elif packing == "bfd":
            rows = [[ls[i] for i in row]
                    for row in best_fit_decreasing(ls, max(capacity or 0, max(ls)))]
            width = max(sum(r) for r in rows)
            computed += width * len(rows)
            pairs += width * width * len(rows)
        else:
            width = max(ls)
            computed += width * len(ls)
            pairs += width * width * len(ls)
    return LayoutCost(real, computed, pairs, useful)
