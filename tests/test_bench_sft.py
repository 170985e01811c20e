"""Smoke test of benchmarks/bench_sft.py --quick: a tiny model, three contestants, ~25 s.

It proves the benchmark runs end to end and writes its report; the numbers of a tiny model
mean nothing (the real figures are in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sft.py"


def test_bench_quick_smoke(tmp_path):
    pytest.importorskip("trl")
    cmd = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--out", str(tmp_path),
           "--contestants", "ours_padded,ours_packed,trl_default"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("packed vs TRL default:") and "packed vs our padded loop:" in last
    assert "matmul peak" in proc.stdout
    payload = json.loads((tmp_path / "bench_sft.json").read_text())
    results = {r["name"]: r for r in payload["results"]}
    assert set(results) == {"ours_padded", "ours_packed", "trl_default"}
    assert all("error" not in r for r in results.values())
    # Packing changes the layout, not the arithmetic: same batches, same final loss.
    assert results["ours_packed"]["final_val_loss"] == pytest.approx(
        results["ours_padded"]["final_val_loss"], abs=1e-2)
    # the validation-loss comparison is also averaged over extra training seeds (default 1, 2)
    over = payload["summary"]["val_over_seeds"]
    assert over["seeds"] == [0, 1, 2] and len(over["losses"]["ours_packed"]) == 3
    assert over["packed_vs_trl_default"] == pytest.approx(
        sum(over["losses"]["ours_packed"]) / sum(over["losses"]["trl_default"]) - 1)
    assert "mean over training seeds 0, 1, 2" in (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "RESULTS.md").read_text().count("|") > 20
    assert (tmp_path / "bench_sft.png").stat().st_size > 1000
