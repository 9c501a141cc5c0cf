"""Tests of utils/metrics/surface.py: boundary voxels, surface distances in mm, surface Dice and HD95 by hand."""

from __future__ import annotations

import numpy as np
import pytest

from utils.metrics.surface import (
    check_spacing,
    find_bounding_box,
    find_surface,
    measure_hd95,
    measure_surface_dice,
    measure_surface_distances,
)


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


def test_distances_between_cubes_offset_along_the_thick_axis_by_hand() -> None:
    to_second, to_first = measure_surface_distances(FIRST, SECOND, (3.0, 1.0, 1.0))
    assert sorted(to_second.tolist()) == [0.0] * 16 + [1.0] + [3.0] * 9
    assert sorted(to_first.tolist()) == sorted(to_second.tolist())
    assert measure_surface_distances(np.zeros_like(FIRST), FIRST, (1.0, 1.0, 1.0)) is None


def test_surface_dice_and_hd95_of_hand_made_distances() -> None:
    to_truth, to_prediction = np.array([0.0, 1.0, 3.0]), np.array([0.0, 2.0])
    assert measure_surface_dice(to_truth, to_prediction, tolerance_mm=2.0) == pytest.approx(4 / 5)  # 3 mm is out
    assert measure_surface_dice(to_truth, to_prediction, tolerance_mm=0.0) == pytest.approx(2 / 5)
    # q95 of [0, 1, 3]: position 1.9 -> 1 + 0.9 * 2 = 2.8; of [0, 2]: 1.9; the larger one
    assert measure_hd95(to_truth, to_prediction) == pytest.approx(2.8)
    with pytest.raises(ValueError, match="tolerance_mm.*-1"):
        measure_surface_dice(to_truth, to_prediction, tolerance_mm=-1.0)
    with pytest.raises(ValueError, match="non-empty"):
        measure_hd95(np.array([]), to_prediction)


def test_bounding_box_of_masks_with_margin_clipped_to_the_array() -> None:
    truth = np.zeros((6, 10, 10), dtype=np.uint8)
    truth[0:3, 0:4, 6:10] = 1
    prediction = np.zeros_like(truth)
    prediction[0:2, 0:4, 5:10] = 1
    assert find_bounding_box([prediction, truth]) == (slice(0, 4), slice(0, 5), slice(4, 10))
    assert find_bounding_box([np.zeros_like(truth)]) is None


def test_spacing_is_checked() -> None:
    assert check_spacing([3, 1, 0.5]) == (3.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="spacing must be three finite values > 0 mm.*0.0"):
        check_spacing((1.0, 0.0, 1.0))


def test_distances_equal_those_of_a_distance_transform_on_random_masks() -> None:
    # The definition, computed the slow way: a Euclidean distance transform of the other mask's
    # boundary over the whole array, read at this mask's boundary voxels.
    from scipy import ndimage

    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 0.7)
    for _ in range(3):
        prediction = ndimage.binary_dilation(rng.random((14, 30, 26)) > 0.995, iterations=2)
        truth = ndimage.binary_dilation(rng.random((14, 30, 26)) > 0.995, iterations=2)
        to_truth, to_prediction = measure_surface_distances(prediction, truth, spacing)
        p_surface, t_surface = find_surface(prediction), find_surface(truth)
        expected_to_truth = ndimage.distance_transform_edt(~t_surface, sampling=spacing)[p_surface]
        expected_to_prediction = ndimage.distance_transform_edt(~p_surface, sampling=spacing)[t_surface]
        np.testing.assert_allclose(to_truth, expected_to_truth, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(to_prediction, expected_to_prediction, rtol=1e-9, atol=1e-9)
