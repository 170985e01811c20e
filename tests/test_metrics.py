"""Tests for lumorik_sft.metrics and the offline evaluate metric modules.

Run: ``.venv/bin/pytest tests/test_metrics.py -q`` (no network, tiny in-process models).
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lumorik_sft import metrics as M

VOCAB = 64
PAD_ID = 0

# --------------------------------------------------------------------------- fixtures


def _gpt2(initializer_range: float = 0.02) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        initializer_range=initializer_range,
    )
    return GPT2LMHeadModel(cfg).eval()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    return _gpt2()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return _llama()


def make_batch(
    prompt_lens: list[int], completion_lens: list[int], seq_len: int, seed: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch: labels = ids on completion tokens, -100 on prompt and padding."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(prompt_lens)
    input_ids = torch.randint(1, VOCAB, (rows, seq_len), generator=gen)
    attention_mask = torch.zeros(rows, seq_len, dtype=torch.long)
    labels = torch.full((rows, seq_len), -100)
    for b, (p, c) in enumerate(zip(prompt_lens, completion_lens, strict=True)):
        assert p >= 1 and p + c <= seq_len
        input_ids[b, p + c :] = PAD_ID
        attention_mask[b, : p + c] = 1
        labels[b, p : p + c] = input_ids[b, p : p + c]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def manual_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Independent reference: loop over supervised positions, -log_softmax of the previous logit."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    total, count = 0.0, 0
    rows, seq_len = batch["labels"].shape
    for b in range(rows):
        for t in range(1, seq_len):
            y = int(batch["labels"][b, t])
            if y != -100:
                total -= float(logp[b, t - 1, y])
                count += 1
    return total, count


# --------------------------------------------------------------------------- chapter numbers

CHAPTER_PROBS = [0.1, 0.6, 0.3]


def test_chapter_worked_example_numbers() -> None:
    assert [round(x, 3) for x in M.token_nll(CHAPTER_PROBS)] == [2.303, 0.511, 1.204]
    assert round(M.sequence_nll(CHAPTER_PROBS), 3) == 4.017  # the chapter's 4.01 is wrong
    assert round(M.mean_nll(CHAPTER_PROBS), 3) == 1.339
    assert round(M.perplexity_from_probs(CHAPTER_PROBS), 2) == 3.82
    logprobs = [math.log(p) for p in CHAPTER_PROBS]
    assert M.perplexity_from_logprobs(logprobs) == pytest.approx(M.perplexity_from_probs(CHAPTER_PROBS))


def test_cross_entropy_on_logits_reproduces_chapter_sum() -> None:
    """Logits whose softmax gives p_true to each true token: summed cross-entropy = 4.017."""
    vocab, targets = 5, torch.tensor([3, 0, 2])
    probs = torch.empty(3, vocab, dtype=torch.float64)
    for row, (p, y) in enumerate(zip(CHAPTER_PROBS, targets.tolist(), strict=True)):
        probs[row] = (1 - p) / (vocab - 1)
        probs[row, y] = p
    logits = probs.log() + 7.0  # softmax is shift invariant: these are real logits, not log-probs
    ce = F.cross_entropy(logits, targets, reduction="sum").item()
    assert round(ce, 3) == 4.017
    assert ce == pytest.approx(M.sequence_nll(CHAPTER_PROBS), abs=1e-9)


@pytest.mark.parametrize(
    ("fn", "bad"),
    [
        (M.token_nll, [0.5, 0.0]),
        (M.token_nll, [1.5]),
        (M.sequence_nll, [-0.1]),
        (M.mean_nll, [float("nan")]),
        (M.perplexity_from_probs, [0.2, 2.0]),
        (M.perplexity_from_logprobs, [-1.0, 0.5]),
        (M.perplexity_from_logprobs, [float("nan")]),
    ],
)
def test_formulas_reject_invalid_values(fn, bad) -> None:
    with pytest.raises(ValueError, match="index"):
        fn(bad)


@pytest.mark.parametrize(
    "fn",
    [M.token_nll, M.sequence_nll, M.mean_nll, M.perplexity_from_probs, M.perplexity_from_logprobs],
)
def test_formulas_reject_empty_input(fn) -> None:
    with pytest.raises(ValueError, match="zero"):
        fn([])


# --------------------------------------------------------------------------- perplexity properties

LOGPROBS = st.lists(st.floats(min_value=-30.0, max_value=0.0), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(logprobs=LOGPROBS, data=st.data())
def test_perplexity_from_logprobs_properties(logprobs: list[float], data) -> None:
    ppl = M.perplexity_from_logprobs(logprobs)
    assert ppl == pytest.approx(math.exp(-sum(logprobs) / len(logprobs)), rel=1e-12)
    assert 1.0 <= ppl < math.inf
    shuffled = data.draw(st.permutations(logprobs))
    assert M.perplexity_from_logprobs(shuffled) == ppl  # exactly: fsum is order-free


@given(n=st.integers(min_value=1, max_value=50))
def test_perplexity_is_one_when_model_is_certain(n: int) -> None:
    assert M.perplexity_from_logprobs([0.0] * n) == 1.0
    assert M.perplexity_from_probs([1.0] * n) == 1.0


def test_perplexity_overflow_gives_inf_not_error() -> None:
    assert M.perplexity_from_logprobs([-1000.0]) == math.inf


# --------------------------------------------------------------------------- completion_nll


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_completion_nll_matches_hf_loss_times_tokens(model_name: str, request) -> None:
    model = request.getfixturevalue(model_name)
    batch = make_batch([3, 1, 6], [5, 9, 2], seq_len=12, seed=1)
    nll, n = M.completion_nll(model, batch)
    assert n == 5 + 9 + 2
    assert nll.dtype == torch.float32 and nll.ndim == 0
    with torch.no_grad():
        hf_loss = model(**batch).loss  # HF averages over the same shifted, unmasked tokens
    assert nll.item() == pytest.approx(hf_loss.item() * n, abs=1e-4)
    ref_total, ref_count = manual_nll(model, batch)
    assert n == ref_count
    assert nll.item() == pytest.approx(ref_total, abs=1e-4)


def test_completion_nll_ignores_tokens_after_last_supervised_position(gpt2) -> None:
    batch = make_batch([3, 2], [4, 6], seq_len=12, seed=2)
    before, n_before = M.completion_nll(gpt2, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, 7:] = torch.tensor([5, 6, 7, 8, 9])  # row 0 padding, labels -100
    changed["input_ids"][1, 8:] = torch.tensor([11, 12, 13, 14])
    assert not torch.equal(changed["input_ids"], batch["input_ids"])
    after, n_after = M.completion_nll(gpt2, changed)
    assert n_after == n_before
    assert after.item() == pytest.approx(before.item(), abs=1e-5)


def test_completion_nll_counts_a_label_once_it_is_unmasked(gpt2) -> None:
    batch = make_batch([4], [3], seq_len=10, seed=3)
    before, n_before = M.completion_nll(gpt2, batch)
    unmasked = {k: v.clone() for k, v in batch.items()}
    unmasked["labels"][0, 3] = 17  # was -100 (prompt); now supervised with an arbitrary id
    after, n_after = M.completion_nll(gpt2, unmasked)
    assert n_after == n_before + 1
    with torch.no_grad():
        logits = gpt2(input_ids=batch["input_ids"]).logits
    extra = -torch.log_softmax(logits[0, 2].float(), dim=-1)[17].item()  # position 2 predicts 3
    assert after.item() - before.item() == pytest.approx(extra, abs=1e-4)


def test_completion_nll_is_float32_for_bf16_model(gpt2) -> None:
    model = copy.deepcopy(gpt2).to(torch.bfloat16)
    batch = make_batch([2, 3], [5, 4], seq_len=10, seed=4)
    nll, n = M.completion_nll(model, batch)
    assert nll.dtype == torch.float32
    ref, _ = M.completion_nll(gpt2, batch)
    assert nll.item() == pytest.approx(ref.item(), rel=0.05)


def test_completion_nll_needs_labels(gpt2) -> None:
    batch = make_batch([2], [3], seq_len=8, seed=5)
    del batch["labels"]
    with pytest.raises(KeyError, match="labels"):
        M.completion_nll(gpt2, batch)


def test_metrics_is_the_plain_reference() -> None:
    """metrics.py is read top to bottom by students: no autograd.Function, no probe, no module
    swapped at run time, and a completion_nll body of at most 25 lines (fused_loss has the rest)."""
    source = inspect.getsource(M)
    for trick in ("autograd.Function", "_PROBE", "setattr", "contextmanager", "fused_activations"):
        assert trick not in source, f"metrics.py contains {trick!r}: move it to fused_loss.py"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            assert not any(isinstance(t, ast.Attribute) for t in targets), (
                f"line {node.lineno} assigns an attribute (a module swapped in?)"
            )
        if isinstance(node, ast.ClassDef):
            assert not any("Function" in ast.unparse(base) for base in node.bases)
    function = ast.parse(textwrap.dedent(inspect.getsource(M.completion_nll))).body[0]
    body = function.body[1:] if ast.get_docstring(function) else function.body
    assert body[-1].end_lineno - body[0].lineno + 1 <= 25


# --------------------------------------------------------------------------- evaluate_loss


@pytest.fixture(scope="module")
def peaky_gpt2() -> GPT2LMHeadModel:
    """Large init so per-token NLL varies a lot between batches (and the wrong mean shows)."""
    return _gpt2(initializer_range=0.3)


def uneven_batches() -> list[dict[str, torch.Tensor]]:
    """3 batches with 2, 60 and 5 supervised tokens."""
    return [
        make_batch([5, 7], [1, 1], seq_len=16, seed=10),
        make_batch([1, 2, 1, 3], [15, 14, 16, 15], seq_len=20, seed=11),
        make_batch([2], [5], seq_len=9, seed=12),
    ]


def test_evaluate_loss_is_token_weighted(peaky_gpt2) -> None:
    batches = uneven_batches()
    per_batch = [manual_nll(peaky_gpt2, b) for b in batches]
    assert [n for _, n in per_batch] == [2, 60, 5]
    total_nll = sum(nll for nll, _ in per_batch)
    total_n = sum(n for _, n in per_batch)
    expected_ppl = math.exp(total_nll / total_n)

    peaky_gpt2.train()  # evaluate_loss must switch to eval, then restore this
    result = M.evaluate_loss(peaky_gpt2, (b for b in batches), device="cpu")
    assert peaky_gpt2.training
    peaky_gpt2.eval()

    assert result.n_tokens == total_n
    assert result.nll_sum == pytest.approx(total_nll, rel=1e-5)
    assert result.loss == pytest.approx(total_nll / total_n, rel=1e-5)
    assert result.perplexity == pytest.approx(expected_ppl, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)

    wrong = M.mean_of_batch_perplexities(peaky_gpt2, batches)
    expected_wrong = sum(math.exp(nll / n) for nll, n in per_batch) / len(per_batch)
    assert wrong == pytest.approx(expected_wrong, rel=1e-5)
    assert abs(wrong - result.perplexity) > 0.01 * result.perplexity


@pytest.mark.parametrize("tokens", [1, 24, 50])
def test_evaluate_loss_in_row_slices_equals_whole_batches(gpt2, tokens) -> None:
    """A batch larger than tokens_per_forward runs a few rows at a time (at least one row):
    same NLL sum and token count as whole batches (float64), fewer positions per forward.
    ``loss_fn`` is what runs on each slice."""
    model = copy.deepcopy(gpt2).double()
    batches = [make_batch([3, 1, 6, 2, 4], [5, 9, 2, 7, 3], seq_len=12, seed=5), *uneven_batches()]
    whole = M.evaluate_loss(model, batches, tokens_per_forward=None)
    widths = []

    def spy(m, batch):
        widths.append(batch["input_ids"].numel())
        return M.completion_nll(m, batch)

    sliced = M.evaluate_loss(model, batches, tokens_per_forward=tokens, loss_fn=spy)
    assert sliced.n_tokens == whole.n_tokens
    assert sliced.nll_sum == pytest.approx(whole.nll_sum, rel=1e-12)
    widest = max(b["input_ids"].shape[1] for b in batches)
    assert max(widths) <= max(tokens, widest) and len(widths) > len(batches)


def test_evaluate_loss_keeps_eval_mode_and_uses_model_device(gpt2) -> None:
    result = M.evaluate_loss(gpt2, [make_batch([2], [4], seq_len=8, seed=13)])
    assert not gpt2.training
    assert result.n_tokens == 4 and result.perplexity > 1.0


@pytest.mark.parametrize(
    "batches",
    [
        [make_batch([4], [0], seq_len=6, seed=20)],  # all labels -100
        [{**make_batch([4], [0], seq_len=6, seed=21), "labels": torch.tensor([[7] + [-100] * 5])}],
        [],  # no batches at all
    ],
    ids=["all-masked", "only-position-0", "no-batches"],
)
def test_zero_supervised_tokens_raise(gpt2, batches) -> None:
    gpt2.train()
    with pytest.raises(ValueError, match="No supervised tokens"):
        M.evaluate_loss(gpt2, batches)
    assert gpt2.training  # mode restored even on error
    gpt2.eval()


def test_mean_of_batch_perplexities_refuses_empty_batch(gpt2) -> None:
    batches = [make_batch([2], [3], seq_len=6, seed=22), make_batch([4], [0], seq_len=6, seed=23)]
    with pytest.raises(ValueError, match="No supervised tokens"):
        M.mean_of_batch_perplexities(gpt2, batches)


# --------------------------------------------------------------------------- BLEU / ROUGE

PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),  # identical
    ("the cat sat on a mat", "the cat sat on the mat"),  # partial overlap
    ("", "a non-empty reference"),  # empty prediction
    ("short", "a much longer reference sentence with many words in it"),
    ("a very long prediction that keeps going well past the end of the reference", "a long one"),
    ("Hello, world!", "Hello world"),  # punctuation
    ("He is running fast.", "He runs fast."),  # stemming-sensitive
    ("The dogs were barking loudly", "the dog barked loudly"),  # stemming + case
    ("First sentence here.\nSecond sentence there.", "Second sentence there.\nFirst sentence here."),
    ("One line only", "One line\nonly"),
    ("Café crème brûlée", "café crème brûlée"),  # unicode
    ("東京は日本の首都です", "東京は日本の首都である"),  # CJK
    ("naïve résumé", "naive resume"),
    ("42 is the answer", "the answer is 42"),  # reordering
    ("completely different words", "nothing shared here"),
    ("the the the the", "the cat"),  # clipped repetition
    (
        "Polymorphism allows objects to be treated as instances of their parent class.",
        "Polymorphism lets objects be treated as instances of a parent class.",
    ),
    ("Numbers: 3.14, 2.71 and 1.41", "numbers 3.14 2.71 1.41"),
    ("Don't stop believing", "do not stop believing"),
    ("emoji 🙂 test", "emoji test 🙂"),
    ("  leading and trailing spaces  ", "leading and trailing spaces"),
    ("tab\tseparated\twords", "tab separated words"),
]
PREDS = [p for p, _ in PAIRS]
REFS = [r for _, r in PAIRS]
# Second references: some equal the prediction (so they add matches), others match nothing.
ALT_REFS = [p if i % 3 == 0 else r.upper() for i, (p, r) in enumerate(PAIRS)]


def mean_rouge_f1(preds, refs, types, use_stemmer) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    scores = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in types}


def test_corpus_bleu_matches_sacrebleu() -> None:
    assert M.corpus_bleu(PREDS, REFS) == sacrebleu.corpus_bleu(PREDS, [REFS]).score
    lower = M.corpus_bleu(PREDS, REFS, lowercase=True)  # kwargs reach sacrebleu
    assert lower == sacrebleu.corpus_bleu(PREDS, [REFS], lowercase=True).score
    assert lower != M.corpus_bleu(PREDS, REFS)
    assert M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert 0 < M.corpus_bleu(PREDS, REFS) < 100


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_matches_mean_rouge_score_f1(use_stemmer: bool) -> None:
    got = M.rouge(PREDS, REFS, use_stemmer=use_stemmer)
    expected = mean_rouge_f1(PREDS, REFS, M.DEFAULT_ROUGE_TYPES, use_stemmer)
    assert got.keys() == expected.keys()
    for t in expected:
        assert got[t] == pytest.approx(expected[t], abs=1e-12)
        assert 0.0 <= got[t] <= 1.0


def test_rouge_hand_values_stemming_and_newlines() -> None:
    assert M.rouge(["the cat sat"], ["the cat sat on the mat"])["rouge1"] == pytest.approx(2 / 3)
    # stemmed: he is run fast / he run fast -> P 3/4, R 1; unstemmed overlap is only 2.
    assert M.rouge(["He is running fast."], ["He runs fast."])["rouge1"] == pytest.approx(6 / 7)
    plain = M.rouge(["He is running fast."], ["He runs fast."], use_stemmer=False)["rouge1"]
    assert plain == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    # rougeLsum splits on "\n": swapped sentences match fully; rougeL sees one LCS of 3/6.
    swapped = M.rouge(["a b c\nd e f"], ["d e f\na b c"], rouge_types=("rougeL", "rougeLsum"))
    assert swapped == {"rougeL": pytest.approx(0.5), "rougeLsum": pytest.approx(1.0)}


@pytest.mark.parametrize("fn", [M.corpus_bleu, M.rouge])
def test_generation_metrics_reject_mismatched_or_empty_lists(fn) -> None:
    with pytest.raises(ValueError, match="same length, got 2 predictions and 1 references"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        fn([], [])
    with pytest.raises(TypeError, match="lists of strings"):
        fn("a b", "a b")


# --------------------------------------------------------------------------- evaluate modules


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline flags as env vars, plus evaluate's own flag, which it reads only at import."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)


def load(name: str, tmp_path: Path) -> evaluate.EvaluationModule:
    return M.load_metric(name, cache_dir=str(tmp_path / "metrics"), keep_in_memory=True)


def test_metric_module_paths_are_absolute_self_contained_scripts() -> None:
    for name in M.METRIC_MODULE_NAMES:
        path = Path(M.metric_module_path(name))
        assert path.is_absolute() and path.is_file() and path.name == f"{name}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}.py has a relative import; evaluate copies it alone"
                assert not (node.module or "").startswith("lumorik_sft")
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("lumorik_sft") for a in node.names)
    with pytest.raises(ValueError, match="choose one of"):
        M.metric_module_path("meteor")


def test_bleu_module_offline_matches_direct(offline, tmp_path: Path) -> None:
    out = load("bleu", tmp_path).compute(predictions=PREDS, references=REFS)
    direct = sacrebleu.corpus_bleu(PREDS, [REFS])
    assert out["score"] == M.corpus_bleu(PREDS, REFS) == direct.score
    assert out["bp"] == direct.bp and out["precisions"] == direct.precisions
    assert (out["sys_len"], out["ref_len"]) == (direct.sys_len, direct.ref_len)


def test_bleu_module_multiple_references_transposes_streams(offline, tmp_path: Path) -> None:
    multi = [[r, alt] for r, alt in zip(REFS, ALT_REFS, strict=True)]
    out = load("bleu", tmp_path).compute(predictions=PREDS, references=multi)
    assert out["score"] == sacrebleu.corpus_bleu(PREDS, [REFS, ALT_REFS]).score
    assert out["score"] > M.corpus_bleu(PREDS, REFS)  # the second reference really counted
    with pytest.raises(ValueError, match="same, non-zero number of references"):
        load("bleu", tmp_path).compute(predictions=["a", "b"], references=[["a", "x"], ["b"]])


def test_rouge_module_offline_matches_direct(offline, tmp_path: Path) -> None:
    metric = load("rouge", tmp_path)
    assert metric.compute(predictions=PREDS, references=REFS) == pytest.approx(M.rouge(PREDS, REFS))
    out = metric.compute(
        predictions=PREDS, references=REFS, rouge_types=["rouge1", "rougeLsum"], use_stemmer=False
    )
    expected = M.rouge(PREDS, REFS, rouge_types=("rouge1", "rougeLsum"), use_stemmer=False)
    assert out == pytest.approx(expected)
    multi = metric.compute(predictions=["He runs fast."], references=[["no", "He runs fast."]])
    assert multi["rouge1"] == 1.0  # best of several references


@pytest.mark.parametrize("name", M.METRIC_MODULE_NAMES)
def test_metric_modules_reject_mismatched_lengths(offline, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="Mismatch in the number of predictions"):
        load(name, tmp_path).compute(predictions=["a", "b"], references=["a"])


def test_load_metric_in_fresh_offline_process(tmp_path: Path) -> None:
    """A new process with an empty HF_HOME and every offline flag set before import."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
    }
    env.pop("HF_MODULES_CACHE", None)
    env.pop("HF_METRICS_CACHE", None)
    script = (
        "import json, sys\n"
        "from lumorik_sft.metrics import load_metric\n"
        "p, r = json.loads(sys.argv[1])\n"
        "b = load_metric('bleu').compute(predictions=p, references=r)['score']\n"
        "g = load_metric('rouge').compute(predictions=p, references=r)\n"
        "print(json.dumps({'bleu': b, 'rouge': g}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps([PREDS, REFS])],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bleu"] == M.corpus_bleu(PREDS, REFS)
    assert out["rouge"] == pytest.approx(M.rouge(PREDS, REFS))
    copied = list((tmp_path / "hf" / "modules" / "evaluate_modules" / "metrics").rglob("*.py"))
    assert {p.name for p in copied} >= {"bleu.py", "rouge.py"}  # evaluate copies scripts here
