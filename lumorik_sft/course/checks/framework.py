"""The checking machinery every exercise shares: what an exercise is, how its cases run and are judged.

An exercise is one :class:`Exercise`, made of four pure pieces:

* ``make_cases(seed)`` -> list of JSON-able inputs (a tokenizer is named, e.g. ``"toy"``);
* ``reference(case)`` -> the expected output *as data*, from the package's reference function;
* ``run(fn, case)`` -> calls a student's function and turns what it returns into data (lists,
  floats, dicts: tensors become lists, see :func:`to_data`);
* ``compare(case, expected, got)`` -> ``None`` when right, else one actionable line.

:func:`run_case` calls ``run`` while the package's references (the exercise's ``forbidden``
functions) are disabled in place (:func:`disable`), however the student's code reaches them;
:func:`judge` turns one case's expected and got data into feedback, and :func:`check_exercise`
runs all of an exercise's cases in this process and prints the feedback a notebook shows. The
instructor grader (:mod:`lumorik_sft.course.grading`) calls ``run_case`` in a sandboxed child
process and ``reference`` and ``judge`` in its own.

Each chapter module (``ch01_data.py`` ...) declares its exercises through a :class:`Chapter`,
next to the functions they name. This module also holds what chapters share: the toy corpus
(:data:`TOY_TEXTS`) and tokenizer, the words and "messy" text that cases are made of, and the
small comparison helpers (:func:`close`, :func:`short`).
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import random
import traceback
import types
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHECK_SEED",
    "TOY_TEXTS",
    "WORDS",
    "Chapter",
    "Exercise",
    "NotData",
    "check_exercise",
    "close",
    "disable",
    "forbidden_targets",
    "is_raised",
    "judge",
    "make_check",
    "messy",
    "not_a_number",
    "one_case",
    "raised",
    "reference_message",
    "resolve",
    "run_answer",
    "run_case",
    "sentence",
    "short",
    "to_data",
    "toy_tokenizer",
]

CHECK_SEED = 0  # the notebook checks' cases; the grader draws a secret seed per grading run

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


# ------------------------------------------------------------------------------------ making cases


def sentence(rng: random.Random, lo: int = 2, hi: int = 6) -> str:
    """`lo` to `hi` random words from :data:`WORDS`."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def messy(text: str, rng: random.Random) -> str:
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


def one_case(seed: int) -> list[dict[str, Any]]:
    """The cases of an answer with nothing to vary: one empty case."""
    return [{}]


def run_answer(value: Any, case: dict[str, Any]) -> Any:
    """``run`` of an ``"answer"`` exercise: the student's value (e.g. ANSWER_Q1), as data."""
    return to_data(value)


# -------------------------------------------------------------------------------------------- data


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


def raised(err: BaseException) -> dict[str, Any]:
    """An exception as data: ``{"raised": name, "message": ..., "traceback": ...}``."""
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return {"raised": type(err).__name__, "message": str(err)[:500], "traceback": "".join(tb)[-1500:]}


def is_raised(x: Any) -> bool:
    """Whether `x` is what :func:`raised` returns."""
    return isinstance(x, dict) and "raised" in x and set(x) <= {"raised", "message", "traceback"}


def close(a: Any, b: Any, rel: float = 1e-5, abs_: float = 1e-6) -> bool:
    """Two numbers equal within tolerance; False for non-numbers and NaN."""
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    if math.isnan(a) or math.isnan(b):
        return False
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def short(x: Any, n: int = 80) -> str:
    """``repr(x)``, cut to `n` characters for a feedback line."""
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _char_name(ch: str) -> str:
    """A character as a student can identify it: its code point and Unicode name."""
    return f"U+{ord(ch):04X} {unicodedata.name(ch, 'control character')}"


def _looks_plain(ch: str) -> bool:
    """Characters that read unambiguously on screen: printable ASCII other than space."""
    return 33 <= ord(ch) < 127


def text_difference(got: str, want: str) -> str:
    """Where two strings first differ, named so that invisible differences become visible.

    Two strings can print identically in a browser and still differ: Unicode normal form
    ('i' + combining diaeresis against precomposed 'ï'), a no-break space for a space, a tab,
    a zero-width or control character. Feedback that quotes both strings must say which.
    """
    if got == want:
        return "the texts are equal"
    if unicodedata.normalize("NFC", got) == unicodedata.normalize("NFC", want):
        return (
            "they look the same but differ in Unicode normal form (composed 'ï' against 'i' + a "
            "combining mark); unicodedata.normalize('NFC', text) makes them equal"
        )
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    yours = _char_name(got[i]) if i < len(got) else "the end of the text"
    wanted = _char_name(want[i]) if i < len(want) else "the end of the text"
    where = f"they first differ at character {i}: yours has {yours}, expected {wanted}"
    hidden = [c for c in (got[i : i + 1] + want[i : i + 1]) if not _looks_plain(c)]
    if hidden:
        where += " (whitespace or characters that look alike on screen)"
    return where


def not_a_number(symbol: str, got: Any) -> str | None:
    """Feedback when an answer that should be a number is unset or not a number; None when it is one."""
    if got is None:
        return f"set {symbol} to a number"
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return f"{symbol} must be a number, got {short(got)}"
    return None


# ------------------------------------------------------------------------- disabling the references


USED_REFERENCE = " is the package's reference for exercise "  # the marker run_case looks for


def reference_message(label: str, exercise: str) -> str:
    """What a disabled reference raises: it names the function and the exercise it answers."""
    return f"{label}{USED_REFERENCE}{exercise}: write it yourself (disabled while {exercise} is checked)"


def _functions_of(obj: Any) -> list[types.FunctionType]:
    """The Python functions that make up `obj`: itself, or a class's methods (inherited by subclasses)."""
    if isinstance(obj, types.FunctionType):
        return [obj]
    found: list[types.FunctionType] = []
    if isinstance(obj, type):
        for value in vars(obj).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                parts = (value.fget, value.fset, value.fdel)
                found += [f for f in parts if isinstance(f, types.FunctionType)]
            elif isinstance(value, types.FunctionType):
                found.append(value)
    return found


def _stub_code(fn: types.FunctionType, message: str | None) -> types.CodeType:
    """Code for `fn` that raises ``RuntimeError(message)`` (returns None when message is None).

    It keeps `fn`'s number of free variables, which CPython requires of a new ``__code__``.
    """
    free = [f"_free{i}" for i in range(len(fn.__code__.co_freevars))]
    body = f"raise RuntimeError({message!r})" if message is not None else "return None"
    source = "def _outer():\n"
    source += "".join(f"    {name} = None\n" for name in free)
    source += "    def stub(*args, **kwargs):\n"
    source += f"        {', '.join(free)}\n" if free else ""
    source += f"        {body}\n    return stub\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "<disabled by the grader>", "exec"), namespace)
    code = namespace["_outer"]().__code__
    return code.replace(co_name=fn.__code__.co_name, co_qualname=fn.__code__.co_qualname)


def resolve(spec: str) -> Any:
    """The object named by ``"module:attribute"``, or None when it does not exist."""
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None


def disable(targets: Sequence[tuple[str, Any]], exercise: str | None) -> Callable[[], None]:
    """Make each ``(label, object)`` raise :func:`reference_message` (or do nothing when `exercise`
    is None) wherever it is reached; returns the function that undoes it.

    Why in place: the function objects themselves get new code, so every way of reaching them
    changes with them: a module attribute, an alias (``import ... as``), a name imported into a
    notebook, a default argument bound earlier (``def f(records, _curate=data.curate)``), a
    closure, a subclass, and the package's own functions that call them.
    """
    undo: list[tuple[types.FunctionType, types.CodeType]] = []
    for label, obj in targets:
        functions = _functions_of(obj)
        if not functions:
            raise TypeError(f"{label} is not a Python function or class, so it cannot be disabled")
        message = reference_message(label, exercise) if exercise is not None else None
        for fn in functions:
            undo.append((fn, fn.__code__))
            fn.__code__ = _stub_code(fn, message)

    def restore() -> None:
        for fn, code in reversed(undo):
            fn.__code__ = code
        undo.clear()

    return restore


def forbidden_targets(ex: Exercise) -> list[tuple[str, Any]]:
    """The exercise's ``forbidden`` references that exist, as ``(label, object)``."""
    out = []
    for spec in ex.forbidden:
        obj = resolve(spec)
        if obj is not None:
            out.append((spec.replace(":", "."), obj))
    return out


def _used_reference(out: Any) -> str | None:
    """The label of the disabled reference whose error `out` reports, if it does."""
    if is_raised(out) and out["raised"] == "RuntimeError" and USED_REFERENCE in out.get("message", ""):
        return out["message"].split(USED_REFERENCE, 1)[0]
    return None


# --------------------------------------------------------------------------------------- exercises


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
    forbidden: tuple[str, ...] = ()  # package references the student must not call, "module:name"
    hint: str = ""
    wrong_variants: tuple[str, ...] = field(default=())  # documented, tested in tests/test_checks.py
    review: str = ""  # what the automatic check cannot judge, for a person to read


@dataclass
class Chapter:
    """One notebook's exercises, in the order its chapter module registers them.

    A chapter module makes one (``CHAPTER = Chapter("01_data_curation.ipynb")``) and, right after
    each exercise's functions, calls ``CHAPTER.register(name=..., symbol=..., ...)`` with the
    other fields of :class:`Exercise` as keyword arguments.
    """

    notebook: str
    exercises: list[Exercise] = field(default_factory=list)

    def register(self, **fields: Any) -> Exercise:
        """Declare one exercise of this notebook; returns it."""
        ex = Exercise(notebook=self.notebook, **fields)
        if any(other.name == ex.name for other in self.exercises):
            raise ValueError(f"exercise {ex.name!r} is registered twice in {self.notebook}")
        self.exercises.append(ex)
        return ex


def run_case(ex: Exercise, obj: Any, case: dict[str, Any], fn_globals: dict | None = None) -> Any:
    """Run one case; returns data, or ``{"raised": ...}`` when the student's code raised.

    While it runs, the exercise's ``forbidden`` references raise (:func:`disable`, however the
    student's code reaches them); a call that reached one is reported as ``{"used_reference":
    [...]}``. Exceptions and SystemExit are caught (a check never ends the notebook's process); the
    grader's child also handles timeouts and a dying process. `fn_globals` is accepted for callers
    of older versions and not needed.
    """
    if ex.kind == "answer":
        try:
            return ex.run(obj, case)
        except (Exception, SystemExit) as err:
            return raised(err)
    if obj is None or not callable(obj):
        return {"raised": "NameError", "message": f"{ex.symbol} is not defined (or not a function)"}
    restore = disable(forbidden_targets(ex), ex.name)
    try:
        out = ex.run(obj, copy.deepcopy(case))
    except (Exception, SystemExit) as err:
        out = raised(err)
    finally:
        restore()
    label = _used_reference(out)
    return {"used_reference": [label]} if label else out


def judge(ex: Exercise, case: dict[str, Any], expected: Any, got: Any) -> str | None:
    """Feedback for one case (None = right). Shared by the notebook checks and the grader."""
    if isinstance(got, dict) and set(got) == {"used_reference"}:
        names = ", ".join(got["used_reference"])
        return f"your function calls {names}, the package's reference: write it yourself"
    if is_raised(expected):
        if is_raised(got) and got["raised"] == expected["raised"]:
            return None
        if is_raised(got):
            return f"should raise {expected['raised']}, but raised {got['raised']}: {got['message']}"
        return f"should raise {expected['raised']} ({expected['message'][:120]}), but returned {short(got)}"
    if is_raised(got):
        if got["raised"] == "NotImplementedError":
            return f"{ex.symbol} is not written yet (raised NotImplementedError)"
        if got["raised"] == "SystemExit":
            return "your code called sys.exit(); return a value instead"
        return f"raised {got['raised']}: {got['message']}"
    try:
        return ex.compare(case, expected, got)
    except Exception as err:  # a malformed answer must give feedback, not crash the check
        return f"returned something of the wrong shape ({type(err).__name__}: {err}); got {short(got)}"


def check_exercise(ex: Exercise, obj: Any) -> bool:
    """Run an exercise's cases on `obj` in this process; print feedback and one final line."""
    cases = ex.make_cases(CHECK_SEED)
    failures = []
    for i, case in enumerate(cases):
        expected = ex.reference(case)
        got = run_case(ex, obj, case)
        feedback = judge(ex, case, expected, got)
        if feedback is not None:
            failures.append((i, feedback))
    if not failures:
        print(f"check_{ex.name}: all {len(cases)} case{'s' if len(cases) != 1 else ''} passed")
        return True
    shown = failures[:3]
    for i, feedback in shown:
        print(f"  case {i}: {feedback}")
    if len(failures) > len(shown):
        print(f"  ... and {len(failures) - len(shown)} more failing case(s)")
    if ex.hint:
        print(f"  hint: {ex.hint}")
    print(f"check_{ex.name}: {len(cases) - len(failures)}/{len(cases)} cases passed, not yet")
    return False


def make_check(ex: Exercise) -> Callable[[Any], None]:
    """The notebook's ``check_<name>(obj)``: prints the feedback, returns nothing."""

    def check(obj: Any) -> None:
        check_exercise(ex, obj)  # no return value: a notebook cell shows the feedback, not "True"

    what = "your answer" if ex.kind == "answer" else f"your `{ex.symbol}`"
    check.__name__ = check.__qualname__ = f"check_{ex.name}"
    check.__doc__ = (
        f"Check {what} ({ex.notebook}) on hidden seeded cases against the package's "
        "reference; prints feedback, then one line saying whether all cases passed. "
        f"`run_check({ex.name!r}, obj)` does the same and returns True or False."
    )
    return check
