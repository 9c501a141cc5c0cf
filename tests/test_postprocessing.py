"""Post-processing on hand-made label maps whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from utils.inference.postprocessing import (
    keep_largest_kidneys,
    postprocess_labels,
    relabel_small_tumours,
    remove_detached_tumour,
)


def _three_blobs() -> np.ndarray:
    """(12, 12, 12): blobs of 27 (3x3x3, with 1 tumour voxel), 8 (2x2x2) and 1 voxels, apart."""
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[0:3, 0:3, 0:3] = 1
    labels[1, 1, 1] = 2
    labels[6:8, 6:8, 6:8] = 1
    labels[11, 0, 11] = 1
    return labels


def test_the_threshold_is_in_ml_so_the_spacing_decides():
    labels = _three_blobs()
    # 27 voxels of 1 mm^3 are 0.027 ml: below 0.05 ml, so everything goes
    assert keep_largest_kidneys(labels, (1.0, 1.0, 1.0), min_component_ml=0.05).sum() == 0
    # the same voxels 4 x 1 x 1 mm are 0.108 ml: the big blob stays (8 voxels = 0.032 ml do not)
    kept = keep_largest_kidneys(labels, (4.0, 1.0, 1.0), min_component_ml=0.05)
    expected = labels.copy()
    expected[6:8, 6:8, 6:8] = 0
    expected[11, 0, 11] = 0
    np.testing.assert_array_equal(kept, expected)
    assert kept[1, 1, 1] == 2  # tumour inside a kept component stays tumour


def test_at_most_the_two_largest_components_are_kept():
    labels = _three_blobs()
    kept = keep_largest_kidneys(labels, (1.0, 1.0, 1.0), min_component_ml=0.0)
    assert kept[0:3, 0:3, 0:3].astype(bool).all() and kept[6:8, 6:8, 6:8].all()
    assert kept[11, 0, 11] == 0
    assert keep_largest_kidneys(labels, (1.0, 1.0, 1.0), min_component_ml=0.0, max_components=1).sum() == 27 + 1
    np.testing.assert_array_equal(labels, _three_blobs())  # input untouched


def test_tumour_not_touching_kidney_is_dropped():
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    labels[2, 2, 2] = 2  # touches the kidney at a corner (26-connectivity): kept
    labels[5:7, 5:7, 5:7] = 2  # touches nothing: dropped
    out = remove_detached_tumour(labels)
    assert out[2, 2, 2] == 2 and out[5:7, 5:7, 5:7].sum() == 0
    assert (out == 1).sum() == 8


def test_postprocess_labels_runs_both_steps():
    labels = np.zeros((8, 8, 8), np.int64)
    labels[0:3, 0:3, 0:3] = 1
    labels[4:6, 4:6, 4:6] = 2  # a second component made only of tumour: kept by size, dropped as detached
    out = postprocess_labels(labels, (1.0, 1.0, 1.0), min_component_ml=0.0)
    assert out.dtype == np.int64 and (out == 1).sum() == 27 and (out == 2).sum() == 0


@pytest.mark.parametrize("labels, spacing, match", [
    (np.zeros((4, 4), np.uint8), (1, 1, 1), "3D integer"),
    (np.zeros((4, 4, 4), np.float32), (1, 1, 1), "3D integer"),
    (np.zeros((4, 4, 4), np.uint8), (1, 0, 1), "spacing_mm"),
    (np.zeros((4, 4, 4), np.uint8), (1, 1), "spacing_mm"),
])
def test_bad_arguments_are_refused(labels, spacing, match):
    with pytest.raises(ValueError, match=match):
        keep_largest_kidneys(labels, spacing)


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="min_component_ml must be >= 0 ml, got -1"):
        keep_largest_kidneys(np.zeros((2, 2, 2), np.uint8), (1, 1, 1), min_component_ml=-1)
    with pytest.raises(ValueError, match="max_components must be >= 1, got 0"):
        keep_largest_kidneys(np.zeros((2, 2, 2), np.uint8), (1, 1, 1), max_components=0)


def _two_kidneys_and_a_tumour_like_organ() -> np.ndarray:
    """(20, 20, 20): kidneys of 27 and 8 voxels (the first with 1 tumour voxel) and a 64-voxel region
    labelled all tumour but one kidney voxel, apart from both."""
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[0:3, 0:3, 0:3] = 1
    labels[1, 1, 1] = 2
    labels[8:10, 8:10, 8:10] = 1
    labels[14:18, 14:18, 14:18] = 2
    labels[14, 14, 14] = 1
    return labels


def test_ranking_by_kidney_voxels_keeps_the_kidneys_over_a_larger_mass():
    labels = _two_kidneys_and_a_tumour_like_organ()
    by_volume = keep_largest_kidneys(labels, (1.0, 1.0, 1.0), min_component_ml=0.0)
    assert by_volume[8:10, 8:10, 8:10].sum() == 0 and (by_volume[14:18, 14:18, 14:18] > 0).all()
    by_kidney = keep_largest_kidneys(labels, (1.0, 1.0, 1.0), min_component_ml=0.0, rank_by="kidney")
    expected = labels.copy()
    expected[14:18, 14:18, 14:18] = 0
    np.testing.assert_array_equal(by_kidney, expected)
    out = postprocess_labels(labels, (1.0, 1.0, 1.0), min_component_ml=0.0, rank_by="kidney")
    np.testing.assert_array_equal(out, expected)
    # equal kidney voxels: the larger component first; the size threshold still reads the whole component
    tied = labels.copy()
    tied[8:10, 8:10, 8:10] = 0
    tied[8, 8, 8] = 1
    kept = keep_largest_kidneys(tied, (1.0, 1.0, 1.0), min_component_ml=0.0, rank_by="kidney")
    assert kept[0:3, 0:3, 0:3].all() and (kept[14:18, 14:18, 14:18] > 0).all() and kept[8, 8, 8] == 0
    assert keep_largest_kidneys(labels, (1.0, 1.0, 1.0), min_component_ml=0.05, rank_by="kidney").sum() == 0
    with pytest.raises(ValueError, match="rank_by must be one of foreground, kidney, got 'tumour'"):
        keep_largest_kidneys(labels, (1.0, 1.0, 1.0), rank_by="tumour")


def _kidney_with_two_tumours() -> np.ndarray:
    """(10, 10, 10): a kidney block with a 27-voxel and an 8-voxel tumour inside it, apart."""
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:9, 1:9, 1:9] = 1
    labels[2:5, 2:5, 2:5] = 2  # 27 voxels
    labels[6:8, 6:8, 6:8] = 2  # 8 voxels
    return labels


def test_small_tumour_components_become_kidney_by_their_volume_in_ml():
    labels = _kidney_with_two_tumours()
    # 1 mm voxels: 27 voxels are 0.027 ml, 8 are 0.008 ml; a 0.01 ml threshold takes the small one only
    out = relabel_small_tumours(labels, (1.0, 1.0, 1.0), 0.01)
    assert (out == 2).sum() == 27 and out[6:8, 6:8, 6:8].tolist() == np.ones((2, 2, 2)).tolist()
    np.testing.assert_array_equal(out > 0, labels > 0)  # the kidney region (label > 0) does not move
    # 2 mm voxels: the same arrays are 8 times the volume (0.216 and 0.064 ml): nothing is under 0.05 ml
    np.testing.assert_array_equal(relabel_small_tumours(labels, (2.0, 2.0, 2.0), 0.05), labels)
    # both under 0.3 ml: the largest tumour component stays however small, the other becomes kidney
    np.testing.assert_array_equal(relabel_small_tumours(labels, (2.0, 2.0, 2.0), 0.3),
                                  relabel_small_tumours(labels, (1.0, 1.0, 1.0), 0.01))
    np.testing.assert_array_equal(relabel_small_tumours(labels, (1.0, 1.0, 1.0), 0.0), labels)
    np.testing.assert_array_equal(labels, _kidney_with_two_tumours())  # input untouched


def test_the_tumour_size_rule_leaves_a_kits23_cyst_alone_and_runs_last_in_postprocess_labels():
    labels = _kidney_with_two_tumours()
    labels[6:8, 6:8, 6:8] = 3  # a cyst as small as the small tumour
    labels[2, 7, 7] = 2  # a one-voxel tumour
    out = relabel_small_tumours(labels, (1.0, 1.0, 1.0), 0.1, dataset="kits23")
    assert (out == 3).sum() == 8 and (out == 2).sum() == 27 and out[2, 7, 7] == 1
    kits19 = np.pad(_kidney_with_two_tumours(), 1)  # (12, 12, 12), the kidney block at 2..9
    kits19[1, 1, 1] = 2  # a tumour voxel touching the kidney only at a corner: kept, and too small: kidney
    kits19[11, 0, 11] = 2  # a detached tumour voxel: dropped as background by the earlier step, not made kidney
    without = postprocess_labels(kits19, (1.0, 1.0, 1.0), min_component_ml=0.0)
    out = postprocess_labels(kits19, (1.0, 1.0, 1.0), min_component_ml=0.0, min_tumour_ml=0.01)
    assert without[1, 1, 1] == 2 and without[11, 0, 11] == 0 and (without == 2).sum() == 27 + 8 + 1
    expected = without.copy()
    expected[7:9, 7:9, 7:9] = 1
    expected[1, 1, 1] = 1
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_bad_tumour_threshold_is_refused(value):
    with pytest.raises(ValueError, match="min_tumour_ml"):
        relabel_small_tumours(_kidney_with_two_tumours(), (1.0, 1.0, 1.0), value)
