"""Tests of utils/metrics/surface.py: hand-computed Dice, surface Dice and HD95, empty masks, MONAI agreement."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from utils.metrics.surface import (METRIC_NAMES, find_bounding_box, find_surface, measure_surface_distances,
                                      score_case_metrics, score_structure, summarise_metrics)


def _cube(start: tuple[int, int, int], size: int = 3, shape: tuple[int, int, int] = (8, 8, 8)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# Two 3x3x3 cubes, the second one voxel further along axis 0. Each has 26 boundary voxels (all
# but its centre). From either cube's boundary to the other's: its outer face (9 voxels) is one
# slice away (3 mm at spacing (3, 1, 1)), its ring and far face lie on the other's boundary (0)
# except its far face's centre, the other's centre, 1 mm from the other's ring: 16 x 0, 1 x 1, 9 x 3.
FIRST, SECOND = _cube((2, 2, 2)), _cube((3, 2, 2))


def test_boundary_of_a_cube_is_all_but_its_centre() -> None:
    surface = find_surface(FIRST)
    assert surface.sum() == 26 and not surface[3, 3, 3]


def test_cubes_offset_along_thick_axis_by_hand() -> None:
    overlap, surface_2mm, hd95 = score_structure(FIRST, SECOND, (3.0, 1.0, 1.0), tolerance_mm=2.0)
    assert overlap == pytest.approx(2 * 18 / 54)
    assert hd95 == 3.0  # sorted 26 distances: positions 23 and 24 (q95 at 23.75) are both 3 mm
    assert surface_2mm == pytest.approx((17 + 17) / 52)  # the 9 outer-face voxels of each side are 3 mm off
    assert score_structure(FIRST, SECOND, (3.0, 1.0, 1.0), tolerance_mm=3.0)[1] == 1.0
    to_second, to_first = measure_surface_distances(FIRST, SECOND, (3.0, 1.0, 1.0))
    assert sorted(to_second.tolist()) == [0.0] * 16 + [1.0] + [3.0] * 9
    assert sorted(to_first.tolist()) == sorted(to_second.tolist())


def test_anisotropic_spacing_matters() -> None:
    """The same shift along a 1 mm axis is 1 mm: HD95 1, surface Dice 1 at 2 mm."""
    along_fine_axis = _cube((2, 2, 3))
    assert score_structure(FIRST, along_fine_axis, (3.0, 1.0, 1.0))[1:] == (1.0, 1.0)
    assert score_structure(FIRST, SECOND, (1.0, 1.0, 1.0))[1:] == (1.0, 1.0)
    assert score_structure(FIRST, SECOND, (3.0, 1.0, 1.0))[2] == 3.0


def test_empty_mask_rules() -> None:
    empty = np.zeros((8, 8, 8), dtype=bool)
    assert score_structure(empty, empty, (1.0, 1.0, 1.0)) == (1.0, 1.0, 0.0)
    assert score_structure(FIRST, empty, (1.0, 1.0, 1.0)) == (0.0, 0.0, None)
    assert score_structure(empty, FIRST, (1.0, 1.0, 1.0)) == (0.0, 0.0, None)
    assert measure_surface_distances(empty, FIRST, (1.0, 1.0, 1.0)) is None


def test_case_scores_composite_kidney_and_tumour() -> None:
    """Truth: kidney cube with a one-voxel tumour; prediction: same kidney, tumour missed, labelled kidney."""
    truth = FIRST.astype(np.uint8)
    truth[3, 3, 3] = 2
    prediction = FIRST.astype(np.uint8)
    scores = score_case_metrics(prediction, truth, (3.0, 1.0, 1.0))
    assert list(scores) == list(METRIC_NAMES)
    assert scores["kidney_dice"] == 1.0 and scores["kidney_surface_dice"] == 1.0 and scores["kidney_hd95"] == 0.0
    assert scores["tumor_dice"] == 0.0 and scores["tumor_surface_dice"] == 0.0 and scores["tumor_hd95"] is None
    nothing = np.zeros_like(truth)
    assert score_case_metrics(nothing, nothing, (1, 1, 1))["tumor_hd95"] == 0.0


def test_crop_does_not_change_scores_at_the_array_edge() -> None:
    """A mask touching the array's edge has a surface there, cropped or not."""
    truth = np.zeros((6, 10, 10), dtype=np.uint8)
    truth[0:3, 0:4, 6:10] = 1
    prediction = np.zeros_like(truth)
    prediction[0:2, 0:4, 5:10] = 1
    cropped = score_case_metrics(prediction, truth, (2.0, 0.5, 0.5))
    padded = score_case_metrics(np.pad(prediction, 3), np.pad(truth, 3), (2.0, 0.5, 0.5))
    assert cropped == padded
    assert find_bounding_box([prediction, truth]) == (slice(0, 4), slice(0, 5), slice(4, 10))


def test_invalid_arguments_are_named() -> None:
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="spacing must be three finite values > 0 mm.*0.0"):
        score_case_metrics(labels, labels, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"same shape.*\(4, 4, 3\)"):
        score_case_metrics(labels, labels[..., :3], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="prediction must hold labels.*from 0 to 3"):
        score_case_metrics(labels + 3 * (np.arange(4) == 1), labels, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance_mm.*-1"):
        score_case_metrics(labels, labels, (1.0, 1.0, 1.0), tolerance_mm=-1.0)


def test_summary_counts_missing_values() -> None:
    records = [{"kidney_hd95": 1.0}, {"kidney_hd95": None}, {"kidney_hd95": 3.0}, {"kidney_hd95": float("nan")}]
    summary = summarise_metrics(records, metrics=["kidney_hd95"])
    assert summary == {"kidney_hd95": {"mean": 2.0, "std": 1.0, "median": 2.0, "n": 2, "missing": 2}}
    nothing = summarise_metrics([{"tumor_hd95": None}], metrics=["tumor_hd95"])["tumor_hd95"]
    assert nothing == {"mean": None, "std": None, "median": None, "n": 0, "missing": 1}
    json.dumps(nothing, allow_nan=False)  # valid JSON: no NaN
    with pytest.raises(ValueError, match="tumor_dice"):
        summarise_metrics([{"kidney_dice": 1.0}], metrics=["tumor_dice"])


def _blob(rng: np.random.Generator, shape: tuple[int, int, int], level: float) -> np.ndarray:
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > level


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_monai(seed: int) -> None:
    """Surface Dice and HD95 match MONAI's (edge voxels, Euclidean distances with spacing) within float32 rounding."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(seed)
    shape, spacing, tolerance = (18, 22, 26), (2.5, 0.8, 0.7), 1.5
    prediction, truth = _blob(rng, shape, 0.05), _blob(rng, shape, 0.05) | _blob(rng, shape, 0.1)

    def one_hot(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    with warnings.catch_warnings():  # MONAI warns about its own deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        expected_nsd = compute_surface_dice(one_hot(prediction), one_hot(truth), [tolerance], spacing=spacing).item()
        expected_hd95 = compute_hausdorff_distance(one_hot(prediction), one_hot(truth), percentile=95,
                                                   spacing=spacing).item()
    overlap, surface_dice, hd95 = score_structure(prediction, truth, spacing, tolerance)
    assert 0.3 < surface_dice < 0.99 and hd95 > 1.0  # a non-trivial comparison
    assert surface_dice == pytest.approx(expected_nsd, abs=1e-6)
    assert hd95 == pytest.approx(expected_hd95, rel=1e-5)
    assert math.isfinite(overlap)

