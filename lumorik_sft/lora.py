"""LoRA from scratch: train two thin matrices beside each frozen weight, in PEFT's file format.

A linear layer computes ``W x`` with ``W`` of shape ``[out, in]``. LoRA (Hu et al. 2021) freezes
``W`` and learns a low-rank update instead: ``W x + (alpha / r) * B (A x)``, with ``A`` of shape
``[r, in]`` (small random values) and ``B`` of shape ``[out, r]`` (zeros, so the model starts out
exactly as it was). A layer then trains ``r * (in + out)`` numbers instead of ``in * out``. On the
embedded model (GPT-2 shape: width 256, 4 blocks, 4,273,664 parameters) with r = 8::

    >>> model, _ = load_model_and_tokenizer()              # lumorik_sft.models
    >>> model = add_lora(model, LoraSettings(r=8, targets=("attention",)))
    >>> trainable_parameters(model)                        # c_attn: 8 * (256 + 3 * 256), 4 blocks
    (32768, 4306432)                                       # 0.77% of the base model
    >>> # targets=("all-linear",) adds attn.c_proj 8 * (256 + 256), mlp.c_fc 8 * (256 + 1024)
    >>> # and mlp.c_proj 8 * (1024 + 256): 131072 trainable, 3.07% of the base model

After training, ``B A`` can be added into ``W`` (`merge_lora`), so the merged model is an ordinary
model that costs nothing extra at inference (`merged_copy`, then ``save_pretrained``).

Interchangeable with Hugging Face PEFT (``pip install lumorik-sft[peft]``): `save_adapter` writes
``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's names, so
``peft.PeftModel.from_pretrained(base, folder)`` loads it, and `load_adapter` loads an adapter that
PEFT saved. This module never imports peft; ``tests/test_lora.py`` proves both directions equal.

Trainable tokens (new special tokens such as chat role tokens have embedding rows that were never
trained) follow PEFT's ``trainable_token_indices``: the chosen rows get new, trainable values that
replace the frozen rows in the embedding and, when the LM head shares the embedding matrix
(GPT-2, and our tiny Llama and Qwen2), in the LM head too. Run ``pytest tests/test_lora.py``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lumorik_sft.chat import CHAT_TOKENS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT saves names as seen from its PeftModel wrapper
PRESETS = ("attention", "all-linear")
# The query, key and value projections: GPT-2 fuses them into one `c_attn`, Llama and Qwen2 keep
# three. The attention's output projection (GPT-2 `attn.c_proj`, Llama `o_proj`) is left to
# "all-linear", so "attention" means the same weights in every architecture.
ATTENTION_NAMES = ("c_attn", "q_proj", "k_proj", "v_proj")


@dataclass
class LoraSettings:
    """What LoRA trains: rank, scale, dropout, which layers, and which token embeddings.

    The scale of the update is ``alpha / r``; keeping alpha fixed while changing r keeps the
    update's size comparable across ranks.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank: the inner width of each B A update."})
    alpha: float = field(
        default=16, metadata={"help": "LoRA scale numerator: the update is multiplied by alpha / r."}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the input of A during training (0 disables it)."}
    )
    targets: tuple[str, ...] = field(
        default=("attention",),
        metadata={
            "help": "'attention' (query, key, value projections: GPT-2 c_attn, Llama/Qwen2 "
            "q_proj k_proj v_proj), 'all-linear' (every Linear/Conv1D but the LM head), or "
            "module names, matched as PEFT does: the full name or its last parts (c_attn, "
            "attn.c_proj)."
        },
    )
    trainable_tokens: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "Token ids whose input-embedding rows train too (new special tokens such as "
            "chat role tokens); a tied LM head uses the same rows."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seeds the random initialisation of every A."})

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # LoraSettings(targets="q_proj,v_proj") reads naturally
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        self.trainable_tokens = tuple(int(t) for t in self.trainable_tokens)
        problems = []
        if not (isinstance(self.r, int) and self.r >= 1):
            problems.append(f"r={self.r!r}: the rank must be a whole number >= 1 (8 is typical)")
        if not self.alpha > 0:
            problems.append(f"alpha={self.alpha!r}: must be > 0 (2 * r is a common choice)")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r}: must be in [0, 1) (0.05 is common, 0 disables it)")
        if not self.targets:
            problems.append("targets is empty: give 'attention', 'all-linear' or module names")
        elif any(t in PRESETS for t in self.targets) and len(self.targets) > 1:
            problems.append(f"targets={self.targets}: use one preset alone, or module names only")
        tokens = self.trainable_tokens
        if min(tokens, default=0) < 0 or len(set(tokens)) < len(tokens):
            problems.append(f"trainable_tokens={self.trainable_tokens}: give distinct token ids >= 0")
        if problems:
            raise ValueError("invalid LoRA settings:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- the layers


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` plus the trainable update ``B A * alpha / r``.

    GPT-2's Conv1D stores its weight transposed (``[in, out]``; PEFT's ``fan_in_fan_out``), which
    matters only when merging: A and B are ordinary ``nn.Linear`` layers either way.
    """

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, dropout: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        in_features, out_features = weight.shape if self.fan_in_fan_out else weight.shape[::-1]
        # skip_init: nn.Linear's own init would draw from the global RNG; A gets a seeded one.
        self.lora_A = nn.utils.skip_init(nn.Linear, in_features, r, bias=False, device="cpu")
        self.lora_B = nn.utils.skip_init(nn.Linear, r, out_features, bias=False, device="cpu")
        with torch.no_grad():
            # Uniform in +-1/sqrt(in): PEFT's default kaiming_uniform_(a=sqrt(5)), nn.Linear's too.
            bound = 1 / math.sqrt(in_features)
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()  # B = 0: the wrapped layer starts out equal to the original
        self.lora_A.to(weight.device, weight.dtype)
        self.lora_B.to(weight.device, weight.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.merged = False  # True once B A is inside base_layer.weight: forward must not add it again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``B A * scaling`` in the base weight's layout (``[out, in]``, transposed for Conv1D)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight()
            self.merged = False


class TrainableTokens(nn.Module):
    """An embedding whose chosen rows train: new values replace the frozen rows at lookup.

    Named as in PEFT's ``trainable_token_indices`` so adapters interchange:
    ``trainable_tokens_delta`` holds the rows' new *values* (PEFT's name; not a difference),
    starting as copies of the originals, so the model starts out unchanged.
    """

    def __init__(self, base_layer: nn.Embedding, token_indices: tuple[int, ...]) -> None:
        super().__init__()
        if type(base_layer) is not nn.Embedding:
            raise TypeError(
                f"trainable tokens need a plain nn.Embedding, not {type(base_layer).__name__} "
                "(which may scale its output); leave trainable_tokens empty for this model"
            )
        if max(token_indices) >= base_layer.num_embeddings:
            raise ValueError(
                f"trainable token {max(token_indices)} is outside the vocabulary of "
                f"{base_layer.num_embeddings}; add the tokens (and resize the embeddings) first"
            )
        self.base_layer = base_layer
        self.token_indices = list(token_indices)
        index = torch.tensor(self.token_indices, device=base_layer.weight.device)
        self.register_buffer("index", index, persistent=False)
        rows = base_layer.weight[index].detach().clone()
        self.trainable_tokens_delta = nn.Parameter(rows.clone())
        self.register_buffer("trainable_tokens_original", rows, persistent=False)  # for unmerge
        self.merged = False

    def weight_with_tokens(self) -> torch.Tensor:
        """The embedding matrix with the chosen rows replaced (a new tensor; gradients reach only them)."""
        return self.base_layer.weight.index_copy(0, self.index, self.trainable_tokens_delta)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(input_ids)
        return F.embedding(input_ids, self.weight_with_tokens(), self.base_layer.padding_idx)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.index_copy_(0, self.index, self.trainable_tokens_delta)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.index_copy_(0, self.index, self.trainable_tokens_original)
            self.merged = False


class TiedTokenHead(nn.Module):
    """An LM head that shares the embedding matrix, reading the same replaced rows as the embedding."""

    def __init__(self, base_layer: nn.Linear, tokens: TrainableTokens) -> None:
        super().__init__()
        self.base_layer = base_layer
        # In a list, so the rows are not registered twice: the embedding owns (and saves) them.
        self._tokens = [tokens]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = self._tokens[0]
        if tokens.merged:  # the new rows are inside the shared matrix already
            return self.base_layer(hidden)
        return F.linear(hidden, tokens.weight_with_tokens(), self.base_layer.bias)


ADAPTER_LAYERS = (LoraLinear, TrainableTokens, TiedTokenHead)


# --------------------------------------------------------------------------- adding LoRA to a model


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze `model` and wrap its target layers with LoRA, in place; returns the model.

    Every weight of the model is frozen; the trainable parameters are then each wrapped layer's
    A and B and, for ``settings.trainable_tokens``, the new values of those embedding rows.
    """
    if any(isinstance(m, ADAPTER_LAYERS) for m in model.modules()):
        raise ValueError("this model has LoRA layers already; start from the base model")
    names = resolve_targets(model, settings.targets)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(settings.seed)
    for name, module in list(model.named_modules()):
        if _matches(name, names):
            _replace(model, name, LoraLinear(module, settings.r, settings.alpha, settings.dropout, generator))
    if settings.trainable_tokens:
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        tokens = TrainableTokens(embedding, settings.trainable_tokens)
        _replace(model, _name_of(model, embedding), tokens)
        if head is not None and head.weight is embedding.weight:  # tied: the logits use those rows too
            _replace(model, _name_of(model, head), TiedTokenHead(head, tokens))
    model.lora_settings = replace(settings, targets=tuple(names))
    return model


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The module names LoRA wraps: a preset turned into names, or the names checked against the model.

    Names match as in PEFT's ``target_modules``: a module's full name, or its last dotted parts.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if targets == ("all-linear",):
        names = leaves
    elif targets == ("attention",):
        names = [n for n in leaves if n in ATTENTION_NAMES]
    else:
        names = list(targets)
    wrapped = [n for n in linear if _matches(n, names)]
    other = [n for n, m in model.named_modules() if _matches(n, names) and n not in wrapped]
    if not wrapped or other:
        raise ValueError(
            f"targets {targets} match {len(wrapped)} Linear/Conv1D layers and {other or 'no'} other "
            f"modules; LoRA wraps Linear/Conv1D layers other than the LM head, here named {leaves}"
        )
    return names


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters, each shared tensor counted once."""
    params = list(model.parameters())  # .parameters() yields a tied weight once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The wrapped layers by module name (``transformer.h.0.attn.c_attn``: its LoraLinear)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


# --------------------------------------------------------------------------- merging


def merge_lora(model: nn.Module) -> nn.Module:
    """Add every ``B A * scaling`` (and the trainable token rows) into the base weights, in place."""
    for module in model.modules():
        if isinstance(module, (LoraLinear, TrainableTokens)):
            module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (subtract the updates, restore the original token rows), in place."""
    for module in model.modules():
        if isinstance(module, (LoraLinear, TrainableTokens)):
            module.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put each base layer back in place of its wrapper: a plain, unfrozen model.

    Works in place; `merged_copy` leaves the LoRA model as it was. The result saves with
    ``save_pretrained`` as an ordinary Hugging Face model.
    """
    merge_lora(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, ADAPTER_LAYERS):
            _replace(model, name, module.base_layer)
    model.requires_grad_(True)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged, plain copy of a LoRA model (for ``save_pretrained``); the LoRA model is untouched."""
    return merge_and_unload(copy.deepcopy(model))


# --------------------------------------------------------------------------- PEFT's file format


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by their names in the model: every A and B, and the token rows."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            state[f"{name}.lora_A.weight"] = module.lora_A.weight
            state[f"{name}.lora_B.weight"] = module.lora_B.weight
        elif isinstance(module, TrainableTokens):
            state[f"{name}.trainable_tokens_delta"] = module.trainable_tokens_delta
    return state


def _peft_name(name: str) -> str:
    """Our name -> PEFT's (its token rows sit one module deeper, in a ``token_adapter``)."""
    name = re.sub(r"\.trainable_tokens_delta$", ".token_adapter.trainable_tokens_delta", name)
    return PEFT_PREFIX + name


def _our_name(peft_name: str) -> str:
    name = peft_name.removeprefix(PEFT_PREFIX)
    return name.replace(".token_adapter.trainable_tokens_delta", ".trainable_tokens_delta")


def save_adapter(model: nn.Module, folder: str | Path, base_name_or_path: str | None = None) -> Path:
    """Write the adapter as PEFT does: ``adapter_config.json`` and ``adapter_model.safetensors``.

    `base_name_or_path` is recorded for loaders (PEFT's ``base_model_name_or_path``); by default
    the model's own ``name_or_path``. Returns the folder.
    """
    settings = _settings_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = base_name_or_path or getattr(model, "name_or_path", "") or None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base) if base else None,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(settings.targets),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in lora_layers(model).values()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "trainable_token_indices": list(settings.trainable_tokens) or None,
        "inference_mode": True,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {_peft_name(k): v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


# PEFT options that change the maths; an adapter using any of them is refused, not loaded wrongly.
_UNSUPPORTED = (
    "use_dora",
    "use_rslora",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "target_parameters",
    "alora_invocation_tokens",
)


def load_adapter(model: nn.Module, folder: str | Path, *, seed: int = 0) -> nn.Module:
    """Add LoRA to a base model as an adapter folder describes, and load its weights (ours or PEFT's).

    Works in place and returns the model; `seed` only matters for A's (overwritten) initial values.
    """
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    settings = settings_from_peft_config(model, config, seed=seed)
    add_lora(model, settings)
    state = {_our_name(k): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    expected = adapter_state_dict(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(
            f"{folder / ADAPTER_WEIGHTS} does not fit this model: missing {missing[:4]}, "
            f"unexpected {extra[:4]}; was it saved for another base model?"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)  # copy_ checks the shape and converts dtype and device
    return model


def settings_from_peft_config(model: nn.Module, config: dict, *, seed: int = 0) -> LoraSettings:
    """`LoraSettings` equal to a PEFT ``adapter_config.json`` (ValueError for what we do not do)."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"peft_type {config.get('peft_type')!r}: only LORA adapters can be loaded")
    unsupported = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"this adapter uses {unsupported}, which lumorik_sft.lora does not implement")
    targets = config["target_modules"]
    if isinstance(targets, str):  # PEFT: a single string is a regular expression on full names
        targets = [n for n, _ in model.named_modules() if re.fullmatch(targets, n)]
    tokens = config.get("trainable_token_indices") or []
    if isinstance(tokens, dict):  # {layer name: ids}; we train rows of the input embedding only
        embedding = _name_of(model, model.get_input_embeddings())
        if len(tokens) != 1 or not _matches(embedding, list(tokens)):
            raise ValueError(f"trainable tokens in {list(tokens)}: only the input embedding is supported")
        tokens = next(iter(tokens.values()))
    return LoraSettings(
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        targets=tuple(targets),
        trainable_tokens=tuple(tokens),
        seed=seed,
    )


def _settings_of(model: nn.Module) -> LoraSettings:
    settings = getattr(model, "lora_settings", None)
    if settings is None:
        raise ValueError("this model has no LoRA layers; call add_lora (or load_adapter) first")
    return settings


# --------------------------------------------------------------------------- from a TrainConfig


def add_lora_from_config(model: nn.Module, tokenizer: Any, config: Any) -> nn.Module:
    """Wrap the model with LoRA as a `TrainConfig`'s ``lora_*`` fields ask (nothing if lora_r is None).

    Called by `lumorik_sft.training.train` before it builds the optimizer, so the optimizer (and
    its state) holds only the trainable parameters. A model that has LoRA already is left as is.
    """
    if config.lora_r is None or lora_layers(model):
        return model
    settings = LoraSettings(
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        targets=config.lora_targets,
        trainable_tokens=lora_token_ids(tokenizer, config.lora_tokens),
        seed=config.seed,
    )
    return add_lora(model, settings)


def lora_token_ids(tokenizer: Any, tokens: str) -> tuple[int, ...]:
    """Ids of the embedding rows LoRA trains: 'auto' = the chat tokens the tokenizer has."""
    vocab = tokenizer.get_vocab()
    if tokens == "none":
        return ()
    if tokens == "auto":
        return tuple(vocab[t] for t in CHAT_TOKENS if t in vocab)
    names = [t.strip() for t in tokens.split(",") if t.strip()]
    unknown = [t for t in names if t not in vocab]
    if unknown:
        raise ValueError(f"lora_tokens: {unknown} are not tokens of this tokenizer; add them first")
    return tuple(vocab[t] for t in names)
