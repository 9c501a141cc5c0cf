import numpy as np
import pytest

from utils.synthetic.shapes import (
    Grid,
    box_around,
    capsule_mask,
    ellipsoid_level,
    rotation_matrix,
    smooth_noise,
    surface_voxels,
)


def test_sphere_volume_matches_formula():
    grid = Grid((60, 60, 60), (0.5, 0.5, 0.5))
    box, level = ellipsoid_level(grid, (15.0, 15.0, 15.0), (10.0, 10.0, 10.0))
    volume = np.count_nonzero(level <= 1.0) * 0.125
    assert volume == pytest.approx(4 / 3 * np.pi * 1000, rel=0.02)


def test_rotation_turns_the_long_axis():
    grid = Grid((40, 40, 40), (1.0, 1.0, 1.0))
    straight = ellipsoid_level(grid, (20.0, 20.0, 20.0), (15.0, 3.0, 3.0))
    turned = ellipsoid_level(grid, (20.0, 20.0, 20.0), (15.0, 3.0, 3.0), rotation_matrix((0.0, 90.0, 0.0)))
    extent = lambda found: np.ptp(np.argwhere(found[1] <= 1.0), axis=0)  # noqa: E731
    assert extent(straight)[0] > 25 and extent(straight)[2] < 8
    assert extent(turned)[2] > 25 and extent(turned)[0] < 8
    np.testing.assert_allclose(rotation_matrix((10.0, 20.0, 30.0)) @ rotation_matrix((10.0, 20.0, 30.0)).T, np.eye(3),
                               atol=1e-12)


def test_capsule_and_box_clipping():
    grid = Grid((20, 20, 20), (1.0, 1.0, 1.0))
    box, mask = capsule_mask(grid, (10.0, 10.0, 2.0), (10.0, 10.0, 17.0), 2.0)
    full = np.zeros(grid.shape, bool)
    full[box] = mask
    assert full[10, 10, 2:18].all() and not full[10, 14, 10] and full[10, 12, 10]
    assert box_around(grid, (100.0, 0.0, 0.0), (5.0, 5.0, 5.0)) is None
    assert box_around(grid, (0.0, 0.0, 0.0), (3.0, 3.0, 3.0)) == (slice(0, 4),) * 3


def test_smooth_noise_is_normalised_reproducible_and_smooth():
    first = smooth_noise(np.random.default_rng(1), (30, 40, 50), (1.0, 1.0, 1.0), 8.0)
    again = smooth_noise(np.random.default_rng(1), (30, 40, 50), (1.0, 1.0, 1.0), 8.0)
    assert first.shape == (30, 40, 50) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert abs(first.mean()) < 1e-4 and first.std() == pytest.approx(1.0, rel=1e-3)
    assert np.abs(np.diff(first, axis=2)).mean() < 0.5  # neighbours are correlated


def test_surface_voxels_of_a_cube():
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 1:4, 1:4] = True
    assert len(surface_voxels(mask)) == 26  # 27 voxels, only the centre is interior
