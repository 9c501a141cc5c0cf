"""utils/analysis/tumour_profiles.py: a tumour's size and kidney contrast, and scores grouped by them."""

from __future__ import annotations

import numpy as np
import pytest

from utils.analysis.tumour_profiles import (
    ISODENSE_HU,
    SMALL_TUMOUR_ML,
    TumourProfile,
    dice_by_group,
    profile_case_folder,
    profile_tumour,
)
from utils.data.kits_layout import build_kits_affine
from utils.data.nifti_io import save_nifti


def _case(tumour_hu: float, kidney_hu: float = 150.0) -> tuple[np.ndarray, np.ndarray]:
    """A (10, 20, 20) CT: kidney block of 600 voxels, tumour block of 100 voxels inside it."""
    labels = np.zeros((10, 20, 20), np.uint8)
    labels[2:8, 5:15, 5:15] = 1
    labels[3:7, 6:11, 6:11] = 2
    image = np.full(labels.shape, -100.0, np.float32)
    image[labels == 1] = kidney_hu
    image[labels == 2] = tumour_hu
    return image, labels


def test_volume_contrast_and_groups_by_hand():
    image, labels = _case(tumour_hu=130.0)
    profile = profile_tumour("case_00001", image, labels, (2.0, 1.0, 1.0))
    assert profile.tumour_ml == pytest.approx(100 * 2.0 / 1000)  # 100 voxels of 2 mm^3
    assert profile.tumour_hu == pytest.approx(130.0) and profile.kidney_hu == pytest.approx(150.0)
    assert profile.contrast_hu == pytest.approx(-20.0)
    assert profile.contrast_group == "isodense" and profile.size_group == "small"

    image, labels = _case(tumour_hu=150.0 - ISODENSE_HU - 1)
    big = profile_tumour("case_00002", image, labels, (10.0, 10.0, 10.0))  # 100 ml of tumour
    assert big.contrast_group == "distinct" and big.size_group == "large"
    assert big.tumour_ml >= SMALL_TUMOUR_ML


def test_a_case_without_tumour_or_kidney_is_in_no_group():
    image, labels = _case(tumour_hu=40.0)
    labels[labels == 2] = 1
    no_tumour = profile_tumour("case_00003", image, labels, (1.0, 1.0, 1.0))
    assert no_tumour.tumour_ml == 0 and no_tumour.tumour_hu is None
    assert no_tumour.contrast_group is None and no_tumour.size_group is None
    image, labels = _case(tumour_hu=40.0)
    labels[labels == 1] = 0
    only_tumour = profile_tumour("case_00004", image, labels, (1.0, 1.0, 1.0))
    assert only_tumour.kidney_hu is None and only_tumour.contrast_group is None and only_tumour.size_group == "small"


def test_bad_input_names_the_case():
    image, labels = _case(tumour_hu=40.0)
    with pytest.raises(ValueError, match="case_00005.*same shape"):
        profile_tumour("case_00005", image[:-1], labels, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="case_00005.*spacing"):
        profile_tumour("case_00005", image, labels, (1.0, 0.0, 1.0))


def test_a_case_folder_is_read_from_its_nifti_files(tmp_path):
    image, labels = _case(tumour_hu=60.0)
    folder = tmp_path / "case_00007"
    folder.mkdir()
    affine = build_kits_affine((3.0, 0.5, 0.5))
    save_nifti(image.astype(np.int16), affine, folder / "imaging.nii.gz")
    save_nifti(labels, affine, folder / "segmentation.nii.gz")
    profile = profile_case_folder(folder)
    assert profile.case_id == "case_00007"
    assert profile.tumour_ml == pytest.approx(100 * 0.75 / 1000)
    assert profile.contrast_hu == pytest.approx(-90.0) and profile.contrast_group == "distinct"

    save_nifti(labels[:-1], affine, folder / "segmentation.nii.gz")
    with pytest.raises(ValueError, match="case_00007.*segmentation.nii.gz"):
        profile_case_folder(folder)
    with pytest.raises(FileNotFoundError, match="imaging.nii.gz"):
        profile_case_folder(tmp_path / "case_00008")


def test_scores_grouped_by_kind_of_tumour():
    profiles = [TumourProfile("a", 5.0, 150.0, 160.0), TumourProfile("b", 50.0, 60.0, 160.0),
                TumourProfile("c", 30.0, 170.0, 160.0), TumourProfile("d", 0.0, None, 160.0),
                TumourProfile("e", 8.0, 100.0, 160.0)]
    groups = dice_by_group(profiles, {"a": 0.2, "b": 0.8, "c": 0.5, "d": 1.0})  # "e" has no score: left out
    assert groups["isodense"] == {"cases": 2, "mean": pytest.approx(0.35), "case_ids": ["a", "c"]}
    assert groups["distinct"] == {"cases": 1, "mean": pytest.approx(0.8), "case_ids": ["b"]}
    assert groups["small"] == {"cases": 1, "mean": pytest.approx(0.2), "case_ids": ["a"]}
    assert groups["large"] == {"cases": 2, "mean": pytest.approx(0.65), "case_ids": ["b", "c"]}
    assert dice_by_group(profiles, {})["isodense"] == {"cases": 0, "mean": None, "case_ids": []}
