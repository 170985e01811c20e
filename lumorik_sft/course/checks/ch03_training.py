"""Exercises of ``03_training_loop.ipynb``: ``masked_nll_sum`` and ``train_step``.

Each exercise's functions (cases, reference, run, compare) come first, then
``CHAPTER.register(...)`` declares it; see :mod:`lumorik_sft.course.checks.framework`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from lumorik_sft.course.checks.framework import Chapter, NotData, close

CHAPTER = Chapter("03_training_loop.ipynb")


# ---------------------------------------------------------------------------------- masked NLL sum


def _logits_case(rng: random.Random) -> dict[str, Any]:
    from lumorik_sft.encoding import IGNORE_INDEX

    b, t, v = rng.randint(1, 3), rng.randint(3, 7), rng.randint(5, 11)
    logits = [[[round(rng.gauss(0, 2), 4) for _ in range(v)] for _ in range(t)] for _ in range(b)]
    labels = []
    for _ in range(b):
        n_prompt = rng.randint(0, t - 2)
        n_real = rng.randint(n_prompt + 1, t)
        labels.append(
            [IGNORE_INDEX] * n_prompt
            + [rng.randrange(v) for _ in range(n_real - n_prompt)]
            + [IGNORE_INDEX] * (t - n_real)
        )
    return {"logits": logits, "labels": labels}


def _nll_cases(seed: int) -> list[dict[str, Any]]:
    cases = [_logits_case(random.Random(f"nll/{seed}/{k}")) for k in range(6)]
    cases[0]["labels"][0][0] = 1  # a supervised label at position 0: never predicted, never counted
    return cases


class _FixedLogits:
    """A stand-in 'model' whose forward returns given logits, to call metrics.completion_nll."""

    def __init__(self, logits: Any) -> None:
        self.logits = logits

    def __call__(self, **_: Any) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits)


def _nll_reference(case: dict[str, Any]) -> Any:
    import torch

    from lumorik_sft.metrics import completion_nll

    logits, labels = torch.tensor(case["logits"]), torch.tensor(case["labels"])
    nll, n = completion_nll(_FixedLogits(logits), {"input_ids": labels.clamp(min=0), "labels": labels})
    return [float(nll), int(n)]


def _run_nll(fn: Callable, case: dict[str, Any]) -> Any:
    import torch

    out = fn(torch.tensor(case["logits"]), torch.tensor(case["labels"]))
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise NotData(f"return a pair (nll_sum, n_tokens), got {type(out).__name__}")
    return [float(out[0]), int(out[1])]


def _nll_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    from lumorik_sft.encoding import IGNORE_INDEX

    (want_nll, want_n), (nll, n) = expected, got
    labels = case["labels"]
    if n != want_n:
        unshifted = sum(x != IGNORE_INDEX for row in labels for x in row)
        all_positions = len(labels) * (len(labels[0]) - 1)
        if n == unshifted:
            return (
                f"n_tokens is {n}, expected {want_n}: logits at position t predict token t+1, so count "
                "labels[:, 1:] != -100 (the label at position 0 is never predicted)"
            )
        if n == all_positions:
            return f"n_tokens is {n}, expected {want_n}: count only labels that are not -100"
        return f"n_tokens is {n}, expected {want_n} (supervised labels after the shift)"
    if close(nll, want_nll, rel=1e-4):
        return None
    if want_n and close(nll, want_nll / want_n, rel=1e-4):
        return "return the SUM of the token NLLs, not the mean (reduction='sum'); the mean comes later"
    return (
        f"nll_sum is {nll:.5f}, expected {want_nll:.5f}: compare logits[:, :-1] with labels[:, 1:] "
        "using cross-entropy that ignores -100"
    )


CHAPTER.register(
    name="masked_nll_sum",
    symbol="masked_nll_sum",
    points=2,
    make_cases=_nll_cases,
    reference=_nll_reference,
    run=_run_nll,
    compare=_nll_compare,
    # fused_loss.completion_nll: the same numbers, so the same answer
    forbidden=("lumorik_sft.metrics:completion_nll", "lumorik_sft.fused_loss:completion_nll"),
    hint="shift: logits[:, :-1] predict labels[:, 1:]; "
    "cross_entropy(..., reduction='sum', ignore_index=-100)",
    wrong_variants=("no shift", "mean instead of sum", "count every position"),
)


# -------------------------------------------------------------------------------------- train step

_TINY = {
    "vocab_size": 40,
    "n_positions": 32,
    "n_embd": 16,
    "n_layer": 1,
    "n_head": 2,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def _step_cases(seed: int) -> list[dict[str, Any]]:
    from lumorik_sft.encoding import IGNORE_INDEX

    cases = []
    for k in range(3):
        rng = random.Random(f"step/{seed}/{k}")
        batches = []
        for size in [1, 2] if k == 0 else [2, 1, 2]:
            rows = []
            for _ in range(size):
                # very different completion lengths, so per-micro-batch means weigh tokens wrongly
                n = rng.randint(6, 12)
                n_sup = rng.choice([1, 2, n - 2])
                ids = [rng.randrange(2, _TINY["vocab_size"]) for _ in range(n)]
                rows.append((ids, [IGNORE_INDEX] * (n - n_sup) + ids[n - n_sup :]))
            width = max(len(i) for i, _ in rows)
            batches.append(
                {
                    "input_ids": [i + [1] * (width - len(i)) for i, _ in rows],
                    "attention_mask": [[1] * len(i) + [0] * (width - len(i)) for i, _ in rows],
                    "labels": [lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows],
                }
            )
        cases.append(
            {"model_seed": rng.randrange(10_000), "lr": 0.5, "batches": batches, "stale_grad": k > 0}
        )
    return cases


def _tiny_setup(case: dict[str, Any]) -> tuple[Any, Any, list[dict[str, Any]]]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**_TINY, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(case["model_seed"])
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=case["lr"])
    if case["stale_grad"]:  # gradients left over from an earlier step
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01)
    batches = [{k: torch.tensor(v) for k, v in b.items()} for b in case["batches"]]
    return model, optimizer, batches


def _param_digest(model: Any, before: Any) -> dict[str, Any]:
    import torch

    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    delta = (after - before).double()
    idx = torch.linspace(0, delta.numel() - 1, 48).long()
    return {"norm": float(delta.norm()), "sample": delta[idx].tolist()}


def _step_reference(case: dict[str, Any]) -> Any:
    import torch

    from lumorik_sft.training import accumulate_gradients

    model, optimizer, batches = _tiny_setup(case)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    optimizer.zero_grad()
    step = accumulate_gradients(model, batches)
    optimizer.step()
    return {"loss": step.loss, "n_tokens": step.n_tokens, **_param_digest(model, before)}


def _run_step(fn: Callable, case: dict[str, Any]) -> Any:
    import torch

    model, optimizer, batches = _tiny_setup(case)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    loss = fn(model, optimizer, batches)
    return {"loss": float(loss), **_param_digest(model, before)}


def _step_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    n = expected["n_tokens"]
    loss_ok = close(got["loss"], expected["loss"], rel=1e-3)
    update_ok = close(got["norm"], expected["norm"], rel=2e-3, abs_=1e-7) and all(
        close(a, b, rel=5e-3, abs_=1e-6) for a, b in zip(got["sample"], expected["sample"], strict=True)
    )
    if loss_ok and update_ok:
        return None
    if not loss_ok and close(got["loss"], expected["loss"] * n, rel=1e-3):
        return f"return the mean loss over the step's {n} supervised tokens (sum NLL / N), not the sum"
    if not update_ok:
        ratio = got["norm"] / expected["norm"] if expected["norm"] else float("inf")
        if abs(ratio - n) / n < 0.05:
            return (
                f"the update is {n}x too large: backprop each micro-batch's summed NLL divided by N "
                f"= {n}, the supervised tokens of ALL micro-batches"
            )
        if case["stale_grad"] and got["norm"] > expected["norm"] * 1.05:
            return (
                "the update includes stale gradients: call optimizer.zero_grad() before accumulating "
                f"(update norm {got['norm']:.4g}, expected {expected['norm']:.4g})"
            )
        return (
            "the parameter update differs from one big batch's: backprop sum_nll / N_total for each "
            "micro-batch, N_total counted over ALL micro-batches first (a mean of per-micro-batch "
            f"means overweights short completions); update norm {got['norm']:.4g}, "
            f"expected {expected['norm']:.4g}"
        )
    return f"loss is {got['loss']:.5f}, expected {expected['loss']:.5f} (sum NLL / N over the whole step)"


CHAPTER.register(
    name="train_step",
    symbol="train_step",
    points=3,
    make_cases=_step_cases,
    reference=_step_reference,
    run=_run_step,
    compare=_step_compare,
    forbidden=("lumorik_sft.training:accumulate_gradients",),
    hint="zero_grad; N = supervised tokens of ALL micro-batches; backward(sum_nll / N) for each; step",
    wrong_variants=("sum instead of mean loss", "mean of per-micro-batch means", "no zero_grad"),
)
