"""3D patch dataset: region reading, class-balanced centring, reproducibility, loaders, validation volumes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from utils.config.data import AugmentationConfig, PatchDatasetConfig
from utils.datasets.patches import (
    EpochSampler,
    PatchDataset,
    VolumeDataset,
    augment_batch,
    build_patch_datasets,
    collate_samples,
    read_region,
)


def test_read_region_inside_partly_outside_and_outside():
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    assert np.array_equal(read_region(volume, (2, 2, 3), (2, 3, 4), -1), volume[1:3, 1:4, 1:5])
    edge = read_region(volume, (0, 0, 0), (3, 3, 3), -1)
    assert edge[0, 0, 0] == -1 and edge[1, 1, 1] == volume[0, 0, 0] and edge[2, 2, 2] == volume[1, 1, 1]
    assert np.all(read_region(volume, (50, 50, 50), (2, 2, 2), -7) == -7)
    labels = read_region(volume.astype(np.uint8), (1, 1, 1), (2, 2, 2), 0, np.uint8)
    assert labels.dtype == np.uint8


def test_tumour_centred_patch_is_centred_on_the_tumour_voxel(tmp_path, make_cached_case):
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    labels[7, 3, 15] = 2
    case = make_cached_case(tmp_path, "case_00000", labels)
    config = PatchDatasetConfig(patch_size=(4, 6, 6), tumour_share=1.0, kidney_share=0.0, anywhere_share=0.0)
    sample = PatchDataset([case], config, None, seed=0, pad_value=-5)[0]
    assert sample["centre_class"] == "tumour" and sample["image"].shape == (1, 4, 6, 6)
    assert sample["label"][0, 2, 3, 3] == 2 and sample["label"].sum() == 2
    assert sample["image"][0, 2, 3, 3] == np.ravel_multi_index((7, 3, 15), labels.shape)


def test_missing_classes_fall_back_to_the_other_class_then_anywhere(tmp_path, make_cached_case):
    kidney_only = np.zeros((10, 20, 20), dtype=np.uint8)
    kidney_only[5, 10, 10] = 1
    empty = np.zeros((10, 20, 20), dtype=np.uint8)
    config = PatchDatasetConfig(patch_size=(4, 6, 6), tumour_share=1.0, kidney_share=0.0, anywhere_share=0.0)
    kidney_case = make_cached_case(tmp_path, "case_00000", kidney_only)
    empty_case = make_cached_case(tmp_path, "case_00001", empty)
    assert PatchDataset([kidney_case], config, None, seed=0, pad_value=0)[0]["centre_class"] == "kidney"
    sample = PatchDataset([empty_case], config, None, seed=0, pad_value=0)[0]
    assert sample["centre_class"] == "anywhere" and sample["image"].min() >= 0  # kept inside the volume


def test_centring_shares_are_respected(tmp_path, make_cached_case):
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    labels[3, 5, 5], labels[6, 12, 12] = 1, 2
    config = PatchDatasetConfig(patch_size=(2, 4, 4), tumour_share=0.5, kidney_share=0.25, anywhere_share=0.25,
                                samples_per_epoch=800)
    dataset = PatchDataset([make_cached_case(tmp_path, "case_00000", labels)], config, None, seed=1, pad_value=0)
    counts = Counter(dataset[i]["centre_class"] for i in range(len(dataset)))
    assert counts["tumour"] / 800 == pytest.approx(0.5, abs=0.06)
    assert counts["kidney"] / 800 == pytest.approx(0.25, abs=0.06)


def test_samples_depend_only_on_seed_epoch_and_index(tiny_cache):
    config = PatchDatasetConfig(patch_size=(8, 16, 16), samples_per_epoch=4)
    dataset = PatchDataset(tiny_cache.cases(), config, AugmentationConfig(affine_prob=1.0), seed=5, pad_value=-1)
    again = PatchDataset(tiny_cache.cases(), config, AugmentationConfig(affine_prob=1.0), seed=5, pad_value=-1)
    assert torch.equal(dataset[2]["image"], again[2]["image"])
    assert not torch.equal(dataset[2]["image"], dataset[2 + 4]["image"])  # same position, next epoch
    sampler = EpochSampler(4)
    sampler.set_epoch(3)
    assert list(sampler) == [12, 13, 14, 15] and len(sampler) == 4


def test_loader_workers_do_not_change_the_samples(tiny_cache):
    config = PatchDatasetConfig(patch_size=(8, 16, 16), samples_per_epoch=4)
    dataset = PatchDataset(tiny_cache.cases(), config, AugmentationConfig(), seed=2, pad_value=-1)
    batches = []
    for workers in (0, 2):
        sampler = EpochSampler(len(dataset), epoch=1)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers)
        batches.append([batch["image"] for batch in loader])
    assert all(torch.equal(a, b) for a, b in zip(*batches, strict=False))
    assert batches[0][0].shape == (2, 1, 8, 16, 16)


def test_augmented_patches_have_the_patch_shape_and_valid_labels(tiny_cache):
    config = PatchDatasetConfig(patch_size=(8, 16, 16), samples_per_epoch=6)
    augmentation = AugmentationConfig(affine_prob=1.0, elastic_prob=0.5, noise_prob=1.0)
    dataset = PatchDataset(tiny_cache.cases(), config, augmentation, seed=0, pad_value=-1)
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image"].shape == (1, 8, 16, 16) and sample["image"].dtype == torch.float32
        assert sample["label"].dtype == torch.uint8 and set(sample["label"].unique().tolist()) <= {0, 1, 2}


def test_build_patch_datasets_follows_the_split(tiny_cache):
    train, validation = build_patch_datasets(tiny_cache, PatchDatasetConfig(patch_size=(8, 16, 16)), None, seed=0)
    train_ids, val_ids = tiny_cache.split(0)
    assert [c.case_id for c in train.cases] == train_ids
    assert [c.case_id for c in validation.cases] == val_ids and not set(train_ids) & set(val_ids)
    volume = validation[0]
    case = tiny_cache.case(val_ids[0])
    assert volume["image"].shape == (1, *case.shape) and volume["label"].dtype == torch.uint8
    assert torch.equal(volume["label"][0], torch.from_numpy(np.array(case.label)))


def test_empty_case_list_is_refused():
    with pytest.raises(ValueError, match="at least one case"):
        PatchDataset([], PatchDatasetConfig(), None, seed=0, pad_value=0)
    assert len(VolumeDataset([])) == 0


def test_epoch_sampler_shards_disjointly_and_evenly():
    shards = [list(EpochSampler(10, epoch=2, rank=rank, world_size=3)) for rank in range(3)]
    assert [len(shard) for shard in shards] == [3, 3, 3]
    flat = sorted(i for shard in shards for i in shard)
    assert len(set(flat)) == 9 and all(20 <= i < 30 for i in flat)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, rank=3, world_size=3)


def test_epoch_sampler_skip_continues_a_stopped_epoch_on_every_rank():
    whole = [list(EpochSampler(12, epoch=1, rank=rank, world_size=2)) for rank in range(2)]
    for rank in range(2):
        sampler = EpochSampler(12, rank=rank, world_size=2)
        sampler.set_epoch(1, skip=4)
        assert list(sampler) == whole[rank][4:] and len(sampler) == 6
        sampler.set_epoch(1)
        assert list(sampler) == whole[rank]
    with pytest.raises(ValueError, match="skip"):
        EpochSampler(12, world_size=2).set_epoch(0, skip=7)


@pytest.mark.parametrize("workers", [0, 1])
def test_deferred_augmentation_gives_the_same_batches_as_augmenting_in_the_workers(tiny_cache, workers):
    config = PatchDatasetConfig(patch_size=(8, 16, 16), samples_per_epoch=8)
    augmentation = AugmentationConfig(affine_prob=0.7, elastic_prob=0.4, noise_prob=0.5, rotate_degrees=(15, 10, 10))
    dataset = PatchDataset(tiny_cache.cases(), config, augmentation, seed=3, pad_value=-1)
    deferred = PatchDataset(tiny_cache.cases(), config, augmentation, seed=3, pad_value=-1)
    deferred.defer_augmentation = True
    item = deferred[1]
    assert {"draw", "rng"} <= set(item) and item["image"].shape[1:] == item["draw"].region_size
    plain = DataLoader(dataset, batch_size=4, sampler=EpochSampler(8, epoch=2), collate_fn=collate_samples)
    later = DataLoader(deferred, batch_size=4, sampler=EpochSampler(8, epoch=2), collate_fn=collate_samples,
                       num_workers=workers)
    resampled = 0
    for expected, batch in zip(plain, later, strict=False):
        assert isinstance(batch["image"], list) and batch["case_id"] == expected["case_id"]
        resampled += sum(draw.matrix is not None for draw in batch["draw"])
        image, label = augment_batch(batch, deferred.augmenter, "cpu")
        assert type(image) is torch.Tensor and image.shape == (4, 1, 8, 16, 16) and label.dtype == torch.uint8
        assert torch.equal(image, expected["image"]) and torch.equal(label, expected["label"])
    assert resampled > 0, "no sample exercised the spatial transform"
    same_image, same_label = augment_batch(next(iter(plain)), dataset.augmenter, "cpu")  # not deferred: moved only
    assert same_image.shape == (4, 1, 8, 16, 16) and same_label.shape == (4, 1, 8, 16, 16)


def test_a_patch_far_larger_than_a_case_is_refused_at_construction(tmp_path, make_cached_case):
    from utils.datasets.patches import PatchGeometryError

    small = make_cached_case(tmp_path, "case_00007", np.zeros((10, 20, 20), dtype=np.uint8))
    config = PatchDatasetConfig(patch_size=(80, 160, 160))
    with pytest.raises(PatchGeometryError, match=r"\[80, 160, 160\].*case_00007.*\[10, 20, 20\]") as caught:
        PatchDataset([small], config, AugmentationConfig(), seed=0, pad_value=0)
    assert caught.value.case_id == "case_00007" and caught.value.shape == (10, 20, 20)


def test_a_patch_somewhat_larger_than_a_case_is_padded(tmp_path, make_cached_case):
    case = make_cached_case(tmp_path, "case_00000", np.zeros((10, 20, 20), dtype=np.uint8))
    sample = PatchDataset([case], PatchDatasetConfig(patch_size=(16, 20, 20), tumour_share=0.0, kidney_share=0.0,
                                                     anywhere_share=1.0), None, seed=0, pad_value=-9)[0]
    assert sample["image"].shape == (1, 16, 20, 20) and (sample["image"] == -9).sum() == 6 * 20 * 20
