"""Models and tokenizers: the embedded base model, any Hugging Face causal LM, and tiny toys.

Every API in the package that takes a model goes through `load_model_and_tokenizer`, so a
Hugging Face name (`gpt2`, `HuggingFaceTB/SmolLM2-135M`) or a local path works the same way as
the embedded model. Tests and smoke runs build tiny GPT-2, Llama and Qwen2 models in-process
with `build_model`, which proves the code serves more than one architecture without a download.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "base-model"
# The same model with role tokens and a chat template (`lumorik_sft.chat`), made from the base model
# by `python -m lumorik_sft.basemodel.chat_variant`; the pair-task notebooks keep the base model.
EMBEDDED_CHAT_MODEL_DIR = EMBEDDED_MODEL_DIR.parent / "chat-model"
# Names that `load_model_and_tokenizer` (and every --model flag) accepts for the shipped models.
EMBEDDED_ALIASES = {"embedded": EMBEDDED_MODEL_DIR, "embedded-chat": EMBEDDED_CHAT_MODEL_DIR}
ARCHITECTURES = ("gpt2", "llama", "qwen2")


def embedded_model_path() -> Path:
    """Path of the small pretrained model shipped inside the package (Hugging Face format)."""
    if not (EMBEDDED_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded base model is missing at {EMBEDDED_MODEL_DIR}; "
            "rebuild it with `lumorik-sft pretrain` or pass a model name or path"
        )
    return EMBEDDED_MODEL_DIR


def embedded_chat_model_path() -> Path:
    """Path of the embedded model with the chat format (role tokens, template, stop token)."""
    if not (EMBEDDED_CHAT_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded chat model is missing at {EMBEDDED_CHAT_MODEL_DIR}; rebuild it with "
            "`python -m lumorik_sft.basemodel.chat_variant` or pass a model name or path"
        )
    return EMBEDDED_CHAT_MODEL_DIR


def has_embedded_model() -> bool:
    """True when the package ships its pretrained base model."""
    return (EMBEDDED_MODEL_DIR / "config.json").exists()


def cpu_supports_bf16() -> bool:
    """Whether oneDNN has fast bf16 kernels on this CPU (AVX512-BF16 or AMX).

    Without them bf16 autocast on a CPU emulates bf16 and is slower than fp32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position embeddings allow (None if unbounded)."""
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU: the fastest device this machine has, unless told otherwise."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer the pad token SFT needs, without touching the vocabulary.

    GPT-2's tokenizer has no pad token (so the chapter's `padding="max_length"` raises). We reuse
    EOS as pad: it adds no embedding row, and it is safe because our labels and attention masks
    are built from lengths, never from `input_ids == pad_token_id` (which would also mask the
    real EOS that ends every completion).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token; set tokenizer.eos_token "
            "so completions can teach the model where to stop"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Open a causal LM and its tokenizer: the embedded model by default, or any HF name or path.

    ``"embedded"`` and ``"embedded-chat"`` name the shipped models (the second has the chat format).

    A local folder must hold a saved model (config.json); a name that can only be a path (absolute,
    starting with `.` or `~`, or with more folders than a Hugging Face `owner/name`) and names no
    folder raises FileNotFoundError instead of Hugging Face's rules for model names.
    """
    source = resolve_alias(str(name_or_path) if name_or_path is not None else "embedded")
    source = _check_model_folder(source)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    adapter = Path(source) / "adapter_config.json"
    if adapter.exists():  # a LoRA adapter (ours or PEFT's): its base model, then the adapter
        from lumorik_sft import lora

        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"{adapter} names no base_model_name_or_path; load the base and use lora.load_adapter"
            )
        model = AutoModelForCausalLM.from_pretrained(_check_model_folder(resolve_alias(base)), **kwargs)
        model = lora.load_adapter(_declare_causal_lm_loss(model), source)
    else:
        model = _declare_causal_lm_loss(AutoModelForCausalLM.from_pretrained(source, **kwargs))
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    return model.to(resolve_device(device)), tokenizer


def resolve_alias(name: str) -> str:
    """'embedded' and 'embedded-chat' -> their folders; any other name unchanged."""
    if name == "embedded":
        return str(embedded_model_path())
    if name == "embedded-chat":
        return str(embedded_chat_model_path())
    return name


def model_source_name(model: PreTrainedModel) -> str | None:
    """Where a model was loaded from, as a name that works on any machine.

    The shipped models are named by their aliases ('embedded', 'embedded-chat') rather than by
    this checkout's absolute path, so an adapter saved here loads on a student's laptop too.
    """
    source = getattr(model, "name_or_path", None) or None
    if source is None:
        return None
    return embedded_alias(source) or str(source)


def embedded_alias(path: str | Path) -> str | None:
    """'embedded' or 'embedded-chat' when ``path`` is that shipped model's folder, else None."""
    resolved = Path(path).expanduser().resolve()
    return next((a for a, folder in EMBEDDED_ALIASES.items() if resolved == folder.resolve()), None)


def shown_path(path: str | Path) -> str:
    """A path as printed to a student: never this machine's absolute path.

    The shipped models print as their aliases ('embedded'), a path under the working directory
    relative to it, one under the temporary directory as ``$TMPDIR/...``; other names (a hub
    name, a path the student typed) unchanged.
    """
    import tempfile

    text = str(path)
    alias = embedded_alias(text)
    if alias is not None or not Path(text).expanduser().is_absolute():
        return alias or text
    resolved = Path(text).expanduser().resolve()
    for base, prefix in ((Path.cwd(), ""), (Path(tempfile.gettempdir()), "$TMPDIR/")):
        with contextlib.suppress(ValueError):
            return prefix + str(resolved.relative_to(base.resolve()))
    return text


def _declare_causal_lm_loss(model: PreTrainedModel) -> PreTrainedModel:
    """Name the loss of a causal LM whose class name transformers cannot map to one.

    transformers 5 picks a model's loss from its class name; GPT-2's (`GPT2LMHeadModel`) matches
    none, so the first ``model(..., labels=...)`` warns on stderr that it falls back to the
    causal-LM loss. It is a causal LM: saying so silences nothing else and changes no number.
    """
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model


def _check_model_folder(source: str) -> str:
    """`source` with `~` expanded; FileNotFoundError for a path with no saved model there."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise FileNotFoundError(
                f"{source} has no config.json, so it is not a saved model folder (save one with "
                "save_pretrained, give a LoRA adapter folder, or give a Hugging Face model name)"
            )
        return str(path)
    parts = source.replace("\\", "/").split("/")
    if (
        path.is_absolute()
        or source.startswith((".", "~"))
        or "\\" in source
        or len(parts) > 2
        or (len(parts) == 2 and path.parent.is_dir())
    ):
        raise FileNotFoundError(
            f"no model folder at {source} (give a local folder with config.json, "
            "or a Hugging Face model name)"
        )
    return source


def train_bpe_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2's scheme) with distinct EOS and pad tokens.

    Byte-level means any UTF-8 text is encodable (no unknown token); a distinct pad token keeps
    padding visibly apart from the EOS that ends each completion.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1024,
    )


def model_config(
    arch: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_layer: int = 2,
    width: int = 64,
    n_head: int = 4,
    context: int = 256,
) -> PretrainedConfig:
    """A small config of the given architecture sized to the tokenizer's vocabulary."""
    special = {
        "bos_token_id": tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None
        else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = len(tokenizer)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_positions=context,
            n_embd=width,
            n_layer=n_layer,
            n_head=n_head,
            **special,
        )
    if arch in ("llama", "qwen2"):
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        return cls(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=width * 4,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=max(1, n_head // 2),
            max_position_embeddings=context,
            tie_word_embeddings=True,
            **special,
        )
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_model(
    arch: str, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, **size: int
) -> PreTrainedModel:
    """A randomly initialised causal LM, seeded so that two builds are identical."""
    config = model_config(arch, tokenizer, **size)
    torch.manual_seed(seed)
    model = _declare_causal_lm_loss(AutoModelForCausalLM.from_config(config))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def fused_activations(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Swap GPT-2's Python GELU for PyTorch's fused tanh GELU inside the block.

    GPT-2's ``gelu_new`` computes 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) as seven
    element-wise operations, each saving a tensor for backward; on a small model that was
    ~15% of a CPU training step here, and its temporaries set the peak memory of an
    evaluation. ``F.gelu(x, approximate="tanh")`` is the same formula in one kernel
    (transformers' own ``GELUTanh``), computed in float32 inside, so in bf16 it is if
    anything more exact. The original modules come back on exit (they hold no
    weights, so checkpoints are unaffected). Yields how many modules were swapped.
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    if enabled:
        for parent in model.modules():
            for name, child in parent.named_children():
                if type(child) in (NewGELUActivation, FastGELUActivation):
                    swapped.append((parent, name, child))
        for parent, name, _ in swapped:
            setattr(parent, name, GELUTanh())
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
