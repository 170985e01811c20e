"""Checks for the exercise notebooks: hidden, seeded cases compared with the package's reference.

In a notebook, right after writing an exercise::

    from lumorik_sft.course import checks
    checks.check_encode_example(encode_example)   # feedback lines, then one "passed" line

The ``check_*`` functions print and return nothing, so a cell shows only the feedback;
``run_check(name, obj)`` returns the verdict as a bool. Neither ever exits the interpreter.
The instructor grader (:mod:`lumorik_sft.course.grading`) uses the same :data:`EXERCISES`,
:func:`run_case` and :func:`judge`.

What is where:

* :mod:`.framework`: the machinery (:class:`Exercise`, :class:`Chapter`, :func:`run_case`, the
  in-place disabling of the references (:func:`.framework.disable`), :func:`judge`,
  :func:`to_data`) and what the chapters share (:data:`TOY_TEXTS`, :func:`toy_tokenizer`,
  helpers to make cases);
* one module per notebook, each exercise's cases, reference, run and compare functions followed
  by its registration: :mod:`.ch01_data` (``01_data_curation.ipynb``), :mod:`.ch02_encoding`
  (``02_tokenization.ipynb``), :mod:`.ch03_training` (``03_training_loop.ipynb``),
  :mod:`.ch04_evaluation` (``04_evaluation.ipynb``), :mod:`.ch05_worked_example`
  (``05_worked_example.ipynb``), :mod:`.ch06_questions` (``06_practice_questions.ipynb``),
  :mod:`.ch09_chat` (``09_chat_sft.ipynb``) and :mod:`.ch10_lora` (``10_lora.ipynb``);
* this module: :data:`EXERCISES` in notebook order, and a ``check_<name>`` function for each.

To add an exercise: in its notebook's chapter module, write ``make_cases``, ``reference``, ``run``
and ``compare`` (import the package's modules inside the functions, so importing the checks stays
quick), then right after them::

    CHAPTER.register(name="my_exercise", symbol="my_exercise", points=1, make_cases=_my_cases,
                     reference=_my_reference, run=_run_my, compare=_my_compare,
                     forbidden=("lumorik_sft.data:the_reference",), wrong_variants=(...))

``checks.check_my_exercise`` then exists; give it wrong variants in ``tests/test_checks.py``.
For a new notebook, add a chapter module and list it in :data:`CHAPTERS` below (in notebook
order).
"""

from __future__ import annotations

from typing import Any

from lumorik_sft.course.checks import (
    ch01_data,
    ch02_encoding,
    ch03_training,
    ch04_evaluation,
    ch05_worked_example,
    ch06_questions,
    ch09_chat,
    ch10_lora,
    framework,
)
from lumorik_sft.course.checks.framework import (
    CHECK_SEED,
    TOY_TEXTS,
    Exercise,
    NotData,
    judge,
    make_check,
    run_case,
    to_data,
    toy_tokenizer,
)
from lumorik_sft.course.checks.framework import raised as _raised  # noqa: F401  (the grader's name)

CHAPTERS = (
    ch01_data,
    ch02_encoding,
    ch03_training,
    ch04_evaluation,
    ch05_worked_example,
    ch06_questions,
    ch09_chat,
    ch10_lora,
)

EXERCISES: dict[str, Exercise] = {ex.name: ex for m in CHAPTERS for ex in m.CHAPTER.exercises}
NOTEBOOKS: tuple[str, ...] = tuple(m.CHAPTER.notebook for m in CHAPTERS)


def run_check(name: str, obj: Any) -> bool:
    """Run exercise `name`'s cases on `obj` in this process; print feedback and one final line."""
    return framework.check_exercise(EXERCISES[name], obj)


for _ex in EXERCISES.values():  # check_clean_and_dedupe, ..., check_q5
    _check = make_check(_ex)
    _check.__module__ = __name__
    globals()[_check.__name__] = _check
del _ex, _check

__all__ = [
    "CHAPTERS",
    "CHECK_SEED",
    "EXERCISES",
    "NOTEBOOKS",
    "TOY_TEXTS",
    "Exercise",
    "NotData",
    "judge",
    "run_case",
    "run_check",
    "to_data",
    "toy_tokenizer",
    *(f"check_{name}" for name in EXERCISES),
]
