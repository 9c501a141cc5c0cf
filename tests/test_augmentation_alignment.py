"""Augmented images and labels stay aligned, through the real datasets and both augmentation paths.

Each case's image *is* its label map (0 background, 1 kidney, 2 tumour, as float), with the
tumour enclosed by kidney, so every boundary in the image is a step of 1 and rounding the
(bi/tri)linearly resampled image gives back the nearest-neighbour label up to the voxels where
the two interpolations legitimately differ. Every spatial augmentation is on (flips, rotation
about every axis, scaling, elastic), every intensity augmentation off.

Two measures per class, between the mask thresholded from the image and the label's mask:

* Dice >= 0.95. Aligned pairs measured 0.96-0.99 on these shapes: trilinear and nearest
  interpolation disagree on some boundary voxels by design, so 0.99 is not reachable for a
  tumour a few voxels thick;
* the distance between the two masks' centroids <= 0.25 voxel. Aligned pairs measured under
  0.1; interpolation differences are symmetric, while any real misalignment (a flip or grid
  applied to one and not the other, an off-by-one crop, a transposed axis) moves it by a voxel
  or more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.analysis.slice_statistics import classify_slices
from utils.config.data import AugmentationConfig, PatchDatasetConfig, SliceDatasetConfig
from utils.datasets.patches import PatchDataset, augment_batch, collate_samples
from utils.datasets.slices import SliceDataset
from utils.metrics.dice import dice
from utils.preprocessing.cache import CachedCase, write_case_folder

ALIGNMENT_DICE = 0.95
CENTROID_TOLERANCE_VOXELS = 0.25
#: Structures smaller than this (voxels or pixels) are not scored: a one-voxel kidney tip vanishes
#: from a down-scaled image by design while the nearest-neighbour label keeps it.
MIN_SCORED_SIZE = 50
SPATIAL_ONLY = AugmentationConfig(flip_prob=0.5, affine_prob=1.0, rotate_degrees=(25.0, 10.0, 10.0),
                                  scale_range=(0.8, 1.25), elastic_prob=1.0, elastic_magnitude_mm=(2.0, 4.0),
                                  noise_prob=0.0, intensity_scale_prob=0.0, intensity_shift_prob=0.0, gamma_prob=0.0)

#: Flips alone take another code path (no resampling grid).
FLIPS_ONLY = AugmentationConfig(flip_prob=0.5, affine_prob=0.0, elastic_prob=0.0, noise_prob=0.0,
                                intensity_scale_prob=0.0, intensity_shift_prob=0.0, gamma_prob=0.0)
AUGMENTATIONS = {"all spatial": SPATIAL_ONLY, "flips only": FLIPS_ONLY}


def _image_is_label_case(folder, case_id: str) -> CachedCase:
    """A cached case (24, 64, 64) at 2 x 1 x 1 mm: an ellipsoidal kidney enclosing a spherical tumour."""
    z, y, x = np.mgrid[:24, :64, :64]
    labels = np.zeros((24, 64, 64), dtype=np.uint8)
    labels[((z - 12) / 8.0) ** 2 + ((y - 30) / 18.0) ** 2 + ((x - 34) / 14.0) ** 2 <= 1] = 1
    labels[((z - 12) / 4.0) ** 2 + ((y - 32) / 8.0) ** 2 + ((x - 36) / 8.0) ** 2 <= 1] = 2
    meta = {"case_id": case_id, "shape": list(labels.shape), "mapping": {"resampled_spacing": [2.0, 1.0, 1.0]},
            "slice_classes": classify_slices(labels).tolist()}
    locations = {"kidney": np.argwhere(labels == 1), "tumour": np.argwhere(labels == 2)}
    image = labels.astype(np.float32)
    return CachedCase(write_case_folder(folder, case_id, {"image.npy": image, "label.npy": labels}, locations, meta),
                      meta)


def _alignment(image: torch.Tensor, label: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Per class with at least :data:`MIN_SCORED_SIZE` voxels in ``label``: (Dice, centroid distance in
    voxels) of the mask thresholded from the image."""
    from_image = torch.round(image).clamp(0, 2).to(torch.uint8)
    masks = {"kidney": (from_image > 0, label > 0), "tumour": (from_image == 2, label == 2)}
    scores = {}
    for name, (predicted, truth) in masks.items():
        if int(truth.sum()) >= MIN_SCORED_SIZE:
            offset = (torch.nonzero(predicted).float().mean(0) - torch.nonzero(truth).float().mean(0)).norm()
            scores[name] = (dice(predicted, truth), float(offset) if predicted.any() else float("inf"))
    return scores


def _assert_aligned(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    measured = [_alignment(image, label) for image, label in samples]
    assert sum("kidney" in m for m in measured) >= len(samples) // 2, "most samples must show kidney"
    assert sum("tumour" in m for m in measured) >= 2, "some samples must show tumour"
    worst_dice = min(score for m in measured for score, _ in m.values())
    worst_offset = max(offset for m in measured for _, offset in m.values())
    assert worst_dice >= ALIGNMENT_DICE and worst_offset <= CENTROID_TOLERANCE_VOXELS, (worst_dice, worst_offset)


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
@pytest.mark.parametrize("defer", [False, True], ids=["in the loader", "on the device"])
def test_3d_patches_stay_aligned_with_their_labels(tmp_path, defer, augmentation):
    case = _image_is_label_case(tmp_path, "case_00000")
    config = PatchDatasetConfig(patch_size=(12, 32, 32), tumour_share=0.5, kidney_share=0.5, anywhere_share=0.0,
                                samples_per_epoch=16)
    dataset = PatchDataset([case], config, AUGMENTATIONS[augmentation], seed=3, pad_value=0.0)
    dataset.defer_augmentation = defer
    batch = collate_samples([dataset[i] for i in range(len(dataset))])
    images, labels = augment_batch(batch, dataset.augmenter if defer else None, torch.device("cpu"))
    assert images.shape == (16, 1, 12, 32, 32) and labels.dtype == torch.uint8
    assert not torch.equal(images[0], images[1])  # the augmentation did act
    _assert_aligned(list(zip(images, labels, strict=True)))


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_2d_slices_stay_aligned_with_their_labels(tmp_path, augmentation):
    """Slices at the model's own size (no resizing: a down-scaled slice aliases small structures
    by up to a third of a pixel, image and nearest-neighbour label alike, which is not a shift)."""
    case = _image_is_label_case(tmp_path, "case_00000")
    config = SliceDatasetConfig(image_size=64, fit="pad", tumour_share=0.5, kidney_share=0.5, background_share=0.0,
                                samples_per_epoch=16)
    dataset = SliceDataset([case], config, AUGMENTATIONS[augmentation], seed=5, pad_value=0.0)
    samples = [dataset[i] for i in range(len(dataset))]
    assert samples[0]["image"].shape == (1, 64, 64)
    assert not torch.equal(samples[0]["image"], samples[1]["image"])
    _assert_aligned([(s["image"], s["label"]) for s in samples])


def test_a_misaligned_pair_fails_the_check():
    """The bar is not loose: a one-voxel shift already breaks it, through the centroid if not the Dice."""
    label = torch.zeros((1, 12, 32, 32), dtype=torch.uint8)
    label[:, 2:10, 6:26, 6:26] = 1
    label[:, 4:8, 11:21, 11:21] = 2
    assert all(score == 1.0 and offset == 0.0 for score, offset in _alignment(label.float(), label).values())
    shifted = torch.roll(label, shifts=1, dims=3).float()
    for _score, offset in _alignment(shifted, label).values():
        assert offset == pytest.approx(1.0)
    with pytest.raises(AssertionError):
        _assert_aligned([(shifted, label)] * 4)
