"""Scoring KiTS23 predictions by hierarchical evaluation region (scripts/evaluate.py --dataset kits23)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_dataset_definitions import _kits23_case

from utils.data.dataset_definitions import CYST_LABEL, KITS23
from utils.data.kits_layout import build_kits_affine
from utils.data.nifti_io import save_nifti
from utils.evaluation.predictions import evaluate_predictions, metrics_csv_header
from utils.metrics.scoring import metric_names

REPO = Path(__file__).resolve().parents[1]
SPACING = (3.0, 0.8, 0.8)


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """Ground truth for three KiTS23 cases; predictions: one perfect, one with cyst and tumour swapped, one missing."""
    gt, pred = tmp_path / "dataset", tmp_path / "predictions"
    pred.mkdir()
    affine = build_kits_affine(SPACING)
    truth = _kits23_case()
    for case_id in ("case_00400", "case_00401", "case_00402"):
        (gt / case_id).mkdir(parents=True)
        save_nifti(np.where(truth > 0, 150, -1000).astype(np.int16), affine, gt / case_id / "imaging.nii.gz")
        save_nifti(truth, affine, gt / case_id / "segmentation.nii.gz")
    (gt / "kits23.json").write_text(json.dumps([{"case_id": f"case_0040{i}"} for i in range(3)]))
    swapped = truth.copy()
    swapped[truth == 2], swapped[truth == CYST_LABEL] = CYST_LABEL, 2
    save_nifti(truth, affine, pred / "case_00400.nii.gz")
    save_nifti(swapped, affine, pred / "case_00401.nii.gz")
    return gt, pred


def test_kits23_predictions_are_scored_by_hec_with_missing_ones_as_failures(folders, tmp_path):
    gt, pred = folders
    result = evaluate_predictions(gt, pred, tmp_path / "report", dataset="kits23")
    perfect, swapped, missing = result.cases
    assert all(perfect[f"{r}_dice"] == 1.0 for r in KITS23.region_names)
    assert swapped["kidney_and_masses_dice"] == 1.0 and swapped["masses_dice"] == 1.0
    assert swapped["tumour_dice"] == 0.0 and swapped["tumour_surface_dice"] == 0.0
    assert missing == {"case_id": "case_00402", **{name: None if name.endswith("hd95") else 0.0
                                                   for name in metric_names(KITS23)}}
    assert result.summary["tumour_dice"]["mean"] == pytest.approx(1 / 3)
    assert result.summary["mean_dice"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    report = json.loads(result.json_path.read_text())
    assert report["settings"]["dataset"] == "kits23"
    assert report["settings"]["regions"]["masses"] == {"labels": [2, 3], "tolerance_mm": KITS23.region("masses")
                                                       .tolerance_mm}
    with open(result.csv_path) as handle:
        rows = list(csv.reader(handle))
    assert ",".join(rows[0]) == metrics_csv_header(KITS23) and len(rows) == 4


def test_evaluate_script_takes_the_dataset_and_refuses_a_kits23_folder_read_as_kits19(folders, tmp_path):
    gt, pred = folders
    command = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--gt", str(gt), "--pred", str(pred)]
    refused = subprocess.run([*command, "--out", str(tmp_path / "a")], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
    assert refused.returncode == 2 and "'dataset: kits23'" in refused.stderr and "Traceback" not in refused.stderr
    scored = subprocess.run([*command, "--out", str(tmp_path / "b"), "--dataset", "kits23"], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert scored.returncode == 0, scored.stderr
    assert "kidney_and_masses_dice" in scored.stdout and "masses_surface_dice" in scored.stdout
    assert "2 predictions scored, 1 cases without a prediction (scored as failures)" in scored.stdout


def test_a_kits23_prediction_against_kits19_truth_is_refused_naming_the_label(tmp_path):
    gt, pred = tmp_path / "data", tmp_path / "predictions"
    (gt / "case_00000").mkdir(parents=True)
    pred.mkdir()
    affine = build_kits_affine(SPACING)
    truth = np.minimum(_kits23_case(), 2)
    save_nifti(truth, affine, gt / "case_00000" / "segmentation.nii.gz")
    save_nifti(_kits23_case(), affine, pred / "case_00000.nii.gz")
    result = evaluate_predictions(gt, pred, tmp_path / "report")
    assert result.refused and "labels outside {0, 1, 2}" in result.refused[0]["reason"]
