"""The pretraining recipe: a deterministic offline corpus, a knowledge task held out by module,
and a micro run whose saved folder opens with Auto* classes and reproduces its checksum."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lumorik_sft.basemodel.corpus import (
    CorpusSource,
    assemble_corpus,
    check_license,
)
from lumorik_sft.basemodel.doc_qa import first_sentence, python_doc_qa
from lumorik_sft.basemodel.pretrain import (
    MODEL_FILES,
    PretrainConfig,
    pack_blocks,
    run_pretrain,
    weights_checksum,
)

TINY_SOURCES = (
    CorpusSource("python-stdlib", "stdlib"),
    CorpusSource("pydoc_data.topics", "topics"),
    CorpusSource("tqdm"),
)


def _squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def tiny_corpus():
    return assemble_corpus(TINY_SOURCES, max_chars=60_000, val_fraction=0.1)


def test_corpus_is_deterministic_licensed_and_holds_out_validation(tiny_corpus):
    again = assemble_corpus(TINY_SOURCES, max_chars=60_000, val_fraction=0.1)
    assert again.sha256 == tiny_corpus.sha256 and again.train_texts == tiny_corpus.train_texts
    assert 20_000 < tiny_corpus.chars <= 60_000
    assert tiny_corpus.val_texts and tiny_corpus.train_texts
    assert not set(tiny_corpus.val_texts) & set(tiny_corpus.train_texts)
    assert not set(tiny_corpus.val_modules) & set(tiny_corpus.train_modules)
    for source in tiny_corpus.sources:
        assert source["license"] and source["version"] and source["chars"] >= 0
    assert tiny_corpus.sources[0]["license"] == "PSF-2.0"


def test_corpus_keeps_each_docstring_once(tiny_corpus):
    blocks = [
        b
        for text in tiny_corpus.train_texts + tiny_corpus.val_texts
        for b in text.split("\n\n")
        if len(b) > 200
    ]
    assert len(blocks) == len(set(blocks))


def test_license_check_refuses_copyleft():
    check_license("numpy", "BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0")
    with pytest.raises(ValueError, match="non-permissive"):
        check_license("somepkg", "GPL-3.0-only")


@pytest.mark.parametrize(
    "doc, expected",
    [
        (
            "Remove any common leading whitespace from every line in `text`.\n\nMore.",
            "Remove any common leading whitespace from every line in `text`.",
        ),
        ("Return the\nnumber of items. Then more.", "Return the number of items."),
        ("dedent(text) -> str", ""),  # a signature, not a sentence
        ("Too short.", ""),
    ],
)
def test_first_sentence(doc, expected):
    assert first_sentence(doc) == expected


def test_python_doc_qa_held_out_by_module_and_answers_are_in_the_corpus():
    train, val = python_doc_qa()
    assert 300 <= len(train) <= 1000 and 60 <= len(val) <= 150
    assert not {r["module"] for r in train} & {r["module"] for r in val}
    assert python_doc_qa() == (train, val)
    r = val[0]
    assert r["prompt"].startswith("Question: What does the Python") and r["name"] in r["prompt"]
    assert len(r["completion"].split()) <= 40
    # The point of the task: pretraining read every held-out answer, next to its name.
    stdlib = assemble_corpus(TINY_SOURCES[:1])
    train_text = _squash("\n".join(stdlib.train_texts))
    for r in val:
        assert f"{r['name']}" in train_text and _squash(r["completion"]) in train_text, r


def test_pack_blocks_joins_documents_with_eos_and_supervises_every_token(toy_tokenizer):
    texts = ["Python functions return values.", "A fever is a body temperature."]
    blocks = pack_blocks(texts, toy_tokenizer, context=8)
    stream = []
    for t in texts:
        stream += toy_tokenizer(t, add_special_tokens=False)["input_ids"] + [toy_tokenizer.eos_token_id]
    assert [b["input_ids"] for b in blocks] == [stream[i : i + 8] for i in range(0, len(stream) - 7, 8)]
    assert all(b["labels"] == b["input_ids"] and b["attention_mask"] == [1] * 8 for b in blocks)


def _micro_config(out) -> PretrainConfig:
    return PretrainConfig(
        sources=("python-stdlib",),
        max_corpus_chars=40_000,
        val_fraction=0.1,
        vocab_size=300,
        n_layer=1,
        width=32,
        n_head=2,
        context=64,
        batch_size=4,
        max_steps=10,
        warmup_steps=2,
        threads=1,
        output_dir=str(out),
        progress=False,
    )


def test_micro_pretrain_saves_an_hf_folder_and_reproduces_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = run_pretrain(_micro_config(tmp_path / "a"))
    out = tmp_path / "a"
    assert all((out / name).exists() for name in MODEL_FILES)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_positions == 64
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    readme = (out / "README.md").read_text()
    for needle in (
        "PSF-2.0",
        card["corpus"]["sha256"],
        card["weights_sha256"],
        "Validation perplexity",
        "Intended use",
    ):
        assert needle in readme
    saved = json.loads((out / "card.json").read_text())
    assert saved["training"]["steps"] == 10 and saved["training"]["tokens_seen"] == 10 * 4 * 64
    assert saved["weights_sha256"] == weights_checksum(out)
    assert sum(p.stat().st_size for p in out.iterdir()) < 30 * 2**20

    again = run_pretrain(_micro_config(tmp_path / "b"))
    assert again["weights_sha256"] == card["weights_sha256"] == weights_checksum(tmp_path / "b")


def test_config_errors_say_how_to_fix():
    with pytest.raises(ValueError, match="divisible by n_head"):
        PretrainConfig(width=100, n_head=3)
    with pytest.raises(ValueError, match="unknown corpus sources"):
        PretrainConfig(sources=("nope",)).corpus_sources()


def test_cli_arguments_round_trip():
    import argparse

    from lumorik_sft.basemodel.pretrain import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            "x",
            "--max-steps",
            "7",
            "--sources",
            "tqdm",
            "numpy",
            "--no-progress",
            "--learning-rate",
            "3e-4",
        ]
    )
    assert (args.output_dir, args.max_steps, args.sources, args.progress, args.learning_rate) == (
        "x",
        7,
        ["tqdm", "numpy"],
        False,
        3e-4,
    )
    assert os.path.basename(parser.parse_args([]).output_dir) == "base-model"


def _fake_model_folder(folder):
    """A model folder with dummy weights and the card data `write_model_card` reads."""
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not really weights")
    (folder / "tokenizer.json").write_text("{}")
    card = {
        "model": {
            "architecture": "GPT2LMHeadModel",
            "n_layer": 1,
            "width": 32,
            "n_head": 2,
            "context": 64,
            "vocab_size": 300,
            "parameters": 30_000,
            "eos_token_id": 0,
            "pad_token_id": 1,
            "weights_bytes": 18,
        },
        "corpus": {
            "chars": 40_000,
            "val_documents": 2,
            "val_chars": 4_000,
            "sha256": "c0ffee",
            "python": "3.11",
            "sources": [
                {
                    "name": "python-stdlib",
                    "version": "3.11",
                    "license": "PSF-2.0",
                    "documents": 9,
                    "chars": 40_000,
                }
            ],
            "train_tokens": 6_400,
            "val_tokens": 640,
            "train_blocks": 100,
            "val_blocks": 10,
        },
        "training": {
            "precision": "fp32",
            "device": "cpu",
            "threads": 1,
            "steps": 10,
            "tokens_per_step": 256,
            "tokens_seen": 2_560,
            "epochs_over_corpus": 0.4,
            "train_seconds": 6.0,
            "tokens_per_second": 500.0,
            "cpu": "test CPU",
            "total_seconds": 9.0,
            "torch": "x",
            "transformers": "y",
            "tokenizers": "z",
        },
        "results": {
            "val_perplexity": 250.0,
            "val_loss": 5.5,
            "initial_val_perplexity": 300.0,
            "final_train_loss": 5.4,
        },
        "config": {"learning_rate": 1e-3, "seed": 0},
        "weights_sha256": weights_checksum(folder),
        "files": {"README.md": 1, "model.safetensors": 18},
    }
    (folder / "card.json").write_text(json.dumps(card))
    return card


def test_update_model_card_merges_figures_and_rewrites_the_readme(tmp_path):
    from lumorik_sft.basemodel.pretrain import update_model_card
    from lumorik_sft.defaults import recommended_learning_rate

    folder = tmp_path / "m"
    card = _fake_model_folder(folder)
    weights = (folder / "model.safetensors").read_bytes()
    figures = {
        "recommended_sft_learning_rate": 3e-3,
        "sft_lr_sweep": {
            "task": "toy",
            "rows": [
                {"learning_rate": 5e-5, "completion_perplexity": 11.7},
                {"learning_rate": 3e-3, "completion_perplexity": 1.4},
            ],
        },
        "benchmark": {
            "command": "python bench.py",
            "date": "today",
            "targets": [
                {"figure": "BLEU gain", "value": 31.5, "target": ">= +20", "pass": True},
                {
                    "figure": "second run",
                    "value": "not re-run",
                    "target": "identical",
                    "pass": None,
                    "note": "",
                },
            ],
        },
        "training": {"total_seconds": 10.0},  # nested dicts merge key by key
    }
    merged = update_model_card(folder / "card.json", figures)
    saved = json.loads((folder / "card.json").read_text())
    assert saved == merged
    assert saved["training"]["total_seconds"] == 10.0 and saved["training"]["steps"] == 10
    assert saved["model"] == card["model"] and saved["weights_sha256"] == card["weights_sha256"]
    assert recommended_learning_rate(str(folder)) == 3e-3
    readme = (folder / "README.md").read_text()
    for needle in (
        "## Measured figures",
        "**0.003**",
        "| 5e-05 | 11.7 |",
        "| BLEU gain | 31.5 |",
        "| PASS |",
        "| not re-run | identical | n/a |",
        "Validation perplexity",
        card["weights_sha256"],
    ):
        assert needle in readme, needle
    assert saved["files"]["README.md"] == len(readme.encode())
    assert (folder / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "card.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    # a second update keeps what the first one recorded
    update_model_card(folder, {"benchmark": {"total_seconds": 5}})
    again = json.loads((folder / "card.json").read_text())
    assert again["benchmark"]["targets"] == figures["benchmark"]["targets"]
    assert again["benchmark"]["total_seconds"] == 5


def test_update_model_card_refuses_other_weights(tmp_path):
    from lumorik_sft.basemodel.pretrain import update_model_card

    folder = tmp_path / "m"
    _fake_model_folder(folder)
    with pytest.raises(ValueError, match="may not change weights_sha256"):
        update_model_card(folder, {"weights_sha256": "0" * 64})
    (folder / "model.safetensors").write_bytes(b"other weights")
    before = (folder / "card.json").read_text()
    with pytest.raises(ValueError, match="does not match its card"):
        update_model_card(folder, {"recommended_sft_learning_rate": 1e-3})
    assert (folder / "card.json").read_text() == before
    with pytest.raises(FileNotFoundError, match="lumorik-sft pretrain"):
        update_model_card(tmp_path / "nowhere", {})
