"""Exercises of ``02_tokenization.ipynb``: ``encode_example`` and ``collate``.

Each exercise's functions (cases, reference, run, compare) come first, then
``CHAPTER.register(...)`` declares it; see :mod:`lumorik_sft.course.checks.framework`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from lumorik_sft.course.checks.framework import Chapter, NotData, sentence, short, to_data, toy_tokenizer

CHAPTER = Chapter("02_tokenization.ipynb")


# ---------------------------------------------------------------------------------- encode example


def _encode_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(6):
        rng = random.Random(f"encode/{seed}/{k}")
        prompt = sentence(rng, 3, 8).capitalize() + "?"
        completion = sentence(rng, 2, 7) + "."
        max_length = 64 if k < 4 else rng.randint(4, 8)  # the last two cases must be truncated
        cases.append(
            {"tokenizer": "toy", "prompt": prompt, "completion": completion, "max_length": max_length}
        )
    return cases


def _encode_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.encoding import encode_example

    return to_data(
        encode_example(toy_tokenizer(), case["prompt"], case["completion"], max_length=case["max_length"])
    )


def _run_encode(fn: Callable, case: dict[str, Any]) -> Any:
    return to_data(fn(toy_tokenizer(), case["prompt"], case["completion"], max_length=case["max_length"]))


def _int_list(x: Any, what: str) -> list[int]:
    if not isinstance(x, list) or not all(isinstance(v, int) for v in x):
        raise TypeError(f"{what} must be a list of ints (or a 1-D tensor), got {short(x)}")
    return x


def _encode_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    from lumorik_sft.encoding import IGNORE_INDEX

    if not isinstance(got, dict):
        return f"return a dict with input_ids, attention_mask and labels, got {short(got)}"
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in got:
            return f"the result has no {key!r} key"
    ids, mask, labels = (_int_list(got[k], k) for k in ("input_ids", "attention_mask", "labels"))
    want_ids, want_labels = expected["input_ids"], expected["labels"]
    eos = toy_tokenizer().eos_token_id
    n_prompt = sum(label == IGNORE_INDEX for label in want_labels)
    truncated = case["max_length"] < 64
    if ids != want_ids:
        if ids == want_ids[:-1] or (
            ids and ids[-1] != eos and want_ids[-1] == eos and len(ids) < len(want_ids)
        ):
            return (
                f"input_ids must end with the EOS token (id {eos}): "
                "append tokenizer.eos_token_id to the completion"
            )
        if len(ids) != len(want_ids):
            extra = (
                (
                    f" (max_length={case['max_length']}: cut the prompt from the left first, keeping at "
                    "least 1 prompt token, then the completion from the right)"
                )
                if truncated
                else ""
            )
            return f"input_ids has {len(ids)} tokens, expected {len(want_ids)}{extra}"
        pos = next(i for i, (a, b) in enumerate(zip(ids, want_ids, strict=True)) if a != b)
        return (
            f"input_ids differ at position {pos}: {ids[pos]} instead of {want_ids[pos]} "
            "(prompt + '\\n' encoded with the tokenizer, then the completion, then EOS)"
        )
    if mask != [1] * len(want_ids):
        return "attention_mask must be 1 for every token of a single (unpadded) example"
    if len(labels) != len(want_labels):
        return f"labels has {len(labels)} entries but input_ids has {len(ids)}: they must align"
    for i, (a, b) in enumerate(zip(labels, want_labels, strict=True)):
        if a == b:
            continue
        if i < n_prompt:
            return f"prompt tokens must have label -100; position {i} has {a}"
        if a == IGNORE_INDEX:
            return (
                f"completion tokens must be supervised: position {i} has label -100, expected {b} "
                f"(the completion starts at position {n_prompt})"
            )
        return f"labels at position {i} is {a}, expected {b}: a completion token's label is its own id"
    return None


CHAPTER.register(
    name="encode_example",
    symbol="encode_example",
    points=3,
    make_cases=_encode_cases,
    reference=_encode_reference,
    run=_run_encode,
    compare=_encode_compare,
    forbidden=(
        "lumorik_sft.encoding:encode_example",
        "lumorik_sft.encoding:truncate_pair",
        "lumorik_sft.encoding:encode_records",
    ),
    hint="labels = [-100] * len(prompt_ids) + completion_ids, where completion_ids end with EOS",
    wrong_variants=(
        "off-by-one mask",
        "missing EOS",
        "labels = input_ids (chapter erratum)",
        "no truncation",
    ),
)


# ---------------------------------------------------------------------------------------- collator


def _collate_cases(seed: int) -> list[dict[str, Any]]:
    from lumorik_sft.encoding import IGNORE_INDEX

    cases = []
    for k in range(6):
        rng = random.Random(f"collate/{seed}/{k}")
        features = []
        for _ in range(rng.randint(2, 4)):
            n = rng.randint(2, 9)
            n_prompt = rng.randint(1, n - 1)
            ids = [rng.randrange(2, 60) for _ in range(n)]
            features.append(
                {
                    "input_ids": ids,
                    "attention_mask": [1] * n,
                    "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:],
                }
            )
        if all(len(f["input_ids"]) == len(features[0]["input_ids"]) for f in features):
            f = features[0]  # make the rows ragged so that padding is needed
            f["input_ids"].append(7)
            f["attention_mask"].append(1)
            f["labels"].append(7)
        cases.append({"features": features, "pad_token_id": rng.choice([1, 0, 3])})
    return cases


def _collate_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.encoding import SFTCollator

    batch = SFTCollator(case["pad_token_id"])(case["features"])
    return {"data": to_data(batch), "types": {k: str(v.dtype) for k, v in batch.items()}}


def _run_collate(fn: Callable, case: dict[str, Any]) -> Any:
    import torch

    batch = fn(case["features"], case["pad_token_id"])
    if not isinstance(batch, Mapping):
        raise NotData(f"return a dict of tensors, got {type(batch).__name__}")
    types = {k: (str(v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__) for k, v in batch.items()}
    return {"data": to_data(batch), "types": types}


def _collate_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    from lumorik_sft.encoding import IGNORE_INDEX

    want, have = expected["data"], got["data"]
    lengths = [len(f["input_ids"]) for f in case["features"]]
    width = max(lengths)
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in have:
            return f"the batch has no {key!r} key"
        if got["types"][key] != "torch.int64":
            return f"batch[{key!r}] must be a torch.long tensor, got {got['types'][key]}"
        rows = have[key]
        if len(rows) != len(want[key]):
            return f"batch[{key!r}] has {len(rows)} rows, expected {len(want[key])} (one per example)"
        for r, row in enumerate(rows):
            if len(row) != width:
                return (
                    f"batch[{key!r}] row {r} has {len(row)} columns; pad every row to the longest "
                    f"in the batch ({width}), not to a fixed length"
                )
    pad_value = {"input_ids": case["pad_token_id"], "attention_mask": 0, "labels": IGNORE_INDEX}
    for key in ("input_ids", "attention_mask", "labels"):
        for r, (row, want_row) in enumerate(zip(have[key], want[key], strict=True)):
            for c, (a, b) in enumerate(zip(row, want_row, strict=True)):
                if a == b:
                    continue
                if c >= lengths[r]:
                    if key == "labels" and a == case["pad_token_id"]:
                        return (
                            f"padding must have label -100 (not the pad id) so the loss ignores it; "
                            f"labels row {r} column {c} has {a}"
                        )
                    return (
                        f"padding of {key} must be {pad_value[key]}; row {r} column {c} has {a} "
                        "(pad on the right: the example's tokens first, then padding)"
                    )
                return (
                    f"{key} row {r} column {c} is {a}, expected {b}: copy the example's values "
                    "into the first columns (right padding)"
                )
    return None


CHAPTER.register(
    name="collate",
    symbol="collate",
    points=2,
    make_cases=_collate_cases,
    reference=_collate_reference,
    run=_run_collate,
    compare=_collate_compare,
    forbidden=("lumorik_sft.encoding:SFTCollator", "lumorik_sft.encoding:pad_sequences"),
    hint="pad right to the longest row: input_ids with pad_token_id, attention_mask with 0, labels with -100",
    wrong_variants=("labels padded with the pad id", "pad to a fixed max_length", "left padding"),
)
