"""The LoRA exercises of 10_lora.ipynb: the solutions pass on any seed, each common mistake fails with a
message naming the part that is wrong (scale, zero start of B, transposition for Conv1D, bias, in place),
and the hidden layers are seeded and cover both weight layouts.

`tests/test_checks.py` and `tests/test_grading.py` also run `WRONG_LORA` (it joins their `WRONG`), with
every other exercise's variants: the stubs fail, the grader grades the notebook like the others.
"""
# ruff: noqa: E501  (wrong solutions are written as source snippets)

from __future__ import annotations

import contextlib
from pathlib import Path

import nbformat
import pytest
import torch

from lumorik_sft.course import checks
from lumorik_sft.course.checks import ch10_lora
from lumorik_sft.course.checks.framework import judge, run_case
from lumorik_sft.course.grading import _compile_cell

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "10_lora.ipynb"

_INIT = (
    "def init_lora(in_features, out_features, r, generator):  # {}\n    bound = 1 / math.sqrt(in_features)\n"
)
_FORWARD = "def lora_forward(x, weight, bias, A, B, alpha, r, fan_in_fan_out=False):  # {}\n"
_BASE = "    base = x @ (weight if fan_in_fan_out else weight.T) + (0 if bias is None else bias)\n"
_MERGE = "def merge_weight(weight, A, B, alpha, r, fan_in_fan_out=False):  # {}\n"

# Plausible wrong versions, each with the feedback it must get. Each is exec'd in the solution
# notebook's namespace (torch, math, lora).
WRONG_LORA: dict[str, list[tuple[str, str]]] = {
    "init_lora": [
        (
            _INIT.format("B random too")
            + "    A = (torch.rand(r, in_features, generator=generator) * 2 - 1) * bound\n"
            "    B = (torch.rand(out_features, r, generator=generator) * 2 - 1) * bound\n"
            "    return A, B",
            "B must start at zeros",
        ),
        (
            _INIT.format("both zeros")
            + "    return torch.zeros(r, in_features), torch.zeros(out_features, r)",
            "A must be small random values, not zeros",
        ),
        (
            _INIT.format("torch.randn: std 1")
            + "    return torch.randn(r, in_features, generator=generator), torch.zeros(out_features, r)",
            "standard deviation",
        ),
        (
            _INIT.format("the global random state")
            + "    return (torch.rand(r, in_features) * 2 - 1) * bound, torch.zeros(out_features, r)",
            "draw with the generator you are given",
        ),
        (
            _INIT.format("A transposed")
            + "    return (torch.rand(in_features, r, generator=generator) * 2 - 1) * bound, torch.zeros(out_features, r)",
            "(transposed), expected [r, in]",
        ),
        (
            _INIT.format("B transposed")
            + "    return (torch.rand(r, in_features, generator=generator) * 2 - 1) * bound, torch.zeros(r, out_features)",
            "(transposed), expected [out, r]",
        ),
    ],
    "lora_forward": [
        (
            _FORWARD.format("no scaling") + _BASE + "    return base + x @ A.T @ B.T",
            "the LoRA part B(A x) is not scaled at all",
        ),
        (
            _FORWARD.format("r / alpha") + _BASE + "    return base + x @ A.T @ B.T * (r / alpha)",
            "scaled by r / alpha, the inverse",
        ),
        (
            _FORWARD.format("alpha only") + _BASE + "    return base + x @ A.T @ B.T * alpha",
            "scaled by alpha: divide by r too",
        ),
        (
            _FORWARD.format("Conv1D weight used as an nn.Linear's")
            + "    base = x @ weight.T + (0 if bias is None else bias)\n"
            "    return base + x @ A.T @ B.T * (alpha / r)",
            "the frozen part uses the weight in the wrong layout: for Conv1D (fan_in_fan_out=True)",
        ),
        (
            _FORWARD.format("bias left out")
            + "    return x @ (weight if fan_in_fan_out else weight.T) + x @ A.T @ B.T * (alpha / r)",
            "the bias is missing",
        ),
        (
            _FORWARD.format("LoRA part left out") + _BASE + "    return base",
            "your output is the frozen layer's alone",
        ),
        (
            _FORWARD.format("B A in the wrong order")
            + _BASE
            + "    return base + x @ B.T @ A.T * (alpha / r)",
            "x is [batch, seq, in], A is [r, in] and B is [out, r]",
        ),
    ],
    "merge_weight": [
        (
            _MERGE.format("Conv1D: delta not transposed") + "    return weight + (B @ A) * (alpha / r)",
            "you added B @ A without transposing it: a Conv1D (fan_in_fan_out=True) stores its weight",
        ),
        (
            _MERGE.format("no scaling") + "    return weight + ((B @ A).T if fan_in_fan_out else B @ A)",
            "the update added to the weight is not scaled at all",
        ),
        (
            _MERGE.format("r / alpha")
            + "    delta = (B @ A) * (r / alpha)\n    return weight + (delta.T if fan_in_fan_out else delta)",
            "the update added to the weight is scaled by r / alpha, the inverse",
        ),
        (
            _MERGE.format("in place")
            + "    delta = (B @ A) * (alpha / r)\n    weight += delta.T if fan_in_fan_out else delta\n    return weight",
            "you changed the weight you were given in place",
        ),
        (
            _MERGE.format("the delta alone")
            + "    delta = (B @ A) * (alpha / r)\n    return delta.T if fan_in_fan_out else delta",
            "you returned the update alone",
        ),
        (
            _MERGE.format("transposed for nn.Linear too") + "    return weight + (B @ A).T * (alpha / r)",
            "you transposed the update for an nn.Linear",
        ),
    ],
}


def _namespace(folder: str) -> dict:
    """The notebook's code run as the grader runs it (without the checks. calls)."""
    ns: dict = {"__name__": "__main__", "display": lambda *a, **k: None}
    nb = nbformat.read(ROOT / folder / NOTEBOOK, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        with contextlib.suppress(NotImplementedError):  # the exercise notebook's demo cells call the stubs
            code = _compile_cell(cell.source, i)
            if code is not None:
                exec(code, ns)
    return ns


@pytest.fixture(scope="module")
def solution():
    return _namespace("solutions")


NAMES = ("init_lora", "lora_forward", "merge_weight")


@pytest.mark.parametrize("name", NAMES)
def test_the_solution_passes_and_the_stub_fails(name, solution, capsys):
    assert checks.run_check(name, solution[name])
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("passed")
    assert not checks.run_check(name, _namespace("exercises").get(name))
    assert "not written yet (raised NotImplementedError)" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_the_solution_passes_whatever_seed_the_grader_draws(name, solution):
    ex = checks.EXERCISES[name]
    failed = [
        (seed, k, feedback)
        for seed in range(40)
        for k, case in enumerate(ex.make_cases(seed))
        if (feedback := judge(ex, case, ex.reference(case), run_case(ex, solution[name], case))) is not None
    ]
    assert failed == []


@pytest.mark.parametrize(
    "name,index", [(n, i) for n, variants in WRONG_LORA.items() for i in range(len(variants))]
)
def test_a_wrong_version_fails_naming_the_wrong_part(name, index, solution, capsys):
    source, feedback = WRONG_LORA[name][index]
    ns = dict(solution)
    exec(source, ns)
    assert not checks.run_check(name, ns[name])
    out = capsys.readouterr().out
    assert feedback in out, out
    assert out.strip().splitlines()[-1].endswith("not yet")


def test_hidden_layers_are_seeded_and_cover_both_layouts_square_and_no_bias():
    for make in (ch10_lora.layer_cases, ch10_lora.init_cases):
        assert make(0) == make(0)
        assert make(0) != make(1)
    for seed in range(20):
        cases = ch10_lora.layer_cases(seed)
        assert {c["fan_in_fan_out"] for c in cases} == {False, True}
        assert {c["bias"] for c in cases} == {False, True}
        square = {c["fan_in_fan_out"] for c in cases if c["in_features"] == c["out_features"]}
        assert square == {False, True}  # a forgotten transposition raises nothing there
        assert all(c["alpha"] != c["r"] for c in cases)  # so alpha / r, r / alpha and 1 differ
        t = ch10_lora.tensors(cases[0])
        assert torch.equal(t["x"], ch10_lora.tensors(cases[0])["x"])


def test_the_reference_is_lora_linear_and_its_merge_keeps_the_output():
    """The expected output is LoraLinear's, which is the formula; merging keeps it (asserted inside)."""
    for case in ch10_lora.layer_cases(3):
        t = ch10_lora.tensors(case)
        weight = t["weight"].T if case["fan_in_fan_out"] else t["weight"]
        bias = t["bias"] if case["bias"] else 0
        formula = t["x"] @ weight.T + bias + t["x"] @ t["A"].T @ t["B"].T * (case["alpha"] / case["r"])
        got = torch.tensor(ch10_lora._forward_reference(case), dtype=torch.float64)
        assert torch.allclose(got, formula, rtol=1e-9, atol=1e-10)
        ch10_lora._merge_reference(case)


def test_calling_the_package_lora_is_caught(solution, capsys):
    ns = dict(solution)
    exec(
        "def lora_forward(x, weight, bias, A, B, alpha, r, fan_in_fan_out=False):\n"
        "    layer = lora.LoraLinear(torch.nn.Linear(A.shape[1], B.shape[0]), r, alpha, 0.0, torch.Generator())\n"
        "    return layer(x)",
        ns,
    )
    assert not checks.run_check("lora_forward", ns["lora_forward"])
    assert "calls lumorik_sft.lora.LoraLinear, the package's reference" in capsys.readouterr().out


def test_wrong_returns_get_feedback_not_a_crash(solution, capsys):
    for source in (
        "def lora_forward(x, weight, bias, A, B, alpha, r, fan_in_fan_out=False):\n    return 'h'",
        "def lora_forward(x, weight, bias, A, B, alpha, r, fan_in_fan_out=False):\n    return x",
        "def init_lora(in_features, out_features, r, generator):\n    return torch.zeros(r, in_features)",
    ):
        ns = dict(solution)
        exec(source, ns)
        name = source.split("(")[0].removeprefix("def ")
        assert not checks.run_check(name, ns[name])
        assert capsys.readouterr().out.strip().splitlines()[-1].endswith("not yet")


def test_a_check_leaves_the_global_random_state_alone(solution):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    for name in NAMES:
        checks.run_check(name, solution[name])
    assert torch.equal(torch.random.get_rng_state(), before)
