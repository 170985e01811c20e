"""Checks for the exercise notebooks: hidden, seeded cases compared with the package's reference.

In a notebook, right after writing an exercise::

    from lumorik_sft.course import checks
    checks.check_encode_example(encode_example)   # feedback lines, then one "passed" line

Every exercise is one :class:`Exercise` in :data:`EXERCISES`, made of four pure pieces:

* ``make_cases(seed)`` -> list of JSON-able inputs (a tokenizer is named, e.g. ``"toy"``);
* ``reference(case)`` -> the expected output *as data*, from the package's reference function;
* ``run(fn, case)`` -> calls a student's function and turns what it returns into data (lists,
  floats, dicts: tensors become lists);
* ``compare(case, expected, got)`` -> ``None`` when right, else one actionable line.

The notebook checks below and the instructor grader (:mod:`lumorik_sft.course.grading`) share them: the
grader calls ``run`` in a sandboxed child process, gets the data back, and calls ``reference`` and
``compare`` in its own process, so nothing a student's code does can change a verdict.
The ``check_*`` functions print and return nothing, so a cell shows only the feedback;
``run_check(name, obj)`` returns the verdict as a bool. Neither ever exits the interpreter.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import random
import traceback
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHECK_SEED",
    "EXERCISES",
    "Exercise",
    "judge",
    "run_case",
    "run_check",
    "toy_tokenizer",
]

CHECK_SEED = 0  # the notebook checks' cases; the grader draws a secret seed per grading run
IGNORE_INDEX = -100

TOY_TEXTS = [
    "Write a product description.\nCategory: backpack\nMaterial: canvas\nColour: navy",
    "A sturdy navy canvas backpack with a padded laptop sleeve and a water-resistant zip.",
    "Question: What is a fever?\nAnswer: A fever is a body temperature above the normal range.",
    "Summarise the case: The tenant sued the landlord over an unreturned deposit.",
    "The court found for the tenant and ordered the deposit returned with interest.",
    "def add(a, b):\n    return a + b  # Python functions return values.",
] * 20

WORDS = [
    "navy",
    "canvas",
    "backpack",
    "laptop",
    "sleeve",
    "zip",
    "fever",
    "body",
    "temperature",
    "tenant",
    "landlord",
    "deposit",
    "court",
    "interest",
    "python",
    "function",
    "returns",
    "values",
    "sturdy",
    "padded",
    "product",
    "description",
    "question",
    "answer",
    "café",
    "naïve",
    "résumé",
    "polymorphism",
    "class",
    "parent",
    "object",
]


@functools.lru_cache(maxsize=1)
def toy_tokenizer():
    """The course's toy byte-level BPE tokenizer (EOS id 0, pad id 1), trained in milliseconds."""
    from lumorik_sft.models import train_bpe_tokenizer

    return train_bpe_tokenizer(TOY_TEXTS, vocab_size=300, min_frequency=2)


# ------------------------------------------------------------------------------------------ data


class NotData(TypeError):
    """A student's function returned something that is not plain data (nor a tensor)."""


def to_data(obj: Any, _depth: int = 0) -> Any:
    """Lists, dicts, numbers and strings only: tensors and arrays become (nested) lists."""
    if _depth > 20:
        raise NotData("the returned value is nested too deeply")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors, numpy arrays and scalars
        return to_data(obj.tolist(), _depth + 1)
    if isinstance(obj, Mapping):
        return {str(k): to_data(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if len(obj) > 200_000:
            raise NotData(f"the returned sequence has {len(obj)} items, far more than expected")
        return [to_data(v, _depth + 1) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_data(v, _depth + 1) for v in obj)
    raise NotData(f"returned a {type(obj).__name__}, which is not plain data")


def _raised(err: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return {"raised": type(err).__name__, "message": str(err)[:500], "traceback": "".join(tb)[-1500:]}


def _is_raised(x: Any) -> bool:
    return isinstance(x, dict) and "raised" in x and set(x) <= {"raised", "message", "traceback"}


def _close(a: Any, b: Any, rel: float = 1e-5, abs_: float = 1e-6) -> bool:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    if math.isnan(a) or math.isnan(b):
        return False
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _short(x: Any, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


# ------------------------------------------------------------------------------------ tripwire


class _Tripwire:
    """While active, calls to the named package functions (the references) are recorded.

    ``"lumorik_sft.data:split_records"`` replaces the module attribute, and any copy a student
    imported into their function's globals, with a recording wrapper; all are restored on exit.
    """

    def __init__(self, forbidden: Sequence[str], fn_globals: dict | None) -> None:
        self.forbidden, self.fn_globals = list(forbidden), fn_globals
        self.hits: list[str] = []
        self._undo: list[tuple[Any, str, Any, bool]] = []

    def __enter__(self) -> _Tripwire:
        for spec in self.forbidden:
            module_name, attr = spec.split(":")
            try:
                module = importlib.import_module(module_name)
                original = getattr(module, attr)
            except (ImportError, AttributeError):
                continue
            wrapper = self._wrap(f"{module_name}.{attr}", original)
            self._patch(module, attr, wrapper, is_dict=False)
            if self.fn_globals is not None:
                for name, value in list(self.fn_globals.items()):
                    if value is original:
                        self._patch(self.fn_globals, name, wrapper, is_dict=True)
        return self

    def _wrap(self, label: str, original: Callable) -> Callable:
        hits = self.hits

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if label not in hits:
                hits.append(label)
            return original(*args, **kwargs)

        return wrapper

    def _patch(self, target: Any, name: str, value: Any, *, is_dict: bool) -> None:
        old = target[name] if is_dict else getattr(target, name)
        self._undo.append((target, name, old, is_dict))
        if is_dict:
            target[name] = value
        else:
            setattr(target, name, value)

    def __exit__(self, *exc: object) -> None:
        for target, name, old, is_dict in reversed(self._undo):
            if is_dict:
                target[name] = old
            else:
                setattr(target, name, old)
        self._undo.clear()


# ------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Exercise:
    """One checkable exercise; see the module docstring for what each piece does."""

    name: str
    notebook: str
    symbol: str
    points: float
    make_cases: Callable[[int], list[dict[str, Any]]]
    reference: Callable[[dict[str, Any]], Any]
    run: Callable[[Any, dict[str, Any]], Any]
    compare: Callable[[dict[str, Any], Any, Any], str | None]
    kind: str = "function"  # "function": call it; "answer": a value such as ANSWER_Q1
    forbidden: tuple[str, ...] = ()  # package references the student must not call
    hint: str = ""
    wrong_variants: tuple[str, ...] = field(default=())  # documented, tested in tests/test_checks.py
    review: str = ""  # what the automatic check cannot judge, for a person to read


def run_case(ex: Exercise, obj: Any, case: dict[str, Any], fn_globals: dict | None = None) -> Any:
    """Run one case; returns data, or ``{"raised": ...}`` when the student's code raised.

    Calls to the exercise's reference are noted as ``{"used_reference": [...]}``.
    Exceptions and SystemExit are caught (a check never ends the notebook's process); the
    grader's child also handles timeouts and a dying process.
    """
    if ex.kind == "answer":
        try:
            return ex.run(obj, case)
        except (Exception, SystemExit) as err:
            return _raised(err)
    if obj is None or not callable(obj):
        return {"raised": "NameError", "message": f"{ex.symbol} is not defined (or not a function)"}
    globals_ = fn_globals if fn_globals is not None else getattr(obj, "__globals__", None)
    with _Tripwire(ex.forbidden, globals_) as wire:
        try:
            out = ex.run(obj, copy.deepcopy(case))
        except (Exception, SystemExit) as err:
            out = _raised(err)
    if wire.hits:
        return {"used_reference": wire.hits}
    return out


def judge(ex: Exercise, case: dict[str, Any], expected: Any, got: Any) -> str | None:
    """Feedback for one case (None = right). Shared by the notebook checks and the grader."""
    if isinstance(got, dict) and set(got) == {"used_reference"}:
        names = ", ".join(got["used_reference"])
        return f"your function calls {names}, the package's reference: write it yourself"
    if _is_raised(expected):
        if _is_raised(got) and got["raised"] == expected["raised"]:
            return None
        if _is_raised(got):
            return f"should raise {expected['raised']}, but raised {got['raised']}: {got['message']}"
        return f"should raise {expected['raised']} ({expected['message'][:120]}), but returned {_short(got)}"
    if _is_raised(got):
        if got["raised"] == "NotImplementedError":
            return f"{ex.symbol} is not written yet (raised NotImplementedError)"
        if got["raised"] == "SystemExit":
            return "your code called sys.exit(); return a value instead"
        return f"raised {got['raised']}: {got['message']}"
    try:
        return ex.compare(case, expected, got)
    except Exception as err:  # a malformed answer must give feedback, not crash the check
        return f"returned something of the wrong shape ({type(err).__name__}: {err}); got {_short(got)}"


def run_check(name: str, obj: Any) -> bool:
    """Run an exercise's cases on `obj` in this process; print feedback and one final line."""
    ex = EXERCISES[name]
    cases = ex.make_cases(CHECK_SEED)
    failures = []
    for i, case in enumerate(cases):
        expected = ex.reference(case)
        got = run_case(ex, obj, case)
        feedback = judge(ex, case, expected, got)
        if feedback is not None:
            failures.append((i, feedback))
    if not failures:
        print(f"check_{name}: all {len(cases)} case{'s' if len(cases) != 1 else ''} passed")
        return True
    shown = failures[:3]
    for i, feedback in shown:
        print(f"  case {i}: {feedback}")
    if len(failures) > len(shown):
        print(f"  ... and {len(failures) - len(shown)} more failing case(s)")
    if ex.hint:
        print(f"  hint: {ex.hint}")
    print(f"check_{name}: {len(cases) - len(failures)}/{len(cases)} cases passed, not yet")
    return False


# ========================================================================= 01 data curation


def _messy(text: str, rng: random.Random) -> str:
    """The same text as a human would see it, with invisible differences clean_text removes."""
    choice = rng.randrange(6)
    if choice == 0:
        return "  " + text.replace(" ", "  ", 1) + " \t"
    if choice == 1:
        return text.replace(" ", "\u00a0", 1) + "\r\n"
    if choice == 2:
        return unicodedata.normalize("NFD", text)
    if choice == 3:
        return text.replace(" ", " \u200b", 1)
    if choice == 4:
        return "\t" + text
    return text + "   "


def _sentence(rng: random.Random, lo: int = 2, hi: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _dedupe_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(6):
        rng = random.Random(f"dedupe/{seed}/{k}")
        pairs = [
            (_sentence(rng).capitalize() + "?", _sentence(rng, 3, 8) + ".") for _ in range(rng.randint(4, 7))
        ]
        records = [{"prompt": p, "completion": c} for p, c in pairs]
        for _ in range(rng.randint(2, 5)):
            p, c = rng.choice(pairs)
            kind = rng.randrange(5)
            if kind == 0:
                records.append({"prompt": p, "completion": c})  # exact copy
            elif kind == 1:
                records.append({"prompt": _messy(p, rng), "completion": _messy(c, rng)})
            elif kind == 2:
                records.append({"prompt": p, "completion": _sentence(rng, 3, 8) + "!"})  # same prompt
            elif kind == 3:
                records.append({"prompt": _messy(p, rng), "completion": " \n "})  # empty answer
            else:
                records.append({"prompt": "\u200b ", "completion": c})  # empty prompt
        # at least one invisible-difference duplicate in every case
        p, c = rng.choice(pairs)
        records.append({"prompt": _messy(p, rng), "completion": c})
        rng.shuffle(records)
        cases.append({"records": records})
    return cases


def _dedupe_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.data import curate

    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in curate(case["records"]).kept]


def _run_dedupe(fn: Callable, case: dict[str, Any]) -> Any:
    return to_data(fn(case["records"]))


def _records_of(got: Any, what: str = "the result") -> list[tuple[str, str]]:
    if not isinstance(got, list):
        raise TypeError(f"{what} must be a list of records, got {type(got).__name__}")
    out = []
    for i, r in enumerate(got):
        if not isinstance(r, dict) or "prompt" not in r or "completion" not in r:
            raise TypeError(f"{what}[{i}] must be a dict with 'prompt' and 'completion', got {_short(r)}")
        out.append((r["prompt"], r["completion"]))
    return out


def _dedupe_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    from lumorik_sft.data import clean_text

    want = [(r["prompt"], r["completion"]) for r in expected]
    have = _records_of(got)
    if have == want:
        return None
    for i, (p, c) in enumerate(have):
        if (clean_text(p), clean_text(c)) != (p, c):
            return (
                f"record {i} is not cleaned: prompt {p!r} should be {clean_text(p)!r} "
                "(clean both fields with data.clean_text)"
            )
        if not p or not c:
            return f"record {i} has an empty {'prompt' if not p else 'completion'} after cleaning: drop it"
    seen: dict[tuple[str, str], int] = {}
    for i, pair in enumerate(have):
        if pair in seen:
            return (
                f"records {seen[pair]} and {i} are the same after cleaning ({_short(pair[0], 40)}): "
                "keep only the first"
            )
        seen[pair] = i
    missing = [pair for pair in want if pair not in set(have)]
    if missing:
        return (
            f"{len(missing)} record(s) dropped that should be kept, e.g. {_short(missing[0], 70)}: "
            "a duplicate must match in BOTH prompt and completion after cleaning"
        )
    return f"right records, wrong order: keep the input order (first occurrence); got {len(have)} records"


# ----------------------------------------------------------------------------- leak-free split


def _split_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(6):
        rng = random.Random(f"split/{seed}/{k}")
        prompts = [_sentence(rng, 3, 6).capitalize() + "?" for _ in range(rng.randint(10, 18))]
        prompts = list(dict.fromkeys(prompts))
        records = []
        for p in prompts:
            for _ in range(rng.choice([1, 1, 2, 3])):
                shown = _messy(p, rng) if rng.random() < 0.35 else p
                records.append({"prompt": shown, "completion": _sentence(rng, 3, 7) + "."})
        rng.shuffle(records)
        cases.append(
            {"records": records, "val_fraction": rng.choice([0.2, 0.25, 0.3]), "seed": rng.randrange(1000)}
        )
    return cases


def _split_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.data import clean_text, split_records

    train, val = split_records(case["records"], val_fraction=case["val_fraction"], seed=case["seed"])
    _, other_val = split_records(case["records"], val_fraction=case["val_fraction"],
                                 seed=case["seed"] + 1)
    groups: dict[str, int] = {}
    for r in case["records"]:
        key = clean_text(r["prompt"])
        groups[key] = groups.get(key, 0) + 1
    return {
        "n_train": len(train),
        "n_val": len(val),
        "target": round(len(case["records"]) * case["val_fraction"]),
        "largest_group": max(groups.values()),
        "seed_matters": other_val != val,  # then a split that ignores its seed is caught
    }


def _run_split(fn: Callable, case: dict[str, Any]) -> Any:
    kwargs = {"val_fraction": case["val_fraction"], "seed": case["seed"]}
    first = to_data(fn(copy.deepcopy(case["records"]), **kwargs))
    again = to_data(fn(copy.deepcopy(case["records"]), **kwargs))
    other = to_data(fn(copy.deepcopy(case["records"]), **{**kwargs, "seed": case["seed"] + 1}))
    return {"first": first, "again": again, "other": other}


def _split_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    from collections import Counter

    from lumorik_sft.data import clean_text

    first = got["first"]
    if not isinstance(first, list) or len(first) != 2:
        return f"return a pair (train, val), got {_short(first)}"
    train, val = _records_of(first[0], "train"), _records_of(first[1], "val")
    records = [(r["prompt"], r["completion"]) for r in case["records"]]
    if Counter(train) + Counter(val) != Counter(records):
        lost = sum((Counter(records) - Counter(train) - Counter(val)).values())
        extra = sum((Counter(train) + Counter(val) - Counter(records)).values())
        return (
            f"train + val must hold every input record exactly once (unchanged): {lost} missing, "
            f"{extra} extra or modified"
        )
    val_prompts = {clean_text(p): p for p, _ in val}
    for p, _ in train:
        if clean_text(p) in val_prompts:
            return (
                f"prompt {_short(clean_text(p), 50)} is in both train and val: group records by "
                "their CLEANED prompt and put each group on one side"
            )
    tolerance = max(1, expected["largest_group"])
    if abs(len(val) - expected["target"]) > tolerance:
        return (
            f"val has {len(val)} records; expected about {expected['target']} "
            f"(round({len(records)} * {case['val_fraction']})), give or take {tolerance}"
        )
    if got["again"] != first:
        return "two calls with the same seed gave different splits: shuffle with random.Random(seed)"
    if expected["seed_matters"] and got["other"] == first:
        return ("another seed gave the same split: shuffle the groups with random.Random(seed), "
                "so that the seed chooses which groups go to val")
    return None


# ============================================================================ 02 tokenization


def _encode_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(6):
        rng = random.Random(f"encode/{seed}/{k}")
        prompt = _sentence(rng, 3, 8).capitalize() + "?"
        completion = _sentence(rng, 2, 7) + "."
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
        raise TypeError(f"{what} must be a list of ints (or a 1-D tensor), got {_short(x)}")
    return x


def _encode_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if not isinstance(got, dict):
        return f"return a dict with input_ids, attention_mask and labels, got {_short(got)}"
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


# ------------------------------------------------------------------------------------- collator


def _collate_cases(seed: int) -> list[dict[str, Any]]:
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


# ============================================================================ 03 training loop


def _logits_case(rng: random.Random) -> dict[str, Any]:
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
    if _close(nll, want_nll, rel=1e-4):
        return None
    if want_n and _close(nll, want_nll / want_n, rel=1e-4):
        return "return the SUM of the token NLLs, not the mean (reduction='sum'); the mean comes later"
    return (
        f"nll_sum is {nll:.5f}, expected {want_nll:.5f}: compare logits[:, :-1] with labels[:, 1:] "
        "using cross-entropy that ignores -100"
    )


# ------------------------------------------------------------------------------------ train step

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
    loss_ok = _close(got["loss"], expected["loss"], rel=1e-3)
    update_ok = _close(got["norm"], expected["norm"], rel=2e-3, abs_=1e-7) and all(
        _close(a, b, rel=5e-3, abs_=1e-6) for a, b in zip(got["sample"], expected["sample"], strict=True)
    )
    if loss_ok and update_ok:
        return None
    if not loss_ok and _close(got["loss"], expected["loss"] * n, rel=1e-3):
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


# ============================================================================= 04 evaluation


def _ppl_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(5):
        rng = random.Random(f"ppl/{seed}/{k}")
        batches = []
        for j in range(rng.randint(2, 4)):
            n = 1 if j == 0 else rng.randint(8, 30)  # one tiny batch: equal weighting is wrong
            centre = rng.uniform(-4.0, -0.3)
            batches.append([round(min(0.0, rng.gauss(centre, 0.5)), 5) for _ in range(n)])
        rng.shuffle(batches)
        cases.append({"batches": batches})
    cases.append({"batches": [[], []]})  # no tokens: the denominator is zero
    return cases


def _ppl_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.metrics import perplexity_from_logprobs

    try:
        return perplexity_from_logprobs([x for b in case["batches"] for x in b])
    except ValueError as err:
        return _raised(err)


def _run_ppl(fn: Callable, case: dict[str, Any]) -> Any:
    return float(fn(copy.deepcopy(case["batches"])))


def _ppl_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if _close(got, expected, rel=1e-6):
        return None
    batches = [b for b in case["batches"] if b]
    means = [-sum(b) / len(b) for b in batches]
    if _close(got, sum(math.exp(m) for m in means) / len(means), rel=1e-6):
        return (
            "you averaged per-batch perplexities: sum the log-probs of ALL tokens and divide by the "
            "total token count, then exponentiate once"
        )
    if _close(got, math.exp(sum(means) / len(means)), rel=1e-6):
        return (
            "you averaged per-batch mean NLLs, so a 1-token batch weighs as much as a 30-token one: "
            "weight by tokens (total NLL / total tokens)"
        )
    if got < 1:
        return f"perplexity is always >= 1, got {got:.4g}: exponentiate the NEGATIVE mean log-prob"
    return (
        f"perplexity is {got:.6g}, expected {expected:.6g}: exp(-(sum of all log-probs) / (number of tokens))"
    )


# ------------------------------------------------------------------------------------------ BLEU


def _bleu_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(3):
        rng = random.Random(f"bleu/{seed}/{k}")
        refs, preds = [], []
        for _ in range(rng.randint(3, 5)):
            ref = _sentence(rng, 6, 12) + "."
            words = ref.split()
            if rng.random() < 0.7:
                for _ in range(rng.randint(1, 3)):
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
            if rng.random() < 0.5:
                words = words[: max(2, len(words) - rng.randint(1, 3))]
            refs.append(ref)
            preds.append(" ".join(words))
        cases.append({"predictions": preds, "references": refs})
    return cases


def _bleu_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.metrics import corpus_bleu

    return corpus_bleu(case["predictions"], case["references"])


def _run_bleu(fn: Callable, case: dict[str, Any]) -> Any:
    return float(fn(list(case["predictions"]), list(case["references"])))


def _bleu_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    import sacrebleu

    if _close(got, expected, rel=1e-6, abs_=1e-6):
        return None
    preds, refs = case["predictions"], case["references"]
    if _close(got * 100, expected, rel=1e-6, abs_=1e-6):
        return "BLEU here is on sacrebleu's 0-100 scale: return compute(...)['score'] unchanged"
    sentence_mean = sum(
        sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(preds, refs, strict=True)
    ) / len(preds)
    if _close(got, sentence_mean, rel=1e-6, abs_=1e-6):
        return (
            "corpus BLEU is not a mean of sentence BLEUs: pass all predictions and references to one "
            "compute() call, which sums n-gram counts over the corpus first"
        )
    if _close(got, sacrebleu.corpus_bleu(refs, [preds]).score, rel=1e-6, abs_=1e-6):
        return "predictions and references are swapped (BLEU is not symmetric: the brevity penalty)"
    return f"BLEU is {got:.4f}, expected {expected:.4f}: use metrics.load_metric('bleu').compute(...)"


# ============================================================================ 05 worked example


def _seq_cases(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"seq/{seed}")
    cases = [
        {"probs": [round(rng.uniform(0.01, 1.0), 4) for _ in range(rng.randint(1, 8))]} for _ in range(5)
    ]
    cases.append({"probs": [0.5, 0.0, 0.25]})  # p = 0: infinite NLL, must raise ValueError
    return cases


def _seq_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.metrics import sequence_nll

    try:
        return sequence_nll(case["probs"])
    except ValueError as err:
        return _raised(err)


def _run_seq(fn: Callable, case: dict[str, Any]) -> Any:
    return float(fn(list(case["probs"])))


def _seq_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if _close(got, expected, rel=1e-9, abs_=1e-12):
        return None
    probs = case["probs"]
    if _close(got, expected / len(probs), rel=1e-9):
        return "return the SUM of -ln p over the tokens (the chapter's loss L), not the mean"
    if _close(got, -sum(math.log10(p) for p in probs), rel=1e-9):
        return "use the natural log (math.log), not log10: NLL and perplexity are in nats"
    if abs(got - expected) < 0.01 * len(probs):
        return (
            f"got {got!r}, expected {expected!r}: do not round the terms before adding them "
            "(the chapter's 4.01 comes from that)"
        )
    return f"got {got:.6f}, expected {expected:.6f}: L = -sum(ln p_t)"


def _worked_answer(seed: int) -> list[dict[str, Any]]:
    return [{}]


def _run_answer(value: Any, case: dict[str, Any]) -> Any:
    return to_data(value)


def _worked_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.metrics import sequence_nll

    return round(sequence_nll([0.1, 0.6, 0.3]), 3)


def _worked_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if got is None:
        return "set ANSWER_WORKED_LOSS to a number"
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return f"ANSWER_WORKED_LOSS must be a number, got {_short(got)}"
    if _close(got, expected, abs_=0.0015):
        return None
    if _close(got, 4.01, abs_=1e-9):
        return "4.01 is the chapter's figure, from rounding each term first; add the unrounded terms"
    return f"{got} is not -ln(0.1) - ln(0.6) - ln(0.3) to 3 decimals"


def _batches_cases(seed: int) -> list[dict[str, Any]]:
    cases = []
    for k in range(3):
        rng = random.Random(f"batches/{seed}/{k}")
        records = [
            {"prompt": _sentence(rng, 3, 6).capitalize() + "?", "completion": _sentence(rng, 2, 6) + "."}
            for _ in range(rng.randint(4, 6))
        ]
        records.append({"prompt": _messy(records[0]["prompt"], rng), "completion": records[0]["completion"]})
        records.append({"prompt": records[1]["prompt"], "completion": "  "})
        rng.shuffle(records)
        cases.append(
            {"records": records, "tokenizer": "toy", "batch_size": rng.choice([2, 3]), "max_length": 64}
        )
    return cases


def _batches_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.data import curate
    from lumorik_sft.encoding import SFTCollator, encode_example

    tok = toy_tokenizer()
    examples = [
        encode_example(tok, r["prompt"], r["completion"], max_length=case["max_length"])
        for r in curate(case["records"]).kept
    ]
    examples = [e for e in examples if e is not None]
    collate = SFTCollator(tok.pad_token_id)
    size = case["batch_size"]
    return [to_data(collate(examples[i : i + size])) for i in range(0, len(examples), size)]


def _run_batches(fn: Callable, case: dict[str, Any]) -> Any:
    out = fn(case["records"], toy_tokenizer(), batch_size=case["batch_size"], max_length=case["max_length"])
    return to_data(list(out))


def _batches_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if not isinstance(got, list):
        return f"return a list of batches, got {_short(got)}"
    n_want = sum(len(b["input_ids"]) for b in expected)
    n_got = sum(len(b.get("input_ids", [])) for b in got if isinstance(b, dict))
    if n_got != n_want:
        return (
            f"{n_got} examples in your batches, expected {n_want}: curate first (clean, drop empty and "
            "duplicate records) with data.curate"
        )
    if len(got) != len(expected):
        return f"{len(got)} batches, expected {len(expected)} of batch_size={case['batch_size']}, in order"
    for b, (have, want) in enumerate(zip(got, expected, strict=True)):
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in have:
                return f"batch {b} has no {key!r}"
            if have[key] == want[key]:
                continue
            if len(have[key][0]) != len(want[key][0]):
                return (
                    f"batch {b} is {len(have[key][0])} columns wide, expected {len(want[key][0])}: pad to "
                    "the longest row of each batch (SFTCollator), not to max_length"
                )
            if key == "labels" and have["labels"] == have["input_ids"]:
                return (
                    "labels equal input_ids: that is the chapter's erratum; prompt and padding must be "
                    "-100 (use encoding.encode_example and SFTCollator)"
                )
            return f"batch {b} {key} differs from the reference: {_short(have[key])} vs {_short(want[key])}"
    return None


# ====================================================================== 06 practice questions


def _one_case(seed: int) -> list[dict[str, Any]]:
    return [{}]


def _choice_compare(symbol: str, correct: str, why: dict[str, str]) -> Callable:
    def compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
        if got is None:
            return f"set {symbol} to one of 'a', 'b', 'c', 'd'"
        if not isinstance(got, str) or got.strip().lower() not in ("a", "b", "c", "d"):
            return f"{symbol} must be one letter, 'a' to 'd'; got {_short(got)}"
        answer = got.strip().lower()
        if answer == correct:
            return None
        return f"not {answer!r}: {why.get(answer, 'read the options again')}"

    return compare


Q2_RUBRIC = (
    ("overfitting", ("overfit", "over-fit", "memoris", "memoriz")),
    (
        "unseen data",
        ("unseen", "held-out", "held out", "new data", "generalis", "generaliz", "not trained on"),
    ),
    (
        "decisions",
        ("hyperparameter", "early stop", "checkpoint", "model selection", "tune", "tuning", "choose"),
    ),
)


def _q2_cases(seed: int) -> list[dict[str, Any]]:
    return [{"group": i} for i in range(len(Q2_RUBRIC))]


def _q2_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if not isinstance(got, str) or not got.strip():
        return "write ANSWER_Q2 as a sentence or two (a string)"
    n_words = len(got.split())
    if not 8 <= n_words <= 150:
        return f"answer in 8 to 150 words, in sentences (got {n_words} words)"
    topic, keywords = Q2_RUBRIC[case["group"]]
    text = got.lower()
    if any(k in text for k in keywords):
        return None
    return f"your answer does not mention {topic} (e.g. one of: {', '.join(keywords[:3])})"


Q5_OPTIONS = {
    "a": (True, "one record per line: a file can be streamed, appended to and split line by line"),
    "b": (False, "JSONL does not compress better than CSV; it repeats every key on every line"),
    "c": (True, "a malformed line breaks only that record, and errors name the line"),
    "d": (False, "JSONL enforces no schema: any line may hold any object; you must validate"),
    "e": (True, "text with commas, quotes and newlines needs no special quoting rules beyond JSON's"),
}


def _q5_cases(seed: int) -> list[dict[str, Any]]:
    return [{"option": k} for k in sorted(Q5_OPTIONS)]


def _q5_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if got is None:
        return "set ANSWER_Q5 to a set of letters, e.g. {'a', 'b'}"
    if isinstance(got, str):
        got = list(got.replace(",", " ").split())
    if not isinstance(got, list) or not all(isinstance(x, str) for x in got):
        return f"ANSWER_Q5 must be a set of letters, got {_short(got)}"
    chosen = {x.strip().lower() for x in got}
    if not chosen:
        return "choose at least one option"
    unknown = sorted(chosen - set(Q5_OPTIONS))
    if unknown:
        return f"options are the letters a to e; {', '.join(map(repr, unknown))} is not one"
    if not any(Q5_OPTIONS[x][0] for x in chosen):
        return "none of the options you chose is an advantage of JSONL"
    option = case["option"]
    right, why = Q5_OPTIONS[option]
    if (option in chosen) == right:
        return None
    return f"option {option!r} is {'an advantage' if right else 'not an advantage'}: {why}"


def _q3_compare(case: dict[str, Any], expected: Any, got: Any) -> str | None:
    if got is None:
        return "set ANSWER_Q3 to a number"
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return f"ANSWER_Q3 must be a number, got {_short(got)}"
    if _close(got, expected, abs_=0.005):
        return None
    if _close(got, math.exp(-1.25), abs_=0.005):
        return "a perplexity is >= 1: exponentiate the NEGATIVE mean log-probability"
    if _close(got, 1.25, abs_=0.005):
        return "1.25 is the mean NLL; perplexity is exp of it"
    return f"{got} is not exp(-mean(log p)) for these log-probs (2 decimals)"


Q3_LOGPROBS = [-0.5, -1.0, -1.5, -2.0]


def _q3_reference(case: dict[str, Any]) -> Any:
    from lumorik_sft.metrics import perplexity_from_logprobs

    return perplexity_from_logprobs(Q3_LOGPROBS)


def _fixed(value: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda case: value


# ===================================================================================== registry

_EXERCISE_LIST = [
    Exercise(
        "clean_and_dedupe",
        "01_data_curation.ipynb",
        "clean_and_dedupe",
        2,
        _dedupe_cases,
        _dedupe_reference,
        _run_dedupe,
        _dedupe_compare,
        forbidden=("lumorik_sft.data:curate",),
        hint="clean both fields with data.clean_text, drop empties, then keep the first of each "
        "(prompt, completion) pair",
        wrong_variants=("dedupe before cleaning", "dedupe on the prompt only", "keep empty records"),
    ),
    Exercise(
        "leak_free_split",
        "01_data_curation.ipynb",
        "leak_free_split",
        2,
        _split_cases,
        _split_reference,
        _run_split,
        _split_compare,
        forbidden=("lumorik_sft.data:split_records",),
        hint="group by clean_text(prompt), shuffle the groups with random.Random(seed), "
        "fill val group by group",
        wrong_variants=("shuffle records and slice", "group by the raw, uncleaned prompt"),
    ),
    Exercise(
        "encode_example",
        "02_tokenization.ipynb",
        "encode_example",
        3,
        _encode_cases,
        _encode_reference,
        _run_encode,
        _encode_compare,
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
    ),
    Exercise(
        "collate",
        "02_tokenization.ipynb",
        "collate",
        2,
        _collate_cases,
        _collate_reference,
        _run_collate,
        _collate_compare,
        forbidden=("lumorik_sft.encoding:SFTCollator", "lumorik_sft.encoding:pad_sequences"),
        hint="pad right to the longest row: input_ids with pad_token_id, attention_mask with 0, "
        "labels with -100",
        wrong_variants=("labels padded with the pad id", "pad to a fixed max_length", "left padding"),
    ),
    Exercise(
        "masked_nll_sum",
        "03_training_loop.ipynb",
        "masked_nll_sum",
        2,
        _nll_cases,
        _nll_reference,
        _run_nll,
        _nll_compare,
        forbidden=("lumorik_sft.metrics:completion_nll",),
        hint="shift: logits[:, :-1] predict labels[:, 1:]; "
        "cross_entropy(..., reduction='sum', ignore_index=-100)",
        wrong_variants=("no shift", "mean instead of sum", "count every position"),
    ),
    Exercise(
        "train_step",
        "03_training_loop.ipynb",
        "train_step",
        3,
        _step_cases,
        _step_reference,
        _run_step,
        _step_compare,
        forbidden=("lumorik_sft.training:accumulate_gradients",),
        hint="zero_grad; N = supervised tokens of ALL micro-batches; backward(sum_nll / N) for each; step",
        wrong_variants=("sum instead of mean loss", "mean of per-micro-batch means", "no zero_grad"),
    ),
    Exercise(
        "corpus_perplexity",
        "04_evaluation.ipynb",
        "corpus_perplexity",
        2,
        _ppl_cases,
        _ppl_reference,
        _run_ppl,
        _ppl_compare,
        forbidden=(
            "lumorik_sft.metrics:perplexity_from_logprobs",
            "lumorik_sft.metrics:perplexity_from_probs",
            "lumorik_sft.metrics:mean_nll",
        ),
        hint="exp(-(sum of all log-probs) / (number of tokens)); raise ValueError when there are no tokens",
        wrong_variants=("perplexity averaged over batches", "mean of batch mean NLLs", "sign error"),
    ),
    Exercise(
        "bleu_score",
        "04_evaluation.ipynb",
        "bleu_score",
        1,
        _bleu_cases,
        _bleu_reference,
        _run_bleu,
        _bleu_compare,
        forbidden=("lumorik_sft.metrics:corpus_bleu",),
        hint="metrics.load_metric('bleu').compute(predictions=..., references=...)['score']",
        wrong_variants=("mean of sentence BLEUs", "predictions and references swapped", "0-1 scale"),
    ),
    Exercise(
        "sequence_nll",
        "05_worked_example.ipynb",
        "sequence_nll",
        1,
        _seq_cases,
        _seq_reference,
        _run_seq,
        _seq_compare,
        forbidden=("lumorik_sft.metrics:sequence_nll", "lumorik_sft.metrics:token_nll"),
        hint="sum of -math.log(p); a probability of 0 must raise ValueError",
        wrong_variants=("mean instead of sum", "log10", "rounded terms"),
    ),
    Exercise(
        "worked_loss",
        "05_worked_example.ipynb",
        "ANSWER_WORKED_LOSS",
        1,
        _worked_answer,
        _worked_reference,
        _run_answer,
        _worked_compare,
        kind="answer",
        wrong_variants=("4.01",),
    ),
    Exercise(
        "build_batches",
        "05_worked_example.ipynb",
        "build_batches",
        2,
        _batches_cases,
        _batches_reference,
        _run_batches,
        _batches_compare,
        hint="data.curate -> encoding.encode_example per record -> SFTCollator per chunk of batch_size",
        wrong_variants=("no curation", "labels = input_ids", "pad to max_length"),
    ),
    Exercise(
        "q1",
        "06_practice_questions.ipynb",
        "ANSWER_Q1",
        1,
        _one_case,
        _fixed("b"),
        _run_answer,
        _choice_compare(
            "ANSWER_Q1",
            "b",
            {
                "a": "that is the batch size",
                "c": "the learning rate does not change the loss function, "
                "only the step taken along its gradient",
                "d": "a larger learning rate is not always faster: too large diverges or oscillates",
            },
        ),
        kind="answer",
        wrong_variants=("a", "c", "d"),
    ),
    Exercise(
        "q2",
        "06_practice_questions.ipynb",
        "ANSWER_Q2",
        2,
        _q2_cases,
        _fixed(None),
        _run_answer,
        _q2_compare,
        kind="answer",
        wrong_variants=("keyword stuffing", "off-topic"),
        review="a keyword screen for the three ideas: it cannot tell an answer that denies them "
               "from one that explains them, so read ANSWER_Q2",
    ),
    Exercise(
        "q3",
        "06_practice_questions.ipynb",
        "ANSWER_Q3",
        1,
        _one_case,
        _q3_reference,
        _run_answer,
        _q3_compare,
        kind="answer",
        wrong_variants=("mean NLL", "sign error"),
    ),
    Exercise(
        "q4",
        "06_practice_questions.ipynb",
        "ANSWER_Q4",
        1,
        _one_case,
        _fixed("c"),
        _run_answer,
        _choice_compare(
            "ANSWER_Q4",
            "c",
            {
                "a": "that is the chapter's labels=input_ids: it trains on the prompt and on padding",
                "b": "the EOS must be supervised, or the model never learns to stop",
                "d": "padding needs label -100, not the pad id, or the loss learns to predict padding",
            },
        ),
        kind="answer",
        wrong_variants=("a (chapter's erratum)", "b", "d"),
    ),
    Exercise(
        "q5",
        "06_practice_questions.ipynb",
        "ANSWER_Q5",
        1,
        _q5_cases,
        _fixed(None),
        _run_answer,
        _q5_compare,
        kind="answer",
        wrong_variants=("all options", "a only"),
    ),
]

EXERCISES: dict[str, Exercise] = {ex.name: ex for ex in _EXERCISE_LIST}
NOTEBOOKS: tuple[str, ...] = tuple(dict.fromkeys(ex.notebook for ex in _EXERCISE_LIST))


def _make_check(name: str) -> Callable[[Any], None]:
    ex = EXERCISES[name]

    def check(obj: Any) -> None:
        run_check(name, obj)  # no return value: a notebook cell shows the feedback, not "True"

    what = "your answer" if ex.kind == "answer" else f"your `{ex.symbol}`"
    check.__name__ = check.__qualname__ = f"check_{name}"
    check.__doc__ = (
        f"Check {what} ({ex.notebook}) on hidden seeded cases against the package's "
        "reference; prints feedback, then one line saying whether all cases passed. "
        f"`run_check({name!r}, obj)` does the same and returns True or False."
    )
    return check


check_clean_and_dedupe = _make_check("clean_and_dedupe")
check_leak_free_split = _make_check("leak_free_split")
check_encode_example = _make_check("encode_example")
check_collate = _make_check("collate")
check_masked_nll_sum = _make_check("masked_nll_sum")
check_train_step = _make_check("train_step")
check_corpus_perplexity = _make_check("corpus_perplexity")
check_bleu_score = _make_check("bleu_score")
check_sequence_nll = _make_check("sequence_nll")
check_worked_loss = _make_check("worked_loss")
check_build_batches = _make_check("build_batches")
check_q1 = _make_check("q1")
check_q2 = _make_check("q2")
check_q3 = _make_check("q3")
check_q4 = _make_check("q4")
check_q5 = _make_check("q5")

__all__ += [f"check_{name}" for name in EXERCISES]
