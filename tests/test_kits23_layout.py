"""KiTS23 data folders: discovery and validation follow the dataset (``dataset/``, ``kits23.json``, labels
0-3), a folder of one challenge read as the other is refused, label 3 in KiTS19 data stays an error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from utils.data.case_discovery import discover_cases
from utils.data.case_validation import UnusableCaseError, load_case, select_cases, validate_dataset
from utils.data.dataset_definitions import CYST_LABEL, KITS23, DatasetLayoutError
from utils.data.kits_layout import build_kits_affine
from utils.data.nifti_io import save_nifti

REPO = Path(__file__).resolve().parents[1]
SPACING = (3.0, 0.8, 0.8)


def _write_case(folder: Path, case_id: str, labels: np.ndarray) -> None:
    case = folder / case_id
    case.mkdir(parents=True)
    affine = build_kits_affine(SPACING)
    image = np.full(labels.shape, -1000, np.int16)
    image[labels > 0] = 150
    save_nifti(image, affine, case / "imaging.nii.gz")
    save_nifti(labels.astype(np.uint8), affine, case / "segmentation.nii.gz")


def _labels(with_cyst: bool) -> np.ndarray:
    labels = np.zeros((8, 24, 24), np.uint8)
    labels[2:6, 4:20, 4:12] = 1
    labels[3:5, 6:10, 6:10] = 2
    if with_cyst:
        labels[3:5, 14:18, 6:10] = CYST_LABEL
    return labels


@pytest.fixture
def kits23_folder(tmp_path) -> Path:
    """A KiTS23 ``dataset/`` folder: two cases (one with a cyst) and a kits23.json without spacings."""
    folder = tmp_path / "kits23" / "dataset"
    _write_case(folder, "case_00400", _labels(with_cyst=True))
    _write_case(folder, "case_00401", _labels(with_cyst=False))
    entries = [{"case_id": "case_00400", "malignant": True}, {"case_id": "case_00401", "malignant": True}]
    (folder / "kits23.json").write_text(json.dumps(entries))
    return folder


def test_a_kits23_folder_validates_with_the_cyst_label(kits23_folder):
    report = validate_dataset(kits23_folder, full=True, show_progress=False, dataset="kits23")
    assert report.counts["ok"] == 2 and report.listing.dataset is KITS23
    assert report.listing.kits_json_ids == ("case_00400", "case_00401")
    assert report.listing.warnings == ()  # kits23.json has no spacings, and none are asked of it
    counts = {r.case_id: r.label_counts for r in report.reports}
    assert counts["case_00400"][CYST_LABEL] == 2 * 4 * 4 and counts["case_00401"][CYST_LABEL] == 0
    assert report.to_dict()["dataset"] == "kits23"
    loaded = load_case(select_cases(report)[0], dataset=KITS23)
    assert set(np.unique(loaded.segmentation)) == {0, 1, 2, 3}


def test_a_kits23_folder_read_as_kits19_is_refused_naming_the_setting(kits23_folder):
    with pytest.raises(DatasetLayoutError, match=r"holds kits23.json, the KiTS23 layout.*'dataset: kits23'"):
        discover_cases(kits23_folder)


def test_a_kits19_folder_read_as_kits23_is_refused(tmp_path):
    _write_case(tmp_path, "case_00000", _labels(with_cyst=False))
    (tmp_path / "kits.json").write_text(json.dumps([{"case_id": "case_00000"}]))
    with pytest.raises(DatasetLayoutError, match=r"holds kits.json, the KiTS19 layout.*'dataset: kits19'"):
        validate_dataset(tmp_path, show_progress=False, dataset="kits23")


def test_label_3_in_kits19_data_stays_an_error_and_names_kits23(tmp_path):
    _write_case(tmp_path, "case_00000", _labels(with_cyst=True))
    report = validate_dataset(tmp_path, full=True, show_progress=False)
    (problem,) = report.reports[0].errors
    assert problem.code == "bad_labels" and problem.path.name == "segmentation.nii.gz"
    assert "label values outside {0, 1, 2}: 3 (32 voxels)" in problem.message
    assert "label 3 is KiTS23's cyst" in problem.message and "'dataset: kits23'" in problem.message
    with pytest.raises(UnusableCaseError, match="case_00000"):
        select_cases(report)


def test_a_label_no_dataset_has_is_an_error_without_a_hint(kits23_folder):
    labels = _labels(with_cyst=True)
    labels[0, 0, 0] = 4
    _write_case(kits23_folder, "case_00402", labels)
    report = validate_dataset(kits23_folder, full=True, show_progress=False, dataset="kits23")
    bad = next(r for r in report.reports if r.case_id == "case_00402")
    assert "outside {0, 1, 2, 3}: 4 (1 voxel)" in bad.errors[0].message and "belongs to" not in bad.errors[0].message


def test_the_repository_root_is_pointed_to_its_dataset_folder(kits23_folder):
    listing = discover_cases(kits23_folder.parent, "kits23")
    assert listing.cases == () and any(f"did you mean {kits23_folder}?" in w for w in listing.warnings)


def test_check_data_takes_the_dataset_and_refuses_the_other_layout(kits23_folder):
    command = [sys.executable, str(REPO / "scripts" / "check_data.py"), "--data", str(kits23_folder), "--full"]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert refused.returncode == 2 and "--dataset kits23" in refused.stderr and "Traceback" not in refused.stderr
    checked = subprocess.run([*command, "--dataset", "kits23"], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert "2 cases in" in checked.stdout and "2 ok" in checked.stdout


def test_the_real_kits23_masks_validate(real_kits23_dir):
    report = validate_dataset(real_kits23_dir, full=True, show_progress=False, dataset="kits23", workers=2)
    assert len(report.reports) == 100
    # Labels only: every case lacks its CT, and nothing else is wrong with any of them.
    assert {p.code for r in report.reports for p in r.errors} == {"missing_imaging"}
    with_cyst = [r.case_id for r in report.reports if r.label_counts[CYST_LABEL] > 0]
    assert len(with_cyst) == 51
    assert report.listing.warnings[0].startswith("kits23.json lists 389 cases (case_00000")
