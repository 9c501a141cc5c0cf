"""Statistics of axial slices, the unit a 2D model trains on: slice classes, kidney and tumour areas, sampling.

Definitions (label arrays ``(Z, Y, X)``, axis 0 the axial slices; labels those of the dataset
definition, :mod:`utils.data.dataset_definitions`: KiTS19 0 background, 1 kidney, 2 tumour; KiTS23
adds 3 cyst):

* slice classes: 0 background only, 1 kidney without tumour (some label > 0, no label 2; a
  KiTS23 slice holding only cyst is class 1 too), 2 contains tumour (some label 2); names in
  ``SLICE_CLASS_NAMES``. The preprocessing cache stores the same classes per case
  (``CachedCase.slice_classes``);
* kidney area of a slice: pixels of label > 0 (kidney and tumour, the KiTS19 "kidney" region;
  kidney, tumour and cyst in KiTS23, its "kidney and masses" region) times the in-plane pixel
  area ``y * x`` mm²; tumour area: pixels of label 2 times the same;
* sampling shares: the share of each slice class among the first ``N`` items of a
  class-balanced slice sampler, beside the probabilities the sampler was configured with.

Functions take arrays or case-like objects (anything with the attributes a
:class:`~utils.preprocessing.cache.CachedCase` has), so they run on a cache or on hand-made
stand-ins alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from utils.data.dataset_definitions import KITS19, DatasetDefinition, foreign_labels_hint, get_dataset
from utils.data.kits_layout import TUMOUR_LABEL

#: Slice classes of :func:`classify_slices`: background only, kidney without tumour, contains tumour.
SLICE_BACKGROUND, SLICE_KIDNEY, SLICE_TUMOUR = 0, 1, 2
#: Their names, in class order (0, 1, 2).
SLICE_CLASS_NAMES = ("background only", "kidney without tumour", "contains tumour")


class SlicedCase(Protocol):
    """What the functions here read of a case (a :class:`~utils.preprocessing.cache.CachedCase` has it)."""

    case_id: str

    @property
    def label(self) -> np.ndarray:
        """``(Z, Y, X)`` integer labels of the dataset (KiTS19 ``{0, 1, 2}``)."""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """``(z, y, x)`` voxel size in mm."""

    @property
    def slice_classes(self) -> np.ndarray:
        """``(Z,)`` integer class of every axial slice in ``{0, 1, 2}``."""


class SliceSampler(Protocol):
    """What :func:`compute_sampling_shares` reads of a sampler (a ``SliceDataset`` has it)."""

    slices: dict[int, np.ndarray]  # slice class -> (K, 2) candidate slices
    class_probabilities: np.ndarray  # (3,) probability of each class, in the order of ``slices``' keys

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SliceAreas:
    """Kidney and tumour areas of the axial slices that hold them, pooled over cases.

    Attributes:
        kidney_mm2: ``(K,)`` float64 area of label > 0 in mm², one value per slice holding label > 0.
        tumour_mm2: ``(T,)`` float64 area of label 2 in mm², one value per slice holding label 2.
    """

    kidney_mm2: np.ndarray
    tumour_mm2: np.ndarray


@dataclass(frozen=True)
class SamplingShares:
    """Configured and realised class shares of sampled slices, in slice-class order (background, kidney, tumour).

    Attributes:
        configured: ``(3,)`` float64 probability of drawing each class (sums to 1).
        counts: ``(3,)`` int64 sampled slices of each class.
    """

    configured: np.ndarray
    counts: np.ndarray

    @property
    def n_samples(self) -> int:
        """Number of sampled slices."""
        return int(self.counts.sum())

    @property
    def realised(self) -> np.ndarray:
        """``(3,)`` float64 share of each class among the sampled slices."""
        return self.counts / self.n_samples

    @property
    def standard_errors(self) -> np.ndarray:
        """``(3,)`` standard deviation of a realised share around its configured one, ``sqrt(p (1 - p) / N)``."""
        return np.sqrt(self.configured * (1 - self.configured) / self.n_samples)


def compute_slice_pixel_counts(labels: np.ndarray, *, name: str = "labels",
                               dataset: str | DatasetDefinition = KITS19) -> tuple[np.ndarray, ...]:
    """Count the pixels of every foreground label in every axial slice.

    Args:
        labels: ``(Z, Y, X)`` integer labels of ``dataset`` (KiTS19 ``{0, 1, 2}``), axis 0 the axial slices.
        name: what ``labels`` is, for error messages (e.g. the case id).
        dataset: the dataset definition (or its name) whose labels ``labels`` holds.

    Returns:
        One ``(Z,)`` int64 count per foreground label in label order: ``(kidney, tumour)`` for
        KiTS19, ``(kidney, tumour, cyst)`` for KiTS23; their sum is the label > 0 count per slice.
    """
    dataset = get_dataset(dataset)
    labels = _check_label_volume(labels, name, dataset)
    return tuple((labels == label).sum(axis=(1, 2), dtype=np.int64) for label in dataset.foreground_labels)


def classify_slices(labels: np.ndarray, *, dataset: str | DatasetDefinition = KITS19) -> np.ndarray:
    """Class of every axial slice: 0 background only, 1 kidney without tumour, 2 contains tumour.

    Args:
        labels: ``(Z, Y, X)`` integer labels of ``dataset`` (KiTS19 ``{0, 1, 2}``), axis 0 the axial slices.
        dataset: the dataset definition (or its name) whose labels ``labels`` holds; any label
            > 0 other than tumour (kidney, cyst) makes a slice class 1 when it holds no tumour.

    Returns:
        ``(Z,)`` uint8 slice classes (names in ``SLICE_CLASS_NAMES``).
    """
    labels = _check_label_volume(labels, dataset=dataset)
    classes = (labels > 0).any(axis=(1, 2)).astype(np.uint8)
    classes[(labels == TUMOUR_LABEL).any(axis=(1, 2))] = SLICE_TUMOUR
    return classes


def compute_slice_class_counts(volumes: Iterable[np.ndarray], *,
                               dataset: str | DatasetDefinition = KITS19) -> np.ndarray:
    """Number of axial slices of each class (see :func:`classify_slices`), summed over volumes.

    Args:
        volumes: ``(Z, Y, X)`` integer label arrays, one per case.
        dataset: the dataset definition (or its name) whose labels the volumes hold.

    Returns:
        ``(3,)`` int64 counts of slices: background only, kidney without tumour, contains tumour.
    """
    counts = np.zeros(len(SLICE_CLASS_NAMES), dtype=np.int64)
    for labels in volumes:
        counts += np.bincount(classify_slices(labels, dataset=dataset), minlength=len(SLICE_CLASS_NAMES))
    return counts


def count_slice_classes_per_case(cases: Iterable[SlicedCase]) -> dict[str, np.ndarray]:
    """Slices of each class in every case, read from the stored ``case.slice_classes`` (no voxels read).

    Args:
        cases: at least one case with a distinct ``case_id`` and ``(Z,)`` integer
            ``slice_classes`` in ``{0, 1, 2}``.

    Returns:
        ``case_id`` -> ``(3,)`` int64 slices (background only, kidney without tumour, contains
        tumour), in the order of ``cases``.
    """
    counts: dict[str, np.ndarray] = {}
    for case in cases:
        classes = np.asarray(case.slice_classes)
        if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(f"{case.case_id}: slice_classes must be a 1D integer array, "
                             f"got shape {classes.shape} of {classes.dtype}")
        if classes.size and not 0 <= classes.min() <= classes.max() < len(SLICE_CLASS_NAMES):
            raise ValueError(f"{case.case_id}: slice classes must be in {{0, 1, 2}}, "
                             f"got values from {classes.min()} to {classes.max()}")
        if case.case_id in counts:
            raise ValueError(f"case ids must be distinct, got {case.case_id} twice")
        counts[case.case_id] = np.bincount(classes, minlength=len(SLICE_CLASS_NAMES)).astype(np.int64)
    if not counts:
        raise ValueError("cases must hold at least one case, got none")
    return counts


def compute_slice_areas(labels: np.ndarray, spacing: Sequence[float], *,
                        dataset: str | DatasetDefinition = KITS19) -> tuple[np.ndarray, np.ndarray]:
    """Kidney (label > 0) and tumour (label 2) area of every axial slice.

    Args:
        labels: ``(Z, Y, X)`` integer labels of ``dataset`` (KiTS19 ``{0, 1, 2}``).
        spacing: ``(z, y, x)`` voxel size in mm, all finite and > 0; the pixel area is ``y * x`` mm².
        dataset: the dataset definition (or its name) whose labels ``labels`` holds.

    Returns:
        ``(kidney_mm2, tumour_mm2)``, each ``(Z,)`` float64 in mm² (0 where the slice has none).
    """
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three finite values > 0 mm (z, y, x), got {tuple(spacing)}")
    dataset = get_dataset(dataset)
    counts = compute_slice_pixel_counts(labels, dataset=dataset)
    pixel_mm2 = float(spacing[1]) * float(spacing[2])
    return np.sum(counts, axis=0) * pixel_mm2, counts[dataset.foreground_labels.index(TUMOUR_LABEL)] * pixel_mm2


def compute_case_slice_areas(cases: Iterable[SlicedCase], *,
                             dataset: str | DatasetDefinition = KITS19) -> SliceAreas:
    """Areas (mm²) of kidney and of tumour in the slices holding them, pooled over cases.

    Args:
        cases: at least one case; each one's ``label`` ``(Z, Y, X)`` is read whole, with its
            ``spacing`` ``(z, y, x)`` mm.
        dataset: the dataset definition (or its name) whose labels the cases hold.

    Returns:
        Kidney areas of slices with label > 0, tumour areas of slices with label 2 (see
        :class:`SliceAreas`), case after case in slice order.
    """
    kidney_parts, tumour_parts = [], []
    for case in cases:
        try:
            kidney, tumour = compute_slice_areas(np.asarray(case.label), case.spacing, dataset=dataset)
        except ValueError as error:
            raise ValueError(f"{case.case_id}: {error}") from error
        kidney_parts.append(kidney[kidney > 0])
        tumour_parts.append(tumour[tumour > 0])
    if not kidney_parts:
        raise ValueError("cases must hold at least one case, got none")
    return SliceAreas(np.concatenate(kidney_parts), np.concatenate(tumour_parts))


def compare_sampled_classes(sampled: Sequence[int] | np.ndarray, configured: Sequence[float] | np.ndarray
                            ) -> SamplingShares:
    """Count the classes of sampled slices beside the configured probabilities.

    Args:
        sampled: ``(N,)`` slice classes in ``{0, 1, 2}``, N >= 1.
        configured: ``(3,)`` probabilities >= 0 summing to 1, in slice-class order
            (background, kidney, tumour).
    """
    sampled = np.asarray(sampled)
    configured = np.asarray(configured, dtype=np.float64)
    if sampled.ndim != 1 or sampled.size == 0 or not np.isin(sampled, (0, 1, 2)).all():
        raise ValueError(f"sampled must be a non-empty 1D array of slice classes in {{0, 1, 2}}, "
                         f"got shape {sampled.shape} with values {np.unique(sampled)[:5].tolist()}")
    if configured.shape != (3,) or (configured < 0).any() or not math.isclose(configured.sum(), 1, abs_tol=1e-6):
        raise ValueError(f"configured must be 3 probabilities >= 0 summing to 1, got {configured.tolist()}")
    counts = np.bincount(sampled.astype(np.intp), minlength=3).astype(np.int64)
    return SamplingShares(configured=configured, counts=counts)


def compute_sampling_shares(sampler: SliceSampler, n_samples: int, *, start: int = 0) -> SamplingShares:
    """Draw items ``start .. start + n_samples - 1`` of a slice sampler and compare their classes with its settings.

    Each item is built in full (fitted and, if configured, augmented), then only its
    ``slice_class`` is kept. The configured probability of class ``c`` is
    ``sampler.class_probabilities`` at the position of ``c`` among ``sampler.slices``' keys.

    Args:
        sampler: e.g. a :class:`~utils.datasets.slices.SliceDataset`.
        n_samples: items to draw (>= 1).
        start: first item index (>= 0); index ``epoch * len + i`` is item ``i`` of that epoch.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    order = [int(c) for c in sampler.slices]
    probabilities = np.asarray(sampler.class_probabilities, dtype=np.float64)
    if sorted(order) != [0, 1, 2] or probabilities.shape != (3,):
        raise ValueError(f"sampler must have slices for classes 0, 1, 2 and 3 class probabilities, "
                         f"got classes {order} and probabilities {probabilities.tolist()}")
    configured = np.zeros(3)
    configured[order] = probabilities
    sampled = [int(sampler[index]["slice_class"]) for index in range(start, start + n_samples)]
    return compare_sampled_classes(sampled, configured)


def describe_label_range_error(name: str, low: int, high: int, dataset: str | DatasetDefinition = KITS19) -> str:
    """The message for label values from ``low`` to ``high`` outside a dataset's labels.

    It names the allowed labels and, when a known dataset has the offending labels (label 3 is
    KiTS23's cyst), that dataset and the setting that selects it.
    """
    dataset = get_dataset(dataset)
    allowed = ", ".join(str(label) for label in sorted(dataset.labels))
    message = (f"{name}: label values must be in {{{allowed}}}, got values from {low} to {high}; "
               f"the {dataset.title} labels are {dataset.describe_labels()}")
    if low >= 0 and high > dataset.max_label:
        message += foreign_labels_hint(range(dataset.max_label + 1, high + 1), dataset)
    return message


def _check_label_volume(labels: np.ndarray, name: str = "labels",
                        dataset: str | DatasetDefinition = KITS19) -> np.ndarray:
    """Return ``labels`` as an array after checking it is 3D, integer and within the dataset's labels."""
    dataset = get_dataset(dataset)
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        raise ValueError(f"{name}: labels must be a non-empty 3D integer array (Z, Y, X), "
                         f"got shape {labels.shape} of {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > dataset.max_label:
        raise ValueError(describe_label_range_error(name, low, high, dataset))
    return labels
