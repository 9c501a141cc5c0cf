"""Augmentation: the sampling-grid convention, flips, rotation, zoom, elastic, intensity, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.config.data import AugmentationConfig
from utils.datasets.augmentation import SampleAugmenter, sampling_grid

OFF = dict(flip_prob=0.0, affine_prob=0.0, elastic_prob=0.0, noise_prob=0.0, intensity_scale_prob=0.0,
           intensity_shift_prob=0.0, gamma_prob=0.0)


def _config(**changes) -> AugmentationConfig:
    return AugmentationConfig(**{**OFF, **changes})


def _region(size, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.standard_normal(size).astype(np.float32))[None]
    label = torch.from_numpy(rng.integers(0, 3, size).astype(np.uint8))[None]
    return image, label


def _centre_crop(array: torch.Tensor, size) -> torch.Tensor:
    starts = [n // 2 - s // 2 for n, s in zip(array.shape[1:], size, strict=False)]
    return array[(slice(None), *(slice(a, a + s) for a, s in zip(starts, size, strict=False)))]


def test_nothing_enabled_returns_the_patch_unchanged():
    augmenter = SampleAugmenter(_config(), 3)
    rng = np.random.default_rng(0)
    draw = augmenter.draw_spatial(rng, (6, 8, 10), (3.0, 1.5, 1.5))
    assert draw.region_size == draw.patch_size and draw.matrix is None
    image, label = _region((6, 8, 10))
    out_image, out_label = augmenter.apply(image, label, draw, rng)
    assert torch.equal(out_image, image) and torch.equal(out_label, label) and out_label.dtype == torch.uint8


def test_flip_without_resampling_mirrors_the_axis():
    augmenter = SampleAugmenter(_config(flip_prob=1.0, flip_axes=(2,)), 3)
    rng = np.random.default_rng(0)
    draw = augmenter.draw_spatial(rng, (4, 5, 6), (1.0, 1.0, 1.0))
    image, label = _region((4, 5, 6))
    out_image, out_label = augmenter.apply(image, label, draw, rng)
    assert draw.flips == (2,)
    assert torch.equal(out_image, torch.flip(image, (3,))) and torch.equal(out_label, torch.flip(label, (3,)))


@pytest.mark.parametrize("patch", [(6, 8, 10), (7, 9, 11)])
def test_identity_grid_samples_voxel_centres_exactly(patch):
    """Rotation 0 and zoom 1 through the resampling path give the centre crop of the region."""
    augmenter = SampleAugmenter(_config(affine_prob=1.0, rotate_degrees=(0.0, 0.0, 0.0), scale_range=(1.0, 1.0)), 3)
    rng = np.random.default_rng(1)
    draw = augmenter.draw_spatial(rng, patch, (3.0, 1.5, 1.5))
    assert np.allclose(draw.matrix, np.eye(3))
    image, label = _region(draw.region_size)
    out_image, out_label = augmenter.apply(image, label, draw, rng)
    assert torch.allclose(out_image, _centre_crop(image, patch), atol=1e-5)
    assert torch.equal(out_label, _centre_crop(label, patch))


@pytest.mark.parametrize("patch", [(5, 7, 9), (4, 6, 8)])
def test_flip_folded_into_the_grid_matches_a_flipped_crop(patch):
    augmenter = SampleAugmenter(_config(affine_prob=1.0, flip_prob=1.0, flip_axes=(1, 2),
                                        rotate_degrees=(0.0, 0.0, 0.0), scale_range=(1.0, 1.0)), 3)
    rng = np.random.default_rng(2)
    draw = augmenter.draw_spatial(rng, patch, (1.0, 1.0, 1.0))
    image, label = _region(draw.region_size)
    out_image, out_label = augmenter.apply(image, label, draw, rng)
    assert torch.allclose(out_image, torch.flip(_centre_crop(image, patch), (2, 3)), atol=1e-5)
    assert torch.equal(out_label, torch.flip(_centre_crop(label, patch), (2, 3)))


def test_rotation_moves_a_point_where_the_matrix_says():
    augmenter = SampleAugmenter(_config(affine_prob=1.0, rotate_degrees=(40.0, 0.0, 0.0), scale_range=(1.0, 1.0)), 2)
    rng = np.random.default_rng(3)
    draw = augmenter.draw_spatial(rng, (41, 41), (1.0, 1.0))
    image = torch.zeros((1, *draw.region_size))
    label = torch.zeros((1, *draw.region_size), dtype=torch.uint8)
    output_point = np.array([30, 25])  # where we expect the marked voxel to land
    source = np.rint(np.array(draw.region_size) // 2 + draw.matrix @ (output_point - 41 // 2)).astype(int)
    label[0, source[0] - 1:source[0] + 2, source[1] - 1:source[1] + 2] = 2
    _, out_label = augmenter.apply(image, label, draw, rng)
    assert out_label[0, output_point[0], output_point[1]] == 2
    angle = np.degrees(np.arctan2(draw.matrix[1, 0], draw.matrix[0, 0]))
    assert 0 < abs(angle) <= 40


def test_zoom_enlarges_objects():
    augmenter = SampleAugmenter(_config(affine_prob=1.0, rotate_degrees=(0.0, 0.0, 0.0), scale_range=(2.0, 2.0)), 2)
    rng = np.random.default_rng(4)
    draw = augmenter.draw_spatial(rng, (64, 64), (1.0, 1.0))
    yy, xx = np.mgrid[:draw.region_size[0], :draw.region_size[1]]
    centre = np.array(draw.region_size) // 2
    disc = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 8 ** 2).astype(np.uint8)
    _, out_label = augmenter.apply(torch.zeros((1, *draw.region_size)), torch.from_numpy(disc)[None], draw, rng)
    assert out_label.sum().item() / disc.sum() == pytest.approx(4.0, rel=0.1)


def test_elastic_deforms_but_keeps_labels_valid_and_zero_magnitude_is_identity():
    config = _config(elastic_prob=1.0, elastic_magnitude_mm=(8.0, 8.0), elastic_spacing_mm=(10.0, 10.0))
    augmenter = SampleAugmenter(config, 3)
    rng = np.random.default_rng(5)
    draw = augmenter.draw_spatial(rng, (8, 16, 16), (2.0, 1.0, 1.0))
    assert draw.displacement is not None and draw.displacement.shape[0] == 3
    field = draw.displacement_field()
    assert field.shape == (3, 8, 16, 16) and field.abs().max() <= draw.displacement.abs().max() + 1e-6
    assert all(r > p for r, p in zip(draw.region_size, draw.patch_size, strict=False))
    image, label = _region(draw.region_size)
    out_image, out_label = augmenter.apply(image, label, draw, rng)
    assert not torch.allclose(out_image, _centre_crop(image, (8, 16, 16)))
    assert set(out_label.unique().tolist()) <= {0, 1, 2}
    still = SampleAugmenter(_config(elastic_prob=1.0, elastic_magnitude_mm=(0.0, 0.0)), 3)
    rng = np.random.default_rng(6)
    draw = still.draw_spatial(rng, (8, 16, 16), (2.0, 1.0, 1.0))
    image, label = _region(draw.region_size)
    out_image, _ = still.apply(image, label, draw, rng)
    assert torch.allclose(out_image, _centre_crop(image, (8, 16, 16)), atol=1e-5)


def test_noise_has_the_configured_strength():
    augmenter = SampleAugmenter(_config(noise_prob=1.0, noise_std=0.3), 3)
    rng = np.random.default_rng(7)
    draw = augmenter.draw_spatial(rng, (16, 32, 32), (1.0, 1.0, 1.0))
    image = torch.zeros((1, 16, 32, 32))
    out_image, _ = augmenter.apply(image, image.to(torch.uint8), draw, rng)
    assert abs(out_image.mean().item()) < 0.02 and out_image.std().item() == pytest.approx(0.3, rel=0.05)


def test_same_generator_state_gives_the_same_sample():
    config = AugmentationConfig(affine_prob=1.0, elastic_prob=1.0, noise_prob=1.0, gamma_prob=1.0)
    augmenter = SampleAugmenter(config, 3)
    outputs = []
    for _ in range(2):
        rng = np.random.default_rng([9, 0, 3])
        draw = augmenter.draw_spatial(rng, (8, 16, 16), (2.0, 1.0, 1.0))
        image, label = _region(draw.region_size, seed=1)
        outputs.append(augmenter.apply(image, label, draw, rng))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_two_dimensional_flips_use_in_plane_axes_only():
    augmenter = SampleAugmenter(_config(flip_prob=1.0, flip_axes=(0, 2)), 2)
    draw = augmenter.draw_spatial(np.random.default_rng(0), (4, 4), (1.0, 1.0))
    assert draw.flips == (1,)


def test_grid_shape_and_order():
    augmenter = SampleAugmenter(_config(affine_prob=1.0, scale_range=(1.0, 1.0), rotate_degrees=(0.0, 0.0, 0.0)), 3)
    draw = augmenter.draw_spatial(np.random.default_rng(0), (2, 3, 4), (1.0, 1.0, 1.0))
    grid = sampling_grid(draw)
    assert grid.shape == (1, 2, 3, 4, 3)
    # last dimension is (x, y, z): x varies along the last array axis
    assert torch.all(grid[0, 0, 0, 1:, 0] > grid[0, 0, 0, :-1, 0])
    assert torch.all(grid[0, 1:, 0, 0, 2] > grid[0, :-1, 0, 0, 2])


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="spatial_dims"):
        SampleAugmenter(AugmentationConfig(), 4)
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentationConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentationConfig(scale_range=(1.2, 0.8))


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_slice_wise_resampling_equals_the_3d_grid(flip_prob):
    """In-plane rotation and zoom take the fast slice-wise path; it must match trilinear/nearest 3D sampling."""
    import torch.nn.functional as F

    augmenter = SampleAugmenter(_config(affine_prob=1.0, flip_prob=flip_prob, rotate_degrees=(30.0, 0.0, 0.0),
                                        scale_range=(0.7, 1.4)), 3)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        draw = augmenter.draw_spatial(rng, (6, 12, 10), (3.0, 1.5, 1.5))
        image, label = _region(draw.region_size, seed)
        fast_image, fast_label = augmenter.apply(image, label, draw, rng)
        grid = sampling_grid(draw)
        slow_image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        slow_label = F.grid_sample(label[None].float(), grid, mode="nearest", padding_mode="border",
                                   align_corners=False)[0]
        assert torch.allclose(fast_image, slow_image, atol=1e-4)
        assert (fast_label != slow_label.to(torch.uint8)).float().mean() < 0.002  # ties at exact half-voxels aside
