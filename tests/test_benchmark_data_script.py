"""scripts/benchmark_data.py runs end to end on a tiny set and reports its figures (smoke test, no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_prints_the_ratio_and_memory(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "scripts/benchmark_data.py", "--cases", "2", "--matrix", "64", "--patches", "2",
               "--baseline-patches", "1", "--large-slices", "8", "--workers", "1", "--work", str(tmp_path / "work"),
               "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "faster per patch than the per-sample pattern" in run.stdout and "peak memory" in run.stdout
    figures = json.loads(out.read_text())
    assert figures["patches"]["cache"]["patches"] == 2 and figures["patches"]["per-sample"]["patches"] == 1
    assert figures["speedup_per_patch"] > 0
    assert figures["memory"]["shape"] == [8, 512, 512] and figures["memory"]["preprocess"]["peak_gb"] > 0
