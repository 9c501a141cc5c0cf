"""Tests of utils.preprocessing.resampling: reorientation, resampling, body crop, grid mapping, on tiny arrays."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.data.kits_layout import build_kits_affine
from utils.preprocessing import resampling
from utils.preprocessing.resampling import (
    CANONICAL_AXCODES,
    GridMapping,
    bounding_box,
    canonical_spacing,
    crop_to_box,
    find_body_box,
    pad_from_box,
    reorient_to_canonical,
    resample_image,
    resample_labels,
    resampled_shape,
    restore_labels,
    restore_orientation,
    restore_probabilities,
    restore_probability_maps,
)

SPACING = (2.5, 0.8, 0.6)
ORIENTATIONS = [np.array([[axis, flip] for axis, flip in zip(order, flips, strict=False)], dtype=float)
                for order in itertools.permutations(range(3)) for flips in itertools.product((1, -1), repeat=3)]


def _file_like(canonical: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The canonical (KiTS19-oriented) array as a file of another orientation would store it."""
    array = nib.orientations.apply_orientation(canonical, ornt)
    affine = build_kits_affine(SPACING) @ nib.orientations.inv_ornt_aff(ornt, canonical.shape)
    return array, affine


@pytest.mark.parametrize("ornt", ORIENTATIONS, ids=lambda o: "".join(f"{int(a)}{'+' if f > 0 else '-'}" for a, f in o))
def test_reorientation_round_trip_in_all_48_orientations(ornt: np.ndarray) -> None:
    canonical = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    array, affine = _file_like(canonical, ornt)
    reoriented, transform = reorient_to_canonical(array, affine)
    np.testing.assert_array_equal(reoriented, canonical)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    assert nib.aff2axcodes(new_affine) == CANONICAL_AXCODES
    assert canonical_spacing(affine, transform) == pytest.approx(SPACING)
    restored = restore_orientation(reoriented, transform)
    assert restored.shape == array.shape
    np.testing.assert_array_equal(restored, array)


def test_the_48_orientations_are_distinct() -> None:
    codes = {nib.aff2axcodes(_file_like(np.zeros((2, 3, 4)), ornt)[1]) for ornt in ORIENTATIONS}
    assert len(codes) == 48


def test_kits_data_are_not_moved() -> None:
    array = np.arange(24.0).reshape(2, 3, 4)
    reoriented, transform = reorient_to_canonical(array, build_kits_affine(SPACING))
    np.testing.assert_array_equal(transform, [[0, 1], [1, 1], [2, 1]])
    assert np.shares_memory(reoriented, array)


def test_resampled_shape_arithmetic() -> None:
    assert resampled_shape((10, 20, 30), (2.5, 0.8, 0.8), (5.0, 1.6, 0.4)) == (5, 10, 60)
    assert resampled_shape((10, 20, 30), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == (10, 20, 30)
    assert resampled_shape((7, 3, 3), (1.0, 1.0, 1.0), (2.0, 100.0, 1.6)) == (4, 1, 2)  # 3.5 -> 4, never 0
    with pytest.raises(ValueError, match="same length"):
        resampled_shape((10, 20), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="> 0"):
        resampled_shape((10, 20, 30), (1.0, 1.0, 1.0), (1.0, 0.0, 1.0))


def test_resample_image_is_the_identity_for_an_unchanged_shape() -> None:
    image = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    out = resample_image(image, image.shape)
    np.testing.assert_array_equal(out, image)
    assert out.dtype == np.float32 and not np.shares_memory(out, image)
    ints = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    for overwrite in (False, True):
        converted = resample_image(ints, ints.shape, overwrite_input=overwrite)
        assert converted.dtype == np.float32
        np.testing.assert_array_equal(converted, ints)


def test_constant_image_stays_constant() -> None:
    image = np.full((9, 8, 7), 42.0, dtype=np.float32)
    for antialias in (True, False):
        out = resample_image(image, (3, 13, 5), antialias=antialias)
        assert out.shape == (3, 13, 5)
        np.testing.assert_allclose(out, 42.0, rtol=1e-6)


def test_linear_ramp_stays_linear() -> None:
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32), (2, 3, 8))
    up = resample_image(ramp, (2, 3, 16))
    # half-voxel convention: output j samples input coordinate (j + 0.5) * 8 / 16 - 0.5 (clamped at the ends)
    np.testing.assert_allclose(up[0, 0, 1:-1], np.arange(1, 15) / 2 - 0.25, atol=1e-5)
    assert up[0, 0, 0] == pytest.approx(0.0) and up[0, 0, -1] == pytest.approx(7.0)
    down = resample_image(ramp, (2, 3, 4), antialias=False)
    np.testing.assert_allclose(down[0, 0], [0.5, 2.5, 4.5, 6.5], atol=1e-5)
    long_ramp = np.broadcast_to(np.arange(32, dtype=np.float32), (2, 2, 32))
    smoothed = resample_image(long_ramp, (2, 2, 16), antialias=True)  # a symmetric blur keeps a ramp
    np.testing.assert_allclose(smoothed[0, 0, 2:-2], 2 * np.arange(2, 14) + 0.5, atol=1e-3)


def test_antialiasing_averages_a_checkerboard_along_the_downsampled_axis() -> None:
    stripes = np.broadcast_to((np.arange(36) % 2).astype(np.float32)[:, None, None], (36, 2, 2))
    plain = resample_image(stripes, (12, 2, 2), antialias=False)  # factor 3 samples every third slice
    smooth = resample_image(stripes, (12, 2, 2), antialias=True)
    np.testing.assert_array_equal(plain[:, 0, 0], np.arange(12) % 2 == 0)
    np.testing.assert_allclose(smooth[2:-2], 0.5, atol=0.02)  # away from the edges


def test_antialiasing_in_place_matches_the_copy() -> None:
    image = np.random.default_rng(1).normal(size=(12, 6, 5)).astype(np.float32)
    expected = resample_image(image, (4, 3, 5))
    scratch = image.copy()
    np.testing.assert_allclose(resample_image(scratch, (4, 3, 5), overwrite_input=True), expected, atol=1e-6)
    view = np.ascontiguousarray(image[::-1]).copy()[::-1]  # a non-contiguous writeable view
    np.testing.assert_allclose(resample_image(view, (4, 3, 5), overwrite_input=True), expected, atol=1e-6)


def test_resample_image_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="3D"):
        resample_image(np.zeros((4, 4)), (2, 2))
    with pytest.raises(ValueError, match=">= 1"):
        resample_image(np.zeros((4, 4, 4)), (2, 0, 2))


def test_resample_labels_identity_and_nearest() -> None:
    labels = np.array([0, 1, 2, 1], dtype=np.int64).reshape(1, 1, 4)
    same = resample_labels(labels, labels.shape)
    assert same.dtype == np.uint8
    np.testing.assert_array_equal(same, labels)
    up = resample_labels(labels, (1, 1, 8))
    assert up.dtype == np.uint8
    np.testing.assert_array_equal(up[0, 0], [0, 0, 1, 1, 2, 2, 1, 1])
    codes = np.arange(8, dtype=np.uint8).reshape(8, 1, 1)
    np.testing.assert_array_equal(resample_labels(codes, (4, 1, 1)).ravel(), [1, 3, 5, 7])  # centre of each pair
    np.testing.assert_array_equal(resample_labels(codes, (8, 2, 3))[:, 1, 2], np.arange(8))
    with pytest.raises(ValueError, match="3D"):
        resample_labels(np.zeros((4, 4), dtype=np.uint8), (2, 2))


def _body_volume() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((10, 14, 12), -1000.0, dtype=np.float32)
    image[2:8, 3:12, 1:9] = 0.0  # the body
    image[0, 0, 10:12] = 500.0  # a small bright object apart from it (e.g. the table)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[4, 5, 5] = 1
    return image, labels


def test_find_body_box_keeps_the_largest_component() -> None:
    image, labels = _body_volume()
    assert find_body_box(image, -500) == ((2, 8), (3, 12), (1, 9))
    assert find_body_box(image, -500, labels) == ((2, 8), (3, 12), (1, 9))
    labels[9, 13, 10] = 2  # a labelled voxel outside the body grows the box
    assert find_body_box(image, -500, labels) == ((2, 10), (3, 14), (1, 11))


def test_find_body_box_without_body_is_the_whole_array() -> None:
    image = np.full((3, 4, 5), -1000.0)
    assert find_body_box(image, -500) == ((0, 3), (0, 4), (0, 5))
    assert bounding_box(np.zeros((3, 4, 5), dtype=bool)) == ((0, 3), (0, 4), (0, 5))


def test_pad_from_box_inverts_crop_to_box() -> None:
    array = np.random.default_rng(2).integers(1, 9, size=(6, 7, 8)).astype(np.uint8)
    box = ((1, 4), (0, 7), (2, 5))
    cropped = crop_to_box(array, box)
    assert cropped.shape == (3, 7, 3)
    padded = pad_from_box(cropped, box, array.shape)
    assert padded.dtype == np.uint8
    mask = np.zeros(array.shape, dtype=bool)
    mask[1:4, :, 2:5] = True
    np.testing.assert_array_equal(padded[mask], array[mask])
    assert not padded[~mask].any()
    np.testing.assert_array_equal(crop_to_box(padded, box), cropped)
    with pytest.raises(ValueError, match="crop box"):
        pad_from_box(cropped[:2], box, array.shape)


def _mapping() -> GridMapping:
    affine = build_kits_affine((3.0, 0.75, 0.75))
    return GridMapping(
        original_shape=(4, 6, 8), original_affine=tuple(tuple(float(v) for v in row) for row in affine),
        original_axcodes=("I", "P", "L"), orientation=((0.0, 1.0), (1.0, 1.0), (2.0, 1.0)),
        canonical_spacing=(3.0, 0.75, 0.75), resampled_shape=(4, 3, 4), resampled_spacing=(3.0, 1.5, 1.5),
        crop_box=((1, 3), (0, 3), (1, 4)),
    )


def test_grid_mapping_round_trips_through_json() -> None:
    mapping = _mapping()
    assert GridMapping.from_dict(json.loads(json.dumps(mapping.to_dict()))) == mapping
    assert mapping.canonical_shape == (4, 6, 8)
    assert mapping.cropped_shape == (2, 3, 3)


def test_canonical_shape_follows_the_orientation() -> None:
    mapping = GridMapping(**{**_mapping().__dict__, "orientation": ((2.0, -1.0), (1.0, 1.0), (0.0, 1.0))})
    assert mapping.canonical_shape == (8, 6, 4)


def test_restore_labels_pads_and_upsamples() -> None:
    mapping = _mapping()
    labels = np.array([[[1, 2, 0]] * 3] * 2, dtype=np.uint8)  # (2, 3, 3) on the cropped grid
    restored = restore_labels(labels, mapping)
    assert restored.shape == mapping.original_shape and restored.dtype == np.uint8
    assert not restored[[0, 3]].any()  # slices outside the crop box
    np.testing.assert_array_equal(restored[1, 0], [0, 0, 1, 1, 2, 2, 0, 0])



def _trilinear_argmax(probabilities: np.ndarray, mapping: GridMapping) -> np.ndarray:
    """The definition: pad with background, trilinear interpolation of the whole volume, argmax, reorient."""
    padded = np.zeros((probabilities.shape[0], *mapping.resampled_shape), dtype=np.float32)
    padded[0] = 1.0
    padded[(slice(None), *(slice(a, b) for a, b in mapping.crop_box))] = probabilities
    resized = F.interpolate(torch.from_numpy(padded)[None], size=mapping.canonical_shape, mode="trilinear",
                            align_corners=False)[0]
    return restore_orientation(resized.argmax(dim=0).to(torch.uint8).numpy(), mapping.orientation)


def _oriented_mapping(canonical, resampled, box, orientation) -> GridMapping:
    """A mapping of 1 mm voxels whose file axes are ``orientation`` of the canonical ones."""
    original = [0, 0, 0]
    for axis, (target, _) in enumerate(orientation):
        original[axis] = canonical[int(target)]
    return GridMapping(original_shape=tuple(original), original_affine=tuple(map(tuple, np.eye(4))),
                       original_axcodes=("I", "P", "L"), orientation=orientation, canonical_spacing=(1, 1, 1),
                       resampled_shape=resampled, resampled_spacing=(1, 1, 1), crop_box=box)


@pytest.mark.parametrize("block_bytes", [1, 4096, resampling.RESTORE_BLOCK_BYTES])
@pytest.mark.parametrize(("canonical", "resampled", "box", "orientation"), [
    ((20, 25, 13), (7, 9, 11), ((1, 6), (2, 9), (0, 11)), ((0.0, 1.0), (1.0, 1.0), (2.0, 1.0))),
    ((4, 16, 16), (10, 8, 8), ((0, 10), (0, 8), (3, 8)), ((2.0, -1.0), (1.0, 1.0), (0.0, -1.0))),
    ((6, 5, 7), (6, 5, 7), ((0, 6), (1, 5), (0, 7)), ((1.0, 1.0), (0.0, -1.0), (2.0, 1.0))),
])
def test_restore_probabilities_is_trilinear_interpolation_then_argmax(monkeypatch, block_bytes, canonical, resampled,
                                                                      box, orientation) -> None:
    monkeypatch.setattr(resampling, "RESTORE_BLOCK_BYTES", block_bytes)  # one output slice per block, some, all
    mapping = _oriented_mapping(canonical, resampled, box, orientation)
    logits = np.random.default_rng(sum(canonical)).normal(size=(3, *mapping.cropped_shape)) * 3
    sparse = logits.copy()
    sparse[0] += 8.0  # background nearly everywhere: only the voxels next to a small blob are computed
    sparse[(0, *(slice(n // 3, n // 3 + 2) for n in mapping.cropped_shape))] -= 16.0
    for scores in (logits, sparse, sparse + np.array([30.0, 0, 0])[:, None, None, None]):  # the last: none
        probabilities = torch.softmax(torch.from_numpy(scores).float(), dim=0).numpy()
        restored = restore_probabilities(probabilities, mapping)
        assert restored.shape == mapping.original_shape and restored.dtype == np.uint8
        np.testing.assert_array_equal(restored, _trilinear_argmax(probabilities, mapping))
    assert restored.max() == 0 and restore_probabilities(torch.softmax(torch.from_numpy(sparse).float(), dim=0).numpy(),
                                                         mapping).max() > 0


def test_restore_probabilities_when_downsampling_skips_the_foreground() -> None:
    mapping = GridMapping(original_shape=(4, 6, 6), original_affine=tuple(map(tuple, np.eye(4))),
                          original_axcodes=("I", "P", "L"), orientation=((0.0, 1.0), (1.0, 1.0), (2.0, 1.0)),
                          canonical_spacing=(2.5, 1, 1), resampled_shape=(10, 6, 6), resampled_spacing=(1, 1, 1),
                          crop_box=((0, 10), (0, 6), (0, 6)))
    for z in range(10):  # output slices sit between source slices (0, 1), (3, 4), (5, 6), (8, 9)
        one_hot = np.zeros((3, 10, 6, 6), dtype=np.float32)
        one_hot[0] = 1.0
        one_hot[:, z, 2, 3] = (0.0, 0.0, 1.0)
        restored = restore_probabilities(one_hot, mapping)
        np.testing.assert_array_equal(restored, _trilinear_argmax(one_hot, mapping))
        if z in (2, 7):  # no output slice blends them: nothing to compute
            assert not restored.any(), z
        elif z == 1:  # weight 0.75 in the first output slice
            assert restored[0, 2, 3] == 2


def test_restore_probabilities_of_one_hot_labels_keeps_them() -> None:
    mapping = _mapping()  # in-plane 1.5 mm -> 0.75 mm
    labels = np.array([[[1, 2, 0]] * 3] * 2, dtype=np.uint8)
    one_hot = np.eye(3, dtype=np.float32)[labels].transpose(3, 0, 1, 2)
    restored = restore_probabilities(one_hot, mapping)
    assert not restored[[0, 3]].any()  # outside the crop box: background
    # a 2x upsampling: every output voxel is nearer one source centre (weight 0.75), so nearest neighbour agrees
    np.testing.assert_array_equal(restore_labels(labels, mapping)[1:3], restored[1:3])
    at_source = GridMapping(**{**mapping.__dict__, "original_shape": (4, 3, 4), "canonical_spacing": (3.0, 1.5, 1.5)})
    np.testing.assert_array_equal(restore_probabilities(one_hot, at_source), restore_labels(labels, at_source))


def test_restore_probabilities_refuses_a_wrong_shape() -> None:
    with pytest.raises(ValueError, match="crop box"):
        restore_probabilities(np.zeros((3, 2, 3, 4), dtype=np.float32), _mapping())
    with pytest.raises(ValueError, match="crop box"):
        restore_probability_maps(np.zeros((3, 2, 3, 4), dtype=np.float32), _mapping())
    with pytest.raises(ValueError, match="mode"):
        restore_probability_maps(np.zeros((3, *_mapping().cropped_shape), dtype=np.float32), _mapping(), mode="cubic")


@pytest.mark.parametrize(("canonical", "resampled", "box", "orientation"), [
    ((20, 25, 13), (7, 9, 11), ((1, 6), (2, 9), (0, 11)), ((0.0, 1.0), (1.0, 1.0), (2.0, 1.0))),
    ((4, 16, 16), (10, 8, 8), ((0, 10), (0, 8), (3, 8)), ((2.0, -1.0), (1.0, 1.0), (0.0, -1.0))),
])
def test_probability_maps_restore_every_class_where_the_labels_are_their_argmax(canonical, resampled, box,
                                                                                orientation) -> None:
    mapping = _oriented_mapping(canonical, resampled, box, orientation)
    scores = np.random.default_rng(sum(canonical)).normal(size=(3, *mapping.cropped_shape)) * 3
    probabilities = torch.softmax(torch.from_numpy(scores).float(), dim=0).numpy()
    linear = restore_probability_maps(probabilities, mapping)
    assert linear.shape == (3, *mapping.original_shape) and linear.dtype == np.float32
    np.testing.assert_allclose(linear.sum(axis=0), 1.0, atol=1e-5)  # a blend of distributions is one
    np.testing.assert_array_equal(linear.argmax(axis=0), restore_probabilities(probabilities, mapping))
    nearest = restore_probability_maps(probabilities, mapping, mode="nearest")
    np.testing.assert_array_equal(nearest.argmax(axis=0), restore_labels(probabilities.argmax(axis=0), mapping))
    # every value copied from a preprocessed voxel, or background one-hot outside the crop box
    assert set(np.unique(nearest[2])) <= set(np.unique(probabilities[2])) | {0.0}

@pytest.mark.parametrize("shape", [(31, 47, 40), (55, 47, 120), (12, 20, 83)])
def test_resampling_on_a_torch_device_equals_the_cache_resampling(shape) -> None:
    image = np.random.default_rng(3).normal(size=(40, 97, 83)).astype(np.float32) * 300
    expected = resample_image(image, shape)
    on_device = resample_image(image, shape, device="cpu")  # the code path of a GPU, run on the CPU
    assert on_device.shape == shape and on_device.dtype == np.float32
    np.testing.assert_allclose(on_device, expected, rtol=0, atol=1e-3)  # values of hundreds: float32 rounding
    plain = resample_image(image, shape, antialias=False, device="cpu")
    np.testing.assert_allclose(plain, resample_image(image, shape, antialias=False), rtol=0, atol=1e-3)
