"""Exercises of ``10_lora.ipynb``: ``init_lora``, ``lora_forward`` and ``merge_weight``.

The student writes LoRA for one linear layer as three plain functions of tensors: the starting
``A`` and ``B``, the forward ``base(x) + (alpha / r) * B (A x)``, and the merged weight. The hidden
cases are seeded random shapes (batch, sequence, in and out features, rank, alpha), with and
without a bias, in both weight layouts: ``nn.Linear`` (weight ``[out, in]``) and GPT-2's
``Conv1D`` (weight ``[in, out]``, ``fan_in_fan_out=True``). The reference is
`lumorik_sft.lora.LoraLinear` wrapped around such a layer, with the case's ``A`` and ``B``; it is
disabled while a student's function runs. On a wrong answer the feedback names the part that is
wrong: the scale (missing, ``r / alpha``, ...), the zero start of ``B``, the transposition for
Conv1D, the bias, or the base layer left out.

Each exercise's functions (cases, reference, run, compare) come first, then
``CHAPTER.register(...)`` declares it; see :mod:`lumorik_sft.course.checks.framework`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from lumorik_sft.course.checks.framework import Chapter, short, to_data

CHAPTER = Chapter("10_lora.ipynb")

# The package's LoRA: the class (every method, __init__ included) and the functions built on it.
_FORBIDDEN = (
    "lumorik_sft.lora:LoraLinear",
    "lumorik_sft.lora:add_lora",
    "lumorik_sft.lora:merge_lora",
    "lumorik_sft.lora:merged_copy",
)

_SHAPES = {
    "forward": "x is [batch, seq, in], A is [r, in] and B is [out, r]; the weight is [out, in] for nn.Linear "
    "and [in, out] for Conv1D (fan_in_fan_out=True)",
    "merge": "A is [r, in] and B is [out, r], so B @ A is [out, in]; the weight is [out, in] for nn.Linear "
    "and [in, out] for Conv1D (fan_in_fan_out=True)",
}


# ----------------------------------------------------------------------------------------- cases


def layer_cases(seed: int) -> list[dict[str, Any]]:
    """Eight layers: nn.Linear and Conv1D alternately, one square of each, alpha never equal to r.

    Square layers (in == out) are there because a forgotten transposition raises no shape error
    on them: only the values can tell.
    """
    cases = []
    for k in range(8):
        rng = random.Random(f"lora/{seed}/{k}")
        in_features = rng.randint(2, 12)
        out_features = (
            in_features if k in (2, 5) else rng.choice([n for n in range(2, 13) if n != in_features])
        )
        r = rng.randint(2, 4)  # r > 1 and alpha != r: alpha / r, alpha, 1 / r, r / alpha and 1 all differ
        alpha = rng.choice([a for a in (1, 2, 4, 8, 16, 32) if a != r])
        cases.append(
            {
                "batch": rng.randint(1, 3),
                "seq": rng.randint(1, 5),
                "in_features": in_features,
                "out_features": out_features,
                "r": r,
                "alpha": alpha,
                "fan_in_fan_out": k % 2 == 1,
                "bias": k % 4 != 3,
                "tensor_seed": rng.randrange(2**31),
            }
        )
    return cases


def tensors(case: dict[str, Any]) -> dict[str, Any]:
    """The case's x, weight (in its layout), bias (or None), A and B, float64, from its seed.

    B is random, as after some training: a zero B would hide every mistake in the LoRA part.
    """
    import torch

    g = torch.Generator().manual_seed(case["tensor_seed"])
    i, o, r = case["in_features"], case["out_features"], case["r"]
    f64 = torch.float64
    weight = torch.randn(o, i, generator=g, dtype=f64) / math.sqrt(i)
    return {
        "x": torch.randn(case["batch"], case["seq"], i, generator=g, dtype=f64),
        "weight": weight.T.contiguous() if case["fan_in_fan_out"] else weight,
        "bias": torch.randn(o, generator=g, dtype=f64) if case["bias"] else None,
        "A": torch.randn(r, i, generator=g, dtype=f64) / math.sqrt(i),
        "B": torch.randn(o, r, generator=g, dtype=f64),
    }


def reference_layer(case: dict[str, Any], t: dict[str, Any]):
    """`lumorik_sft.lora.LoraLinear` around an nn.Linear or Conv1D holding the case's tensors."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from lumorik_sft.lora import LoraLinear

    i, o = case["in_features"], case["out_features"]
    with torch.random.fork_rng(devices=[]):  # the layers' own init must not move a notebook's RNG
        if case["fan_in_fan_out"]:
            base = Conv1D(o, i).to(torch.float64)  # always has a bias: zeros stand for none
        else:
            base = nn.Linear(i, o, bias=case["bias"], dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(t["weight"])
        if base.bias is not None:
            base.bias.copy_(t["bias"] if case["bias"] else torch.zeros(o, dtype=torch.float64))
    layer = LoraLinear(base, case["r"], case["alpha"], 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_A.weight.copy_(t["A"])
        layer.lora_B.weight.copy_(t["B"])
    return layer.eval()


def _call(fn: Callable, *args: Any, shapes: str = "", **kwargs: Any) -> Any:
    """Call the student's function; a shape error gets `shapes` (what it was given) added."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:
        if shapes and ("shape" in str(err) or "size" in str(err)):
            raise RuntimeError(f"{err} -- {shapes}") from None
        raise


def _layer_shapes(case: dict[str, Any], what: str) -> str:
    """The shapes hint for a shape error, naming this case's layer."""
    i, o = case["in_features"], case["out_features"]
    layer = (
        f"Conv1D, weight [in, out] = [{i}, {o}]"
        if case["fan_in_fan_out"]
        else f"nn.Linear, weight [out, in] = [{o}, {i}]"
    )
    return f"{_SHAPES[what]} (this layer: {layer}, r = {case['r']})"


def _tensor(got: Any, what: str):
    import torch

    try:
        out = torch.tensor(got, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"return {what} as one tensor, got {short(got)}") from None
    return out


def _scale_words(c: float, alpha: float, r: int, term: str) -> str:
    """What a LoRA part (`term`, e.g. "B(A x)") scaled by `c` instead of alpha / r most likely did."""
    for value, words in (
        (1.0, f"not scaled at all: multiply {term} by alpha / r"),
        (r / alpha, "scaled by r / alpha, the inverse: the scale is alpha / r"),
        (alpha, "scaled by alpha: divide by r too (alpha / r)"),
        (1 / r, "scaled by 1 / r: multiply by alpha too (alpha / r)"),
        (-alpha / r, "added with the wrong sign"),
    ):
        if math.isclose(c, value, rel_tol=1e-6):
            return words
    return f"scaled by {c:.4g} instead of alpha / r = {alpha}/{r} = {alpha / r:.4g}"


def _fit(d: Any, part: Any) -> float | None:
    """The c with d == c * part, when there is one (least squares, then a residual test)."""
    import torch

    norm = float((part * part).sum())
    if norm == 0:
        return None
    c = float((d * part).sum()) / norm
    return c if torch.allclose(d, c * part, rtol=1e-6, atol=1e-8) else None


# ------------------------------------------------------------------------------------- init_lora


def init_cases(seed: int) -> list[dict[str, Any]]:
    """Six layers wide enough (16 to 64 inputs) to tell a small A from torch.randn's std of 1."""
    cases = []
    for k in range(6):
        rng = random.Random(f"lora-init/{seed}/{k}")
        cases.append(
            {
                "in_features": rng.randint(16, 64),
                "out_features": rng.randint(16, 64),
                "r": rng.randint(2, 8),
                "generator_seed": rng.randrange(2**31),
            }
        )
    return cases


def _init_summary(A: Any, B: Any) -> dict[str, Any]:
    import torch

    return {
        "A_shape": list(A.shape),
        "B_shape": list(B.shape),
        "A_std": float(A.double().std()) if A.numel() > 1 else 0.0,
        "A_zero": bool((A == 0).all()),
        "A_finite": bool(torch.isfinite(A).all()),
        "B_absmax": float(B.double().abs().max()) if B.numel() else 0.0,
    }


def _fresh_lora(case: dict[str, Any], generator_seed: int) -> tuple[Any, Any]:
    """The reference's starting A and B for the case's layer (an nn.Linear, weights left unset)."""
    import torch
    from torch import nn

    from lumorik_sft.lora import LoraLinear

    base = nn.utils.skip_init(nn.Linear, case["in_features"], case["out_features"])
    r = case["r"]
    layer = LoraLinear(base, r, 2 * r, 0.0, torch.Generator().manual_seed(generator_seed))
    return layer.lora_A.weight.detach(), layer.lora_B.weight.detach()


def _init_reference(case: dict[str, Any]) -> Any:
    import torch

    A, B = _fresh_lora(case, case["generator_seed"])
    out = _init_summary(A, B)
    out["bound"] = 1 / math.sqrt(case["in_features"])
    out["same_seed_same_A"] = True
    out["other_seed_other_A"] = not torch.equal(A, _fresh_lora(case, case["generator_seed"] + 1)[0])
    return out


def _init_run(fn: Callable, case: dict[str, Any]) -> Any:
    import torch

    i, o, r = case["in_features"], case["out_features"], case["r"]
    seed = case["generator_seed"]
    results = []
    for s in (seed, seed, seed + 1):
        got = _call(fn, i, o, r, torch.Generator().manual_seed(s))
        if not (isinstance(got, (tuple, list)) and len(got) == 2 and all(torch.is_tensor(t) for t in got)):
            raise TypeError(f"return (A, B), two tensors, got {short(got)}")
        results.append([t.detach() for t in got])
    out = _init_summary(*results[0])
    out["same_seed_same_A"] = results[0][0].shape == results[1][0].shape and torch.equal(
        results[0][0], results[1][0]
    )
    out["other_seed_other_A"] = results[0][0].shape != results[2][0].shape or not torch.equal(
        results[0][0], results[2][0]
    )
    return to_data(out)


def _init_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    i, o, r = case["in_features"], case["out_features"], case["r"]
    if got["A_shape"] != expected["A_shape"]:
        turned = " (transposed)" if got["A_shape"] == expected["A_shape"][::-1] else ""
        return (
            f"A is {got['A_shape']}{turned}, expected [r, in] = {expected['A_shape']}: "
            f"A maps the {i} inputs to r = {r}"
        )
    if got["B_shape"] != expected["B_shape"]:
        turned = " (transposed)" if got["B_shape"] == expected["B_shape"][::-1] else ""
        return (
            f"B is {got['B_shape']}{turned}, expected [out, r] = {expected['B_shape']}: "
            f"B maps r = {r} to the {o} outputs"
        )
    if got["B_absmax"] != 0:
        return (
            f"B must start at zeros (yours has values up to {got['B_absmax']:.3g}): with B = 0 a fresh "
            "LoRA layer's output equals the frozen layer's, so fine-tuning starts from the model as it was"
        )
    if got["A_zero"]:
        return (
            "A must be small random values, not zeros: with A = 0 and B = 0 both get zero gradients "
            "and the update never leaves 0"
        )
    if not got["A_finite"]:
        return "A holds NaN or infinite values"
    std, bound = got["A_std"], expected["bound"]
    if not 0.25 * bound <= std <= 1.5 * bound:
        return (
            f"A's values have a standard deviation of {std:.3g}; expected about 1/sqrt(in) = {bound:.3g} "
            f"or less (uniform in +-1/sqrt(in) = +-{bound:.3g}, as nn.Linear and PEFT start): torch.randn "
            "alone is far too large for a wide layer"
        )
    if not got["same_seed_same_A"]:
        return (
            "two calls with generators of the same seed gave different A: draw with the generator you "
            "are given (generator=generator), not the global random state"
        )
    if not got["other_seed_other_A"]:
        return "generators of different seeds gave the same A: draw A at random with the generator"
    return None


CHAPTER.register(
    name="init_lora",
    symbol="init_lora",
    points=1,
    make_cases=init_cases,
    reference=_init_reference,
    run=_init_run,
    compare=_init_compare,
    forbidden=_FORBIDDEN,
    hint="A: [r, in], uniform in +-1/sqrt(in) drawn with the generator; B: [out, r], zeros",
    wrong_variants=("B random", "A zeros", "A from torch.randn", "global random state", "A transposed"),
)


# ---------------------------------------------------------------------------------- lora_forward


def _forward_reference(case: dict[str, Any]) -> Any:
    import torch

    t = tensors(case)
    with torch.no_grad():
        return to_data(reference_layer(case, t)(t["x"]))


def _forward_run(fn: Callable, case: dict[str, Any]) -> Any:
    t = tensors(case)
    out = _call(
        fn,
        t["x"],
        t["weight"],
        t["bias"],
        t["A"],
        t["B"],
        case["alpha"],
        case["r"],
        fan_in_fan_out=case["fan_in_fan_out"],
        shapes=_layer_shapes(case, "forward"),
    )
    return to_data(out.detach() if hasattr(out, "detach") else out)


def _forward_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    import torch

    want, out = torch.tensor(expected, dtype=torch.float64), _tensor(got, "the layer's output")
    b, s, i, o = case["batch"], case["seq"], case["in_features"], case["out_features"]
    if list(out.shape) != list(want.shape):
        return (
            f"output of shape {list(out.shape)} for x of shape [{b}, {s}, {i}]: "
            f"expected [batch, seq, out] = {list(want.shape)}"
        )
    if torch.allclose(out, want, rtol=1e-6, atol=1e-8):
        return None
    t = tensors(case)
    x, weight, A, B = t["x"], t["weight"], t["A"], t["B"]
    bias = t["bias"] if t["bias"] is not None else torch.zeros(o, dtype=torch.float64)
    W = weight.T if case["fan_in_fan_out"] else weight  # [out, in] in both layouts
    base, part = x @ W.T + bias, x @ A.T @ B.T
    scale = case["alpha"] / case["r"]
    layout = "Conv1D (fan_in_fan_out=True)" if case["fan_in_fan_out"] else "nn.Linear"
    if torch.allclose(out, base, rtol=1e-6, atol=1e-8):
        return "your output is the frozen layer's alone: add the LoRA part B(A x) * alpha / r"
    if torch.allclose(out, part * scale, rtol=1e-6, atol=1e-8):
        return "your output is the LoRA part alone: add the frozen layer's output (x W^T + bias) to it"
    if case["bias"] and torch.allclose(out, want - bias, rtol=1e-6, atol=1e-8):
        return "the bias is missing: the frozen layer's output is x W^T + bias (bias is None for some layers)"
    if i == o and torch.allclose(out - want, x @ W - x @ W.T, rtol=1e-6, atol=1e-8):
        right = "x @ weight" if case["fan_in_fan_out"] else "x @ weight.T"
        return (
            f"the frozen part uses the weight in the wrong layout: for {layout} the weight is "
            f"{'[in, out]' if case['fan_in_fan_out'] else '[out, in]'}, so the base output is {right} + bias"
        )
    c = _fit(out - base, part)
    if c is not None:
        words = _scale_words(c, case["alpha"], case["r"], "B(A x)")
        return f"the frozen part is right but the LoRA part B(A x) is {words}"
    diff = float((out - want).abs().max())
    return (
        f"wrong values for {layout} (max difference {diff:.3g}), and not one of the usual mistakes: "
        "the output is x W^T + bias + (x @ A.T @ B.T) * alpha / r, with W = weight.T for Conv1D"
    )


CHAPTER.register(
    name="lora_forward",
    symbol="lora_forward",
    points=2,
    make_cases=layer_cases,
    reference=_forward_reference,
    run=_forward_run,
    compare=_forward_compare,
    forbidden=_FORBIDDEN,
    hint="x @ W.T + bias (W = weight.T for Conv1D) plus (x @ A.T @ B.T) * alpha / r",
    wrong_variants=(
        "no scaling",
        "r / alpha",
        "Conv1D weight not transposed",
        "bias left out",
        "LoRA part left out",
    ),
)


# ---------------------------------------------------------------------------------- merge_weight


def _merge_reference(case: dict[str, Any]) -> Any:
    import torch

    t = tensors(case)
    layer = reference_layer(case, t)
    with torch.no_grad():
        unmerged = layer(t["x"])
        layer.merge()
        merged = layer(t["x"])
    assert torch.allclose(merged, unmerged, rtol=1e-9, atol=1e-10), "the reference's merge changed the output"
    return {"weight": to_data(layer.base_layer.weight.detach()), "input_changed": False}


def _merge_run(fn: Callable, case: dict[str, Any]) -> Any:
    t = tensors(case)
    weight = t["weight"].clone()
    out = _call(
        fn,
        weight,
        t["A"],
        t["B"],
        case["alpha"],
        case["r"],
        fan_in_fan_out=case["fan_in_fan_out"],
        shapes=_layer_shapes(case, "merge"),
    )
    out = out.detach() if hasattr(out, "detach") else out
    return {"weight": to_data(out), "input_changed": not bool((weight == t["weight"]).all())}


def _merge_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    import torch

    want, out = (
        torch.tensor(expected["weight"], dtype=torch.float64),
        _tensor(got["weight"], "the merged weight"),
    )
    t = tensors(case)
    weight, scale = t["weight"], case["alpha"] / case["r"]
    delta = t["B"] @ t["A"]  # [out, in], unscaled
    conv = case["fan_in_fan_out"]
    layout = delta.T if conv else delta  # in the weight's layout
    if list(out.shape) != list(want.shape):
        if list(out.shape) == list(want.shape)[::-1]:
            return (
                f"merged weight of shape {list(out.shape)}, the transpose of the layer's {list(want.shape)}: "
                + (
                    "a Conv1D (fan_in_fan_out=True) stores its weight [in, out], so add (B @ A).T"
                    if conv
                    else "an nn.Linear stores its weight [out, in], like B @ A: do not transpose it"
                )
            )
        return f"merged weight of shape {list(out.shape)}: it must keep the layer's shape {list(want.shape)}"
    close = lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-8)  # noqa: E731
    if close(out, want):
        if got["input_changed"]:
            return (
                "the merged weight is right, but you changed the weight you were given in place: return "
                "a new tensor (weight + delta), so the frozen weight stays as it was"
            )
        return None
    if close(out, weight):
        return "your merged weight is the frozen weight unchanged: add B @ A * alpha / r to it"
    if close(out, layout * scale):
        return "you returned the update alone: the merged weight is weight + B @ A * alpha / r"
    if conv and delta.shape == weight.shape and close(out, weight + delta * scale):
        return (
            "you added B @ A without transposing it: a Conv1D (fan_in_fan_out=True) stores its weight "
            "[in, out], so add (B @ A).T * alpha / r"
        )
    if not conv and delta.shape[0] == delta.shape[1] and close(out, weight + delta.T * scale):
        return "you transposed the update for an nn.Linear: its weight is [out, in], like B @ A"
    c = _fit(out - weight, layout)
    if c is not None:
        return f"the update added to the weight is {_scale_words(c, case['alpha'], case['r'], 'B @ A')}"
    diff = float((out - want).abs().max())
    return (
        f"wrong merged weight (max difference {diff:.3g}): a forward through it must equal the unmerged "
        "LoRA layer's, which takes weight + B @ A * alpha / r (transposed for Conv1D)"
    )


CHAPTER.register(
    name="merge_weight",
    symbol="merge_weight",
    points=1,
    make_cases=layer_cases,
    reference=_merge_reference,
    run=_merge_run,
    compare=_merge_compare,
    forbidden=_FORBIDDEN,
    hint="weight + (B @ A) * alpha / r, with (B @ A).T for Conv1D (fan_in_fan_out=True); a new tensor",
    wrong_variants=(
        "Conv1D: delta not transposed",
        "no scaling",
        "changed in place",
        "delta alone",
    ),
)
