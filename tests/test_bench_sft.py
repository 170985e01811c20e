"""Smoke tests of the benchmarks: bench_sft.py --quick (a tiny model, three contestants, all in
one process: about 20 s) and bench_cuda.py's CPU dry run.

They prove the scripts run end to end and write their reports; the numbers mean nothing here
(the real figures are in benchmarks/runs/*/RESULTS.md, indexed by benchmarks/RESULTS.md, and in
benchmarks/bench_cuda.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sft.py"


def _bench_module():
    sys.path.insert(0, str(BENCH.parent))
    import bench_sft

    return bench_sft


def test_bench_quick_smoke(tmp_path):
    pytest.importorskip("trl")
    cmd = [
        sys.executable,
        str(BENCH),
        "--quick",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
        "--contestants",
        "ours_padded,ours_packed,trl_default",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # a hang guard, not a speed check
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("packed vs TRL default:") and "packed vs our padded loop:" in last
    assert "matmul peak" in proc.stdout
    payload = json.loads((tmp_path / "bench_sft.json").read_text())
    results = {r["name"]: r for r in payload["results"]}
    assert set(results) == {"ours_padded", "ours_packed", "trl_default"}
    assert all("error" not in r for r in results.values())
    # each share is also given against the peak measured right before that contestant ran
    for r in results.values():
        assert r["peak_now"] > 0
        assert r["peak_fraction_now"] == pytest.approx(r["useful_flop_s"] / r["peak_now"])
    # Packing changes the layout, not the arithmetic: same batches, same final loss.
    assert results["ours_packed"]["final_val_loss"] == pytest.approx(
        results["ours_padded"]["final_val_loss"], abs=1e-2
    )
    # the validation-loss comparison is also averaged over extra training seeds (default 1, 2)
    over = payload["summary"]["val_over_seeds"]
    assert over["seeds"] == [0, 1, 2] and len(over["losses"]["ours_packed"]) == 3
    assert over["packed_vs_trl_default"] == pytest.approx(
        sum(over["losses"]["ours_packed"]) / sum(over["losses"]["trl_default"]) - 1
    )
    # ... and so are the speed ratios (the padded loop is re-run too): summed times
    assert over["speed"]["packed_vs_padded"] == pytest.approx(
        sum(over["seconds"]["ours_padded"]) / sum(over["seconds"]["ours_packed"])
    )
    assert len(over["seconds"]["trl_default"]) == 3
    assert "mean over training seeds 0, 1, 2" in (tmp_path / "RESULTS.md").read_text()
    # padding and TRL's recomputation only ever add arithmetic to the packed loop's
    ceilings = payload["summary"]["ceilings"]
    assert 1 < ceilings["packed_vs_padded"] < ceilings["packed_vs_trl_default"]
    assert results["trl_default"]["executed_flop_s"] > results["trl_default"]["useful_flop_s"]
    assert (tmp_path / "RESULTS.md").read_text().count("|") > 20
    assert (tmp_path / "bench_sft.png").stat().st_size > 1000


def test_bench_cuda_dry_runs_on_cpu(tmp_path):
    """The CUDA check cannot run in CI (no GPU); its CPU dry run keeps the script from rotting:
    every check runs and passes, and the report holds every contestant."""
    if not (
        Path(__file__).resolve().parents[1] / "lumorik_sft" / "assets" / "base-model" / "model.safetensors"
    ).exists():
        pytest.skip("needs the embedded model")
    out = tmp_path / "bench_cuda.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH.parent / "bench_cuda.py"),
            "--device",
            "cpu",
            "--limit",
            "16",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert set(report["runs"]) == {"ours_padded", "ours_packed", "ours_length", "hf_trainer"}
    assert report["nll_check"]["relative_gap"] < 1e-5
    assert proc.stdout.strip().splitlines()[-1].endswith("all checks passed")


def test_matmul_peak_stops_growing_when_one_product_is_slow(monkeypatch):
    """On a CPU without native bf16 one 2048² bf16 product takes ~10 s: the peak measurement
    must stop at the size where a single product already eats a tenth of its budget."""
    bench_sft = _bench_module()
    sizes: list[int] = []

    def mm(a, b, delay):
        sizes.append(a.shape[0])
        time.sleep(delay)
        return a

    monkeypatch.setattr(bench_sft.torch, "mm", lambda a, b: mm(a, b, 0.05))
    assert bench_sft.matmul_peak(bench_sft.torch.float32, 1, seconds=0.3) > 0
    assert set(sizes) == {512}
    sizes.clear()
    monkeypatch.setattr(bench_sft.torch, "mm", lambda a, b: mm(a, b, 0.0))
    bench_sft.matmul_peak(bench_sft.torch.float32, 1, seconds=0.3)
    assert sorted(set(sizes)) == [512, 1024, 1536, 2048]


def test_executed_work_by_hand():
    """Rows [2, 4] and [3] tokens, 5 completion targets, 10 matmul weights of which the head
    holds 4, one layer of width 1: f(n) = 60n + 6n² per row.
    packed = f(2)+f(4)+f(3) - 6·4·(9-5) = 618; padded = 2f(4)+f(3) - 6·4·(11-5) = 762;
    TRL = 2f(4)+f(3) + (906 - 6·4·11)/3 = 906 + 214 = 1120."""
    bench_sft = _bench_module()
    work = bench_sft.executed_work([2, 4, 3], 5, [[0, 1], [2]], linear=10, head=4, n_layer=1, d=1)
    assert work == {"ours_packed": 618, "ours_padded": 762, "trl_default": 1120, "padded_tokens": 11}
    no_ckpt = bench_sft.executed_work(
        [2, 4, 3], 5, [[0, 1], [2]], linear=10, head=4, n_layer=1, d=1, checkpointing=False
    )
    assert no_ckpt["trl_default"] == 906
    # Rows rounded up to 4 tokens: packed rows of 6 -> 8 and 3 -> 4 (+3 tokens), padded widths
    # 4 and 3 -> 4 (+1 token); each extra token costs 6·(10 - 4) = 36 (body only, no head).
    rounded = bench_sft.executed_work(
        [2, 4, 3], 5, [[0, 1], [2]], linear=10, head=4, n_layer=1, d=1, multiple=4
    )
    assert (rounded["ours_packed"], rounded["ours_padded"]) == (618 + 3 * 36, 762 + 36)
    assert rounded["trl_default"] == 1120
    # Our loops also skip the last block's MLP (2 weights here) where they skip the head:
    # packed 618 - 6·2·(9-5) = 570, padded 762 - 6·2·(11-5) = 690; TRL runs it everywhere.
    skipped = bench_sft.executed_work(
        [2, 4, 3], 5, [[0, 1], [2]], linear=10, head=4, n_layer=1, d=1, last_mlp=2
    )
    assert (skipped["ours_packed"], skipped["ours_padded"], skipped["trl_default"]) == (570, 690, 1120)


def test_runs_are_kept_per_kind_of_machine():
    bench_sft = _bench_module()
    assert bench_sft.run_tag({"cuda": False, "isa": "AVX2"}, 2, "fp32") == "cpu-avx2-2threads-fp32"
    assert bench_sft.run_tag({"cuda": True, "isa": "AVX512"}, 8, "bf16") == "cuda-avx512-8threads-bf16"


def test_committed_index_is_the_one_the_committed_runs_give(tmp_path):
    """benchmarks/RESULTS.md is generated from runs/*/bench_sft.json: regenerate it from copies
    of the committed runs (plus a quick run, which it leaves out) and compare."""
    bench_sft = _bench_module()
    runs = sorted(bench_sft.RUNS.glob("*/bench_sft.json"))
    assert runs, "no committed benchmark run"
    for path in runs:
        (tmp_path / "runs" / path.parent.name).mkdir(parents=True)
        shutil.copy(path, tmp_path / "runs" / path.parent.name / "bench_sft.json")
    quick = json.loads(runs[0].read_text()) | {"quick": True}
    (tmp_path / "runs" / "zz-quick").mkdir()
    (tmp_path / "runs" / "zz-quick" / "bench_sft.json").write_text(json.dumps(quick))
    text = bench_sft.write_index(tmp_path)
    assert text == (bench_sft.HERE / "RESULTS.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| [")]
    assert len(rows) == len(runs) and "zz-quick" not in text
    for path in runs:
        ratio = json.loads(path.read_text())["summary"]["ratios"]["packed_vs_trl_default"]
        assert f"runs/{path.parent.name}/RESULTS.md" in text and f"{ratio:.2f}x" in text


def test_committed_runs_are_what_their_data_and_timings_give():
    """Every committed run's derived figures (work, ceilings, ratios, seeds) are recomputed from
    its recorded timings and the data and model it names: the committed summary must be that."""
    bench_sft = _bench_module()
    for path in sorted(bench_sft.RUNS.glob("*/bench_sft.json")):
        committed = json.loads(path.read_text())
        again = json.loads(json.dumps(bench_sft.resummarise(path.parent)))
        assert again["work"] == committed["work"], path
        assert again["summary"] == committed["summary"], path
