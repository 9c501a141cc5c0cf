"""2D axial slices for the UNETR, from the same cache as the 3D patches (no second pass over NIfTI).

Each cached slice (``Y x X`` at the cache's in-plane spacing) is fitted into an
``image_size x image_size`` square with its aspect ratio kept (:class:`SliceGeometry`): scaled
so its longer side fills the square (``fit="resize"``) or kept at its pixel size
(``fit="pad"``, scaled down only when larger than the square), then padded centrally.
:func:`restore_slices` undoes the fit, so 2D predictions land back on the cache grid and from
there, through the case's grid mapping, on the original CT.

Training slices are drawn with the configured shares of tumour, kidney-only and
background-only slices (and, for KiTS23, of slices holding cyst) and augmented like the 3D
patches (:mod:`utils.datasets.augmentation`), with the same ``(seed, epoch, index)`` reproducibility.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from utils.analysis.slice_statistics import SLICE_BACKGROUND, SLICE_CLASS_NAMES, SLICE_KIDNEY, SLICE_TUMOUR
from utils.config.data import AugmentationConfig, SliceDatasetConfig
from utils.data.nifti_io import write_bytes_atomic
from utils.data.output_guard import OutputGuardError, check_output_location, check_overwrite, is_own_text
from utils.data.progress import progress
from utils.datasets.augmentation import SampleAugmenter
from utils.datasets.patches import SampledDataset, VolumeDataset, background_value, check_cyst_locations, read_region
from utils.preprocessing.cache import CachedCase, PreprocessedCache

logger = logging.getLogger(__name__)

#: The sampling class of slices holding cyst (label 3, KiTS23), drawn with ``slices.cyst_share``; the
#: cache's slice classes are 0, 1 and 2 (``utils.analysis.slice_statistics.SLICE_CLASS_NAMES``).
SLICE_CYST = 3


@dataclass(frozen=True)
class SliceGeometry:
    """How a ``source`` (H, W) slice sits in the ``size`` x ``size`` square.

    Attributes:
        source: ``(H, W)`` of the cached slice. size: side of the square.
        resized: ``(h, w)`` after scaling. offset: ``(top, left)`` of the scaled slice in the square.
    """

    source: tuple[int, int]
    size: int
    resized: tuple[int, int]
    offset: tuple[int, int]

    @classmethod
    def fit(cls, source: Sequence[int], size: int, fit: str = "resize") -> "SliceGeometry":
        """The geometry of fitting a ``source`` slice into a square (see the module docstring)."""
        if fit not in ("resize", "pad"):
            raise ValueError(f"fit must be 'resize' or 'pad', got {fit!r}")
        height, width = (int(n) for n in source)
        scale = size / max(height, width)
        if fit == "pad":
            scale = min(1.0, scale)
        resized = (max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale))))
        return cls((height, width), int(size), resized, ((size - resized[0]) // 2, (size - resized[1]) // 2))

    @property
    def scale(self) -> tuple[float, float]:
        """Size of a square pixel relative to a cached pixel, per axis (``resized / source``)."""
        return self.resized[0] / self.source[0], self.resized[1] / self.source[1]


def fit_slices(slices: torch.Tensor, geometry: SliceGeometry, *, labels: bool = False,
               pad_value: float = 0.0) -> torch.Tensor:
    """Fit ``(N, C, H, W)`` slices into ``(N, C, S, S)`` squares.

    Args:
        slices: images (float) or labels (``labels=True``: nearest, uint8 result).
        geometry: from :meth:`SliceGeometry.fit`. pad_value: fill of the square outside the slice.
    """
    if tuple(slices.shape[-2:]) != geometry.source:
        raise ValueError(f"slices are {tuple(slices.shape[-2:])}, the geometry expects {geometry.source}")
    if labels:
        resized = F.interpolate(slices.to(torch.uint8), size=geometry.resized, mode="nearest-exact")
    elif geometry.resized == geometry.source:
        resized = slices.float()
    else:
        resized = F.interpolate(slices.float(), size=geometry.resized, mode="bilinear", align_corners=False,
                                antialias=geometry.resized[0] < geometry.source[0])
    out = torch.full((*slices.shape[:2], geometry.size, geometry.size), pad_value, dtype=resized.dtype,
                     device=slices.device)
    top, left = geometry.offset
    out[..., top:top + geometry.resized[0], left:left + geometry.resized[1]] = resized
    return out


def restore_slices(squares: torch.Tensor, geometry: SliceGeometry, *, labels: bool = False) -> torch.Tensor:
    """Undo :func:`fit_slices`: ``(N, C, S, S)`` back to ``(N, C, H, W)`` on the cache grid.

    Args:
        squares: network outputs (logits or probabilities: bilinear) or labels (``labels=True``: nearest).
    """
    top, left = geometry.offset
    inner = squares[..., top:top + geometry.resized[0], left:left + geometry.resized[1]]
    if inner.shape[-2:] == geometry.source:
        return inner.clone()
    if labels:
        return F.interpolate(inner.to(torch.uint8), size=geometry.source, mode="nearest-exact")
    return F.interpolate(inner.float(), size=geometry.source, mode="bilinear", align_corners=False)


class SliceDataset(SampledDataset):
    """Axial training slices with class-balanced sampling and augmentation.

    Args:
        cases: the training cases. config: size, fit, shares, samples per epoch.
        augmentation: settings, or ``None``. seed: the training seed. pad_value: background value.

    Items (index ``epoch * len(self) + i``) are dicts: ``image`` ``(1, S, S)`` float32,
    ``label`` ``(1, S, S)`` uint8, ``case_id``, ``slice_index`` (z in the cache), ``slice_class``
    (0 background, 1 kidney, 2 tumour; :data:`SLICE_CYST` for a slice drawn as holding cyst). A
    class with no slice in ``cases`` is never drawn (its share goes to the others). The cyst
    class exists only with ``config.cyst_share > 0`` (``slices`` and ``class_probabilities``
    then have a fourth entry).

    Raises:
        ValueError: no slice of any class with a share > 0; ``config.cyst_share > 0`` on cases of
            a dataset without a cyst label.
    """

    def __init__(self, cases: Sequence[CachedCase], config: SliceDatasetConfig,
                 augmentation: AugmentationConfig | None, *, seed: int, pad_value: float):
        augmenter = SampleAugmenter(augmentation, 2) if augmentation is not None else None
        super().__init__(cases, config.samples_per_epoch, augmenter, seed=seed, pad_value=pad_value)
        self.config = config
        self.slices = {c: _pairs([np.flatnonzero(case.slice_classes == c) for case in self.cases])
                       for c in (SLICE_TUMOUR, SLICE_KIDNEY, SLICE_BACKGROUND)}
        shares = [config.tumour_share, config.kidney_share, config.background_share]
        if config.cyst_share > 0:
            check_cyst_locations(self.cases, "slices.cyst_share", config.cyst_share)
            self.slices[SLICE_CYST] = _pairs([np.unique(case.locations("cyst")[:, 0]) for case in self.cases])
            shares.append(config.cyst_share)
        self.classes = tuple(self.slices)
        shares = np.array(shares)
        shares[[len(self.slices[c]) == 0 for c in self.classes]] = 0
        if shares.sum() == 0:
            raise ValueError("no slice of any class with a share > 0 in the given cases")
        self.class_probabilities = shares / shares.sum()

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.sample_generator(index)
        slice_class = self.classes[rng.choice(len(self.classes), p=self.class_probabilities)]
        case_index, z = self.slices[slice_class][int(rng.integers(len(self.slices[slice_class])))]
        case = self.cases[int(case_index)]
        geometry = SliceGeometry.fit(case.shape[1:], self.config.image_size, self.config.fit)
        image = fit_slices(torch.from_numpy(np.array(case.image[z], dtype=np.float32))[None, None], geometry,
                           pad_value=self.pad_value)[0]
        label = fit_slices(torch.from_numpy(np.array(case.label[z]))[None, None], geometry, labels=True)[0]
        draw = None
        if self.augmenter is not None:
            spacing = tuple(s / f for s, f in zip(case.spacing[1:], geometry.scale, strict=False))
            draw = self.augmenter.draw_spatial(rng, (geometry.size, geometry.size), spacing)
            if draw.region_size != draw.patch_size:
                centre = (geometry.size // 2, geometry.size // 2)
                image = torch.from_numpy(read_region(image[0].numpy(), centre, draw.region_size, self.pad_value))[None]
                label = torch.from_numpy(read_region(label[0].numpy(), centre, draw.region_size, 0, np.uint8))[None]
        return self.finish_sample(image, label, draw, rng, case_id=case.case_id, slice_index=int(z),
                                  slice_class=int(slice_class))


def _pairs(slices_per_case: list[np.ndarray]) -> np.ndarray:
    """``(K, 2)`` int64 ``(case index, z)`` of the given slice indices of each case."""
    return np.asarray([(i, int(z)) for i, slices in enumerate(slices_per_case) for z in slices],
                      dtype=np.int64).reshape(-1, 2)


def build_slice_dataset(cache: PreprocessedCache, config: SliceDatasetConfig, augmentation: AugmentationConfig | None,
                        *, fold: int = 0, seed: int = 0) -> SliceDataset:
    """The training slices of one fold of the cache's split (validation uses whole volumes)."""
    return build_slice_datasets(cache, config, augmentation, fold=fold, seed=seed)[0]


def build_slice_datasets(cache: PreprocessedCache, config: SliceDatasetConfig, augmentation: AugmentationConfig | None,
                         *, fold: int = 0, seed: int = 0) -> tuple[SliceDataset, VolumeDataset]:
    """The training slices and the whole validation volumes of one fold of the cache's split.

    The validation volumes are the same :class:`~utils.datasets.patches.VolumeDataset` the 3D model
    is validated on: the 2D model predicts each of their axial slices and is scored per volume.
    """
    train_ids, val_ids = cache.split(fold)
    train = SliceDataset(cache.cases(train_ids), config, augmentation, seed=seed, pad_value=background_value(cache))
    return train, VolumeDataset(cache.cases(val_ids))


#: The first line of every ``slices.csv``: how an earlier index is recognised before it is replaced.
SLICES_CSV_HEADER = "case_id,slice,slice_class,split,image,label"


def write_slice_dataset(cache: PreprocessedCache, out_dir: str | os.PathLike, config: SliceDatasetConfig, *,
                        fold: int = 0, show_progress: bool = True, allow_inside_input: bool = False) -> Path:
    """Write every axial slice of the cache, fitted to ``config.image_size``, as ``.npy`` files.

    Layout: ``out_dir/images/<case>_<z>.npy`` (float16, normalised), ``out_dir/labels/<case>_<z>.npy``
    (uint8) and ``out_dir/slices.csv`` (case_id, slice, slice_class, split, image, label). Each
    file is written atomically.

    Raises:
        OutputGuardError: (a ``ValueError``) ``out_dir`` is or lies inside the raw data folder or
            the cache (unless ``allow_inside_input``), or its ``slices.csv`` was not written here.
    """
    try:
        out = check_output_location(out_dir, [cache.plan.get("source_data"), cache.folder], what="slice folder",
                                    allow_inside_input=allow_inside_input)
        check_overwrite(out / "slices.csv", is_own_text(SLICES_CSV_HEADER), what="slice index")
    except OutputGuardError as error:
        raise OutputGuardError(error.output, error.protected, f"refusing to write slices: {error}") from None
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    train_ids, _ = cache.split(fold)
    pad = background_value(cache)
    rows = []
    for case in progress(cache.cases(), desc="slices", unit="case", disable=not show_progress):
        geometry = SliceGeometry.fit(case.shape[1:], config.image_size, config.fit)
        images = fit_slices(torch.from_numpy(np.array(case.image, dtype=np.float32))[:, None], geometry, pad_value=pad)
        labels = fit_slices(torch.from_numpy(np.array(case.label))[:, None], geometry, labels=True)
        for z in range(case.shape[0]):
            name = f"{case.case_id}_{z:04d}.npy"
            _save_npy(out / "images" / name, images[z, 0].numpy().astype(np.float16))
            _save_npy(out / "labels" / name, labels[z, 0].numpy())
            rows.append([case.case_id, z, SLICE_CLASS_NAMES[int(case.slice_classes[z])],
                         "train" if case.case_id in train_ids else "val", f"images/{name}", f"labels/{name}"])
    text = io.StringIO()
    csv.writer(text).writerows([["case_id", "slice", "slice_class", "split", "image", "label"], *rows])
    write_bytes_atomic(out / "slices.csv", text.getvalue().encode())
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes_atomic(path, buffer.getvalue())
