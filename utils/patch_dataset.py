"""3D training patches and whole validation volumes, read from the memory-mapped cache.

A training sample is drawn in four steps: pick a case, pick the class the patch is centred on
(tumour / kidney / anywhere, with the configured shares), read just the region the augmentation
needs around that centre from the memory map, augment it (:mod:`utils.augmentation`). Sample
``i`` of epoch ``e`` depends only on ``(seed, e, i)``: the same on any number of loader
workers, and reproduced exactly after a resume. Epochs reach the workers through the index
itself (see :class:`EpochSampler`), so persistent workers see them too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from utils.augmentation import SampleAugmenter
from utils.config import AugmentationConfig, PatchDatasetConfig
from utils.preprocessed_cache import CachedCase, PreprocessedCache
from utils.preprocessing import Normalisation

CENTRE_CLASSES = ("tumour", "kidney", "anywhere")


def background_value(cache: PreprocessedCache) -> float:
    """The normalised value of air/background: the lower clip bound after z-scoring (used for padding)."""
    return Normalisation(**cache.plan["normalisation"]).background_value


def read_region(volume: np.ndarray, centre: Sequence[int], size: Sequence[int], pad_value: float,
                dtype: type = np.float32) -> np.ndarray:
    """Read a box of ``size`` centred on ``centre`` (``start = centre - size // 2``), padding outside.

    Args:
        volume: ``(Z, Y, X)`` array or memory map (only the box is read).
        centre, size: voxel coordinates and box size per axis.
        pad_value: value of voxels outside the volume. dtype: of the result.

    Returns:
        ``size`` array of ``dtype``.
    """
    size = tuple(int(s) for s in size)
    starts = [int(c) - s // 2 for c, s in zip(centre, size)]
    source, target = [], []
    for start, n, limit in zip(starts, size, volume.shape):
        low, high = max(start, 0), min(start + n, limit)
        source.append(slice(low, max(high, low)))
        target.append(slice(low - start, max(high, low) - start))
    inside = tuple(s.stop - s.start for s in source)
    if inside == size:
        return np.array(volume[tuple(source)], dtype=dtype)
    out = np.full(size, pad_value, dtype=dtype)
    if min(inside) > 0:
        out[tuple(target)] = volume[tuple(source)]
    return out


class EpochSampler(Sampler[int]):
    """Yields one epoch's item indices ``epoch * samples_per_epoch + i`` (call :meth:`set_epoch`).

    With ``world_size`` processes, process ``rank`` takes ``i = rank, rank + world_size, ...``:
    the processes draw disjoint samples, each the same number (``samples_per_epoch // world_size``),
    so no process waits for another at the end of an epoch.
    """

    def __init__(self, samples_per_epoch: int, epoch: int = 0, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be >= 0 and < world_size ({world_size}), got {rank}")
        if samples_per_epoch < world_size:
            raise ValueError(f"samples_per_epoch ({samples_per_epoch}) must be >= world_size ({world_size})")
        self.samples_per_epoch = samples_per_epoch
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.samples_per_epoch
        return iter(range(start + self.rank, start + len(self) * self.world_size, self.world_size))

    def __len__(self) -> int:
        return self.samples_per_epoch // self.world_size


class SampledDataset(Dataset):
    """Base of the training datasets: ``samples_per_epoch`` items per epoch, each from its own generator.

    Item ``epoch * samples_per_epoch + i`` is drawn from ``numpy.random.default_rng([seed, epoch, i])``.
    """

    def __init__(self, cases: Sequence[CachedCase], samples_per_epoch: int, augmenter: SampleAugmenter | None, *,
                 seed: int, pad_value: float):
        if not cases:
            raise ValueError(f"{type(self).__name__} needs at least one case")
        self.cases = list(cases)
        self.samples_per_epoch = samples_per_epoch
        self.augmenter = augmenter
        self.seed = seed
        self.pad_value = pad_value

    def __len__(self) -> int:
        return self.samples_per_epoch

    def sample_generator(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` (``epoch * len(self) + i``)."""
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        epoch, i = divmod(int(index), len(self))
        return np.random.default_rng([self.seed, epoch, i])


class PatchDataset(SampledDataset):
    """Class-balanced, augmented 3D patches drawn from cached cases.

    Args:
        cases: the training cases (e.g. ``cache.cases(train_ids)``).
        config: patch size, centring shares, samples per epoch.
        augmentation: settings, or ``None`` for plain patches.
        seed: the training seed; every sample's generator derives from ``(seed, epoch, i)``.
        pad_value: image value outside the volume (see :func:`background_value`).

    Items (index ``epoch * len(self) + i``; plain ``i`` is epoch 0) are dicts:
    ``image`` ``(1, Z, Y, X)`` float32, ``label`` ``(1, Z, Y, X)`` uint8, ``case_id`` str,
    ``centre_class`` one of :data:`CENTRE_CLASSES`.
    """

    def __init__(self, cases: Sequence[CachedCase], config: PatchDatasetConfig,
                 augmentation: AugmentationConfig | None, *, seed: int, pad_value: float):
        augmenter = SampleAugmenter(augmentation, 3) if augmentation is not None else None
        super().__init__(cases, config.samples_per_epoch, augmenter, seed=seed, pad_value=pad_value)
        self.config = config

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.sample_generator(index)
        case = self.cases[int(rng.integers(len(self.cases)))]
        centre, centre_class = self._draw_centre(case, rng)
        patch_size = tuple(self.config.patch_size)
        draw = self.augmenter.draw_spatial(rng, patch_size, case.spacing) if self.augmenter else None
        region = draw.region_size if draw else patch_size
        image = torch.from_numpy(read_region(case.image, centre, region, self.pad_value))[None]
        label = torch.from_numpy(read_region(case.label, centre, region, 0, np.uint8))[None]
        if self.augmenter:
            image, label = self.augmenter.apply(image, label, draw, rng)
        return {"image": image, "label": label, "case_id": case.case_id, "centre_class": centre_class}

    def _draw_centre(self, case: CachedCase, rng: np.random.Generator) -> tuple[tuple[int, ...], str]:
        """A voxel of the drawn class (falling back to the other class, then anywhere)."""
        u = rng.random()
        config = self.config
        if u < config.tumour_share:
            order = ("tumour", "kidney")
        elif u < config.tumour_share + config.kidney_share:
            order = ("kidney", "tumour")
        else:
            order = ()
        for name in order:
            locations = case.locations(name)
            if len(locations):
                return tuple(int(v) for v in locations[int(rng.integers(len(locations)))]), name
        return self._anywhere(case.shape, rng), "anywhere"

    def _anywhere(self, shape: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
        """A centre keeping the patch inside the volume where the volume is large enough."""
        centre = []
        for n, p in zip(shape, self.config.patch_size):
            low, high = p // 2, n - (p - p // 2)
            centre.append(int(rng.integers(low, high + 1)) if high >= low else n // 2)
        return tuple(centre)


class VolumeDataset(Dataset):
    """Whole preprocessed volumes (validation): ``image`` ``(1, Z, Y, X)`` float32, ``label`` uint8, ``case_id``."""

    def __init__(self, cases: Sequence[CachedCase]):
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        return {"image": torch.from_numpy(np.array(case.image, dtype=np.float32))[None],
                "label": torch.from_numpy(np.array(case.label, dtype=np.uint8))[None],
                "case_id": case.case_id}


def build_patch_datasets(cache: PreprocessedCache, config: PatchDatasetConfig, augmentation: AugmentationConfig | None,
                         *, fold: int = 0, seed: int = 0) -> tuple[PatchDataset, VolumeDataset]:
    """The training patches and validation volumes of one fold of the cache's split."""
    train_ids, val_ids = cache.split(fold)
    train = PatchDataset(cache.cases(train_ids), config, augmentation, seed=seed, pad_value=background_value(cache))
    return train, VolumeDataset(cache.cases(val_ids))
