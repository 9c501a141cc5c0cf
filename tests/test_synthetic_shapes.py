import numpy as np
import pytest
from scipy import ndimage

from utils.synthetic.anatomy import layout_from_labels
from utils.synthetic.shapes import (
    Grid,
    bounding_box,
    box_around,
    capsule_mask,
    centre_of_mass,
    component_boxes,
    ellipsoid_level,
    labelled_components,
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


def _random_blobs(seed: int, shape=(23, 40, 37)) -> np.ndarray:
    """A few random blobs, some touching the volume's faces, some touching each other diagonally only."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    mask = field > np.quantile(field, 0.93)
    mask[0, :3, :3] = True  # a corner component
    mask[-1, -1, -1] = True  # a one-voxel component at the opposite corner
    volume = np.zeros(tuple(n + 12 for n in shape), dtype=bool)  # placed away from the volume's origin
    volume[5:5 + shape[0], 7:7 + shape[1], 3:3 + shape[2]] = mask
    return volume


@pytest.mark.parametrize("seed", range(5))
def test_components_in_the_bounding_box_are_those_of_the_whole_volume(seed):
    mask = _random_blobs(seed)
    full, count = ndimage.label(mask)
    box, components, n = labelled_components(mask)
    assert n == count > 3
    assert box == ndimage.find_objects(mask.astype(np.uint8))[0]
    assert [b.start for b in box] == [5, 7, 3]
    expected = np.zeros_like(full)
    expected[box] = components
    assert np.array_equal(expected, full)  # the same numbering, component by component
    assert component_boxes(mask) == ndimage.find_objects(full)


def test_an_empty_mask_has_no_box_and_no_components():
    mask = np.zeros((4, 5, 6), dtype=bool)
    assert bounding_box(mask) is None
    assert component_boxes(mask) == []
    box, components, count = labelled_components(mask)
    assert box is None and count == 0 and components.size == 0


@pytest.mark.parametrize("seed", range(5))
def test_centre_of_mass_is_scipys_to_the_last_bit(seed):
    mask = _random_blobs(seed, shape=(31, 64, 57))
    box = bounding_box(mask)
    inner = mask[box]
    offset = [s.start for s in box]
    assert tuple(centre_of_mass(inner, offset)) == ndimage.center_of_mass(mask)
    full, _ = ndimage.label(mask)
    for k in (1, 2):
        assert tuple(centre_of_mass(full == k)) == ndimage.center_of_mass(full == k)


def test_layout_places_the_kidneys_at_the_two_largest_components():
    grid = Grid((40, 64, 80), (2.5, 1.5, 1.25))
    labels = np.zeros(grid.shape, dtype=np.uint8)
    labels[10:30, 20:40, 8:22] = 1  # right kidney (low x), with a tumour on it
    labels[18:26, 28:36, 20:26] = 2
    labels[12:28, 22:38, 55:66] = 1  # left kidney
    labels[34:36, 50:52, 40:42] = 1  # a speck: neither kidney
    layout = layout_from_labels(np.random.default_rng(0), labels, grid)
    components, _ = ndimage.label(labels > 0)
    spacing = np.asarray(grid.spacing)
    by_side = {kidney.side: kidney for kidney in layout.kidneys}
    assert sorted(by_side) == ["left", "right"]
    for side, component in (("right", components[20, 30, 10]), ("left", components[12, 30, 60])):
        expected = np.asarray(ndimage.center_of_mass(components == component)) * spacing
        assert np.array_equal(np.asarray(by_side[side].centre), expected)
    assert layout.midline_x == pytest.approx((by_side["left"].centre[2] + by_side["right"].centre[2]) / 2)
    # the hilum: the medial-most voxel of the kidney's centre slice (its tumour's, on the right)
    assert by_side["right"].hilum[2] == pytest.approx(25 * 1.25)
    assert by_side["left"].hilum[2] == pytest.approx(55 * 1.25)
    with pytest.raises(ValueError, match="no kidney or tumour voxels"):
        layout_from_labels(np.random.default_rng(0), np.zeros(grid.shape, dtype=np.uint8), grid)
