"""The recipe's settings: one dataclass, each field with its help (also the `pretrain` flags)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lumorik_sft.basemodel.corpus import DEFAULT_SOURCES, CorpusSource
from lumorik_sft.models import EMBEDDED_MODEL_DIR


@dataclass
class PretrainConfig:
    """Settings of the pretraining recipe; the defaults build the embedded model.

    Corpus: sources, max_corpus_chars, val_fraction. Tokenizer: vocab_size, min_frequency.
    Model: n_layer, width, n_head, context, dropout. Optimisation: learning_rate, batch_size,
    max_steps, warmup_steps, weight_decay, max_grad_norm, seed. Hardware: device, precision,
    threads. Output: output_dir, work_dir, progress.
    """

    sources: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Corpus source names to use (default: all of corpus.DEFAULT_SOURCES)."},
    )
    max_corpus_chars: int | None = field(
        default=None,
        metadata={"help": "Cap on corpus characters, filled in source order (None: ~10M, all sources)."},
    )
    val_fraction: float = field(
        default=0.02, metadata={"help": "Fraction of modules held out as validation text (whole modules)."}
    )
    vocab_size: int = field(
        default=4096,
        metadata={
            "help": "BPE vocabulary. 4,096 keeps the embedding and output layers (a quarter of "
            "the compute at width 256) small; a larger one gives shorter sequences."
        },
    )
    min_frequency: int = field(
        default=2,
        metadata={"help": "A BPE merge must occur this often; 2 keeps one-off strings out of the vocab."},
    )
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks."})
    width: int = field(default=256, metadata={"help": "Hidden size (n_embd)."})
    n_head: int = field(default=4, metadata={"help": "Attention heads (head size width/n_head)."})
    context: int = field(
        default=256,
        metadata={"help": "Tokens per training block and the model's maximum length (n_positions)."},
    )
    dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout in every layer. 0: a short run over ~3.6 passes of the corpus "
            "underfits, so regularisation only slows it down."
        },
    )
    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Peak AdamW learning rate; small models train well at 1e-3 with warmup."},
    )
    batch_size: int = field(
        default=16, metadata={"help": "Blocks per optimizer step (16 x 256 = 4,096 tokens)."}
    )
    # 3,500 steps of 16 x 256 tokens = 14.3M tokens, about 3.6 passes over the corpus. The
    # recipe's time on each kind of CPU (bf16 where native, fp32 elsewhere) is what
    # `benchmarks/bench_base_model.py` prints and the model card records; it is not repeated here.
    max_steps: int = field(
        default=3500,
        metadata={"help": "Optimizer steps: the stopping rule (a fixed count keeps runs reproducible)."},
    )
    warmup_steps: int = field(
        default=200, metadata={"help": "Linear warmup steps before the linear decay to 0 at max_steps."}
    )
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay on weight matrices (GPT-style pretraining value)."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping: guards the early high-learning-rate steps."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seeds the model initialisation and the order of training blocks."}
    )
    device: str = field(
        default="auto",
        metadata={"help": "'auto' (CUDA, MPS, CPU) or a torch device; the card records which ran."},
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "'auto' (bf16 autocast where the CPU or GPU supports bf16, else fp32), 'fp32' or 'bf16'."
        },
    )
    threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads (None: leave torch's default); results depend on it."},
    )
    output_dir: str = field(
        default=str(EMBEDDED_MODEL_DIR),
        metadata={"help": "Where the Hugging Face folder goes (default: inside the package)."},
    )
    work_dir: str | None = field(
        default=None, metadata={"help": "Checkpoints for resuming after Ctrl-C (None: no checkpoints)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar and log lines."})

    def __post_init__(self) -> None:
        if isinstance(self.sources, list):
            self.sources = tuple(self.sources)
        if self.width % self.n_head:
            raise ValueError(
                f"width {self.width} must be divisible by n_head {self.n_head}; "
                "e.g. width 256 with 4 or 8 heads"
            )
        for name in ("vocab_size", "n_layer", "width", "n_head", "context", "batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 259:
            raise ValueError(
                f"vocab_size must be >= 259 (256 bytes + 2 special tokens + 1), got {self.vocab_size}"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def corpus_sources(self) -> tuple[CorpusSource, ...]:
        """The `CorpusSource`s named by `sources` (all defaults when None)."""
        if self.sources is None:
            return DEFAULT_SOURCES
        known = {s.name: s for s in DEFAULT_SOURCES}
        unknown = [n for n in self.sources if n not in known]
        if unknown:
            raise ValueError(f"unknown corpus sources {unknown}; choose from {sorted(known)}")
        return tuple(known[n] for n in self.sources)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sources"] = list(self.sources) if self.sources is not None else None
        return data

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for the CLI and the model card."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
