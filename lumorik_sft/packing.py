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
The attention then runs once per example (`lumorik_sft.attention`): no token is computed for
padding, and the attention of each example costs its own length squared.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lumorik_sft.attention import block_causal_mask, mask_kind_for
from lumorik_sft.encoding import IGNORE_INDEX, SFTCollator, pad_sequences, round_up

PACKING_MODES = ("none", "bfd", "length")
MASK_KINDS = ("varlen", "bool", "float", "none")
LENGTH_GROUP_MEGABATCHES = 50
"""Micro-batches per mega-batch in length grouping (the value Hugging Face's sampler uses)."""


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
        raise ValueError(
            f"example {i} has {lengths[i]} tokens, more than the row capacity "
            f"{capacity}; raise the capacity or encode with max_length <= {capacity}"
        )
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
    order: Sequence[int],
    lengths: Sequence[int],
    batch_size: int,
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
        mega = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches += [mega[j : j + batch_size] for j in range(0, len(mega), batch_size)]
    return batches


def plan_micro_batches(
    order: Sequence[int],
    lengths: Sequence[int],
    batch_size: int,
    packing: str = "none",
) -> list[list[int]]:
    """Example indices of every micro-batch of an epoch, in training order.

    'none' and 'bfd' take consecutive slices of `order` ('bfd' only changes how a slice is
    laid out in rows, see `PackedCollator`); 'length' groups by length. A pure function of
    its arguments: the epoch order comes from (seed, epoch), so a resume rebuilds the plan.
    """
    check_packing(packing)
    if packing == "length":
        return length_grouped_batches(order, lengths, batch_size)
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def shard_micro_batch(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This process's share of a global micro-batch: every `world_size`-th example.

    Strided, so with length grouping every rank gets rows of similar length.
    """
    return list(indices[rank::world_size])


def check_packing(packing: str) -> str:
    if packing not in PACKING_MODES:
        raise ValueError(
            f"packing must be one of {', '.join(PACKING_MODES)}, got {packing!r}; "
            "'bfd' packs each micro-batch into block-diagonal rows, 'length' "
            "batches examples of similar length"
        )
    return packing


# --------------------------------------------------------------------------- collation


@dataclass
class PackedCollator:
    """Lay a micro-batch out best-fit decreasing in rows with block-diagonal causal masks.

    ``mask`` is 'varlen', 'bool', 'float' or 'none' (see `attention.mask_kind_for`). With
    'varlen' and 'none' the kernel itself keeps examples apart, so the whole micro-batch is one
    row with no padding at all ('varlen' adds ``cu_seq_lens_q``/``cu_seq_lens_k``, the offsets
    where examples start, for `attention.varlen_sdpa_attention`). With 'bool' and 'float' the
    rows carry a 4-D block-diagonal mask and ``capacity`` is the row length (None: the longest
    example of the micro-batch, so no row is longer than the padded batch would be; a
    larger one fits more examples per row at a higher attention cost on dense kernels).
    Each example keeps its tokens and labels, its positions restart at 0, and its first
    label becomes -100 (see the module docstring). Returned keys:
    input_ids, position_ids, labels, segment_ids (example number in the row, -1 on padding;
    bookkeeping, never passed to the model), and attention_mask (4-D for 'bool' and 'float',
    from `attention.block_causal_mask`; 2-D, 0 on padding, for 'varlen', which also adds
    cu_seq_lens_q/k).
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


def make_collator(
    pad_token_id: int,
    packing: str = "none",
    model: torch.nn.Module | None = None,
    capacity: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> SFTCollator | PackedCollator:
    """The collator a packing mode trains with: `PackedCollator` for 'bfd', else padding."""
    if check_packing(packing) == "bfd":
        return PackedCollator(
            pad_token_id, mask=mask_kind_for(model), capacity=capacity, pad_to_multiple_of=pad_to_multiple_of
        )
    return SFTCollator(pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def count_input_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a padded or a packed batch."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] >= 0).sum().item())
    return int(batch["attention_mask"].sum().item())


def naive_packed_batch(
    features: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int,
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


def layout_cost(
    lengths: Sequence[int],
    micro_batches: Sequence[Sequence[int]],
    packing: str = "none",
    *,
    varlen: bool = False,
    capacity: int | None = None,
) -> LayoutCost:
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
            rows = [[ls[i] for i in row] for row in best_fit_decreasing(ls, max(capacity or 0, max(ls)))]
            width = max(sum(r) for r in rows)
            computed += width * len(rows)
            pairs += width * width * len(rows)
        else:
            width = max(ls)
            computed += width * len(ls)
            pairs += width * width * len(ls)
    return LayoutCost(real, computed, pairs, useful)
