"""Loss, perplexity, BLEU and ROUGE for supervised fine-tuning, done right.

The chapter's worked example, with the arithmetic fixed (it rounds each term first
and reports a sum of 4.01):

>>> [round(x, 3) for x in token_nll([0.1, 0.6, 0.3])]
[2.303, 0.511, 1.204]
>>> round(sequence_nll([0.1, 0.6, 0.3]), 3)
4.017
>>> round(mean_nll([0.1, 0.6, 0.3]), 3), round(perplexity_from_probs([0.1, 0.6, 0.3]), 2)
(1.339, 3.82)

Validation perplexity is token-weighted: exp(total completion NLL / total completion
tokens) over the whole split (`evaluate_loss`), never a mean of per-batch
perplexities (`mean_of_batch_perplexities`, kept only to show the difference).

Run the doctests with ``python -m doctest lumorik_sft/metrics.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lumorik_sft.models import fused_activations
from lumorik_sft.packing import VARLEN_KEYS, varlen_attention

if TYPE_CHECKING:  # evaluate pulls in datasets; import it only when a module is loaded.
    import evaluate

IGNORE_INDEX = -100
"""Label value that marks a token as not supervised (prompt or padding)."""

# Keys of a batch that are forwarded to the model; anything else (labels, bookkeeping
# such as lengths) stays out of the forward call.
_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")

_METRIC_MODULES_DIR = Path(__file__).resolve().parent / "metric_modules"
METRIC_MODULE_NAMES = ("bleu", "rouge")
DEFAULT_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# --------------------------------------------------------------------------- formulas


def _as_floats(values: Iterable[float], what: str) -> list[float]:
    """Materialise the input once and refuse empty input (a zero-token denominator)."""
    floats = [float(v) for v in values]
    if not floats:
        raise ValueError(
            f"Got no {what}: perplexity and mean NLL divide by the number of tokens, "
            "which would be zero. Pass at least one token."
        )
    return floats


def _safe_exp(x: float) -> float:
    """exp that returns inf instead of raising OverflowError for huge losses."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def token_nll(probs: Iterable[float]) -> list[float]:
    """Per-token negative log-likelihood -ln p of each true token's probability.

    >>> [round(x, 3) for x in token_nll([0.1, 0.6, 0.3])]
    [2.303, 0.511, 1.204]
    """
    values = _as_floats(probs, "token probabilities")
    for i, p in enumerate(values):
        if not 0.0 < p <= 1.0:  # also rejects NaN
            raise ValueError(
                f"Token probability at index {i} is {p!r}; probabilities must satisfy "
                "0 < p <= 1 (p = 0 has infinite NLL). Did you pass logits or log-probs?"
            )
    return [-math.log(p) for p in values]


def sequence_nll(probs: Iterable[float]) -> float:
    """Summed NLL of a sequence: the chapter's loss L = -sum_t log p(y_t | y_<t, x).

    Uses math.fsum so the result does not depend on token order by rounding.
    """
    return math.fsum(token_nll(probs))


def mean_nll(probs: Iterable[float]) -> float:
    """Mean NLL per token, the quantity that perplexity exponentiates."""
    nlls = token_nll(probs)
    return math.fsum(nlls) / len(nlls)


def perplexity_from_probs(probs: Iterable[float]) -> float:
    """Perplexity exp(mean NLL) from the probabilities of the true tokens."""
    return _safe_exp(mean_nll(probs))


def perplexity_from_logprobs(logprobs: Iterable[float]) -> float:
    """Perplexity exp(-mean(log p)) from natural-log token log-probabilities (<= 0).

    >>> perplexity_from_logprobs([0.0, 0.0])
    1.0
    """
    values = _as_floats(logprobs, "token log-probabilities")
    for i, lp in enumerate(values):
        if not lp <= 0.0:  # also rejects NaN
            raise ValueError(
                f"Log-probability at index {i} is {lp!r}; log-probabilities must be <= 0. "
                "Did you pass NLLs (which are >= 0) instead? Negate them."
            )
    return _safe_exp(-math.fsum(values) / len(values))


# --------------------------------------------------------------------------- model loss


def _model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's weights (HF models expose `.device`, plain modules do not)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a batch to `device`, leaving other values as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def completion_nll(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
    """Summed NLL over supervised tokens, and how many there are.

    Logits at position t predict token t + 1, so we compare ``logits[:, :-1]`` with
    ``labels[:, 1:]``; positions whose label is -100 (prompt, padding) are ignored. A
    label at position 0 is never predicted and so never counted (same as HF's loss).
    Only the positions that predict a supervised token go through the LM head: prompt and
    padding logits would be thrown away anyway. Where the model's logits are exactly
    ``lm_head(base_model(...))`` (`_plain_head`), the head is fused with the loss
    (`linear_cross_entropy`); otherwise `completion_logits` returns those rows.
    Cross-entropy runs in float32 even for bf16/fp16 logits. We avoid the model's own
    ``labels=`` loss because it returns a *mean*, and means of batches with different
    token counts cannot be combined correctly.

    Returns:
        ``(nll_sum, n_tokens)``: a 0-dim float32 tensor (keeps the graph, so it can be
        backpropagated) and a Python int. ``nll_sum`` is 0 when ``n_tokens`` is 0.
    """
    if "labels" not in batch:
        raise KeyError("completion_nll needs batch['labels'] (-100 on unsupervised tokens).")
    labels = batch["labels"]
    if labels.shape != batch["input_ids"].shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match input_ids' [B, T] "
            f"{tuple(batch['input_ids'].shape)}; labels must be aligned with input_ids (not pre-shifted)."
        )
    next_labels = torch.full_like(labels, IGNORE_INDEX)
    next_labels[:, :-1] = labels[:, 1:]  # position t predicts token t + 1
    keep = _round_up_kept(next_labels != IGNORE_INDEX)
    targets = next_labels[keep]  # -100 on the rows added by the rounding
    n_tokens = int((targets != IGNORE_INDEX).sum().item())
    head = _plain_head(model, batch, keep)
    if head is not None:  # the LM head and the loss fused, a chunk of rows at a time
        hidden = completion_hidden(model, batch, keep)
        return linear_cross_entropy(hidden, head.weight, head.bias, targets.to(hidden.device)), n_tokens
    logits = completion_logits(model, batch, keep)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    nll_sum = F.cross_entropy(logits, targets.to(logits.device), reduction="sum", ignore_index=IGNORE_INDEX)
    return nll_sum, n_tokens


class _KeptRowsMLP(torch.nn.Module):
    """The last block's MLP run on the kept positions only; zeros elsewhere.

    The MLP acts on each position alone, and the last block's output at a position the loss
    does not read goes nowhere but to that position's (skipped) head: computing it is wasted.
    Exact for the kept rows, forward and backward.
    """

    def __init__(self, mlp: torch.nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self.mlp, self.keep = mlp, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1] != self.keep.shape:  # not the layout we planned for: run it whole
            return self.mlp(x)
        y = self.mlp(x[self.keep])
        if not isinstance(y, torch.Tensor):  # e.g. a mixture of experts returning router logits too
            return self.mlp(x)
        out = y.new_zeros((*x.shape[:-1], y.shape[-1]))
        out[self.keep] = y
        return out


def _last_block(model: torch.nn.Module) -> torch.nn.Module | None:
    """The last decoder block, found where transformers keeps it (GPT-2 `h`, Llama `layers`)."""
    body = getattr(getattr(model, "module", model), "base_model", None)
    blocks = getattr(body, "h", None) or getattr(body, "layers", None)
    return blocks[-1] if isinstance(blocks, torch.nn.ModuleList) and len(blocks) else None


@contextlib.contextmanager
def _last_mlp_on_kept_rows(model: torch.nn.Module, keep: torch.Tensor | None) -> Iterator[None]:
    """While the forward runs, the last block's MLP computes only the ``keep`` positions.

    With a third to a half of the positions in prompts, that is 5-8% of a small model's
    training step (measured on the embedded model, fp32). Models without a plain ``mlp``
    submodule, or with hooks on it, run unchanged.
    """
    inner = getattr(model, "module", model)
    flag = next((f for f in ("is_activation_checkpointing", "is_gradient_checkpointing")
                 if hasattr(type(inner), f)), None)
    checkpointing = bool(flag and getattr(inner, flag))  # the recompute would run it whole
    block = _last_block(model) if keep is not None and not checkpointing else None
    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, torch.nn.Module) or _hooked(mlp) or bool(keep.all()):
        yield
        return
    block.mlp = _KeptRowsMLP(mlp, keep.to(next(mlp.parameters()).device))
    try:
        yield
    finally:
        block.mlp = mlp


@contextlib.contextmanager
def _model_call(model: torch.nn.Module, batch: Mapping[str, Any],
                keep: torch.Tensor | None = None) -> Iterator[dict[str, Any]]:
    """The model's keyword inputs for `batch`, inside the settings they need: the varlen
    attention for a padding-free packed batch, no cuDNN attention on CUDA, and with ``keep``
    the last block's MLP on the kept positions only."""
    base = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    inputs = {k: batch[k] for k in _MODEL_INPUT_KEYS if k in batch}
    context: contextlib.AbstractContextManager = contextlib.nullcontext()
    if "cu_seq_lens_q" in batch:
        inputs.update({k: batch[k] for k in VARLEN_KEYS if k in batch})
        # the longest example, read once per batch rather than by the attention of every layer
        inputs["max_length_q"] = inputs["max_length_k"] = int(batch["cu_seq_lens_q"].diff().max())
        context = varlen_attention(model)
    if _accepts(base, "use_cache"):
        inputs["use_cache"] = False  # no KV cache to build and throw away
    with context, _attention_backends(batch["input_ids"].device), _last_mlp_on_kept_rows(model, keep):
        yield inputs


def completion_hidden(model: torch.nn.Module, batch: Mapping[str, Any], keep: torch.Tensor) -> torch.Tensor:
    """The final hidden states (what the LM head reads) at the ``keep`` positions, [n_keep, d].

    Runs the model's body (``model.base_model``) without its head; `linear_cross_entropy`
    then applies the head. Only for models `_plain_head` accepts.
    """
    with _model_call(model, batch, keep) as inputs:
        hidden = model.base_model(**inputs).last_hidden_state
    return hidden[keep.to(hidden.device)]


def completion_logits(model: torch.nn.Module, batch: Mapping[str, Any], keep: torch.Tensor) -> torch.Tensor:
    """Logits at the ``keep`` positions only, as a [n_keep, vocab] tensor.

    Recent transformers models take a boolean [B, T] ``logits_to_keep`` and run the LM head
    on those hidden states alone: with a 4,096-token vocabulary that head is a large share
    of a small model's work, and in SFT most positions are prompt or padding. Models that
    cannot do that (older transformers, plain modules) get the full logits, then indexed;
    the first call finds out which and remembers it per model class. A padding-free packed
    batch (``cu_seq_lens_q``) runs under `packing.varlen_attention`.
    """
    base = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    n_keep = int(keep.sum().item())
    known = _HEAD_KEEPS_MASK.get(type(base))
    with _model_call(model, batch, keep) as inputs:
        if known is not False and _accepts(base, "logits_to_keep"):
            try:
                logits = model(**inputs, logits_to_keep=keep.to(batch["input_ids"].device)).logits
            except torch.OutOfMemoryError:
                raise  # a RuntimeError too, but it says nothing about the head: don't remember it
            except (IndexError, RuntimeError, TypeError):
                if known:
                    raise
                logits = None  # this model's head cannot take a boolean mask
            works = logits is not None and logits.dim() == 2 and logits.shape[0] == n_keep
            _HEAD_KEEPS_MASK[type(base)] = works
            if works:
                return logits
        logits = model(**inputs).logits
    if logits.shape[:2] != keep.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match the batch's [B, T] "
                         f"{tuple(keep.shape)}")
    return logits[keep.to(logits.device)]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, *, chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` (-100 ignored),
    without ever holding the [rows, vocab] logits.

    The LM head and the loss are fused: ``chunk`` rows at a time, we compute the logits, their
    log-softmax in float32, the loss, and right away the gradients of the loss with respect to
    ``hidden``, ``weight`` and ``bias`` (softmax - one-hot, times the inputs); backward then only
    scales them by the incoming gradient. That is the idea of Liger Kernel's fused linear
    cross-entropy and of Apple's Cut Cross-Entropy: with a 4,096-token vocabulary and ~1,000
    supervised rows, the unfused head keeps ~60 MB of float32 logits, log-probabilities and
    their gradients alive at the peak; here the peak is one chunk (~4 MB).

    Under autocast the matmuls run in the autocast dtype, exactly as ``F.linear`` would, and
    the softmax accumulates in float32 (float64 stays float64). The result is a 0-dim tensor.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if chunk is None:  # ~1 M logits (4 MB in float32) per chunk, a multiple of 64 rows
        chunk = max(64, (1 << 20) // weight.shape[0] // 64 * 64)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, dtype, chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; see `linear_cross_entropy`."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, dtype: torch.dtype, chunk: int) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.promote_types(dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            dh = torch.empty_like(h) if need_h else None
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
            for s in range(0, h.shape[0], chunk):
                rows, target = h[s:s + chunk], targets[s:s + chunk]
                valid = target != IGNORE_INDEX
                safe = target.clamp(min=0)  # ignored rows: any index, masked below
                logp = torch.log_softmax(F.linear(rows, w, b), dim=-1, dtype=acc)
                total -= (logp.gather(1, safe[:, None]).squeeze(1) * valid).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad = logp.exp_()  # d loss / d logits = softmax - one-hot, 0 on ignored rows
                grad[torch.arange(len(safe), device=grad.device), safe] -= 1
                grad = grad.mul_(valid[:, None]).to(dtype)
                if dh is not None:
                    torch.mm(grad, w, out=dh[s:s + chunk])
                if dw is not None:
                    dw.add_(grad.t() @ rows)
                if db is not None:
                    db.add_(grad.sum(0))
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True):
            grads.append(None if g is None else (g * grad_out).to(dtype))
        return (*grads, None, None, None)


_PLAIN_HEAD: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()
"""Per model: are its logits exactly ``lm_head(base_model(...))`` (see `_plain_head`)?

Per model and not per class: one class can soft-cap its logits or not depending on its config
(Gemma 2's ``final_logit_softcapping``)."""


def _plain_head(model: torch.nn.Module, batch: Mapping[str, Any],
                keep: torch.Tensor) -> torch.nn.Linear | None:
    """The LM head, when the loss may be computed as ``linear_cross_entropy(body output, head)``.

    That holds for GPT-2, Llama, Qwen2 and most causal LMs, but not for a model that rescales
    or soft-caps its logits (Gemma 2, Cohere, Granite) or for a plain module. So each model is
    run both ways once, in float32 on 16 tokens (`_head_is_plain`), and the verdict is
    remembered. Models in half precision (too coarse to tell a rescaled head apart),
    DistributedDataParallel wrappers (whose forward must run to sync gradients) and hooked
    models (`_hooked`) keep the unfused path.
    """
    if getattr(model, "module", None) is not None or not bool(keep.any()):
        return None
    body, get_head = getattr(model, "base_model", None), getattr(model, "get_output_embeddings", None)
    if not isinstance(body, torch.nn.Module) or body is model or get_head is None:
        return None
    head = get_head()
    if not isinstance(head, torch.nn.Linear) or head.weight.device.type == "meta" or _hooked(model, head):
        return None
    verdict = _PLAIN_HEAD.get(model)
    if verdict is None:
        verdict = _PLAIN_HEAD[model] = _head_is_plain(model, head, batch["input_ids"])
    return head if verdict else None


def _hooked(*modules: torch.nn.Module) -> bool:
    """Would skipping these modules' own calls skip someone's code? (hooks, a replaced forward)

    The fused loss reads the head's weight instead of calling the head, and runs the body
    instead of the model: a hook that edits the logits (notebook 05 does), or accelerate's
    device-placement hooks, must then keep the plain path.
    """
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               or "forward" in vars(m) for m in modules)


def _head_is_plain(model: torch.nn.Module, head: torch.nn.Linear, input_ids: torch.Tensor) -> bool:
    """Do the model's own logits equal ``head(base_model(...))`` (eval, fp32)?

    Checked on one short sequence, the batch's first 16 tokens: the question is about the
    model's structure, not about the data, and a full batch would cost two extra forwards.

    The head's weight is scaled by 64 for the comparison (a power of two, so dividing
    restores it bit for bit; through ``.data``, so autograd's version counters do not move):
    a freshly initialised model has logits near 0, where a soft cap such as
    ``30 * tanh(logits / 30)`` is the identity to within 1e-7 and would pass.
    """
    if head.weight.dtype not in (torch.float32, torch.float64):
        return False
    ids = input_ids.flatten()[:16][None]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    keep = torch.ones_like(ids, dtype=torch.bool)
    was_training = model.training
    model.eval()  # no dropout, so both runs see the same network
    try:
        with torch.no_grad(), torch.autocast(batch["input_ids"].device.type, enabled=False):
            head.weight.data.mul_(_PROBE_SCALE)
            try:
                logits = completion_logits(model, batch, keep)
                mine = F.linear(completion_hidden(model, batch, keep), head.weight, head.bias)
            finally:
                head.weight.data.div_(_PROBE_SCALE)
    except Exception:  # e.g. a body that needs more than token ids: keep the plain path
        return False
    finally:
        model.train(was_training)
    return logits.shape == mine.shape and torch.allclose(logits, mine.to(logits.dtype), rtol=1e-5, atol=1e-5)


_PROBE_SCALE = 64.0


KEPT_MULTIPLE = 64
"""The LM head runs on a multiple of this many positions (see `_round_up_kept`)."""


def _round_up_kept(keep: torch.Tensor) -> torch.Tensor:
    """Add unsupervised positions to `keep` until it counts a multiple of KEPT_MULTIPLE.

    oneDNN, PyTorch's CPU matmul library, caches a kernel for every new matrix shape. A
    head that sees a different number of rows at every step filled that cache: resident
    memory grew from 0.8 to 1.5 GB over 60 steps here. With the count rounded up there
    are at most a few dozen shapes, for at most 63 extra rows, whose targets are -100.
    """
    extra = -int(keep.sum().item()) % KEPT_MULTIPLE
    free = (~keep).flatten().nonzero().squeeze(1)[:extra]
    if len(free) == 0:
        return keep
    grown = keep.flatten().clone()
    grown[free] = True
    return grown.view_as(keep)


def _attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, let SDPA choose any kernel but cuDNN's.

    PyTorch 2.11 prefers cuDNN attention on an H100, and cuDNN builds a graph for every new
    input shape: SFT batches change shape at every step, and each SDPA call then took
    11-19 ms instead of microseconds (measured with benchmarks/bench_cuda.py). Flash and
    memory-efficient attention have no per-shape setup.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


_HEAD_KEEPS_MASK: dict[type, bool] = {}
"""Per model class: does ``logits_to_keep=<bool [B, T]>`` return [n_keep, vocab] logits?"""


def _accepts(model: torch.nn.Module, name: str) -> bool:
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


@dataclass(frozen=True)
class EvalResult:
    """Token-weighted loss over a whole split.

    Attributes:
        nll_sum: total NLL over all supervised (completion) tokens, in nats.
        n_tokens: number of supervised tokens that were predicted.
        loss: ``nll_sum / n_tokens``, the mean NLL per completion token.
        perplexity: ``exp(loss)``.
    """

    nll_sum: float
    n_tokens: int
    loss: float
    perplexity: float


def _no_tokens_error() -> ValueError:
    return ValueError(
        "No supervised tokens: every label is -100 (or only position 0 is supervised, which "
        "is never predicted). Loss and perplexity would divide by zero; check the label mask "
        "and that completions were not truncated away."
    )


EVAL_TOKENS_PER_FORWARD = 2048
"""Evaluation runs a padded batch this many positions (rows x width) at a time at most."""


def _per_batch_nll(
    model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device | str | None,
    tokens_per_forward: int | None = EVAL_TOKENS_PER_FORWARD,
) -> list[tuple[float, int]]:
    """(nll_sum, n_tokens) for every batch, in eval mode without gradients.

    The model's previous train/eval mode is restored afterwards, so this can be called
    in the middle of a training loop. A batch of more than ``tokens_per_forward`` positions
    runs a few rows at a time (`_row_slices`; the sums are the same), so the memory of an
    evaluation does not grow with its batch size; GPT-2's Python GELU runs as the fused
    kernel (`models.fused_activations`): the same function with fewer temporaries.
    """
    device = _model_device(model) if device is None else device
    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.inference_mode(), fused_activations(model):
            for batch in batches:
                nll, n = 0.0, 0
                for piece in _row_slices(batch, tokens_per_forward):
                    piece_nll, piece_n = completion_nll(model, _to_device(piece, device))
                    nll, n = nll + float(piece_nll), n + piece_n
                results.append((nll, n))
    finally:
        model.train(was_training)
    return results


def _row_slices(batch: Mapping[str, Any], tokens: int | None) -> Iterator[Mapping[str, Any]]:
    """The batch in slices of whole rows with at most ``tokens`` positions each (at least a row).

    Rows are independent in a padded batch and in block-masked packed rows, so every tensor
    with one entry per row is sliced alike; a padding-free row (``cu_seq_lens_q``) is one row.
    """
    rows, width = batch["input_ids"].shape
    if tokens is None or rows * width <= tokens or "cu_seq_lens_q" in batch:
        yield batch
        return
    step = max(1, tokens // width)
    for r in range(0, rows, step):
        yield {k: v[r:r + step] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
               for k, v in batch.items()}


def evaluate_loss(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str | None = None,
    tokens_per_forward: int | None = EVAL_TOKENS_PER_FORWARD,
) -> EvalResult:
    """Validation loss and perplexity, weighted by supervised tokens.

    perplexity = exp(sum of completion NLL / number of completion tokens) over all
    batches, so a batch with 3 completion tokens weighs 3, not as much as one with 300.

    Args:
        model: any causal LM returning ``.logits`` of shape [B, T, V].
        batches: dicts with ``input_ids``, ``attention_mask``, ``labels`` ([B, T]).
        device: where to run; defaults to the model's device.
        tokens_per_forward: run larger batches a few rows at a time (None: whole batches).
    """
    per_batch = _per_batch_nll(model, batches, device, tokens_per_forward)
    nll_sum = math.fsum(nll for nll, _ in per_batch)
    n_tokens = sum(n for _, n in per_batch)
    if n_tokens == 0:
        raise _no_tokens_error()
    loss = nll_sum / n_tokens
    return EvalResult(nll_sum=nll_sum, n_tokens=n_tokens, loss=loss, perplexity=_safe_exp(loss))


def mean_of_batch_perplexities(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str | None = None,
) -> float:
    """The WRONG way to get validation perplexity: average exp(batch mean NLL) over batches.

    Kept so the notebooks can show why it is wrong: it weighs every batch equally
    whatever its number of completion tokens, and averages after exponentiating (by
    Jensen's inequality that is >= the right value even with equal token counts). Use
    `evaluate_loss` instead.
    """
    per_batch = _per_batch_nll(model, batches, device)
    if not per_batch:
        raise ValueError("Got no batches: cannot average perplexities over zero batches.")
    if any(n == 0 for _, n in per_batch):
        raise _no_tokens_error()
    return math.fsum(_safe_exp(nll / n) for nll, n in per_batch) / len(per_batch)


# --------------------------------------------------------------------------- BLEU / ROUGE


def _check_pairs(predictions: Sequence[str], references: Sequence[Any]) -> None:
    """Generation metrics compare pairs: refuse mismatched or empty lists up front."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, not a string.")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} "
            f"predictions and {len(references)} references (one reference per prediction)."
        )
    if len(predictions) == 0:
        raise ValueError("Got no predictions: need at least one (prediction, reference) pair.")


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], **kwargs: Any) -> float:
    """Corpus BLEU (0-100) with sacrebleu's standard settings, one reference per prediction.

    Equal to ``sacrebleu.corpus_bleu(predictions, [references], **kwargs).score``; note
    sacrebleu wants reference *streams*, hence the extra list. ``kwargs`` (tokenize,
    lowercase, smooth_method, ...) go to sacrebleu. Corpus BLEU is not a mean of
    sentence BLEUs: n-gram counts are summed over the corpus first. A corpus with no
    matching 4-gram scores 0 (e.g. a single 3-word sentence, even if identical).
    """
    import sacrebleu

    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], **kwargs).score)


def rouge(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    rouge_types: Sequence[str] = DEFAULT_ROUGE_TYPES,
    use_stemmer: bool = True,
) -> dict[str, float]:
    """Mean ROUGE F1 per type over (prediction, reference) pairs, each in [0, 1].

    Same scale as HF evaluate's rouge (not x100). Texts are passed to
    ``rouge_score.rouge_scorer.RougeScorer`` unchanged, like evaluate does: rougeLsum
    treats "\\n" as the sentence separator, so join sentences with newlines first if you
    want summary-level LCS (otherwise rougeLsum equals rougeL). We report the exact mean
    of per-pair F1; evaluate's default ``use_aggregator=True`` reports a bootstrap
    median of means instead, which can differ in the last digits.
    """
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    if not rouge_types:
        raise ValueError(f"rouge_types is empty; choose from e.g. {DEFAULT_ROUGE_TYPES}.")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    per_pair = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {t: math.fsum(s[t].fmeasure for s in per_pair) / len(per_pair) for t in rouge_types}


# --------------------------------------------------------------------------- evaluate modules


def metric_module_path(name: str) -> str:
    """Absolute path of a bundled, offline `evaluate` metric script ('bleu' or 'rouge').

    `evaluate.load("bleu")` needs the Hub; these local scripts do not.
    """
    if name not in METRIC_MODULE_NAMES:
        raise ValueError(f"Unknown metric module {name!r}; choose one of {METRIC_MODULE_NAMES}.")
    return str(_METRIC_MODULES_DIR / f"{name}.py")


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load`` on a bundled metric script, so it works offline.

    ``kwargs`` go to ``evaluate.load``: ``cache_dir`` only moves the temporary
    predictions/references files, ``keep_in_memory=True`` avoids them. The script itself
    is always copied under ``HF_MODULES_CACHE`` (``~/.cache/huggingface/modules``),
    which evaluate reads from the environment once, at import time.
    """
    import evaluate

    return evaluate.load(metric_module_path(name), **kwargs)
