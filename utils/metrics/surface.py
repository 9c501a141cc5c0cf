"""Surfaces of binary masks and the distances between them in mm: surface Dice and HD95.

Masks are ``(Z, Y, X)`` = ``(slice, row, column)`` arrays as stored in the KiTS19 NIfTI files
(see :mod:`utils.data.kits_layout`), with the voxel spacing in mm along the same axes. The
convention is the one of MONAI's ``compute_surface_dice`` and ``compute_hausdorff_distance``
with ``use_subvoxels=False``, ``distance_metric="euclidean"``:

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

Distances exist only when both masks are non-empty (:func:`measure_surface_distances` returns
``None`` otherwise); the scores of empty masks are set by :func:`utils.metrics.scoring.score_structure`.
Surfaces are found in the bounding box of both masks plus a one-voxel margin (which keeps the
erosion exact). Distances are exact nearest-neighbour queries between the boundary-voxel
centres (a k-d tree, ``scipy.spatial.cKDTree``): the cost grows with the number of surface
voxels, not with the volume, so a prediction with false positives far from the kidney (whose
bounding box is the whole CT) costs no more than a tidy one. No float copy of the volume is made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

#: Default surface-Dice tolerance in mm.
DEFAULT_TOLERANCE_MM = 2.0
#: Percentile of the surface distances reported as the Hausdorff distance.
HAUSDORFF_PERCENTILE = 95.0
#: Rounding slack (mm) when comparing a distance with the surface-Dice tolerance.
DISTANCE_SLACK_MM = 1e-6
#: Voxels added on each side of the masks' bounding box before eroding.
CROP_MARGIN = 1


def check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Return ``spacing`` as three floats in mm, ``(Z, Y, X)`` order.

    Raises:
        ValueError: not three finite values > 0.
    """
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three finite values > 0 mm in (Z, Y, X) order, got {tuple(spacing)}")
    return values  # type: ignore[return-value]


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
    scale = np.asarray(spacing, dtype=np.float64)
    targets = cKDTree(np.argwhere(to_surface) * scale)
    distances, _ = targets.query(np.argwhere(from_surface) * scale)
    return np.asarray(distances, dtype=np.float64)


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
    spacing = check_spacing(spacing)
    box = find_bounding_box([prediction_mask, truth_mask])
    if box is None or not np.any(prediction_mask[box]) or not np.any(truth_mask[box]):
        return None
    prediction_surface = find_surface(np.asarray(prediction_mask[box]) != 0)
    truth_surface = find_surface(np.asarray(truth_mask[box]) != 0)
    return (_directed_distances(prediction_surface, truth_surface, spacing),
            _directed_distances(truth_surface, prediction_surface, spacing))


def _check_distances(to_truth: np.ndarray, to_prediction: np.ndarray) -> None:
    if to_truth.size == 0 or to_prediction.size == 0:
        raise ValueError(f"to_truth and to_prediction must be non-empty (both masks non-empty), got "
                         f"{to_truth.size} and {to_prediction.size} distances")


def measure_surface_dice(to_truth: np.ndarray, to_prediction: np.ndarray, tolerance_mm: float) -> float:
    """Return the surface Dice: the share of boundary voxels within ``tolerance_mm`` of the other surface.

    Args:
        to_truth, to_prediction: the two directed distance arrays in mm of
            :func:`measure_surface_distances`, each non-empty.
        tolerance_mm: the tolerance in mm, finite and >= 0.

    Returns:
        Surface Dice in ``[0, 1]`` (module docstring).
    """
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0 mm, got {tolerance_mm}")
    _check_distances(to_truth, to_prediction)
    within = int(np.count_nonzero(to_truth <= tolerance_mm + DISTANCE_SLACK_MM))
    within += int(np.count_nonzero(to_prediction <= tolerance_mm + DISTANCE_SLACK_MM))
    return within / (to_truth.size + to_prediction.size)


def measure_hd95(to_truth: np.ndarray, to_prediction: np.ndarray) -> float:
    """Return the 95th-percentile Hausdorff distance in mm: the larger of the two directed 95th percentiles.

    Args:
        to_truth, to_prediction: the two directed distance arrays in mm of
            :func:`measure_surface_distances`, each non-empty.
    """
    _check_distances(to_truth, to_prediction)
    return max(float(np.percentile(to_truth, HAUSDORFF_PERCENTILE)),
               float(np.percentile(to_prediction, HAUSDORFF_PERCENTILE)))
