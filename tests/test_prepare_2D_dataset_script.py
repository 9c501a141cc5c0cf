"""scripts/prepare_2D_dataset.py writes the fitted slices of a cache, and refuses bad input clearly."""

from __future__ import annotations

import csv
import hashlib
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
    assert inside.returncode == 2 and "inside the input data folder" in inside.stderr
    assert str((tiny_cache.folder / "slices").resolve()) in inside.stderr
    assert not (tiny_cache.folder / "slices").exists()


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refuses_an_output_inside_the_raw_data_and_a_foreign_index(tiny_cache, tmp_path):
    data = Path(tiny_cache.plan["source_data"])
    before = _hashes(data)
    inside = data / "case_00000" / "slices"
    run = subprocess.run([sys.executable, str(SCRIPT), "--cache", str(tiny_cache.folder), "--out", str(inside)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2 and "prepare_2D_dataset.py: error: refusing to write slices: slice folder" in run.stderr
    assert f"{inside.resolve()} is inside the input data folder {data.resolve()}" in run.stderr
    assert not inside.exists() and _hashes(data) == before
    out = tmp_path / "slices"
    out.mkdir()
    (out / "slices.csv").write_text("my,own,table\n")
    foreign = subprocess.run([sys.executable, str(SCRIPT), "--cache", str(tiny_cache.folder), "--out", str(out)],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert foreign.returncode == 2 and str((out / "slices.csv").resolve()) in foreign.stderr
    assert (out / "slices.csv").read_text() == "my,own,table\n" and sorted(out.iterdir()) == [out / "slices.csv"]
