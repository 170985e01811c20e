"""A compiled training step (speed work): `torch.compile` on the model's repeated blocks.

Nothing here changes what a step computes; `tests/test_compiled.py` proves the compiled step
equal to the eager one (loss and gradients) for GPT-2 and Llama, padded and packed. Read
`training.train_step` for the step itself.

What compiling buys: PyTorch's compiler (inductor) fuses the element-wise work between the
matmuls (layer norm, GELU, residual adds, the attention's reshapes) into generated C++ (CPU) or
Triton (CUDA) kernels. The matmuls themselves were already near the hardware's peak, so the
gain is the share of a step spent between them. Compiling costs seconds up front, before the
first compiled step returns.

How: *regional* compilation. Each decoder block (`repeated_blocks`) but the last is compiled
in place, as ``nn.Module.compile`` would: the blocks share one class and so one compiled
graph, so compile time does not grow with depth, and the model's state dict keeps its names
(checkpoints load anywhere). Varying batch widths do not recompile: the blocks are compiled
for dynamic shapes from the start (one graph for every batch width and row length), and for
training steps only; forward passes without gradients (validation, generation) run eager. The
packed attention's per-example kernels stay outside the graph (a graph break), so packed and
padded batches both compile (`compiled_blocks` says what else stays eager).

When: ``TrainConfig(compile='on')`` compiles from the first step, ``'off'`` never, and
``'auto'`` (the default) only where it pays for the run at hand, compile time included: it
times the first eager steps, estimates what compiling would save over the remaining steps
(`expected_gain`) and compares that with what compiling costs (`expected_compile_seconds`).
Measured on the embedded model (2-core CPU): compiling saved 4-7% of a step and cost about
35 s, so on a CPU it pays after ten minutes or so of eager training only, and short runs (the
demo, the notebooks) stay eager.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

COMPILE_MODES = ("auto", "on", "off")
TIMED_STEPS = 3
"""Eager steps 'auto' times before it decides (the first one, with its warm-up, is not counted)."""

# Measured on the embedded model, fp32 and bf16 autocast, batches of 8 product descriptions, with
# eager and compiled steps interleaved on the same batches (so that the machine's drift cancels;
# benchmarks/bench_sft.py has whole runs): a compiled step took 0.93x (fp32) and 0.96x (bf16)
# of an eager one, and the first compiled step 33-37 s longer (a cold cache; inductor's disk
# cache shortens later runs). No GPU was measured; the CUDA figures are the usual order of
# magnitude for a small transformer.
_EXPECTED_GAIN = {"cpu": 0.06, "cuda": 0.25}
_EXPECTED_COMPILE_SECONDS = {"cpu": 35.0, "cuda": 60.0}


def expected_gain(device: torch.device) -> float:
    """Fraction of an eager step's time compiling is expected to save on this kind of device."""
    return _EXPECTED_GAIN.get(device.type, 0.0)


def expected_compile_seconds(device: torch.device) -> float:
    """Seconds compiling is expected to cost before the first compiled step returns."""
    return _EXPECTED_COMPILE_SECONDS.get(device.type, float("inf"))


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder blocks: the longest ModuleList whose children share one class.

    GPT-2 keeps them in ``transformer.h``, Llama and Qwen2 in ``model.layers``; LoRA wrappers
    and data-parallel wrappers only add levels above.
    """
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            children = list(module)
            if children and len({type(c) for c in children}) == 1:
                best = children
    if not best:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks to compile")
    return best


@contextmanager
def compiled_blocks(model: torch.nn.Module, dynamic: bool = True) -> Iterator[list[torch.nn.Module]]:
    """Compile the repeated blocks in place for the duration of the context, then undo it.

    Two things stay eager, so that no batch recompiles a graph: the last block, whose MLP the
    fused loss swaps for one that runs on the kept positions only (a new module every batch,
    `fused_loss._last_mlp_on_kept_rows`), and the packed attention (`attention.varlen_sdpa_attention`),
    whose loop over examples depends on each batch's boundaries. Yields the compiled blocks.
    """
    blocks = repeated_blocks(model)
    compiled = blocks[:-1] if len(blocks) > 1 else blocks
    for block in compiled:
        block._compiled_call_impl = _compiled_when_training(block, dynamic)
    try:
        with _packed_attention_outside_the_graph():
            yield compiled
    finally:
        for block in compiled:
            block._compiled_call_impl = None  # what nn.Module.compile set: back to eager


def _compiled_when_training(block: torch.nn.Module, dynamic: bool) -> Callable[..., Any]:
    """What ``nn.Module.compile`` installs, compiled for training steps only.

    Forward passes without gradients (validation, generation, the fused loss's one-off probe)
    run eager: compiling them too would cost a second graph for a few calls.
    """
    compiled_call = torch.compile(block._call_impl, dynamic=dynamic)

    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return compiled_call(*args, **kwargs)
        return block._call_impl(*args, **kwargs)

    return call


@contextmanager
def _packed_attention_outside_the_graph() -> Iterator[None]:
    """Register the packed attention as a function the compiler calls but does not trace."""
    from transformers import AttentionInterface

    from lumorik_sft.attention import VARLEN_ATTENTION, varlen_sdpa_attention

    mapping = AttentionInterface._global_mapping
    previous = mapping.get(VARLEN_ATTENTION)
    mapping[VARLEN_ATTENTION] = torch.compiler.disable(varlen_sdpa_attention)
    try:
        yield
    finally:
        if previous is None:
            mapping.pop(VARLEN_ATTENTION, None)
        else:
            mapping[VARLEN_ATTENTION] = previous


@dataclass
class CompileDecision:
    """What `TrainConfig.compile` did in a run: saved in `TrainResult.compile`.

    ``compiled``: whether steps ran compiled; ``at_step``: the first compiled step;
    ``seconds``: the compile time, measured as the first compiled step's time minus the fastest
    timed eager step's (with 'on' no eager step was timed: the whole first step); ``reason``:
    why, in words.
    """

    mode: str = "off"
    compiled: bool = False
    at_step: int | None = None
    seconds: float | None = None
    reason: str = ""
    _eager_steps: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class StepCompiler:
    """Turns compilation on for `train` (at once, never, or once it pays) and undoes it at the end."""

    def __init__(self, model: torch.nn.Module, mode: str, device: torch.device, total_steps: int) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self.model, self.device, self.total_steps = model, device, total_steps
        self.decision = CompileDecision(mode=mode)
        self._undo = ExitStack()  # holds compiled_blocks once compiling starts
        self._first_compiled_step = False
        if mode == "off":
            self.decision.reason = "compile='off'"

    def __enter__(self) -> StepCompiler:
        if self.decision.mode == "on":
            self._compile(step=1, reason="compile='on'")
        return self

    def __exit__(self, *exc: object) -> None:
        self._undo.close()

    def after_step(self, step: int, seconds: float) -> None:
        """Record the step's wall time; under 'auto', decide once enough eager steps are timed."""
        d = self.decision
        if self._first_compiled_step:
            self._first_compiled_step = False
            eager = min(d._eager_steps) if d._eager_steps else 0.0
            d.seconds = max(0.0, seconds - eager)
            return
        if d.compiled or d.mode != "auto" or d.reason:
            return
        if step > 1:  # the first step warms caches and allocators up: not representative
            d._eager_steps.append(seconds)
        if len(d._eager_steps) < TIMED_STEPS - 1 and step < self.total_steps:
            return
        remaining = self.total_steps - step
        step_seconds = min(d._eager_steps) if d._eager_steps else seconds
        saving = remaining * step_seconds * expected_gain(self.device)
        cost = expected_compile_seconds(self.device)
        words = (
            f"{remaining} steps left at {step_seconds:.3f} s: compiling would save about {saving:.0f} s "
            f"for about {cost:.0f} s of compiling on {self.device.type}"
        )
        if saving > cost:
            self._compile(step + 1, reason=f"compile='auto': {words}")
        else:
            d.reason = f"compile='auto' stayed eager: {words}"

    def _compile(self, step: int, reason: str) -> None:
        self._undo.enter_context(compiled_blocks(self.model))
        self.decision.compiled, self.decision.at_step, self.decision.reason = True, step, reason
        self._first_compiled_step = True
