"""Statistics of a KiTS-layout dataset: per-case label statistics and HU histograms.

The labels are those of a dataset definition (:mod:`utils.data.dataset_definitions`, chosen by
the ``dataset`` argument, default KiTS19): KiTS19 0 background, 1 kidney, 2 tumour; KiTS23 adds
3 cyst. Definitions (all arrays ``(Z, Y, X)``, axis 0 the axial slices):

* volumes in ml are voxel counts times the voxel volume read from the affine
  (``z * y * x`` mm³ / 1000): kidney tissue (label 1), tumour (label 2) and the composite
  kidney+tumour (labels 1 and 2; label > 0, the "kidney" region, in KiTS19); with a cyst
  label also cyst (label 3) and the composite kidney and masses (labels 1, 2 and 3, KiTS23's
  "kidney_and_masses" region);
* tumours are the connected components of label 2, cysts those of label 3, kidney components
  those of label > 0, all in 3D with 26-connectivity (voxels touching by a face, edge or
  corner are connected);
* slice shares are the fraction of all axial slices holding at least one voxel of label > 0
  (kidney), label 2 (tumour) or label 3 (cyst);
* class proportions: the share of the case's voxels of each label, over all labels of the dataset;
* labels above the dataset's highest label are an error that names the file, the labels
  allowed and, for label 3 read as KiTS19, that it is KiTS23's cyst (``dataset: kits23``);
* HU statistics per class (only when the case has imaging): mean and (population) standard
  deviation of the voxel values, and the 0.5th and 99.5th percentiles read from a histogram of one bin per
  integer HU over ``[-1024, 3071]``, values rounded to the nearest integer and clipped into
  the end bins (exact for integer-valued CT within that range). The histograms are kept per
  case so that they can be summed over cases without holding voxels.

Per-slice statistics are in :mod:`utils.analysis.slice_statistics`; tables and CSV files of these
statistics in :mod:`utils.analysis.statistics_tables`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from utils.analysis.slice_statistics import compute_slice_pixel_counts
from utils.data.case_discovery import CaseFiles, discover_cases
from utils.data.dataset_definitions import KITS19, DatasetDefinition, get_dataset
from utils.data.kits_layout import HU_RANGE, KIDNEY_LABEL, LABEL_NAMES, TUMOUR_LABEL, spacing_from_affine
from utils.data.nifti_io import load_nifti, read_voxels
from utils.data.parallel import map_with_progress

logger = logging.getLogger(__name__)

#: Histogram bins, one per integer HU in ``[HU_HISTOGRAM_RANGE[0], HU_HISTOGRAM_RANGE[1])``.
HU_HISTOGRAM_RANGE = (HU_RANGE[0], HU_RANGE[1] + 1)
#: Percentiles of each class's HU reported per case.
HU_PERCENTILES = (0.5, 99.5)
#: Class names in label order (0 background, 1 kidney, 2 tumour): KiTS19's; see :func:`class_names`.
CLASS_NAMES = tuple(LABEL_NAMES[label] for label in sorted(LABEL_NAMES))
#: Name of the label that, where a dataset has it, adds cyst statistics.
CYST_NAME = "cyst"
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
_SLAB_SLICES = 32  # slices of CT read at a time for the HU statistics


def class_names(dataset: str | DatasetDefinition = KITS19) -> tuple[str, ...]:
    """Class names of a dataset in label order (``("background", "kidney", "tumour", "cyst")`` for KiTS23)."""
    labels = get_dataset(dataset).labels
    return tuple(labels[label] for label in sorted(labels))


@dataclass(frozen=True)
class HuSummary:
    """HU statistics of one class in one case: mean, standard deviation and percentiles (HU)."""

    mean: float
    std: float
    p0_5: float
    p99_5: float


@dataclass(frozen=True)
class CaseStatistics:
    """Label (and, with imaging, HU) statistics of one case.

    Per-class values are in label order over all labels of the dataset: ``(background, kidney,
    tumour)`` for KiTS19, ``(background, kidney, tumour, cyst)`` for KiTS23.

    Attributes:
        case_id: e.g. ``"case_00007"``.
        shape: ``(Z, Y, X)`` voxels of the segmentation.
        spacing: ``(z, y, x)`` voxel size in mm, from the segmentation's affine.
        voxel_counts: voxels of each label (``(0, 1, 2)`` for KiTS19, ``(0, 1, 2, 3)`` for KiTS23).
        tumours: connected components of label 2 (3D, 26-connectivity).
        kidney_components: connected components of label > 0 (3D, 26-connectivity).
        slices_with_kidney: axial slices holding any voxel of label > 0.
        slices_with_tumour: axial slices holding any voxel of label 2.
        hu: per class a :class:`HuSummary`, ``None`` for a class without voxels; ``None`` as a
            whole when the case has no imaging.
        hu_histogram: ``(classes, 4096)`` int64 voxel counts per class and integer HU (see
            ``HU_HISTOGRAM_RANGE``), ``None`` without imaging; not part of equality.
        dataset: name of the dataset definition whose labels were read (``"kits19"``, ``"kits23"``);
            a :class:`~utils.data.dataset_definitions.DatasetDefinition` is stored as its name.
        cysts: connected components of the cyst label (3D, 26-connectivity); ``None`` for a
            dataset without a cyst label.
        slices_with_cyst: axial slices holding any voxel of the cyst label; ``None`` for a
            dataset without a cyst label.
    """

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    voxel_counts: tuple[int, ...]
    tumours: int
    kidney_components: int
    slices_with_kidney: int
    slices_with_tumour: int
    hu: tuple[HuSummary | None, ...] | None = None
    hu_histogram: np.ndarray | None = field(default=None, compare=False, repr=False)
    dataset: str = KITS19.name
    cysts: int | None = None
    slices_with_cyst: int | None = None

    def __post_init__(self) -> None:
        definition = get_dataset(self.dataset)
        object.__setattr__(self, "dataset", definition.name)
        if len(self.voxel_counts) != definition.num_classes:
            raise ValueError(f"{self.case_id}: voxel_counts must hold {definition.num_classes} counts, one per "
                             f"{definition.title} label ({definition.describe_labels()}), got {self.voxel_counts}")
        has_cyst = definition.has_label(CYST_NAME)
        if has_cyst != (self.cysts is not None) or has_cyst != (self.slices_with_cyst is not None):
            raise ValueError(f"{self.case_id}: cysts and slices_with_cyst must be "
                             f"{'given' if has_cyst else 'None'} for {definition.title}, "
                             f"got {self.cysts} and {self.slices_with_cyst}")

    @property
    def definition(self) -> DatasetDefinition:
        """The dataset definition whose labels were read."""
        return get_dataset(self.dataset)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in label order, as ``voxel_counts``, ``class_proportions`` and ``hu`` hold them."""
        return class_names(self.dataset)

    @property
    def has_cyst_label(self) -> bool:
        """Whether the dataset has a cyst label (KiTS23), so that cyst statistics exist."""
        return self.definition.has_label(CYST_NAME)

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in ml."""
        return math.prod(self.spacing) / 1000.0

    @property
    def class_proportions(self) -> tuple[float, ...]:
        """Share of all voxels that are of each label, in label order (sums to 1)."""
        total = sum(self.voxel_counts)
        return tuple(count / total for count in self.voxel_counts)

    @property
    def kidney_ml(self) -> float:
        """Kidney tissue (label 1) volume in ml."""
        return self.voxel_counts[KIDNEY_LABEL] * self.voxel_ml

    @property
    def tumour_ml(self) -> float:
        """Tumour (label 2) volume in ml."""
        return self.voxel_counts[TUMOUR_LABEL] * self.voxel_ml

    @property
    def kidney_tumour_ml(self) -> float:
        """Composite kidney+tumour (labels 1 and 2; label > 0 in KiTS19) volume in ml."""
        return (self.voxel_counts[KIDNEY_LABEL] + self.voxel_counts[TUMOUR_LABEL]) * self.voxel_ml

    @property
    def cyst_ml(self) -> float | None:
        """Cyst (label 3) volume in ml; ``None`` for a dataset without a cyst label."""
        if not self.has_cyst_label:
            return None
        return self.voxel_counts[self.definition.label(CYST_NAME)] * self.voxel_ml

    @property
    def kidney_and_masses_ml(self) -> float | None:
        """Composite kidney, tumour and cyst (label > 0, KiTS23's ``kidney_and_masses``) volume in ml.

        ``None`` for a dataset without a cyst label (there :attr:`kidney_tumour_ml` is label > 0).
        """
        if not self.has_cyst_label:
            return None
        return sum(self.voxel_counts[1:]) * self.voxel_ml

    @property
    def kidney_slice_share(self) -> float:
        """Fraction of axial slices holding kidney (label > 0)."""
        return self.slices_with_kidney / self.shape[0]

    @property
    def tumour_slice_share(self) -> float:
        """Fraction of axial slices holding tumour (label 2)."""
        return self.slices_with_tumour / self.shape[0]

    @property
    def cyst_slice_share(self) -> float | None:
        """Fraction of axial slices holding cyst (label 3); ``None`` for a dataset without a cyst label."""
        return None if self.slices_with_cyst is None else self.slices_with_cyst / self.shape[0]


def compute_label_statistics(case_id: str, labels: np.ndarray, spacing: Sequence[float],
                             image: np.ndarray | None = None, *,
                             dataset: str | DatasetDefinition = KITS19) -> CaseStatistics:
    """Compute the statistics of one case from its arrays (definitions in the module docstring).

    Args:
        case_id: name used in the result and in error messages.
        labels: ``(Z, Y, X)`` integer labels of ``dataset`` (KiTS19 ``{0, 1, 2}``, KiTS23 ``{0, 1, 2, 3}``).
        spacing: ``(z, y, x)`` voxel size in mm, all > 0.
        image: ``(Z, Y, X)`` CT in HU (any real dtype, finite), or ``None`` for no HU statistics.
        dataset: the dataset definition (or its name, e.g. ``"kits23"``) whose labels ``labels`` holds.

    Raises:
        ValueError: invalid arrays or spacing; labels outside the dataset's (the message names
            the labels allowed).
    """
    dataset = get_dataset(dataset)
    per_label = dict(zip(dataset.foreground_labels,
                         compute_slice_pixel_counts(labels, name=case_id, dataset=dataset), strict=True))
    labels = np.asarray(labels)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{case_id}: spacing must be three finite values > 0 mm (z, y, x), got {tuple(spacing)}")
    foreground = np.sum(list(per_label.values()), axis=0)
    slices_with_kidney = np.flatnonzero(foreground)
    box = _bounding_box(labels > 0, slices_with_kidney)
    inside = labels[box] if box is not None else np.zeros((1, 1, 1), labels.dtype)
    hu, histogram = (_compute_hu(case_id, np.asarray(image), labels, dataset.num_classes) if image is not None
                     else (None, None))
    cysts = slices_with_cyst = None
    if dataset.has_label(CYST_NAME):
        cyst_label = dataset.label(CYST_NAME)
        cysts = _count_components(inside == cyst_label)
        slices_with_cyst = int(np.count_nonzero(per_label[cyst_label]))
    return CaseStatistics(
        case_id=case_id, shape=tuple(int(n) for n in labels.shape),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        voxel_counts=(labels.size - int(foreground.sum()), *(int(counts.sum()) for counts in per_label.values())),
        tumours=_count_components(inside == TUMOUR_LABEL), kidney_components=_count_components(inside > 0),
        slices_with_kidney=int(slices_with_kidney.size),
        slices_with_tumour=int(np.count_nonzero(per_label[TUMOUR_LABEL])),
        hu=hu, hu_histogram=histogram, dataset=dataset.name, cysts=cysts, slices_with_cyst=slices_with_cyst)


def _bounding_box(mask: np.ndarray, slices: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a ``(Z, Y, X)`` mask whose non-empty slice indices are ``slices``; ``None`` if empty."""
    if slices.size == 0:
        return None
    inside = mask[slices[0]:slices[-1] + 1]
    rows, columns = np.flatnonzero(inside.any(axis=(0, 2))), np.flatnonzero(inside.any(axis=(0, 1)))
    return (slice(slices[0], slices[-1] + 1), slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))


def _count_components(mask: np.ndarray) -> int:
    """Number of connected components of a boolean mask, 3D 26-connectivity."""
    return int(ndimage.label(mask, structure=_CONNECTIVITY_26)[1])


def _compute_hu(case_id: str, image: np.ndarray, labels: np.ndarray,
                num_classes: int = len(CLASS_NAMES)) -> tuple[tuple[HuSummary | None, ...], np.ndarray]:
    """HU summary per class and the ``(num_classes, 4096)`` int64 per-class histogram, read in slabs of slices."""
    if image.shape != labels.shape:
        raise ValueError(f"{case_id}: image shape {image.shape} differs from label shape {labels.shape}")
    low, high = HU_HISTOGRAM_RANGE
    histogram = np.zeros((num_classes, high - low), dtype=np.int64)
    moments = np.zeros((num_classes, 3))  # per class: count, mean, sum of squared deviations
    for start in range(0, labels.shape[0], _SLAB_SLICES):
        image_slab, label_slab = image[start:start + _SLAB_SLICES], labels[start:start + _SLAB_SLICES]
        if not np.isfinite(image_slab).all():
            raise ValueError(f"{case_id}: image holds NaN or infinite values (in slices {start} to "
                             f"{start + len(image_slab) - 1}); CT values must be finite HU")
        for label in range(num_classes):
            values = image_slab[label_slab == label].astype(np.float64)
            if values.size:
                bins = np.clip(np.rint(values), low, high - 1).astype(np.intp) - low
                histogram[label] += np.bincount(bins, minlength=high - low)
                moments[label] = _merge_moments(moments[label], values)
    summaries = tuple(None if count == 0 else HuSummary(
        float(mean), math.sqrt(squares / count), *(compute_histogram_percentile(counts, q) for q in HU_PERCENTILES))
        for (count, mean, squares), counts in zip(moments, histogram, strict=False))
    return summaries, histogram


def _merge_moments(moments: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Add values to ``(count, mean, sum of squared deviations)`` (Chan et al.'s pairwise update)."""
    count, mean, squares = moments
    new_count, new_mean = values.size, values.mean()
    delta, total = new_mean - mean, count + values.size
    return np.array([total, mean + delta * new_count / total,
                     squares + ((values - new_mean) ** 2).sum() + delta**2 * count * new_count / total])


def compute_histogram_percentile(counts: np.ndarray, q: float, low: int = HU_HISTOGRAM_RANGE[0]) -> float:
    """Return the ``q``-th percentile of integer values given as a histogram of one bin per integer.

    Uses the inverted-CDF definition (``np.percentile(values, q, method="inverted_cdf")``): the
    smallest value whose cumulative count reaches ``q`` % of all values.

    Args:
        counts: ``(n,)`` non-negative counts; bin ``i`` holds the value ``low + i``.
        q: percentile in ``[0, 100]``.
        low: value of bin 0 (HU).

    Returns:
        The percentile (same unit as the values), ``nan`` for an empty histogram.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError(f"counts must be a 1D array of counts >= 0, got shape {counts.shape}")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be between 0 and 100, got {q}")
    cumulative = np.cumsum(counts, dtype=np.int64)
    total = int(cumulative[-1]) if cumulative.size else 0
    if total == 0:
        return math.nan
    rank = max(math.ceil(q / 100.0 * total), 1)
    return float(low + int(np.searchsorted(cumulative, rank, side="left")))


def compute_case_statistics(case: CaseFiles, *, with_hu: bool = True,
                            dataset: str | DatasetDefinition = KITS19) -> CaseStatistics:
    """Read a case's segmentation (and imaging, when present and ``with_hu``) and compute its statistics.

    Args:
        case: the case's files, from :func:`~utils.data.case_discovery.discover_cases`; the
            segmentation must exist, the imaging may be absent (no HU statistics then).
        with_hu: read the imaging for HU statistics when it exists.
        dataset: the dataset definition (or its name, e.g. ``"kits23"``) whose labels the
            segmentation holds.

    Returns:
        The statistics; spacing from the segmentation's affine.

    Raises:
        ValueError: the case has no segmentation, or a file holds invalid values, labels
            outside the dataset's included (the message names the file and the labels allowed).
    """
    dataset = get_dataset(dataset)
    if case.segmentation is None:
        raise ValueError(f"{case.case_id}: no segmentation in {case.folder}; statistics need one")
    label_image = load_nifti(case.segmentation)
    labels = read_voxels(label_image, np.uint8)
    try:
        statistics = compute_label_statistics(case.case_id, labels, spacing_from_affine(label_image.affine),
                                              dataset=dataset)
    except ValueError as error:
        raise ValueError(f"{case.segmentation}: {error}") from error
    if not with_hu or case.imaging is None:
        return statistics
    image = read_voxels(load_nifti(case.imaging), np.float32)
    try:
        hu, histogram = _compute_hu(case.case_id, image, labels, dataset.num_classes)
    except ValueError as error:
        raise ValueError(f"{case.imaging}: {error}") from error
    return dataclasses.replace(statistics, hu=hu, hu_histogram=histogram)


def _statistics_job(job: tuple[CaseFiles, bool, str]) -> CaseStatistics:
    case, with_hu, dataset = job
    return compute_case_statistics(case, with_hu=with_hu, dataset=dataset)


def compute_dataset_statistics(data_dir: str | os.PathLike, *, workers: int = 1, max_cases: int | None = None,
                               with_hu: bool = True, show_progress: bool = True,
                               dataset: str | DatasetDefinition = KITS19) -> list[CaseStatistics]:
    """Compute :func:`compute_case_statistics` for every case of a KiTS-layout folder, in parallel.

    Cases without a segmentation are skipped (logged).

    Args:
        data_dir: the folder holding the ``case_XXXXX`` folders.
        workers: processes (>= 1), each holding one case's arrays at a time.
        max_cases: use only the first ``max_cases`` cases with a segmentation (>= 1), ``None`` for all.
        with_hu: read the imaging, where present, for HU statistics and histograms.
        show_progress: show a tqdm progress bar.
        dataset: the dataset definition (or its name: ``"kits19"``, ``"kits23"``) whose labels the
            segmentations hold.

    Returns:
        One :class:`CaseStatistics` per case, sorted by case id.

    Raises:
        FileNotFoundError: ``data_dir`` does not exist.
        ValueError: a segmentation holds labels outside the dataset's (the message names the file), or
            the folder is laid out for another dataset (e.g. it holds ``kits23.json`` and is read as KiTS19).
    """
    if max_cases is not None and max_cases < 1:
        raise ValueError(f"max_cases must be >= 1 or None, got {max_cases}")
    dataset = get_dataset(dataset)
    listing = discover_cases(data_dir, dataset=dataset)
    cases = [case for case in listing.cases if case.segmentation is not None]
    skipped = [case.case_id for case in listing.cases if case.segmentation is None]
    if skipped:
        logger.info("%s: skipping %d case(s) without a segmentation: %s", listing.data_dir, len(skipped),
                    ", ".join(skipped))
    jobs = [(case, with_hu, dataset.name) for case in cases[:max_cases]]
    return map_with_progress(_statistics_job, jobs, workers=workers, description="case statistics",
                             show_progress=show_progress)


def accumulate_hu_histograms(statistics: Iterable[CaseStatistics]) -> np.ndarray | None:
    """Sum the per-class HU histograms of the cases that have imaging.

    Returns:
        ``(classes, 4096)`` int64 counts per class (background, kidney, tumour and, for KiTS23,
        cyst) and integer HU, bin ``i`` holding ``HU_HISTOGRAM_RANGE[0] + i``; ``None`` when no
        case has imaging.

    Raises:
        ValueError: the cases were read as different datasets (their class counts differ).
    """
    cases = [case for case in statistics if case.hu_histogram is not None]
    first_case = {}
    for case in cases:
        first_case.setdefault(case.dataset, case.case_id)
    if len(first_case) > 1:
        raise ValueError("cannot sum HU histograms of cases read as different datasets: "
                         + ", ".join(f"{name} (e.g. {case_id})" for name, case_id in first_case.items()))
    histograms = [case.hu_histogram for case in cases]
    return np.sum(histograms, axis=0, dtype=np.int64) if histograms else None
