"""The recipe of the embedded chat model: the base model plus role tokens and a chat template.

Run it after `lumorik-sft pretrain` (it reads the base model and writes the chat model)::

    python -m lumorik_sft.basemodel.chat_variant                 # into the package
    python -m lumorik_sft.basemodel.chat_variant --out /tmp/chat # anywhere else

It calls `lumorik_sft.chat.add_chat_format` on the base model: four special tokens
(``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``), four new embedding rows (the mean
row plus seeded noise, computed in Python floats), the chat template and ``<|end|>`` as the stop
token. Nothing is trained, so the result depends only on the base weights and the seed: the same
bytes on every CPU (a test rebuilds it and compares checksums). The base model stays as it is;
the pair-task notebooks keep using it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lumorik_sft.basemodel.card import weights_checksum
from lumorik_sft.chat import CHAT_TEMPLATE, add_chat_format, chat_token_ids
from lumorik_sft.models import EMBEDDED_CHAT_MODEL_DIR, EMBEDDED_MODEL_DIR, count_parameters

SEED = 0
NOISE = 0.1
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def build_chat_model(
    base_dir: str | Path = EMBEDDED_MODEL_DIR,
    out_dir: str | Path = EMBEDDED_CHAT_MODEL_DIR,
    *,
    seed: int = SEED,
    noise: float = NOISE,
) -> dict[str, Any]:
    """Write the chat model folder (written beside `out_dir`, then swapped in); returns its card."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    n_base = count_parameters(model)
    model, tokenizer = add_chat_format(model, tokenizer, seed=seed, noise=noise)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        # In tokenizer_config.json, where every tool looks, rather than transformers 5's separate .jinja
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        _drop_load_options(tmp / "tokenizer_config.json")
        card = _card(base_dir, tmp, tokenizer, seed, noise, n_base, count_parameters(model))
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card_text(card))
        for p in tmp.iterdir():
            p.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def _drop_load_options(path: Path) -> None:
    """Remove the options of our `from_pretrained` call that transformers writes back as settings."""
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _card(
    base_dir: Path, folder: Path, tokenizer: Any, seed: int, noise: float, n_base: int, n_chat: int
) -> dict[str, Any]:
    base_card = json.loads((base_dir / "card.json").read_text())
    return {
        "base_model": {"folder": base_dir.name, "weights_sha256": weights_checksum(base_dir)},
        "base_card_weights_sha256": base_card.get("weights_sha256"),
        "chat_tokens": chat_token_ids(tokenizer),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "new_rows": {
            "rule": "mean of the base rows + noise x their std x N(0,1)",
            "seed": seed,
            "noise": noise,
        },
        "parameters": {"base": n_base, "chat": n_chat},
        "chat_template": CHAT_TEMPLATE,
        "weights_sha256": weights_checksum(folder),
    }


def model_card_text(card: dict[str, Any]) -> str:
    """The README of the chat model folder, from its card."""
    tokens = ", ".join(f"`{t}` = {i}" for t, i in card["chat_tokens"].items())
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, lumorik-sft, tiny, cpu, chat-template]
---

# lumorik-sft embedded chat model: the base model with a chat format

The course's base model (`../base-model`) with four special tokens added for conversations ({tokens}),
a Jinja chat template in `tokenizer_config.json` whose `{{% generation %}}` markers cover each assistant
reply and its `<|end|>`, and `<|end|>` as the end-of-sequence and first stop token
(`generation_config.json`). It has **not** been trained on conversations: the four new embedding rows
start at the mean embedding plus a little seeded noise, and chat SFT (notebook 09) teaches them.
{card["parameters"]["chat"]:,} parameters ({card["parameters"]["chat"] - card["parameters"]["base"]:,} more
than the base model).

## Reproduce and verify
`python -m lumorik_sft.basemodel.chat_variant` rebuilds it from the base model (weights SHA-256
`{card["base_model"]["weights_sha256"]}`) with seed {card["new_rows"]["seed"]} and noise
{card["new_rows"]["noise"]}. Nothing is trained and the new rows are computed in Python floats, so
the rebuild is bit for bit on any CPU: SHA-256 of `model.safetensors`: `{card["weights_sha256"]}`.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lumorik_sft.basemodel.chat_variant", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--base", default=str(EMBEDDED_MODEL_DIR), help="the base model folder")
    parser.add_argument("--out", default=str(EMBEDDED_CHAT_MODEL_DIR), help="where to write the chat model")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the new rows' noise")
    args = parser.parse_args(argv)
    card = build_chat_model(args.base, args.out, seed=args.seed)
    print(json.dumps({"output_dir": args.out, "weights_sha256": card["weights_sha256"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
