"""Tests of utils/evaluation/predictions.py and scripts/evaluate.py on hand-made predictions for two synthetic cases."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.data.kits_layout import SEGMENTATION_NAME, spacing_from_affine
from utils.data.nifti_io import load_nifti, read_voxels, save_nifti
from utils.data.output_guard import OutputGuardError
from utils.evaluation.predictions import MISSING_PREDICTION_SCORES, evaluate_predictions
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "evaluate.py"
CASES = ("case_00000", "case_00001")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic KiTS19 cases, 64x64 in-plane, 5 and 3 mm slices, slice 0 free of labels."""
    folder = tmp_path_factory.mktemp("evaluate") / "data"
    generate_dataset(folder, 2, seed=0, options=SyntheticOptions(matrix=64), show_progress=False)
    return folder


def _truth(data_dir: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    image = load_nifti(data_dir / case_id / SEGMENTATION_NAME)
    return read_voxels(image, np.uint8), image.affine


def _write(folder: Path, name: str, labels: np.ndarray, affine: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_nifti(labels.astype(np.uint8), affine, folder / name)


def _by_case(result) -> dict[str, dict]:
    return {case["case_id"]: case for case in result.cases}


def test_script_scores_a_perfect_case_and_refuses_a_mismatched_affine(data_dir: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    labels, affine = _truth(data_dir, "case_00000")
    _write(pred, "prediction_00000.nii.gz", labels, affine)  # KiTS19 submission name
    labels, affine = _truth(data_dir, "case_00001")
    stretched = affine.copy()
    stretched[2, 0] *= 1.5  # 3 mm slices claimed to be 4.5 mm
    _write(pred, "case_00001.nii.gz", labels, stretched)
    inputs_before = sorted(p for p in (*data_dir.rglob("*"), *pred.rglob("*")))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--gt", str(data_dir), "--pred", str(pred),
                             "--out", str(tmp_path / "out"), "--tolerance-mm", "2.5"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "case_00001" in result.stderr and "affine" in result.stderr and "Traceback" not in result.stderr
    report = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert [case["case_id"] for case in report["cases"]] == ["case_00000"]
    perfect = report["cases"][0]
    assert perfect["kidney_dice"] == perfect["tumour_dice"] == perfect["kidney_surface_dice"] == 1.0
    assert perfect["kidney_hd95"] == perfect["tumour_hd95"] == 0.0
    assert report["refused"][0]["case_id"] == "case_00001" and "4.5" in report["refused"][0]["reason"]
    assert report["settings"]["tolerance_mm"] == 2.5 and "both empty" in report["settings"]["empty_mask_rules"]
    assert report["summary"]["tumour_hd95"] == {"mean": 0.0, "std": 0.0, "median": 0.0, "n": 1, "missing": 0}
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open(encoding="utf-8")))
    assert [row["case_id"] for row in rows] == ["case_00000"] and float(rows[0]["tumour_dice"]) == 1.0
    assert "kidney_hd95" in result.stdout and "1 refused" in result.stdout
    assert sorted(p for p in (*data_dir.rglob("*"), *pred.rglob("*"))) == inputs_before  # inputs untouched


def test_empty_prediction_has_missing_hd95_counted(data_dir: Path, tmp_path: Path) -> None:
    labels, affine = _truth(data_dir, "case_00000")
    _write(tmp_path / "pred", "case_00000.nii.gz", labels, affine)
    labels, affine = _truth(data_dir, "case_00001")
    _write(tmp_path / "pred", "prediction_00001.nii.gz", np.zeros_like(labels), affine)
    result = evaluate_predictions(data_dir, tmp_path / "pred", tmp_path / "out")
    empty = _by_case(result)["case_00001"]
    assert empty["kidney_dice"] == empty["tumour_dice"] == empty["kidney_surface_dice"] == 0.0
    assert empty["kidney_hd95"] is None and empty["tumour_hd95"] is None
    assert result.summary["kidney_hd95"] == {"mean": 0.0, "std": 0.0, "median": 0.0, "n": 1, "missing": 1}
    assert result.summary["kidney_dice"]["mean"] == 0.5 and result.summary["kidney_dice"]["missing"] == 0
    written = json.loads(result.json_path.read_text(encoding="utf-8"))
    assert written["cases"][1]["kidney_hd95"] is None  # null in JSON
    assert "NaN" not in result.json_path.read_text(encoding="utf-8")
    rows = list(csv.DictReader(result.csv_path.open(encoding="utf-8")))
    assert rows[1]["kidney_hd95"] == "" and rows[1]["kidney_dice"] == "0.0"


def test_prediction_shifted_by_one_slice(data_dir: Path, tmp_path: Path) -> None:
    """Shifted one slice (5 mm) towards slice 0: Dice from voxel counts, surface scores as MONAI's."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    labels, affine = _truth(data_dir, "case_00000")
    assert not labels[0].any()
    shifted = np.roll(labels, -1, axis=0)  # a true translation: slice 0 was empty
    _write(tmp_path / "pred", "case_00000.nii.gz", shifted, affine)
    scores = _by_case(evaluate_predictions(data_dir, tmp_path / "pred", tmp_path / "out"))["case_00000"]
    kidney, moved = labels > 0, shifted > 0
    assert scores["kidney_dice"] == pytest.approx(2 * np.sum(kidney & moved) / (2 * np.sum(kidney)))
    one_hot = [torch.from_numpy(np.stack([~m, m])[None].astype(np.float32)) for m in (moved, kidney)]
    spacing = spacing_from_affine(affine)
    with warnings.catch_warnings():  # MONAI warns about its own deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        nsd = compute_surface_dice(*one_hot, [2.0], spacing=spacing).item()
        hd95 = compute_hausdorff_distance(*one_hot, percentile=95, spacing=spacing).item()
    assert 0.0 < scores["kidney_surface_dice"] < 1.0 and 0.0 < scores["kidney_hd95"] <= 5.0
    assert scores["kidney_surface_dice"] == pytest.approx(nsd, abs=1e-6)
    assert scores["kidney_hd95"] == pytest.approx(hd95, rel=1e-5)


def test_swapped_kidney_and_tumour_labels(data_dir: Path, tmp_path: Path) -> None:
    """Kidney <-> tumour: the composite kidney is unchanged, the predicted tumour is the true kidney-only region."""
    labels, affine = _truth(data_dir, "case_00001")
    swapped = np.where(labels > 0, 3 - labels, 0)
    _write(tmp_path / "pred", "case_00001.nii.gz", swapped, affine)
    scores = _by_case(evaluate_predictions(data_dir, tmp_path / "pred", tmp_path / "out"))["case_00001"]
    assert scores["kidney_dice"] == 1.0 and scores["kidney_hd95"] == 0.0 and scores["kidney_surface_dice"] == 1.0
    # |pred tumour & true tumour| = |label 1 & label 2| = 0, both non-empty: Dice 2 * 0 / (|1| + |2|) = 0.
    assert np.count_nonzero(labels == 1) > 0 and np.count_nonzero(labels == 2) > 0
    assert scores["tumour_dice"] == 0.0 and scores["tumour_hd95"] is not None and scores["tumour_hd95"] > 0


def test_wrong_shape_and_labels_refused_naming_the_case(data_dir: Path, tmp_path: Path) -> None:
    labels, affine = _truth(data_dir, "case_00000")
    _write(tmp_path / "pred", "case_00000.nii.gz", labels[1:], affine)
    labels, affine = _truth(data_dir, "case_00001")
    bad = labels.copy()
    bad[50, 30, 30] = 7
    _write(tmp_path / "pred", "case_00001.nii.gz", bad, affine)
    result = evaluate_predictions(data_dir, tmp_path / "pred", tmp_path / "out")
    assert result.cases == ()
    reasons = {entry["case_id"]: entry["reason"] for entry in result.refused}
    assert reasons["case_00000"].startswith("case_00000") and "(41, 64, 64)" in reasons["case_00000"]
    assert "(42, 64, 64)" in reasons["case_00000"] and "shape" in reasons["case_00000"]
    assert reasons["case_00001"].startswith("case_00001") and "outside {0, 1, 2}" in reasons["case_00001"]
    assert "1 voxels with values 7" in reasons["case_00001"]


def test_unmatched_files_are_reported(data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    labels, affine = _truth(data_dir, "case_00000")
    for name in ("case_00000.nii.gz", "prediction_00007.nii.gz"):
        _write(tmp_path / "pred", name, labels, affine)
    (tmp_path / "pred" / "notes.txt").write_text("not a prediction")
    with caplog.at_level(logging.WARNING, logger="utils.evaluation.predictions"):
        result = evaluate_predictions(data_dir, tmp_path / "pred", tmp_path / "out")
    assert [case["case_id"] for case in result.cases] == ["case_00000", "case_00001"] and result.refused == ()
    assert result.missing == ("case_00001",)
    text = " | ".join(result.warnings)
    assert "case_00007" in text and "without ground truth" in text
    assert "case_00001" in text and "without a prediction" in text and "notes.txt" in text
    assert "case_00007" in caplog.text
    assert json.loads(result.json_path.read_text())["warnings"] == list(result.warnings)


def test_output_inside_an_input_folder_is_refused(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "pred").mkdir()
    with pytest.raises(OutputGuardError, match="inside the input data folder") as inside_truth:
        evaluate_predictions(data_dir, tmp_path / "pred", data_dir / "case_00000" / "metrics")
    assert str(data_dir.resolve()) in str(inside_truth.value)
    with pytest.raises(OutputGuardError, match="inside the input data folder") as inside_predictions:
        evaluate_predictions(data_dir, tmp_path / "pred", tmp_path / "pred" / "metrics")
    assert str((tmp_path / "pred").resolve()) in str(inside_predictions.value)
    with pytest.raises(OutputGuardError, match="would overwrite the input"):
        evaluate_predictions(data_dir, tmp_path / "pred", tmp_path / "pred")
    with pytest.raises(FileNotFoundError, match="pred_dir.*missing"):
        evaluate_predictions(data_dir, tmp_path / "missing", tmp_path / "out")
    assert not (data_dir / "case_00000" / "metrics").exists()


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_missing_prediction_scores_as_a_failure_by_default(data_dir: Path, tmp_path: Path) -> None:
    labels, affine = _truth(data_dir, "case_00000")
    _write(tmp_path / "pred", "case_00000.nii.gz", labels, affine)  # perfect; case_00001 has no prediction
    done = _run_script("--gt", str(data_dir), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "1 predictions scored, 1 cases without a prediction (scored as failures)" in done.stdout
    report = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert [case["case_id"] for case in report["cases"]] == ["case_00000", "case_00001"]
    assert report["cases"][1] == {"case_id": "case_00001", **MISSING_PREDICTION_SCORES}
    assert report["missing_predictions"] == ["case_00001"]
    assert report["settings"]["missing_predictions"] == "scored as failures"
    summary = report["summary"]
    assert summary["kidney_dice"]["mean"] == 0.5 and summary["tumour_dice"]["mean"] == 0.5
    assert summary["kidney_dice"]["n"] == 2 and summary["kidney_dice"]["missing"] == 0
    assert summary["kidney_hd95"] == {"mean": 0.0, "std": 0.0, "median": 0.0, "n": 1, "missing": 1}
    assert summary["mean_dice"] == 0.5 and summary["cases"] == 2
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open(encoding="utf-8")))
    assert [row["case_id"] for row in rows] == ["case_00000", "case_00001"]
    assert rows[1]["kidney_dice"] == "0.0" and rows[1]["tumour_dice"] == "0.0" and rows[1]["kidney_hd95"] == ""
    assert "scored as failures" in done.stderr and "case_00001" in done.stderr  # the warning names the case


def test_only_predicted_leaves_missing_cases_out_and_still_counts_them(data_dir: Path, tmp_path: Path) -> None:
    labels, affine = _truth(data_dir, "case_00000")
    _write(tmp_path / "pred", "case_00000.nii.gz", labels, affine)
    done = _run_script("--gt", str(data_dir), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "out"),
                       "--only-predicted")
    assert done.returncode == 0, done.stderr
    assert "1 predictions scored, 1 cases without a prediction (left out)" in done.stdout
    report = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert [case["case_id"] for case in report["cases"]] == ["case_00000"]
    assert report["missing_predictions"] == ["case_00001"] and report["summary"]["kidney_dice"]["mean"] == 1.0
    assert report["settings"]["missing_predictions"] == "left out"


def test_no_prediction_at_all_exits_1_even_though_every_case_is_scored(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "pred").mkdir()
    done = _run_script("--gt", str(data_dir), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    assert "0 predictions scored, 2 cases without a prediction" in done.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["summary"]["kidney_dice"]["mean"] == 0.0


def test_the_segmentation_record_beside_predictions_is_not_warned_about(data_dir: Path, tmp_path: Path) -> None:
    for case_id in CASES:
        labels, affine = _truth(data_dir, case_id)
        _write(tmp_path / "pred", f"{case_id}.nii.gz", labels, affine)
    (tmp_path / "pred" / "segmentation_run.json").write_text(json.dumps({"cases": {}}))
    (tmp_path / "pred" / "notes.txt").write_text("not a prediction")
    result = evaluate_predictions(data_dir, tmp_path / "pred", tmp_path / "out")
    assert len(result.warnings) == 1
    assert "notes.txt" in result.warnings[0] and "segmentation_run.json" not in result.warnings[0]
    assert "ignored 1 entries" in result.warnings[0]


def test_a_foreign_metrics_file_is_never_replaced(data_dir: Path, tmp_path: Path) -> None:
    labels, affine = _truth(data_dir, "case_00000")
    _write(tmp_path / "pred", "case_00000.nii.gz", labels, affine)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.csv").write_text("someone else's table\n")
    done = _run_script("--gt", str(data_dir), "--pred", str(tmp_path / "pred"), "--out", str(out))
    assert done.returncode == 2 and "evaluate.py: error:" in done.stderr
    assert str((out / "metrics.csv").resolve()) in done.stderr and "Traceback" not in done.stderr
    assert (out / "metrics.csv").read_text() == "someone else's table\n" and not (out / "metrics.json").exists()
    (out / "metrics.csv").unlink()
    assert _run_script("--gt", str(data_dir), "--pred", str(tmp_path / "pred"), "--out", str(out)).returncode == 0
    again = _run_script("--gt", str(data_dir), "--pred", str(tmp_path / "pred"), "--out", str(out))
    assert again.returncode == 0, again.stderr  # an earlier evaluation's files are replaced


def test_the_script_refuses_an_output_inside_the_data_before_scoring(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "pred").mkdir()
    inside = data_dir / "case_00000" / "metrics"
    done = _run_script("--gt", str(data_dir), "--pred", str(tmp_path / "pred"), "--out", str(inside))
    assert done.returncode == 2 and f"{inside.resolve()} is inside the input data folder" in done.stderr
    assert "--allow-inside-input" in done.stderr and not inside.exists()
