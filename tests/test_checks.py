"""The checks bite: every solution passes its check, every stub and every plausible wrong version fails it
with the feedback a student needs. Functions come from the committed solution/exercise notebooks."""
# ruff: noqa: E501  (wrong solutions and hostile notebooks are written as source snippets)

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from test_checks_chat import WRONG_CHAT
from test_checks_lora import WRONG_LORA

from lumorik_sft.course import checks
from lumorik_sft.course.grading import _compile_cell

ROOT = Path(__file__).resolve().parent.parent

# Plausible wrong versions, each with the feedback it must get. `ns` has the notebook's imports.
WRONG: dict[str, list[tuple[str, str]]] = {
    "clean_and_dedupe": [
        (
            """def clean_and_dedupe(records):  # dedupe BEFORE cleaning
    out, seen = [], set()
    for r in records:
        if (r["prompt"], r["completion"]) in seen:
            continue
        seen.add((r["prompt"], r["completion"]))
        p, c = data.clean_text(r["prompt"]), data.clean_text(r["completion"])
        if p and c:
            out.append({"prompt": p, "completion": c})
    return out""",
            "are the same after cleaning",
        ),
        (
            """def clean_and_dedupe(records):  # dedupe on the prompt only
    out, seen = [], set()
    for r in records:
        p, c = data.clean_text(r["prompt"]), data.clean_text(r["completion"])
        if p and c and p not in seen:
            seen.add(p)
            out.append({"prompt": p, "completion": c})
    return out""",
            "BOTH prompt and completion",
        ),
        (
            """def clean_and_dedupe(records):  # keeps empty records
    out, seen = [], set()
    for r in records:
        key = (data.clean_text(r["prompt"]), data.clean_text(r["completion"]))
        if key not in seen:
            seen.add(key)
            out.append({"prompt": key[0], "completion": key[1]})
    return out""",
            "empty",
        ),
        (
            """def clean_and_dedupe(records):  # cleans all but the normal form: looks right in a browser
    import unicodedata

    out, seen = [], set()
    for r in records:
        key = tuple(unicodedata.normalize("NFD", data.clean_text(r[f])) for f in ("prompt", "completion"))
        if all(key) and key not in seen:
            seen.add(key)
            out.append({"prompt": key[0], "completion": key[1]})
    return out""",
            "differ in Unicode normal form",
        ),
        (
            """def clean_and_dedupe(records):  # leaves no-break spaces in the completion
    out, seen = [], set()
    for r in records:
        key = (data.clean_text(r["prompt"]), r["completion"].strip())
        if all(key) and key not in seen:
            seen.add(key)
            out.append({"prompt": key[0], "completion": key[1]})
    return out""",
            "completion",
        ),
    ],
    "leak_free_split": [
        (
            """def leak_free_split(records, val_fraction=0.1, seed=0):  # shuffle and slice: leaks
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = round(len(records) * val_fraction)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])""",
            "is in both train and val",
        ),
        (
            """def leak_free_split(records, val_fraction=0.1, seed=0):  # groups by the RAW prompt
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(r["prompt"], []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    target, val_idx = round(len(records) * val_fraction), set()
    for g in order:
        if len(val_idx) >= target:
            break
        val_idx.update(g)
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])""",
            "CLEANED prompt",
        ),
        (
            """def leak_free_split(records, val_fraction=0.1, seed=None):  # unseeded: not reproducible
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(data.clean_text(r["prompt"]), []).append(i)
    order = list(groups.values())
    random.shuffle(order)
    target, val_idx = round(len(records) * val_fraction), set()
    for g in order:
        if len(val_idx) >= target:
            break
        val_idx.update(g)
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])""",
            "same seed gave different splits",
        ),
        (
            """def leak_free_split(records, val_fraction=0.1, seed=0):  # ignores its seed
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(data.clean_text(r["prompt"]), []).append(i)
    target, val_idx = round(len(records) * val_fraction), set()
    for g in groups.values():  # always the first groups: the seed changes nothing
        if len(val_idx) >= target:
            break
        val_idx.update(g)
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])""",
            "another seed gave the same split",
        ),
    ],
    "encode_example": [
        (
            """def encode_example(tokenizer, prompt, completion, max_length=64):  # off-by-one mask
    p = tokenizer(prompt + "\\n")["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) + len(c) > max_length:
        keep = max(1, max_length - len(c)); p = p[-keep:]; c = c[: max_length - len(p)]
    ids = p + c
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * (len(p) + 1) + c[1:]}""",
            "completion tokens must be supervised",
        ),
        (
            """def encode_example(tokenizer, prompt, completion, max_length=64):  # missing EOS
    p = tokenizer(prompt + "\\n")["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if len(p) + len(c) > max_length:
        keep = max(1, max_length - len(c)); p = p[-keep:]; c = c[: max_length - len(p)]
    return {"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": [-100] * len(p) + c}""",
            "must end with the EOS token",
        ),
        (
            """def encode_example(tokenizer, prompt, completion, max_length=64):  # the chapter's labels=input_ids
    p = tokenizer(prompt + "\\n")["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) + len(c) > max_length:
        keep = max(1, max_length - len(c)); p = p[-keep:]; c = c[: max_length - len(p)]
    return {"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": p + c}""",
            "prompt tokens must have label -100; position 0 has",
        ),
        (
            """def encode_example(tokenizer, prompt, completion, max_length=64):  # no truncation
    p = tokenizer(prompt + "\\n")["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": [-100] * len(p) + c}""",
            "cut the prompt from the left",
        ),
    ],
    "collate": [
        (
            """def collate(features, pad_token_id):  # labels padded with the pad id
    w = max(len(f["input_ids"]) for f in features)
    pad = lambda row, v: list(row) + [v] * (w - len(row))
    return {"input_ids": torch.tensor([pad(f["input_ids"], pad_token_id) for f in features]),
            "attention_mask": torch.tensor([pad(f["attention_mask"], 0) for f in features]),
            "labels": torch.tensor([pad(f["labels"], pad_token_id) for f in features])}""",
            "padding must have label -100",
        ),
        (
            """def collate(features, pad_token_id):  # padded to a fixed length
    w = 16
    pad = lambda row, v: list(row) + [v] * (w - len(row))
    return {"input_ids": torch.tensor([pad(f["input_ids"], pad_token_id) for f in features]),
            "attention_mask": torch.tensor([pad(f["attention_mask"], 0) for f in features]),
            "labels": torch.tensor([pad(f["labels"], -100) for f in features])}""",
            "not to a fixed length",
        ),
        (
            """def collate(features, pad_token_id):  # left padding
    w = max(len(f["input_ids"]) for f in features)
    pad = lambda row, v: [v] * (w - len(row)) + list(row)
    return {"input_ids": torch.tensor([pad(f["input_ids"], pad_token_id) for f in features]),
            "attention_mask": torch.tensor([pad(f["attention_mask"], 0) for f in features]),
            "labels": torch.tensor([pad(f["labels"], -100) for f in features])}""",
            "right padding",
        ),
    ],
    "masked_nll_sum": [
        (
            """def masked_nll_sum(logits, labels):  # no shift
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum")
    return nll, int((labels != -100).sum())""",
            "never predicted",
        ),
        (
            """def masked_nll_sum(logits, labels):  # mean, not sum
    s_logits, s_labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(s_logits.reshape(-1, s_logits.size(-1)), s_labels.reshape(-1))
    return nll, int((s_labels != -100).sum())""",
            "SUM of the token NLLs",
        ),
        (
            """def masked_nll_sum(logits, labels):  # counts every position
    s_logits, s_labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(s_logits.reshape(-1, s_logits.size(-1)), s_labels.reshape(-1), reduction="sum")
    return nll, s_labels.numel()""",
            "count only labels that are not -100",
        ),
    ],
    "train_step": [
        (
            """def train_step(model, optimizer, micro_batches):  # sum, not mean
    optimizer.zero_grad()
    total = 0.0
    for b in micro_batches:
        nll, n = metrics.completion_nll(model, b)
        nll.backward()
        total += float(nll)
    optimizer.step()
    return total""",
            "not the sum",
        ),
        (
            """def train_step(model, optimizer, micro_batches):  # mean of per-micro-batch means
    optimizer.zero_grad()
    losses = []
    for b in micro_batches:
        nll, n = metrics.completion_nll(model, b)
        loss = nll / n / len(micro_batches)
        loss.backward()
        losses.append(float(nll / n))
    optimizer.step()
    return sum(losses) / len(losses)""",
            "ALL micro-batches",
        ),
        (
            """def train_step(model, optimizer, micro_batches):  # forgets zero_grad
    n_total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        nll, n = metrics.completion_nll(model, b)
        (nll / n_total).backward()
        total += float(nll)
    optimizer.step()
    return total / n_total""",
            "zero_grad",
        ),
    ],
    "corpus_perplexity": [
        (
            """def corpus_perplexity(batch_logprobs):  # perplexity averaged over batches
    ppls = [math.exp(-sum(b) / len(b)) for b in batch_logprobs]
    return sum(ppls) / len(ppls)""",
            "averaged per-batch perplexities",
        ),
        (
            """def corpus_perplexity(batch_logprobs):  # mean of batch mean NLLs
    means = [-sum(b) / len(b) for b in batch_logprobs if b]
    if not means:
        raise ValueError("no tokens")
    return math.exp(sum(means) / len(means))""",
            "weight by tokens",
        ),
        (
            """def corpus_perplexity(batch_logprobs):  # sign error
    lps = [x for b in batch_logprobs for x in b]
    if not lps:
        raise ValueError("no tokens")
    return math.exp(sum(lps) / len(lps))""",
            "NEGATIVE mean",
        ),
    ],
    "bleu_score": [
        (
            """def bleu_score(predictions, references):  # mean of sentence BLEUs
    bleu = metrics.load_metric("bleu")
    scores = [bleu.compute(predictions=[p], references=[r])["score"] for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)""",
            "not a mean of sentence BLEUs",
        ),
        (
            """def bleu_score(predictions, references):  # swapped
    return metrics.load_metric("bleu").compute(predictions=references, references=predictions)["score"]""",
            "swapped",
        ),
        (
            """def bleu_score(predictions, references):  # 0-1 scale
    return metrics.load_metric("bleu").compute(predictions=predictions, references=references)["score"] / 100""",
            "0-100 scale",
        ),
    ],
    "cohen_kappa": [
        (
            """def cohen_kappa(labels_1, labels_2):  # raw agreement
    return sum(a == b for a, b in zip(labels_1, labels_2)) / len(labels_1)""",
            "you returned the raw agreement p_o",
        ),
        (
            """def cohen_kappa(labels_1, labels_2):  # Scott's pi: chance from both raters pooled
    n = len(labels_1)
    p_o = sum(a == b for a, b in zip(labels_1, labels_2)) / n
    both = labels_1 + labels_2
    p_e = sum((both.count(c) / (2 * n)) ** 2 for c in set(both))
    if p_e == 1:
        raise ValueError("undefined")
    return (p_o - p_e) / (1 - p_e)""",
            "that is Scott's pi",
        ),
        (
            """def cohen_kappa(labels_1, labels_2):  # no ValueError when p_e == 1
    n = len(labels_1)
    p_o = sum(a == b for a, b in zip(labels_1, labels_2)) / n
    p_e = sum(labels_1.count(c) * labels_2.count(c) for c in set(labels_1)) / n**2
    return (p_o - p_e) / (1 - p_e)""",
            "should raise ValueError, but raised ZeroDivisionError",
        ),
    ],
    "sequence_nll": [
        (
            """def sequence_nll(probs):  # mean, not sum
    return sum(-math.log(p) for p in probs) / len(probs)""",
            "not the mean",
        ),
        (
            """def sequence_nll(probs):  # log10
    return sum(-math.log10(p) for p in probs)""",
            "natural log",
        ),
        (
            """def sequence_nll(probs):  # rounds each term, like the chapter
    return sum(round(-math.log(p), 2) for p in probs)""",
            "do not round",
        ),
    ],
    "build_batches": [
        (
            """def build_batches(records, tokenizer, batch_size=2, max_length=64):  # no curation
    ex = [encoding.encode_example(tokenizer, r["prompt"], r["completion"], max_length=max_length) for r in records]
    ex = [e for e in ex if e is not None]
    col = encoding.SFTCollator(tokenizer.pad_token_id)
    return [col(ex[i:i + batch_size]) for i in range(0, len(ex), batch_size)]""",
            "curate first",
        ),
        (
            """def build_batches(records, tokenizer, batch_size=2, max_length=64):  # the chapter's labels
    kept = data.curate(records).kept
    ex = [encoding.encode_example(tokenizer, r["prompt"], r["completion"], max_length=max_length) for r in kept]
    ex = [{**e, "labels": list(e["input_ids"])} for e in ex]
    col = encoding.SFTCollator(tokenizer.pad_token_id)
    out = [col(ex[i:i + batch_size]) for i in range(0, len(ex), batch_size)]
    return [{**b, "labels": b["input_ids"].clone()} for b in out]""",
            "chapter's erratum",
        ),
        (
            """def build_batches(records, tokenizer, batch_size=2, max_length=64):  # pads to max_length
    kept = data.curate(records).kept
    ex = [encoding.encode_example(tokenizer, r["prompt"], r["completion"], max_length=max_length) for r in kept]
    col = encoding.SFTCollator(tokenizer.pad_token_id)
    return [col([{k: v + ([0] * (max_length - len(v))) for k, v in e.items()} for e in ex[i:i + batch_size]])
            for i in range(0, len(ex), batch_size)]""",
            "not to max_length",
        ),
    ],
    **WRONG_CHAT,  # 09_chat_sft.ipynb's wrong masks, with tests of their own in test_checks_chat.py
    **WRONG_LORA,  # 10_lora.ipynb's wrong LoRA layers, with tests of their own in test_checks_lora.py
}

WRONG_ANSWERS: dict[str, list[tuple[object, str]]] = {
    "worked_loss": [(4.01, "rounding each term"), ("4.017", "must be a number")],
    "q1": [("a", "batch size"), ("d", "too large diverges")],
    "q2": [
        ("overfit unseen tuning", "8 to 150 words"),
        (
            "It matters because the data set is big and the model needs many examples to learn well.",
            "overfitting",
        ),
    ],
    "q3": [(1.25, "exp of it"), (0.29, "NEGATIVE")],
    "q4": [("a", "labels=input_ids"), ("d", "label -100, not the pad id")],
    "q5": [
        ({"a", "b", "c", "d", "e"}, "not an advantage"),
        ({"a"}, "is an advantage"),
        ({"z"}, "letters a to e; 'z' is not one"),
        ("none", "'none' is not one"),
        ({"b", "d"}, "none of the options you chose is an advantage"),
    ],
}


def _namespace(folder: str, notebook: str) -> dict:
    """Run a committed notebook's code the way the grader does (no checks. calls), in a namespace."""
    ns: dict = {"__name__": "__main__", "display": lambda *a, **k: None}
    nb = nbformat.read(ROOT / folder / notebook, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        try:
            code = _compile_cell(cell.source, i)
            if code is not None:
                exec(code, ns)
        except NotImplementedError:
            pass  # exercise notebooks: demo cells call the stubs
    return ns


@pytest.fixture(scope="module")
def solution_ns():
    return {nb: _namespace("solutions", nb) for nb in checks.NOTEBOOKS}


@pytest.fixture(scope="module")
def exercise_ns():
    return {nb: _namespace("exercises", nb) for nb in checks.NOTEBOOKS}


def test_every_exercise_has_a_check_function():
    for name in checks.EXERCISES:
        assert callable(getattr(checks, f"check_{name}")), name


def test_every_coding_exercise_has_two_wrong_variants():
    coding = [n for n, ex in checks.EXERCISES.items() if ex.kind == "function"]
    for name in coding:
        assert len(WRONG.get(name, [])) >= 2, f"{name} needs at least two wrong variants"
    for name in (n for n, ex in checks.EXERCISES.items() if ex.kind == "answer"):
        assert WRONG_ANSWERS.get(name), name


@pytest.mark.parametrize("name", list(checks.EXERCISES))
def test_solution_passes_and_stub_fails(name, solution_ns, exercise_ns, capsys):
    ex = checks.EXERCISES[name]
    getattr(checks, f"check_{name}")(solution_ns[ex.notebook][ex.symbol])
    out = capsys.readouterr().out.strip().splitlines()
    assert (
        out[-1]
        == f"check_{name}: all {len(ex.make_cases(0))} case{'s' if len(ex.make_cases(0)) != 1 else ''} passed"
    )
    assert not checks.run_check(name, exercise_ns[ex.notebook].get(ex.symbol))
    out = capsys.readouterr().out
    assert "not yet" in out.splitlines()[-1]
    if ex.kind == "function":
        assert "not written yet (raised NotImplementedError)" in out


def test_a_correct_split_passes_whatever_seed_the_grader_draws(solution_ns):
    """The grader draws a secret seed per run: a correct solution must pass every one. With a single
    other seed, a correct split gave the same val for it by chance in about 1 of 60 seeds and was
    failed as "ignores its seed"."""
    from lumorik_sft.course.checks.framework import judge, run_case

    ex = checks.EXERCISES["leak_free_split"]
    fn = solution_ns[ex.notebook][ex.symbol]
    failed = []
    for seed in range(300):
        for case in ex.make_cases(seed):
            if judge(ex, case, ex.reference(case), run_case(ex, fn, case)) is not None:
                failed.append(seed)
    assert failed == []


@pytest.mark.parametrize(
    "name,index", [(n, i) for n, variants in WRONG.items() for i in range(len(variants))]
)
def test_wrong_variant_fails_with_feedback(name, index, solution_ns, capsys):
    source, feedback = WRONG[name][index]
    ns = dict(solution_ns[checks.EXERCISES[name].notebook])
    exec(source, ns)
    assert not checks.run_check(name, ns[checks.EXERCISES[name].symbol])
    out = capsys.readouterr().out
    assert feedback in out, out


@pytest.mark.parametrize("name,index", [(n, i) for n, v in WRONG_ANSWERS.items() for i in range(len(v))])
def test_wrong_answer_fails_with_feedback(name, index, capsys):
    value, feedback = WRONG_ANSWERS[name][index]
    assert not checks.run_check(name, value)
    assert feedback in capsys.readouterr().out


def test_calling_the_reference_is_caught(solution_ns, capsys):
    ns = dict(solution_ns["01_data_curation.ipynb"])
    exec(
        "def leak_free_split(records, val_fraction=0.1, seed=0):\n"
        "    return data.split_records(records, val_fraction=val_fraction, seed=seed)",
        ns,
    )
    assert not checks.run_check("leak_free_split", ns["leak_free_split"])
    assert "calls lumorik_sft.data.split_records, the package's reference" in capsys.readouterr().out
    from lumorik_sft import data  # the tripwire restored the module afterwards

    assert data.split_records.__name__ == "split_records"
    ns = dict(solution_ns["01_data_curation.ipynb"])
    exec(
        "from lumorik_sft.data import curate\n"
        "def clean_and_dedupe(records):\n    return [dict(prompt=r['prompt'], completion=r['completion'])"
        " for r in curate(records).kept]",
        ns,
    )
    assert not checks.run_check("clean_and_dedupe", ns["clean_and_dedupe"])
    assert "calls lumorik_sft.data.curate" in capsys.readouterr().out


def test_a_check_never_exits_and_reports_exceptions(capsys):
    def exits(records):
        raise SystemExit(0)

    assert not checks.run_check("clean_and_dedupe", exits)
    assert "called sys.exit()" in capsys.readouterr().out
    assert not checks.run_check("clean_and_dedupe", lambda records: 1 / 0)
    assert "raised ZeroDivisionError" in capsys.readouterr().out
    assert not checks.run_check("clean_and_dedupe", lambda records: object())
    assert "not plain data" in capsys.readouterr().out


def test_cases_are_seeded_and_differ_by_seed():
    for ex in checks.EXERCISES.values():
        assert ex.make_cases(3) == ex.make_cases(3), ex.name
    for name in ("clean_and_dedupe", "encode_example", "train_step", "corpus_perplexity"):
        assert checks.EXERCISES[name].make_cases(1) != checks.EXERCISES[name].make_cases(2)


def test_to_data_turns_tensors_into_lists():
    import torch

    assert checks.to_data({"a": torch.tensor([[1, 2]]), "b": (1.5, None)}) == {
        "a": [[1, 2]],
        "b": [1.5, None],
    }
    with pytest.raises(checks.NotData):
        checks.to_data(object())


CHECKS_DIR = Path(checks.__file__).resolve().parent
MAX_LINES = 600


@pytest.mark.parametrize("path", sorted(CHECKS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_no_checks_module_is_over_600_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.name} has {n} lines; split it by chapter"


def test_each_exercise_is_declared_next_to_its_functions():
    """An exercise's reference and compare live in the chapter module that registers it, one module a notebook."""
    registered = []
    for module in checks.CHAPTERS:
        assert module.CHAPTER.exercises, f"{module.__name__} registers no exercise"
        for ex in module.CHAPTER.exercises:
            assert ex.notebook == module.CHAPTER.notebook
            for piece in ("reference", "compare"):
                where = getattr(ex, piece).__module__
                assert where == module.__name__, (
                    f"{ex.name}: {piece} is defined in {where}, not {module.__name__}"
                )
            registered.append(ex)
    assert {ex.name: ex for ex in registered} == checks.EXERCISES
    assert len(registered) == len(checks.EXERCISES)  # no name registered twice
    assert tuple(dict.fromkeys(ex.notebook for ex in registered)) == checks.NOTEBOOKS
    fields = {k: v for k, v in vars(checks.EXERCISES["q1"]).items() if k != "notebook"}
    chapter = checks.framework.Chapter("06_practice_questions.ipynb")
    assert chapter.register(**fields) == checks.EXERCISES["q1"]
    with pytest.raises(ValueError, match="registered twice"):
        chapter.register(**fields)


def test_importing_the_checks_imports_every_module_and_ignore_index_is_not_redefined():
    """The grader's child restores every loaded ``lumorik_sft.course.checks.*`` module after student code;
    importing the checks stays quick (no torch); IGNORE_INDEX has one definition, in encoding."""
    import subprocess
    import sys

    code = (
        "import sys, lumorik_sft.course.checks as c\n"
        "assert 'torch' not in sys.modules, 'the checks import the package inside functions'\n"
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith(c.__name__)))"
    )
    files = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {Path(f).resolve() for f in files.split()} == set(CHECKS_DIR.glob("*.py"))
    for path in CHECKS_DIR.glob("*.py"):
        assert "IGNORE_INDEX =" not in path.read_text(), f"{path.name} redefines encoding.IGNORE_INDEX"


@pytest.mark.parametrize(
    ("got", "want", "says"),
    [
        ("nai\u0308ve?", "na\u00efve?", "Unicode normal form"),
        ("a\u00a0b", "a b", "U+00A0 NO-BREAK SPACE, expected U+0020 SPACE"),
        ("a\u200bb", "ab", "U+200B ZERO WIDTH SPACE"),
        ("a\tb", "a b", "U+0009 control character"),
        ("ab", "abc", "at character 2: yours has the end of the text, expected U+0063"),
    ],
)
def test_text_difference_names_invisible_characters(got, want, says):
    from lumorik_sft.course.checks.framework import text_difference

    assert says in text_difference(got, want)
    assert text_difference(want, want) == "the texts are equal"
