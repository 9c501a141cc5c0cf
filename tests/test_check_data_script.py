"""End-to-end tests of scripts/check_data.py on a tiny synthetic data folder (run as a subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from utils.data.kits_layout import IMAGING_NAME, SEGMENTATION_NAME, build_kits_affine
from utils.data.nifti_io import save_nifti

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "check_data.py"
SHAPE = (6, 16, 16)
SPACING = (2.0, 0.8, 0.8)


def _write_case(root: Path, case_id: str, *, with_labels: bool = True) -> Path:
    folder = root / case_id
    folder.mkdir(parents=True)
    image = np.random.default_rng(0).integers(-1000, 1000, size=SHAPE, dtype=np.int16)
    save_nifti(image, build_kits_affine(SPACING), folder / IMAGING_NAME)
    if with_labels:
        labels = np.zeros(SHAPE, dtype=np.uint8)
        labels[2:4, 4:10, 4:10] = 1
        save_nifti(labels, build_kits_affine(SPACING), folder / SEGMENTATION_NAME)
    return folder


def _run(*args: str, data_env: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KITS19_DATA"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if data_env is not None:
        env["KITS19_DATA"] = data_env
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_good_dataset_exits_0(tmp_path: Path) -> None:
    _write_case(tmp_path, "case_00000")
    _write_case(tmp_path, "case_00001", with_labels=False)
    result = _run("--full", data_env=str(tmp_path))  # data folder from KITS19_DATA
    assert result.returncode == 0, result.stderr
    assert "case_00001" in result.stdout and "inference_only" in result.stdout
    assert "1 ok, 1 inference-only" in result.stdout and "0 unusable" in result.stdout


def test_unusable_case_exits_1_and_writes_json(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_case(data, "case_00000")
    bad = _write_case(data, "case_00001") / IMAGING_NAME
    payload = bad.read_bytes()
    bad.write_bytes(payload[: len(payload) // 2])
    (data / "notes").mkdir()
    out = tmp_path / "report.json"
    result = _run("--data", str(data), "--json", str(out))
    assert result.returncode == 1, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("case_00001"))
    assert "unusable" in row and "unreadable" in row and "truncated" in row
    assert "warning:" in result.stdout and "notes" in result.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["counts"] == {"ok": 1, "inference_only": 0, "unusable": 1}
    assert report["cases"][1]["problems"][0]["code"] == "unreadable"
    assert not list(tmp_path.glob(".report.json.*"))  # no temporary file left behind


def test_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    missing = _run("--data", str(tmp_path / "missing"))
    unset = _run()  # neither --data nor KITS19_DATA
    for result in (missing, unset):
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert "missing" in missing.stderr and "does not exist" in missing.stderr
    assert "--data" in unset.stderr and "KITS19_DATA" in unset.stderr


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_json_onto_a_ct_in_the_data_folder_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ct = _write_case(data, "case_00007") / IMAGING_NAME
    before = _hashes(data)
    result = _run("--data", str(data), "--json", str(ct))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("check_data.py: error: --json") and str(ct.resolve()) in result.stderr
    assert result.stdout == ""  # refused before any case was checked
    inside = _run("--data", str(data), "--json", str(data / "report.json"))
    assert inside.returncode == 2 and "inside the input data folder" in inside.stderr
    assert "--allow-inside-input" in inside.stderr
    assert _hashes(data) == before


def test_json_never_replaces_a_file_that_is_not_a_report(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_case(data, "case_00000")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    refused = _run("--data", str(data), "--json", str(notes))
    assert refused.returncode == 2 and str(notes.resolve()) in refused.stderr
    assert "not written by this command" in refused.stderr and notes.read_text() == '{"mine": true}\n'
    report = tmp_path / "report.json"
    assert _run("--data", str(data), "--json", str(report)).returncode == 0
    again = _run("--data", str(data), "--json", str(report), "--full")  # an earlier report is replaced
    assert again.returncode == 0, again.stderr
    assert json.loads(report.read_text())["full"] is True


def test_allow_inside_input_writes_a_new_report_but_never_onto_a_ct(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ct = _write_case(data, "case_00000") / IMAGING_NAME
    before = ct.read_bytes()
    inside = _run("--data", str(data), "--json", str(data / "report.json"), "--allow-inside-input")
    assert inside.returncode == 0, inside.stderr
    assert json.loads((data / "report.json").read_text())["counts"]["ok"] == 1
    onto = _run("--data", str(data), "--json", str(ct), "--allow-inside-input")
    assert onto.returncode == 2 and ct.read_bytes() == before
