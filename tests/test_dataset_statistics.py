import logging
import math

import numpy as np
import pytest

from utils.analysis.dataset_statistics import (
    HU_HISTOGRAM_RANGE,
    HuSummary,
    accumulate_hu_histograms,
    compute_case_statistics,
    compute_dataset_statistics,
    compute_histogram_percentile,
    compute_label_statistics,
)
from utils.data.case_discovery import CaseFiles
from utils.data.kits_layout import build_kits_affine
from utils.data.nifti_io import save_nifti

SPACING = (4.0, 2.5, 2.5)  # 25 mm³ = 0.025 ml per voxel


def _hand_made_image(labels: np.ndarray) -> np.ndarray:
    return np.choose(labels, [-1000, 40, 80]).astype(np.int16)


def _write_case(root, case_id, labels=None, image=None, spacing=SPACING):
    folder = root / case_id
    folder.mkdir(parents=True)
    if labels is not None:
        save_nifti(labels, build_kits_affine(spacing), folder / "segmentation.nii.gz")
    if image is not None:
        save_nifti(image, build_kits_affine(spacing), folder / "imaging.nii.gz")
    return folder


def test_hand_made_case(hand_made_labels):
    stats = compute_label_statistics("case_00000", hand_made_labels(), SPACING)
    assert stats.shape == (6, 8, 8) and stats.spacing == SPACING
    assert stats.voxel_counts == (384 - 32, 27, 5)
    assert stats.tumours == 2 and stats.kidney_components == 2
    assert stats.kidney_ml == pytest.approx(0.675) and stats.tumour_ml == pytest.approx(0.125)
    assert stats.kidney_tumour_ml == pytest.approx(0.8)
    assert stats.class_proportions == pytest.approx((352 / 384, 27 / 384, 5 / 384))
    assert (stats.slices_with_kidney, stats.slices_with_tumour) == (5, 2)
    assert stats.kidney_slice_share == pytest.approx(5 / 6) and stats.tumour_slice_share == pytest.approx(2 / 6)
    assert stats.hu is None and stats.hu_histogram is None


def test_components_are_26_connected_in_3d():
    labels = np.zeros((3, 3, 3), np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = 2  # corner contact: one tumour
    assert compute_label_statistics("c", labels, (1, 1, 1)).tumours == 1
    labels[1, 1, 1], labels[2, 2, 2] = 0, 2  # a gap: two tumours
    assert compute_label_statistics("c", labels, (1, 1, 1)).tumours == 2
    empty = compute_label_statistics("c", np.zeros((2, 2, 2), np.uint8), (1, 1, 1))
    assert (empty.tumours, empty.kidney_components, empty.kidney_ml) == (0, 0, 0.0)


def test_hu_summary_of_constant_classes_and_clipped_histogram(hand_made_labels):
    labels = hand_made_labels()
    image = _hand_made_image(labels).astype(np.float32)
    image[0, 0, 0] = 5000.0  # a kidney voxel beyond the histogram range
    stats = compute_label_statistics("c", labels, SPACING, image)
    assert stats.hu[0] == HuSummary(-1000.0, 0.0, -1000.0, -1000.0)
    assert stats.hu[2] == HuSummary(80.0, 0.0, 80.0, 80.0)
    assert stats.hu[1].mean == pytest.approx((26 * 40 + 5000) / 27)  # the mean uses the unclipped value
    assert (stats.hu[1].p0_5, stats.hu[1].p99_5) == (40.0, 3071.0)
    low = HU_HISTOGRAM_RANGE[0]
    assert stats.hu_histogram.shape == (3, 4096) and stats.hu_histogram.dtype == np.int64
    assert stats.hu_histogram[1, 40 - low] == 26 and stats.hu_histogram[1, -1] == 1
    assert stats.hu_histogram.sum(axis=1).tolist() == [352, 27, 5]
    no_tumour = compute_label_statistics("c", np.minimum(labels, 1), SPACING, image)
    assert no_tumour.hu[2] is None


def test_hu_summary_over_many_slabs_matches_numpy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (70, 5, 5)).astype(np.uint8)  # more slices than one slab
    image = rng.normal(50, 200, labels.shape).astype(np.float32)
    stats = compute_label_statistics("c", labels, SPACING, image)
    for label, summary in enumerate(stats.hu):
        values = image[labels == label].astype(np.float64)
        rounded = np.clip(np.rint(values), *HU_HISTOGRAM_RANGE)
        assert summary.mean == pytest.approx(values.mean(), abs=1e-9)
        assert summary.std == pytest.approx(values.std(), rel=1e-12)
        assert summary.p0_5 == np.percentile(rounded, 0.5, method="inverted_cdf")
        assert summary.p99_5 == np.percentile(rounded, 99.5, method="inverted_cdf")


def test_histogram_percentile_by_hand_and_against_numpy():
    counts = np.array([1, 0, 3])  # values 10, 12, 12, 12
    assert [compute_histogram_percentile(counts, q, low=10) for q in (0, 25, 26, 100)] == [10, 10, 12, 12]
    assert math.isnan(compute_histogram_percentile(np.zeros(5), 50))
    values = np.random.default_rng(0).integers(-50, 50, 999)
    counts = np.bincount(values + 50)
    for q in (0, 0.5, 10, 50, 99.5, 100):
        assert compute_histogram_percentile(counts, q, low=-50) == np.percentile(values, q, method="inverted_cdf")
    with pytest.raises(ValueError, match="q must be between 0 and 100, got 101"):
        compute_histogram_percentile(counts, 101)


def test_invalid_arrays_are_refused_with_the_rule_and_the_value(hand_made_labels):
    labels = hand_made_labels()
    labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"case_00009: label values must be in \{0, 1, 2\}, got values from 0 to 3"):
        compute_label_statistics("case_00009", labels, SPACING)
    with pytest.raises(ValueError, match="spacing must be three finite values > 0"):
        compute_label_statistics("c", hand_made_labels(), (0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="image shape"):
        compute_label_statistics("c", hand_made_labels(), SPACING, np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="3D integer array"):
        compute_label_statistics("c", np.zeros((4, 4), np.uint8), SPACING)


def test_folder_with_imaging_labels_only_and_a_missing_segmentation(tmp_path, caplog, hand_made_labels):
    labels = hand_made_labels()
    _write_case(tmp_path, "case_00000", labels, _hand_made_image(labels))
    _write_case(tmp_path, "case_00001", labels, spacing=(1.0, 0.5, 0.5))  # labels only, like the real copy
    _write_case(tmp_path, "case_00002", image=_hand_made_image(labels))  # no segmentation: skipped
    with caplog.at_level(logging.INFO, logger="utils.analysis.dataset_statistics"):
        stats = compute_dataset_statistics(tmp_path, show_progress=False)
    assert [s.case_id for s in stats] == ["case_00000", "case_00001"]
    assert "case_00002" in caplog.text and "without a segmentation" in caplog.text
    assert stats[0].hu[1] == HuSummary(40.0, 0.0, 40.0, 40.0) and stats[1].hu is None
    assert stats[1].spacing == (1.0, 0.5, 0.5) and stats[1].kidney_ml == pytest.approx(27 * 0.25 / 1000)
    assert np.array_equal(accumulate_hu_histograms(stats), stats[0].hu_histogram)
    assert accumulate_hu_histograms(stats[1:]) is None
    assert compute_dataset_statistics(tmp_path, max_cases=1, with_hu=False, show_progress=False)[0].hu is None
    with pytest.raises(ValueError, match="no segmentation"):
        compute_case_statistics(CaseFiles("case_00002", tmp_path / "case_00002", None, None))


def test_parallel_workers_give_the_serial_result(tmp_path, hand_made_labels):
    labels = hand_made_labels()
    for index in range(2):
        _write_case(tmp_path, f"case_0000{index}", np.roll(labels, index, axis=0), _hand_made_image(labels))
    serial = compute_dataset_statistics(tmp_path, show_progress=False)
    assert compute_dataset_statistics(tmp_path, workers=2, show_progress=False) == serial


def test_file_errors_name_the_file(tmp_path, hand_made_labels):
    labels = hand_made_labels()
    labels[0, 0, 0] = 7
    folder = _write_case(tmp_path, "case_00000", labels)
    with pytest.raises(ValueError, match="segmentation.nii.gz: case_00000: label values"):
        compute_dataset_statistics(tmp_path, show_progress=False)
    (folder / "segmentation.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="segmentation.nii.gz"):
        compute_dataset_statistics(tmp_path, show_progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_dataset_statistics(tmp_path / "missing")
    with pytest.raises(ValueError, match="max_cases must be >= 1 or None, got 0"):
        compute_dataset_statistics(tmp_path, max_cases=0)


def test_real_segmentations(real_kits19_dir):
    stats = compute_dataset_statistics(real_kits19_dir, max_cases=2, show_progress=False)
    assert [s.case_id for s in stats] == ["case_00000", "case_00001"]
    for case in stats:
        assert case.shape[1:] == (512, 512) and 0.4 <= case.spacing[0] <= 5.0
        assert 50 <= case.kidney_tumour_ml <= 2000 and case.tumours >= 1 and case.kidney_components >= 2
        assert 0 < case.tumour_slice_share <= case.kidney_slice_share < 1 and case.hu is None
