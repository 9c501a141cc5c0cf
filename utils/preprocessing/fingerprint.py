"""The dataset fingerprint: spacings, shapes and foreground intensity statistics of the training cases.

Computed from the data, never hard-coded, in two steps so that re-running is cheap:

* :func:`compute_case_fingerprint` reads one case and keeps, for its foreground (label > 0:
  kidney and tumour, and in KiTS23 cysts too) voxels in the original grid, the count, sum and
  sum of squares of HU (exact mean and standard deviation) and a histogram in 1 HU bins
  (percentiles exact to 1 HU for integer-valued CT, which KiTS19 is); these per-case records
  are cached as small JSON files;
* :func:`build_fingerprint` pools them into the dataset fingerprint: the clipping percentiles
  (default 0.5 and 99.5) and the mean and standard deviation used for z-normalisation, as
  nnU-Net does for CT.

Which cases count as training cases: every case with a segmentation (KiTS19's training set), as
in nnU-Net; the validation split's intensities therefore take part in the normalisation, while
nothing else about them does.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.analysis.dataset_statistics import HU_HISTOGRAM_RANGE, compute_histogram_percentile
from utils.data.nifti_io import save_json_atomic

FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class CaseFingerprint:
    """Per-case ingredients of the fingerprint.

    Attributes:
        case_id: e.g. ``"case_00007"``.
        source: identity of the source files (name, size, modification time) they were read from.
        shape: ``(Z, Y, X)`` as stored. spacing: ``(z, y, x)`` mm as stored.
        foreground_voxels: number of voxels with label > 0.
        hu_sum, hu_sum_squares: sums of their HU values and squared values.
        histogram_start: HU of the first bin of ``histogram``.
        histogram: foreground voxels per 1 HU bin from ``histogram_start`` (trimmed to the non-empty range).
    """

    case_id: str
    source: dict[str, Any]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    foreground_voxels: int
    hu_sum: float
    hu_sum_squares: float
    histogram_start: int
    histogram: tuple[int, ...]


@dataclass(frozen=True)
class DatasetFingerprint:
    """What preprocessing needs to know about the training cases.

    Attributes:
        case_ids: the cases it was computed from.
        spacings: ``(z, y, x)`` mm per case; shapes: ``(Z, Y, X)`` per case.
        median_spacing: per axis, mm.
        clip_percentiles: the percentiles of foreground HU used for clipping.
        clip_hu: the HU values at those percentiles.
        foreground_mean_hu, foreground_std_hu: over all foreground voxels (unclipped).
        foreground_min_hu, foreground_max_hu: range of the foreground HU values (to 1 HU).
        foreground_voxels: number of foreground voxels pooled.
    """

    case_ids: tuple[str, ...]
    spacings: tuple[tuple[float, float, float], ...]
    shapes: tuple[tuple[int, int, int], ...]
    median_spacing: tuple[float, float, float]
    clip_percentiles: tuple[float, float]
    clip_hu: tuple[float, float]
    foreground_mean_hu: float
    foreground_std_hu: float
    foreground_min_hu: float
    foreground_max_hu: float
    foreground_voxels: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with summary statistics of spacing and shape added for reading."""
        data = {"version": FINGERPRINT_VERSION, **asdict(self)}
        spacings, shapes = np.asarray(self.spacings), np.asarray(self.shapes)
        data["summary"] = {
            "cases": len(self.case_ids),
            "spacing_mm_min": spacings.min(axis=0).tolist(), "spacing_mm_max": spacings.max(axis=0).tolist(),
            "shape_min": shapes.min(axis=0).tolist(), "shape_median": np.median(shapes, axis=0).tolist(),
            "shape_max": shapes.max(axis=0).tolist(),
        }
        return data


def compute_case_fingerprint(case_id: str, image: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float],
                            source: dict[str, Any]) -> CaseFingerprint:
    """Foreground intensity statistics of one case in its original grid.

    Args:
        image: ``(Z, Y, X)`` CT in HU. labels: same shape, label > 0 is foreground.
        spacing: ``(z, y, x)`` mm. source: identity of the files (kept for cache checks).
    """
    if image.shape != labels.shape:
        raise ValueError(f"{case_id}: image shape {image.shape} and label shape {labels.shape} differ")
    values = image[labels > 0].astype(np.float64)
    low, high = HU_HISTOGRAM_RANGE  # bins [low, high), values outside counted in the end bins
    bins = np.clip(np.rint(values), low, high - 1).astype(np.int64) - low
    counts = np.bincount(bins, minlength=high - low)
    nonzero = np.flatnonzero(counts)
    first, last = (int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else (0, 0)
    return CaseFingerprint(
        case_id=case_id, source=source, shape=tuple(int(n) for n in image.shape),
        spacing=tuple(float(s) for s in spacing), foreground_voxels=int(values.size),
        hu_sum=float(values.sum()), hu_sum_squares=float(np.square(values).sum()),
        histogram_start=low + first, histogram=tuple(int(c) for c in counts[first:last]),
    )


def build_fingerprint(statistics: list[CaseFingerprint], clip_percentiles: tuple[float, float]) -> DatasetFingerprint:
    """Pool per-case statistics into the dataset fingerprint.

    Raises:
        ValueError: no cases, or no foreground voxel in any of them.
    """
    if not statistics:
        raise ValueError("the fingerprint needs at least one case with a segmentation; none were given")
    voxels = sum(s.foreground_voxels for s in statistics)
    if voxels == 0:
        raise ValueError("no case has any kidney or tumour voxel (label > 0); cannot compute intensity statistics")
    low = min(s.histogram_start for s in statistics if s.histogram)
    high = max(s.histogram_start + len(s.histogram) for s in statistics if s.histogram)
    pooled = np.zeros(high - low, dtype=np.int64)
    for s in statistics:
        pooled[s.histogram_start - low: s.histogram_start - low + len(s.histogram)] += np.asarray(s.histogram, np.int64)
    mean = sum(s.hu_sum for s in statistics) / voxels
    variance = max(sum(s.hu_sum_squares for s in statistics) / voxels - mean ** 2, 0.0)
    spacings = np.asarray([s.spacing for s in statistics])
    occupied = np.flatnonzero(pooled)
    return DatasetFingerprint(
        case_ids=tuple(s.case_id for s in statistics),
        spacings=tuple(tuple(s.spacing) for s in statistics), shapes=tuple(tuple(s.shape) for s in statistics),
        median_spacing=tuple(float(v) for v in np.median(spacings, axis=0)),
        clip_percentiles=tuple(float(p) for p in clip_percentiles),
        clip_hu=tuple(compute_histogram_percentile(pooled, p, low=low) for p in clip_percentiles),
        foreground_mean_hu=float(mean), foreground_std_hu=float(np.sqrt(variance)),
        foreground_min_hu=float(low + occupied[0]), foreground_max_hu=float(low + occupied[-1]),
        foreground_voxels=int(voxels),
    )


def save_case_fingerprint(path: str | os.PathLike, statistics: CaseFingerprint) -> Path:
    """Write one case's statistics as JSON (atomically)."""
    return save_json_atomic(path, asdict(statistics))


def load_case_fingerprint(path: str | os.PathLike) -> CaseFingerprint | None:
    """Read statistics saved by :func:`save_case_fingerprint`; ``None`` when absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        data["shape"], data["spacing"] = tuple(data["shape"]), tuple(data["spacing"])
        data["histogram"] = tuple(data["histogram"])
        return CaseFingerprint(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def load_fingerprint(path: str | os.PathLike) -> DatasetFingerprint:
    """Read a fingerprint JSON written by the preprocessing.

    Raises:
        FileNotFoundError: no such file. ValueError: not a fingerprint file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fingerprint not found; run scripts/preprocess.py to create the cache")
    try:
        data = json.loads(path.read_text())
        data.pop("version", None)
        data.pop("summary", None)
        nested = {"spacings", "shapes"}
        return DatasetFingerprint(**{k: tuple(tuple(x) for x in v) if k in nested else
                                     tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a valid fingerprint file ({error})") from error
