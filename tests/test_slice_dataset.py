"""2D slices: fitting into squares and back, class-balanced sampling, augmentation, writing slices out."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest
import torch

from utils.config.data import AugmentationConfig, SliceDatasetConfig
from utils.datasets.slices import (
    SliceDataset,
    SliceGeometry,
    build_slice_dataset,
    fit_slices,
    restore_slices,
    write_slice_dataset,
)


def test_geometry_keeps_the_aspect_ratio():
    resize = SliceGeometry.fit((100, 200), 64, "resize")
    assert resize.resized == (32, 64) and resize.offset == (16, 0) and resize.scale == (0.32, 0.32)
    pad = SliceGeometry.fit((30, 40), 64, "pad")
    assert pad.resized == (30, 40) and pad.offset == (17, 12)
    too_big = SliceGeometry.fit((100, 50), 64, "pad")
    assert too_big.resized == (64, 32)
    with pytest.raises(ValueError, match="fit must be"):
        SliceGeometry.fit((10, 10), 8, "stretch")


def test_fit_and_restore_round_trip_labels_exactly_when_upsampling():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, (3, 1, 20, 30)).astype(np.uint8))
    geometry = SliceGeometry.fit((20, 30), 60, "resize")  # exactly 2x
    squares = fit_slices(labels, geometry, labels=True)
    assert squares.shape == (3, 1, 60, 60) and squares.dtype == torch.uint8
    assert squares[:, :, :geometry.offset[0]].sum() == 0  # padding is background
    assert torch.equal(restore_slices(squares, geometry, labels=True), labels)


def test_fit_pads_images_with_the_given_value_and_restores_logits():
    image = torch.ones((1, 2, 10, 20))
    geometry = SliceGeometry.fit((10, 20), 40, "resize")
    squares = fit_slices(image, geometry, pad_value=-3.0)
    assert squares[0, 0, 0, 0] == -3.0 and squares[0, 0, 20, 20] == pytest.approx(1.0)
    restored = restore_slices(squares, geometry)
    assert restored.shape == (1, 2, 10, 20) and torch.allclose(restored, image)
    with pytest.raises(ValueError, match="geometry expects"):
        fit_slices(torch.ones((1, 1, 5, 5)), geometry)


def test_class_shares_and_missing_classes(tmp_path, make_cached_case):
    labels = np.zeros((10, 8, 8), dtype=np.uint8)
    labels[2:4, 3, 3] = 2  # two tumour slices
    labels[5:9, 4, 4] = 1  # four kidney slices; four background slices
    case = make_cached_case(tmp_path, "case_00000", labels)
    config = SliceDatasetConfig(image_size=16, tumour_share=0.5, kidney_share=0.3, background_share=0.2,
                                samples_per_epoch=600)
    dataset = SliceDataset([case], config, None, seed=0, pad_value=-1)
    counts = Counter(dataset[i]["slice_class"] for i in range(len(dataset)))
    assert counts[2] / 600 == pytest.approx(0.5, abs=0.06) and counts[0] / 600 == pytest.approx(0.2, abs=0.06)
    sample = dataset[0]
    expected = 2 if (sample["label"] == 2).any() else 1 if (sample["label"] == 1).any() else 0
    assert sample["slice_class"] == expected and sample["image"].shape == (1, 16, 16)
    no_tumour = labels.copy()
    no_tumour[no_tumour == 2] = 0
    other = SliceDataset([make_cached_case(tmp_path, "case_00001", no_tumour)], config, None, seed=0, pad_value=-1)
    assert other.class_probabilities[0] == 0 and other.class_probabilities.sum() == pytest.approx(1)


def test_augmented_slices_are_reproducible_and_valid(tiny_cache):
    config = SliceDatasetConfig(image_size=32, samples_per_epoch=8)
    augmentation = AugmentationConfig(affine_prob=1.0, elastic_prob=0.5)
    dataset = build_slice_dataset(tiny_cache, config, augmentation, seed=4)
    again = build_slice_dataset(tiny_cache, config, augmentation, seed=4)
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image"].shape == (1, 32, 32) and sample["label"].dtype == torch.uint8
        assert set(sample["label"].unique().tolist()) <= {0, 1, 2}
        assert sample["case_id"] in tiny_cache.split(0)[0]
    assert torch.equal(dataset[3]["image"], again[3]["image"])


def test_write_slice_dataset_writes_every_slice_outside_the_data(tiny_cache, tmp_path):
    out = write_slice_dataset(tiny_cache, tmp_path / "slices", SliceDatasetConfig(image_size=24), show_progress=False)
    with open(out / "slices.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == sum(case.shape[0] for case in tiny_cache.cases())
    first = rows[0]
    image, label = np.load(out / first["image"]), np.load(out / first["label"])
    assert image.shape == (24, 24) and image.dtype == np.float16 and label.dtype == np.uint8
    assert {row["split"] for row in rows} == {"train", "val"}
    with pytest.raises(ValueError, match="refusing"):
        write_slice_dataset(tiny_cache, tiny_cache.folder / "slices", SliceDatasetConfig(image_size=24))


def test_deferred_slice_augmentation_equals_augmenting_in_the_dataset(tiny_cache):
    from utils.datasets.patches import augment_batch, collate_samples
    config = SliceDatasetConfig(image_size=32, samples_per_epoch=6)
    augmentation = AugmentationConfig(affine_prob=1.0, elastic_prob=0.5, noise_prob=1.0)
    dataset = build_slice_dataset(tiny_cache, config, augmentation, seed=4)
    deferred = build_slice_dataset(tiny_cache, config, augmentation, seed=4)
    deferred.defer_augmentation = True
    batch = collate_samples([deferred[i] for i in range(6)])
    image, label = augment_batch(batch, deferred.augmenter, "cpu")
    expected = collate_samples([dataset[i] for i in range(6)])
    assert torch.equal(image, expected["image"]) and torch.equal(label, expected["label"])
    assert batch["slice_index"].tolist() == expected["slice_index"].tolist()
