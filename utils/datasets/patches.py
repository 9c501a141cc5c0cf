"""3D training patches and whole validation volumes, read from the memory-mapped cache.

A training sample is drawn in four steps: pick a case, pick the class the patch is centred on
(tumour / kidney / cyst (KiTS23) / anywhere, with the configured shares), read just the region the augmentation
needs around that centre from the memory map, augment it (:mod:`utils.datasets.augmentation`). Sample
``i`` of epoch ``e`` depends only on ``(seed, e, i)``: the same on any number of loader
workers, and reproduced exactly after a resume. Epochs reach the workers through the index
itself (see :class:`EpochSampler`), so persistent workers see them too.

A case smaller than the patch along an axis is padded with background (``read_region``). A patch
so much larger than a case that the case would fill less than :data:`MIN_PATCH_FILL` of it is
refused when the dataset is built (:class:`PatchGeometryError`, naming the patch size, the case
and its shape): every sample would then be mostly padding, costing the time of a huge patch for
a few real voxels, so that training seems to hang while learning nothing.

With ``defer_augmentation`` the workers stop after reading the region: items carry the region,
the spatial draw and the sample's generator, :func:`collate_samples` keeps them as lists, and
:func:`augment_batch` applies the very same augmentation on the GPU in the training process.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from utils.config.data import AugmentationConfig, PatchDatasetConfig
from utils.datasets.augmentation import SampleAugmenter, SpatialDraw
from utils.preprocessing.cache import CachedCase, PreprocessedCache
from utils.preprocessing.preprocess import Normalisation

logger = logging.getLogger(__name__)

CENTRE_CLASSES = ("tumour", "kidney", "cyst", "anywhere")
#: Where a patch is centred when its drawn class is absent from the case, in order (then anywhere).
CENTRE_FALLBACKS = {"tumour": ("tumour", "kidney"), "kidney": ("kidney", "tumour"), "cyst": ("cyst", "kidney")}
#: Smallest share of a patch a case must be able to fill (the rest is padding); below it the patch is refused.
MIN_PATCH_FILL = 0.125

#: Item keys of a deferred sample that stay per-sample lists in a batch (regions differ in size).
DEFERRED_KEYS = ("image", "label", "draw", "rng")


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
    starts = [int(c) - s // 2 for c, s in zip(centre, size, strict=False)]
    source, target = [], []
    for start, n, limit in zip(starts, size, volume.shape, strict=False):
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


class PatchGeometryError(ValueError):
    """A patch size that does not fit the cases: ``patch_size``, ``case_id`` and ``shape`` say which."""

    def __init__(self, message: str, patch_size: tuple[int, ...], case_id: str, shape: tuple[int, ...]):
        self.patch_size = patch_size
        self.case_id = case_id
        self.shape = shape
        super().__init__(message)


def patch_fill(patch_size: Sequence[int], shape: Sequence[int]) -> float:
    """Largest share of a patch that a volume of ``shape`` can fill (1 when the patch fits inside it)."""
    return math.prod(min(p, n) / p for p, n in zip(patch_size, shape, strict=True))


def check_patch_geometry(cases: Sequence[CachedCase], patch_size: Sequence[int], *,
                         key: str = "patches.patch_size") -> None:
    """Refuse a patch size the cases cannot fill; log the cases that are padded.

    Args:
        cases: the cached cases (only their ``shape`` is read, from ``meta.json``).
        patch_size: ``(Z, Y, X)`` voxels. key: the setting named in messages.

    Raises:
        PatchGeometryError: a case fills less than :data:`MIN_PATCH_FILL` of a patch; the message
            names the patch size, the case, its shape and the largest patch that would do.
    """
    patch_size = tuple(int(p) for p in patch_size)
    padded = []
    for case in cases:
        shape = tuple(int(n) for n in case.shape)
        if len(shape) != len(patch_size):
            raise PatchGeometryError(f"{key} {list(patch_size)} has {len(patch_size)} axes but {case.case_id} has "
                                     f"shape {shape}", patch_size, case.case_id, shape)
        fill = patch_fill(patch_size, shape)
        if fill < MIN_PATCH_FILL:
            raise PatchGeometryError(
                f"{key} {list(patch_size)} is far larger than {case.case_id} (preprocessed shape {list(shape)}): "
                f"the case fills at most {100 * fill:.3g} % of a patch (at least {100 * MIN_PATCH_FILL:g} % is "
                "needed), so every sample would be mostly padding and training would crawl; use a patch size "
                f"no larger than about {[min(p, n) for p, n in zip(patch_size, shape, strict=True)]}, or leave "
                "this case out", patch_size, case.case_id, shape)
        if fill < 1:
            padded.append(f"{case.case_id} {list(shape)}")
    if padded:
        logger.info("%s %s is larger than %d case(s) along some axis; they are padded with background: %s", key,
                    list(patch_size), len(padded), ", ".join(padded[:5]) + (" ..." if len(padded) > 5 else ""))


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
        self.skip = 0
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch the next iteration yields, leaving out this process's first ``skip`` items.

        ``skip`` continues an epoch that was stopped part-way (items already trained on); the
        length stays the full epoch's, so the learning-rate schedule is unchanged.
        """
        if not 0 <= skip <= len(self):
            raise ValueError(f"skip must be >= 0 and <= {len(self)}, got {skip}")
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.samples_per_epoch + (self.rank + self.skip * self.world_size)
        return iter(range(start, self.epoch * self.samples_per_epoch + len(self) * self.world_size, self.world_size))

    def __len__(self) -> int:
        return self.samples_per_epoch // self.world_size


class SampledDataset(Dataset):
    """Base of the training datasets: ``samples_per_epoch`` items per epoch, each from its own generator.

    Item ``epoch * samples_per_epoch + i`` is drawn from ``numpy.random.default_rng([seed, epoch, i])``.

    Attributes:
        defer_augmentation: when ``True`` (and there is an augmenter), items hold the unaugmented
            region read around the sample, its ``draw`` and its generator ``rng`` instead of the
            augmented sample; :func:`augment_batch` finishes them (on the GPU) identically.
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
        self.defer_augmentation = False

    def __len__(self) -> int:
        return self.samples_per_epoch

    def sample_generator(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` (``epoch * len(self) + i``)."""
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        epoch, i = divmod(int(index), len(self))
        return np.random.default_rng([self.seed, epoch, i])

    def finish_sample(self, image: torch.Tensor, label: torch.Tensor, draw: SpatialDraw | None,
                      rng: np.random.Generator, **fields: Any) -> dict[str, Any]:
        """The item: augmented now, or (``defer_augmentation``) the region with its draw and generator."""
        if draw is None:
            return {"image": image, "label": label, **fields}
        if self.defer_augmentation:
            return {"image": image, "label": label, "draw": draw, "rng": rng, **fields}
        image, label = self.augmenter.apply(image, label, draw, rng)
        return {"image": image, "label": label, **fields}


class PatchDataset(SampledDataset):
    """Class-balanced, augmented 3D patches drawn from cached cases.

    Args:
        cases: the training cases (e.g. ``cache.cases(train_ids)``).
        config: patch size, centring shares, samples per epoch. A drawn class absent from the
            case falls back as :data:`CENTRE_FALLBACKS` says (cyst to kidney, as tumour), then anywhere.
        augmentation: settings, or ``None`` for plain patches.
        seed: the training seed; every sample's generator derives from ``(seed, epoch, i)``.
        pad_value: image value outside the volume (see :func:`background_value`).

    Raises:
        PatchGeometryError: the patch is far larger than a case (see :func:`check_patch_geometry`).
        ValueError: ``config.cyst_share`` > 0 but a case's cache stores no cyst locations (a
            dataset without a cyst label, e.g. KiTS19).

    Items (index ``epoch * len(self) + i``; plain ``i`` is epoch 0) are dicts:
    ``image`` ``(1, Z, Y, X)`` float32, ``label`` ``(1, Z, Y, X)`` uint8, ``case_id`` str,
    ``centre_class`` one of :data:`CENTRE_CLASSES`.
    """

    def __init__(self, cases: Sequence[CachedCase], config: PatchDatasetConfig,
                 augmentation: AugmentationConfig | None, *, seed: int, pad_value: float):
        augmenter = SampleAugmenter(augmentation, 3) if augmentation is not None else None
        super().__init__(cases, config.samples_per_epoch, augmenter, seed=seed, pad_value=pad_value)
        check_patch_geometry(self.cases, config.patch_size)
        if config.cyst_share > 0:
            check_cyst_locations(self.cases, "patches.cyst_share", config.cyst_share)
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
        return self.finish_sample(image, label, draw, rng, case_id=case.case_id, centre_class=centre_class)

    def _draw_centre(self, case: CachedCase, rng: np.random.Generator) -> tuple[tuple[int, ...], str]:
        """A voxel of the drawn class (falling back as :data:`CENTRE_FALLBACKS` says, then anywhere)."""
        u = rng.random()
        config = self.config
        order: tuple[str, ...] = ()
        bound = 0.0
        for name, share in (("tumour", config.tumour_share), ("kidney", config.kidney_share),
                            ("cyst", config.cyst_share)):
            bound += share
            if u < bound:
                order = CENTRE_FALLBACKS[name]
                break
        for name in order:
            locations = case.locations(name)
            if len(locations):
                return tuple(int(v) for v in locations[int(rng.integers(len(locations)))]), name
        return self._anywhere(case.shape, rng), "anywhere"

    def _anywhere(self, shape: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
        """A centre keeping the patch inside the volume where the volume is large enough."""
        centre = []
        for n, p in zip(shape, self.config.patch_size, strict=False):
            low, high = p // 2, n - (p - p // 2)
            centre.append(int(rng.integers(low, high + 1)) if high >= low else n // 2)
        return tuple(centre)


def check_cyst_locations(cases: Sequence[CachedCase], key: str, share: float) -> None:
    """Refuse a positive cyst share on cases whose cache stores no cyst locations.

    Args:
        cases: the training cases. key, share: the setting and its value, for the message.

    Raises:
        ValueError: a case of a dataset without a cyst label (e.g. KiTS19), naming the setting,
            the case and its dataset.
    """
    for case in cases:
        if "cyst" not in case.location_names:
            raise ValueError(f"{key} is {share}, but {case.case_id} comes from a {case.dataset.title} cache, "
                             f"which has no cyst label (its location classes are {list(case.location_names)}): "
                             f"set {key} to 0, or train on a KiTS23 cache ('dataset: kits23')")


class VolumeDataset(Dataset):
    """Whole preprocessed volumes (validation): ``image`` ``(1, Z, Y, X)`` float32, ``label`` uint8, ``case_id``.

    With ``roi_margin`` (voxels per axis), each volume is cut to the box of its labelled voxels
    grown by that margin (clipped to the volume): the region a second-stage model is shown
    (:class:`utils.config.experiment.CascadeConfig`). A case without labelled voxels stays whole.
    """

    def __init__(self, cases: Sequence[CachedCase], roi_margin: Sequence[int] | None = None):
        self.cases = list(cases)
        self.roi_margin = None if roi_margin is None else tuple(int(m) for m in roi_margin)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        label = np.asarray(case.label)
        region = (slice(None),) * label.ndim if self.roi_margin is None else labelled_region(label, self.roi_margin)
        return {"image": torch.from_numpy(np.array(case.image[region], dtype=np.float32))[None],
                "label": torch.from_numpy(np.array(label[region], dtype=np.uint8))[None],
                "case_id": case.case_id}


def labelled_region(label: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    """The box of ``label``'s non-zero voxels grown by ``margin`` voxels per axis, clipped (whole volume if none)."""
    if len(margin) != label.ndim:
        raise ValueError(f"margin has {len(margin)} value(s) for a {label.ndim}D label map")
    present = [np.flatnonzero(np.any(label, axis=tuple(a for a in range(label.ndim) if a != axis)))
               for axis in range(label.ndim)]
    if any(p.size == 0 for p in present):
        return (slice(None),) * label.ndim
    return tuple(slice(max(0, int(p[0]) - m), min(n, int(p[-1]) + 1 + m))
                 for p, m, n in zip(present, margin, label.shape, strict=True))


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: stacked as usual, or for deferred items the :data:`DEFERRED_KEYS` as lists."""
    if "draw" not in samples[0]:
        return default_collate(samples)
    batch = default_collate([{k: v for k, v in s.items() if k not in DEFERRED_KEYS} for s in samples])
    batch.update({key: [s[key] for s in samples] for key in DEFERRED_KEYS})
    return batch


def augment_batch(batch: dict[str, Any], augmenter: SampleAugmenter,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of a batch on ``device``, augmenting deferred items there.

    Args:
        batch: from :func:`collate_samples` (deferred or not).
        augmenter: the dataset's augmenter (used only for deferred items).
        device: where the tensors go and the augmentation runs.

    Returns:
        ``(B, 1, *size)`` float32 images and ``(B, 1, *size)`` uint8 labels on ``device``.
    """
    if "draw" not in batch:
        return (batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True))
    images, labels = [], []
    for image, label, draw, rng in zip(*(batch[key] for key in DEFERRED_KEYS), strict=False):
        image, label = augmenter.apply(image.to(device, non_blocking=True), label.to(device, non_blocking=True),
                                       draw, rng)
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.stack(labels)


def build_patch_datasets(cache: PreprocessedCache, config: PatchDatasetConfig, augmentation: AugmentationConfig | None,
                         *, fold: int = 0, seed: int = 0) -> tuple[PatchDataset, VolumeDataset]:
    """The training patches and validation volumes of one fold of the cache's split."""
    train_ids, val_ids = cache.split(fold)
    train = PatchDataset(cache.cases(train_ids), config, augmentation, seed=seed, pad_value=background_value(cache))
    return train, VolumeDataset(cache.cases(val_ids))
