"""KiTS19 metrics of one case on its original voxel grid: Dice, surface Dice and HD95 in mm.

Label maps are ``(Z, Y, X)`` = ``(slice, row, column)`` arrays as stored in the KiTS19 NIfTI
files (see :mod:`utils.data.kits_layout`), values ``0`` background, ``1`` kidney, ``2`` tumour.
Two structures are scored, as in the KiTS19 challenge: the composite kidney ``label > 0``
(kidney and tumour together) and the tumour ``label == 2``.

Surface convention (the one of MONAI's ``compute_surface_dice`` and
``compute_hausdorff_distance`` with ``use_subvoxels=False``, ``distance_metric="euclidean"``):

* the surface of a mask is its *boundary voxels*: voxels of the mask that a binary erosion
  with the 6-connected cross (``scipy.ndimage.generate_binary_structure(3, 1)``) removes,
  voxels outside the array counting as background (a mask touching the array's edge has a
  surface there);
* a distance is the Euclidean distance in mm between boundary-voxel *centres*, each axis
  scaled by its voxel spacing; ``d(p -> T)`` is the distance from a predicted boundary voxel
  ``p`` to the nearest truth boundary voxel, and likewise ``d(t -> P)``;
* surface Dice at tolerance ``tau`` mm:
  ``(#{p: d(p -> T) <= tau} + #{t: d(t -> P) <= tau}) / (#P + #T)``, with ``P``, ``T`` the
  boundary-voxel sets (a slack of :data:`DISTANCE_SLACK_MM` absorbs rounding at ``d == tau``);
* HD95: ``max(q95(d(p -> T)), q95(d(t -> P)))``, with ``q95`` the 95th percentile with linear
  interpolation (``numpy.percentile``, as ``torch.quantile`` in MONAI).

Empty masks (:data:`EMPTY_MASK_RULES`): both prediction and truth empty gives Dice 1, surface
Dice 1 and HD95 0 mm (nothing to find, nothing found); exactly one empty gives Dice 0, surface
Dice 0 and HD95 missing (``None``; ``null`` in JSON), which :func:`summarise_metrics` counts
under ``"missing"`` instead of averaging it away.

Distances are computed by Euclidean distance transforms (``scipy.ndimage``) restricted to the
bounding box of both masks plus a one-voxel margin (which keeps the erosion exact); no float
copy of the whole volume is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from utils.data.kits_layout import TUMOUR_LABEL
from utils.metrics.dice import dice

#: Default surface-Dice tolerance in mm.
DEFAULT_TOLERANCE_MM = 2.0
#: Percentile of the surface distances reported as the Hausdorff distance.
HAUSDORFF_PERCENTILE = 95.0
#: Rounding slack (mm) when comparing a distance with the surface-Dice tolerance.
DISTANCE_SLACK_MM = 1e-6
#: Voxels added on each side of the masks' bounding box before eroding.
CROP_MARGIN = 1
#: Per-case metric names, in table order (the JSON keys use the American "tumor", as KiTS19 does).
METRIC_NAMES = ("kidney_dice", "tumor_dice", "kidney_surface_dice", "tumor_surface_dice", "kidney_hd95", "tumor_hd95")
#: The empty-mask rules, as written into ``metrics.json``.
EMPTY_MASK_RULES = (
    "prediction and truth both empty: Dice 1, surface Dice 1, HD95 0 mm (nothing to find, nothing found); "
    "exactly one empty: Dice 0, surface Dice 0, HD95 missing (null), counted under 'missing' in the summary"
)


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three finite values > 0 mm in (Z, Y, X) order, got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def _check_label_map(labels: np.ndarray, name: str) -> None:
    if labels.ndim != 3 or labels.size == 0:
        raise ValueError(f"{name} must be a non-empty (Z, Y, X) label map, got shape {labels.shape}")
    low, high = labels.min(), labels.max()
    if low < 0 or high > TUMOUR_LABEL:
        raise ValueError(f"{name} must hold labels 0 (background), 1 (kidney), 2 (tumour), "
                         f"got values from {low} to {high}")


def find_bounding_box(masks: Sequence[np.ndarray], margin: int = CROP_MARGIN) -> tuple[slice, ...] | None:
    """Return the slices of the bounding box of the non-zero voxels of all masks, plus a margin.

    Args:
        masks: arrays of one shape (any dtype; non-zero means inside).
        margin: voxels added on each side, clipped to the array; >= 0.

    Returns:
        One slice per axis, or ``None`` when every mask is empty.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0 voxels, got {margin}")
    shape = masks[0].shape
    box = []
    for axis in range(len(shape)):
        others = tuple(a for a in range(len(shape)) if a != axis)
        occupied = np.zeros(shape[axis], dtype=bool)
        for mask in masks:
            occupied |= np.any(mask, axis=others)
        indices = np.flatnonzero(occupied)
        if indices.size == 0:
            return None
        box.append(slice(max(int(indices[0]) - margin, 0), min(int(indices[-1]) + 1 + margin, shape[axis])))
    return tuple(box)


def find_surface(mask: np.ndarray) -> np.ndarray:
    """Return the boundary voxels of a binary mask: the voxels a 6-connected erosion removes.

    Args:
        mask: ``(Z, Y, X)`` bool array; voxels outside the array count as background.

    Returns:
        ``(Z, Y, X)`` bool array, true on the mask's boundary voxels.
    """
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def _directed_distances(from_surface: np.ndarray, to_surface: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distances (mm, float64) from each voxel of ``from_surface`` to the nearest voxel of ``to_surface``."""
    distance_map = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return distance_map[from_surface]


def measure_surface_distances(prediction_mask: np.ndarray, truth_mask: np.ndarray,
                              spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Return the surface distances in mm between two binary masks, both ways.

    Args:
        prediction_mask, truth_mask: ``(Z, Y, X)`` arrays of equal shape; non-zero means inside.
        spacing: voxel size in mm along ``(Z, Y, X)``.

    Returns:
        ``(prediction -> truth, truth -> prediction)``: 1-D float64 arrays, one distance per
        boundary voxel of the first mask to the nearest boundary voxel of the second (see the
        module docstring), or ``None`` when either mask is empty.
    """
    spacing = _check_spacing(spacing)
    box = find_bounding_box([prediction_mask, truth_mask])
    if box is None or not np.any(prediction_mask[box]) or not np.any(truth_mask[box]):
        return None
    prediction_surface = find_surface(np.asarray(prediction_mask[box]) != 0)
    truth_surface = find_surface(np.asarray(truth_mask[box]) != 0)
    return (_directed_distances(prediction_surface, truth_surface, spacing),
            _directed_distances(truth_surface, prediction_surface, spacing))


def score_structure(prediction_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float],
                    tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> tuple[float, float, float | None]:
    """Return ``(Dice, surface Dice, HD95 in mm)`` of one binary structure, with the empty-mask rules.

    Args:
        prediction_mask, truth_mask: ``(Z, Y, X)`` arrays of equal shape; non-zero means inside.
        spacing: voxel size in mm along ``(Z, Y, X)``, all > 0.
        tolerance_mm: surface-Dice tolerance in mm, finite and >= 0.

    Returns:
        Dice and surface Dice in ``[0, 1]``; HD95 in mm, ``None`` when exactly one mask is empty.
    """
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0 mm, got {tolerance_mm}")
    distances = measure_surface_distances(prediction_mask, truth_mask, spacing)
    overlap = dice(prediction_mask, truth_mask)
    if distances is None:
        both_empty = overlap == 1.0
        return (1.0, 1.0, 0.0) if both_empty else (0.0, 0.0, None)
    to_truth, to_prediction = distances
    within = int(np.count_nonzero(to_truth <= tolerance_mm + DISTANCE_SLACK_MM))
    within += int(np.count_nonzero(to_prediction <= tolerance_mm + DISTANCE_SLACK_MM))
    surface_dice = within / (to_truth.size + to_prediction.size)
    hd95 = max(float(np.percentile(to_truth, HAUSDORFF_PERCENTILE)),
               float(np.percentile(to_prediction, HAUSDORFF_PERCENTILE)))
    return overlap, surface_dice, hd95


def score_case_metrics(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                       tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict[str, float | None]:
    """Score one case on its original grid: kidney and tumour Dice, surface Dice and HD95.

    Args:
        prediction, truth: ``(Z, Y, X)`` integer label maps of equal shape, values 0/1/2, on
            the CT's original grid.
        spacing: voxel size in mm along ``(Z, Y, X)`` (e.g. from
            :func:`utils.data.kits_layout.spacing_from_affine`); anisotropic spacing is honoured.
        tolerance_mm: surface-Dice tolerance in mm (default 2 mm).

    Returns:
        ``{"kidney_dice", "tumor_dice", "kidney_surface_dice", "tumor_surface_dice",
        "kidney_hd95", "tumor_hd95"}``: kidney is ``label > 0``, tumour ``label == 2``; HD95 in
        mm, ``None`` when exactly one of the two masks is empty (module docstring).
    """
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction and truth must have the same shape, got {prediction.shape} and {truth.shape}")
    _check_label_map(prediction, "prediction")
    _check_label_map(truth, "truth")
    spacing = _check_spacing(spacing)
    box = find_bounding_box([prediction, truth])
    if box is not None:  # every mask lies inside the kidney box: crop once
        prediction, truth = prediction[box], truth[box]
    scores: dict[str, float | None] = {}
    for name, select in (("kidney", lambda labels: labels > 0), ("tumor", lambda labels: labels == TUMOUR_LABEL)):
        overlap, surface_dice, hd95 = score_structure(select(prediction), select(truth), spacing, tolerance_mm)
        scores.update({f"{name}_dice": overlap, f"{name}_surface_dice": surface_dice, f"{name}_hd95": hd95})
    return {key: scores[key] for key in METRIC_NAMES}


def _is_missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def summarise_metrics(records: Sequence[Mapping[str, float | None]],
                      metrics: Sequence[str] = METRIC_NAMES) -> dict[str, dict[str, float | int | None]]:
    """Summarise per-case metrics: mean, standard deviation, median, count and missing count.

    Args:
        records: one mapping per case (e.g. from :func:`score_case_metrics`); a value of
            ``None`` or NaN is missing.
        metrics: the keys to summarise; each must be present in every record.

    Returns:
        ``{metric: {"mean", "std", "median", "n", "missing"}}``: statistics over the ``n``
        present values (``std`` the population standard deviation, ``ddof=0``), ``missing`` the
        number of cases without a value; the statistics are ``None`` when ``n`` is 0.
    """
    summary: dict[str, dict[str, float | int | None]] = {}
    for metric in metrics:
        absent = [index for index, record in enumerate(records) if metric not in record]
        if absent:
            raise ValueError(f"every record must hold {metric!r}; records {absent[:5]} do not")
        values = np.array([float(r[metric]) for r in records if not _is_missing(r[metric])], dtype=np.float64)
        present = values.size > 0
        summary[metric] = {
            "mean": float(values.mean()) if present else None,
            "std": float(values.std()) if present else None,
            "median": float(np.median(values)) if present else None,
            "n": int(values.size),
            "missing": len(records) - int(values.size),
        }
    return summary
