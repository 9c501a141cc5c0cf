"""Tests of utils/metrics/scoring.py: per-structure and per-case KiTS19 scores (Dice only, and with surface
Dice and HD95 in mm), the empty-mask rules, the summary over cases, agreement with MONAI."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from scipy import ndimage

from utils.metrics.scoring import METRIC_NAMES, score_case, score_structure, summarise_scores


def _cube(start: tuple[int, int, int], size: int = 3, shape: tuple[int, int, int] = (8, 8, 8)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# Two 3x3x3 cubes, the second one voxel further along axis 0 (26 boundary voxels each; from either
# boundary to the other: 16 x 0 mm, 1 x 1 mm, 9 x 3 mm at spacing (3, 1, 1); see test_metrics_surface.py).
FIRST, SECOND = _cube((2, 2, 2)), _cube((3, 2, 2))


# --- score_structure: one binary structure with a spacing ---

def test_cubes_offset_along_thick_axis_by_hand() -> None:
    overlap, surface_2mm, hd95 = score_structure(FIRST, SECOND, (3.0, 1.0, 1.0), tolerance_mm=2.0)
    assert overlap == pytest.approx(2 * 18 / 54)
    assert hd95 == 3.0  # sorted 26 distances: positions 23 and 24 (q95 at 23.75) are both 3 mm
    assert surface_2mm == pytest.approx((17 + 17) / 52)  # the 9 outer-face voxels of each side are 3 mm off
    assert score_structure(FIRST, SECOND, (3.0, 1.0, 1.0), tolerance_mm=3.0)[1] == 1.0


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


# --- score_case without a spacing: Dice on any grid ---

def test_score_case_uses_the_composite_kidney_and_the_tumour():
    # Truth: kidney 0 1 1 1, tumour at voxel 3; prediction calls voxel 3 kidney and voxel 4 tumour.
    truth = np.array([[0, 1, 1, 2, 0, 0]], np.uint8)
    prediction = np.array([[0, 1, 1, 1, 2, 0]], np.uint8)
    scores = score_case(prediction, truth)
    assert scores["kidney_dice"] == pytest.approx(2 * 3 / (4 + 3))  # label > 0: {1, 2, 3, 4} vs {1, 2, 3}
    assert scores["tumour_dice"] == 0.0
    assert score_case(np.zeros((2, 2)), np.zeros((2, 2))) == {"kidney_dice": 1.0, "tumour_dice": 1.0}


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    prediction, truth = rng.integers(0, 3, (4, 5, 6), dtype=np.uint8), rng.integers(0, 3, (4, 5, 6), dtype=np.uint8)
    expected = score_case(prediction, truth)
    assert score_case(torch.from_numpy(prediction), torch.from_numpy(truth)) == pytest.approx(expected)
    assert score_case(torch.from_numpy(prediction), truth.astype(np.int64)) == pytest.approx(expected)
    with_spacing = score_case(prediction, truth, (1.0, 1.0, 1.0))
    assert score_case(torch.from_numpy(prediction), torch.from_numpy(truth), (1.0, 1.0, 1.0)) == with_spacing
    assert {key: with_spacing[key] for key in expected} == pytest.approx(expected)  # the same Dice either way


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_matches_monai_dice_metric_on_random_label_maps(seed):
    generator = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 3, (1, 1, 6, 7, 8), generator=generator)
    prediction = torch.where(torch.rand(truth.shape, generator=generator) < 0.3,
                             torch.randint(0, 3, truth.shape, generator=generator), truth)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)

    def one_hot(labels, classes):
        return torch.nn.functional.one_hot(labels[:, 0], classes).movedim(-1, 1)

    tumour = metric(one_hot(prediction, 3), one_hot(truth, 3))[0, 2].item()
    kidney = metric(one_hot((prediction > 0).long(), 2), one_hot((truth > 0).long(), 2))[0, 1].item()
    scores = score_case(prediction[0, 0], truth[0, 0])
    assert scores["tumour_dice"] == pytest.approx(tumour, abs=1e-6)
    assert scores["kidney_dice"] == pytest.approx(kidney, abs=1e-6)


# --- score_case with a spacing: surface Dice and HD95 in mm ---

def test_case_scores_composite_kidney_and_tumour() -> None:
    """Truth: kidney cube with a one-voxel tumour; prediction: same kidney, tumour missed, labelled kidney."""
    truth = FIRST.astype(np.uint8)
    truth[3, 3, 3] = 2
    prediction = FIRST.astype(np.uint8)
    scores = score_case(prediction, truth, (3.0, 1.0, 1.0))
    assert list(scores) == list(METRIC_NAMES)
    assert scores["kidney_dice"] == 1.0 and scores["kidney_surface_dice"] == 1.0 and scores["kidney_hd95"] == 0.0
    assert scores["tumour_dice"] == 0.0 and scores["tumour_surface_dice"] == 0.0 and scores["tumour_hd95"] is None
    nothing = np.zeros_like(truth)
    assert score_case(nothing, nothing, (1, 1, 1))["tumour_hd95"] == 0.0


def test_crop_does_not_change_scores_at_the_array_edge() -> None:
    """A mask touching the array's edge has a surface there, cropped or not."""
    truth = np.zeros((6, 10, 10), dtype=np.uint8)
    truth[0:3, 0:4, 6:10] = 1
    prediction = np.zeros_like(truth)
    prediction[0:2, 0:4, 5:10] = 1
    cropped = score_case(prediction, truth, (2.0, 0.5, 0.5))
    padded = score_case(np.pad(prediction, 3), np.pad(truth, 3), (2.0, 0.5, 0.5))
    assert cropped == padded


def test_invalid_arguments_are_named() -> None:
    """Merged: the Dice-only and the with-spacing argument checks, one scorer."""
    with pytest.raises(ValueError, match=r"prediction \(2, 3\) and truth \(3, 2\)"):
        score_case(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="labels 0.*got values from 0 to 3"):
        score_case(np.array([0, 3]), np.array([0, 1]))
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="spacing must be three finite values > 0 mm.*0.0"):
        score_case(labels, labels, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"same shape.*\(4, 4, 3\)"):
        score_case(labels, labels[..., :3], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="prediction must hold labels.*from 0 to 3"):
        score_case(labels + 3 * (np.arange(4) == 1), labels, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance_mm.*-1"):
        score_case(labels, labels, (1.0, 1.0, 1.0), tolerance_mm=-1.0)
    with pytest.raises(ValueError, match=r"\(Z, Y, X\) label maps when a spacing is given.*\(2, 2\)"):
        score_case(np.zeros((2, 2)), np.zeros((2, 2)), (1.0, 1.0, 1.0))


# --- summarise_scores ---

def test_summary_averages_each_score_and_adds_the_selection_criterion():
    per_case = [{"case_id": "case_00001", "kidney_dice": 0.9, "tumour_dice": 0.5, "val_loss": 0.25},
                {"case_id": "case_00002", "kidney_dice": 0.7, "tumour_dice": 0.1, "val_loss": 0.75}]
    summary = summarise_scores(per_case)
    assert {key: summary[key]["mean"] for key in ("kidney_dice", "tumour_dice", "val_loss")} == pytest.approx(
        {"kidney_dice": 0.8, "tumour_dice": 0.3, "val_loss": 0.5})
    assert summary["mean_dice"] == pytest.approx(0.55) and summary["cases"] == 2
    assert isinstance(summary["cases"], int) and "case_id" not in summary


def test_summary_counts_missing_values() -> None:
    records = [{"kidney_hd95": 1.0}, {"kidney_hd95": None}, {"kidney_hd95": 3.0}, {"kidney_hd95": float("nan")}]
    summary = summarise_scores(records, metrics=["kidney_hd95"])
    assert summary == {"kidney_hd95": {"mean": 2.0, "std": 1.0, "median": 2.0, "n": 2, "missing": 2},
                       "mean_dice": None, "cases": 4}
    nothing = summarise_scores([{"tumour_hd95": None}], metrics=["tumour_hd95"])["tumour_hd95"]
    assert nothing == {"mean": None, "std": None, "median": None, "n": 0, "missing": 1}
    json.dumps(nothing, allow_nan=False)  # valid JSON: no NaN
    none_scored = summarise_scores([], metrics=METRIC_NAMES)
    assert none_scored["tumour_dice"]["n"] == 0 and none_scored["mean_dice"] is None and none_scored["cases"] == 0


def test_summary_rejects_empty_and_inconsistent_input():
    """Merged: the Dice-summary and the metric-summary rejections of records lacking a score."""
    with pytest.raises(ValueError, match="at least one case"):
        summarise_scores([])
    with pytest.raises(ValueError, match="same numeric scores"):
        summarise_scores([{"kidney_dice": 1.0, "tumour_dice": 1.0}, {"kidney_dice": 1.0}])
    with pytest.raises(ValueError, match=r"missing \['tumour_dice'\]"):
        summarise_scores([{"kidney_dice": 1.0}])
    with pytest.raises(ValueError, match="tumour_dice"):
        summarise_scores([{"kidney_dice": 1.0}], metrics=["tumour_dice"])
    with pytest.raises(ValueError, match="'kidney_dice' must be a number or None.*'high'"):
        summarise_scores([{"kidney_dice": 1.0, "tumour_dice": 1.0}, {"kidney_dice": "high", "tumour_dice": 1.0}])


def test_score_case_can_score_some_regions_only():
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[1:5, 1:7, 1:7] = 1
    truth[2:4, 2:4, 2:4] = 2
    prediction = truth.copy()
    prediction[2, 2, 2] = 1
    full = score_case(prediction, truth, (2.0, 1.0, 1.0))
    tumour = score_case(prediction, truth, (2.0, 1.0, 1.0), regions=["tumour"])
    assert list(tumour) == ["tumour_dice", "tumour_surface_dice", "tumour_hd95"]
    assert tumour == {key: full[key] for key in tumour} and tumour["tumour_dice"] < 1.0
    assert score_case(prediction, truth, regions=["kidney"]) == {"kidney_dice": 1.0}
    with pytest.raises(ValueError, match="regions must be among"):
        score_case(prediction, truth, regions=["cyst"])
