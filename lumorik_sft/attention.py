"""Attention for packed batches: examples share a row, never each other's tokens.

`packing` lays a micro-batch out in rows; this module makes the model's attention keep the
examples of a row apart, and says which layout a model can take (`mask_kind_for`).

``mask="varlen"`` (the default for models on PyTorch's SDPA attention) drops padding
altogether: the whole micro-batch is *one* row of exactly the sum of its lengths, with
``cu_seq_lens_q`` = [0, 9, 12, 16] marking where each example starts. While such a batch runs
(`model_inputs`), `varlen_attention` switches the model to `varlen_sdpa_attention`, which calls
a causal kernel once per example: no token is computed for padding, and the attention of each
example costs its own length squared, on CPU (`SegmentAttention`) and GPU (PyTorch's
variable-length flash attention) alike.

On CUDA with ``attn_implementation="flash_attention_2"`` the collator sends no mask ('none'):
flash attention's variable-length kernel reads the example boundaries from the restarted
position ids. Eager attention *adds* its mask to the scores ('float'); other models read a
boolean 4-D block-diagonal mask ('bool', `block_causal_mask`): the plain reference layout.

Run the checks with ``pytest tests/test_attention.py``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lumorik_sft.distributed import unwrap
from lumorik_sft.encoding import round_up

_VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
VARLEN_ATTENTION = "lumorik_sdpa_varlen"
"""Name under which `varlen_sdpa_attention` is registered with transformers' AttentionInterface."""
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")
"""Batch keys that carry example boundaries to the attention (Hugging Face's names for them)."""
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
"""Keys of a batch that are forwarded to the model; anything else (labels, bookkeeping such as
segment_ids) stays out of the forward call."""


# --------------------------------------------------------------------------- masks and model inputs


def mask_kind_for(model: torch.nn.Module | None) -> str:
    """Which packed mask the model's attention implementation honours.

    A transformers model on sdpa that routes attention through the AttentionInterface gets
    'varlen' (one padding-free row, SDPA per example); other sdpa and flex models read a
    boolean 4-D mask (True = attend); eager *adds* the mask to the scores, so it needs a
    float one (0 / very negative); flash attention takes no 4-D mask and finds example
    boundaries in the restarted position ids instead.
    """
    base = unwrap(model)
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


@contextlib.contextmanager
def model_inputs(model: torch.nn.Module, batch: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The model's keyword inputs for `batch`, under the attention the batch's layout needs.

    A padded or block-masked batch passes its tensors as they are. A padding-free packed batch
    (``cu_seq_lens_q``) also passes its example offsets and longest example, and runs under
    `varlen_attention`, so no example attends to another. ``use_cache=False`` where the model
    takes it: no KV cache to build and throw away, and with a cache Hugging Face would not read
    example boundaries from restarted position ids (flash attention's layout).
    """
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    if accepts(unwrap(model), "use_cache"):
        inputs["use_cache"] = False
    if "cu_seq_lens_q" not in batch:
        yield inputs
        return
    inputs.update({k: batch[k] for k in VARLEN_KEYS if k in batch})
    # the longest example, read once per batch rather than by the attention of every layer
    inputs["max_length_q"] = inputs["max_length_k"] = int(batch["cu_seq_lens_q"].diff().max())
    with varlen_attention(model):
        yield inputs


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's forward takes keyword `name` (explicitly or through **kwargs).

    Looked up once per model class: this runs for every micro-batch.
    """
    params = _FORWARD_PARAMS.get(type(model))
    if params is None:
        try:
            params = frozenset(inspect.signature(getattr(model, "forward", model)).parameters)
        except (TypeError, ValueError):
            params = frozenset()
        _FORWARD_PARAMS[type(model)] = params
    return name in params


_FORWARD_PARAMS: dict[type, frozenset[str]] = {}


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
    config = unwrap(model).config
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
            "with PackedCollator(mask='bool') (4-D block masks) for this model instead"
        )


# --------------------------------------------------------------------------- the kernels


class _VarlenCalls:
    """How many attention calls saw example boundaries: proof the model routed them to us."""

    count = 0


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each example of a padding-free row; the AttentionInterface signature.

    query, key, value are [1, heads, T, head_dim] for one row holding several examples;
    ``cu_seq_lens_q`` gives where each starts and ``max_length_q`` the longest example
    (`model_inputs` passes both, the names of transformers' flash-attention kwargs). Each
    example attends only to itself, with the causal kernel, so the cost is sum(n_i^2) and no
    mask is ever built. Without boundaries (a padded batch, generation) this is plain SDPA.
    """
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
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
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            dropout_p=dropout,
            is_causal=True,
            scale=scale,
            enable_gqa=gqa,
        )
        for s, e in zip(bounds, bounds[1:], strict=False)
        if e > s
    ]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def _cuda_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    longest: int,
    scale: float,
) -> torch.Tensor | None:
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
    options: dict[str, Any] = (
        {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    )  # (-1, 0) is causal from 2.12
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


def _repeat_kv(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...], scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        probs = []
        q_, k_, v_ = (F.pad(x, (0, 0, 0, SEGMENT_MULTIPLE)) for x in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            for s, e in zip(bounds, bounds[1:], strict=False):
                n, m = e - s, round_up(e - s, SEGMENT_MULTIPLE)
                scores = torch.baddbmm(
                    _causal_bias(m, q), q_[:, s : s + m], k_[:, s : s + m].transpose(1, 2), alpha=scale
                )
                p = torch.softmax(scores, dim=-1)  # bf16 in and out, float32 inside
                p[:, n:] = 0  # rows of the next segment: no output, no gradient
                out[:, s:e] = torch.bmm(p, v_[:, s : s + m])[:, :n]
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
                do = do_[:, s : s + m]
                dv[:, s:e] = torch.bmm(p.transpose(1, 2), do)[:, :n]
                dp = torch.bmm(do, v_[:, s : s + m].transpose(1, 2))
                # P * (dP - rowsum(dP * P)) in one pass: the kernel autograd uses for softmax
                ds = torch._softmax_backward_data(dp, p, -1, dtype).mul_(ctx.scale)
                dq[:, s:e] = torch.bmm(ds, k_[:, s : s + m])[:, :n]
                dk[:, s:e] = torch.bmm(ds.transpose(1, 2), q_[:, s : s + m])[:, :n]
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
