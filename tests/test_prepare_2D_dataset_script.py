"""scripts/prepare_2D_dataset.py writes the fitted slices of a cache, and refuses bad input clearly."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_2D_dataset.py"


def test_writes_slices_of_the_size_asked_for(tiny_cache, tmp_path):
    out = tmp_path / "slices"
    run = subprocess.run([sys.executable, str(SCRIPT), "--cache", str(tiny_cache.folder), "--out", str(out),
                          "--set", "slices.image_size=40"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    with open(out / "slices.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert {row["case_id"] for row in rows} == set(tiny_cache.case_ids)
    assert np.load(out / rows[-1]["image"]).shape == (40, 40)


def test_refuses_a_missing_cache_and_an_output_inside_the_cache(tiny_cache, tmp_path):
    missing = subprocess.run([sys.executable, str(SCRIPT), "--cache", str(tmp_path / "nothing"), "--out",
                              str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert missing.returncode == 2 and "not a preprocessing cache" in missing.stderr
    inside = subprocess.run([sys.executable, str(SCRIPT), "--cache", str(tiny_cache.folder), "--out",
                             str(tiny_cache.folder / "slices")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert inside.returncode == 2 and "refusing" in inside.stderr
