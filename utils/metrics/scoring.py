"""The KiTS scores of one case and their summary over cases: the one scorer of training, benchmarks and evaluation.

The scored structures are the dataset's evaluation regions
(:mod:`utils.data.dataset_definitions`). KiTS19 (the default): label maps hold ``0``
background, ``1`` kidney, ``2`` tumour, and as in the KiTS19 challenge two structures are
scored, the composite kidney ``label > 0`` (kidney and tumour together) and the tumour
``label == 2``. KiTS23 adds ``3`` cyst and scores its hierarchical evaluation regions
(kidney and masses {1, 2, 3}, masses {2, 3}, tumour {2}), each with the challenge's own
surface-Dice tolerance; score keys are ``<region>_dice``, ``<region>_surface_dice`` and
``<region>_hd95``.

* :func:`score_case` without a spacing: kidney and tumour Dice on whatever grid the two label
  maps share (the preprocessing cache's grid in training validation); numpy arrays or torch
  tensors of any shape.
* :func:`score_case` with a spacing: also surface Dice at ``tolerance_mm`` and HD95 in mm, on a
  ``(Z, Y, X)`` grid of that spacing (each CT's original grid in evaluation); see
  :mod:`utils.metrics.surface` for the surface convention.
* :func:`summarise_scores`: mean, standard deviation, median, count and missing count of every
  score over cases, plus ``mean_dice`` (mean of the regions' Dice, for KiTS19 of kidney and
  tumour Dice: the model-selection criterion) and ``cases``.

Empty masks (:data:`EMPTY_MASK_RULES`): both prediction and truth empty gives Dice 1, surface
Dice 1 and HD95 0 mm (nothing to find, nothing found); exactly one empty gives Dice 0, surface
Dice 0 and HD95 missing (``None``; ``null`` in JSON), which :func:`summarise_scores` counts
under ``"missing"`` instead of averaging it away.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from utils.data.dataset_definitions import KITS19, DatasetDefinition, EvaluationRegion
from utils.metrics.dice import Array, dice
from utils.metrics.surface import (
    DEFAULT_TOLERANCE_MM,
    check_spacing,
    find_bounding_box,
    measure_hd95,
    measure_surface_dice,
    measure_surface_distances,
)

#: KiTS19's scored structures: name, and the mask of a label map (its evaluation regions, as functions).
STRUCTURES: tuple[tuple[str, Callable[[Array], Array]], ...] = tuple((region.name, region.mask)
                                                                    for region in KITS19.regions)
#: KiTS19's Dice scores whose mean is ``mean_dice``, the model-selection criterion.
DICE_NAMES = ("kidney_dice", "tumour_dice")
#: KiTS19's per-case scores on a grid with a spacing, in table order (the keys of metrics.json and metrics.csv).
METRIC_NAMES = ("kidney_dice", "tumour_dice", "kidney_surface_dice", "tumour_surface_dice", "kidney_hd95",
                "tumour_hd95")
#: Keys :func:`summarise_scores` adds next to the per-score statistics.
SUMMARY_KEYS = ("mean_dice", "cases")
#: The empty-mask rules, as written into ``metrics.json``.
EMPTY_MASK_RULES = (
    "prediction and truth both empty: Dice 1, surface Dice 1, HD95 0 mm (nothing to find, nothing found); "
    "exactly one empty: Dice 0, surface Dice 0, HD95 missing (null), counted under 'missing' in the summary"
)


def metric_names(dataset: DatasetDefinition = KITS19) -> tuple[str, ...]:
    """Per-case score keys of a dataset on a grid with a spacing, in table order: every region's Dice,
    then surface Dice, then HD95 (:data:`METRIC_NAMES` for KiTS19)."""
    return tuple(f"{region.name}_{kind}" for kind in ("dice", "surface_dice", "hd95") for region in dataset.regions)


def dice_names(dataset: DatasetDefinition = KITS19) -> tuple[str, ...]:
    """The Dice keys whose mean is ``mean_dice`` (:data:`DICE_NAMES` for KiTS19)."""
    return tuple(f"{region.name}_dice" for region in dataset.regions)


def _check_label_map(labels: Array, name: str, dataset: DatasetDefinition = KITS19) -> None:
    """``ValueError`` unless ``labels`` is non-empty and every label is one of the dataset's."""
    size = labels.numel() if isinstance(labels, torch.Tensor) else labels.size
    if size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(labels.shape)}")
    low, high = float(labels.min()), float(labels.max())
    if low < 0 or high > dataset.max_label:
        raise ValueError(f"{name} must hold labels {dataset.describe_labels()} ({dataset.title}), "
                         f"got values from {low:g} to {high:g}")


def score_structure(prediction_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float],
                    tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> tuple[float, float, float | None]:
    """Return ``(Dice, surface Dice, HD95 in mm)`` of one binary structure, with the empty-mask rules.

    Args:
        prediction_mask, truth_mask: ``(Z, Y, X)`` arrays of equal shape; non-zero means inside.
        spacing: voxel size in mm along ``(Z, Y, X)``, all > 0.
        tolerance_mm: surface-Dice tolerance in mm, finite and >= 0.

    Returns:
        Dice and surface Dice in ``[0, 1]``; HD95 in mm. Both masks empty: ``(1.0, 1.0, 0.0)``;
        exactly one empty: ``(0.0, 0.0, None)``.
    """
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0 mm, got {tolerance_mm}")
    distances = measure_surface_distances(prediction_mask, truth_mask, spacing)
    overlap = dice(prediction_mask, truth_mask)
    if distances is None:
        both_empty = overlap == 1.0
        return (1.0, 1.0, 0.0) if both_empty else (0.0, 0.0, None)
    return overlap, measure_surface_dice(*distances, tolerance_mm), measure_hd95(*distances)


def _region_mask(region: EvaluationRegion, labels: Array, dataset: DatasetDefinition) -> Array:
    """A region's voxels of a checked label map: ``labels > 0`` for the union of all foreground labels
    (the KiTS19 kidney), ``labels == k`` for one label."""
    if region.labels == frozenset(dataset.foreground_labels):
        return labels > 0
    if len(region.labels) == 1:
        return labels == next(iter(region.labels))
    return region.mask(labels)


def score_case(prediction: Array, truth: Array, spacing: Sequence[float] | None = None, *,
               tolerance_mm: float = DEFAULT_TOLERANCE_MM,
               dataset: DatasetDefinition = KITS19,
               regions: Sequence[str] | None = None) -> dict[str, float | None]:
    """KiTS scores of one case: for KiTS19 kidney (``label > 0``) and tumour (``label == 2``); for
    another dataset its evaluation regions.

    Args:
        prediction, truth: label maps of equal shape, values 0/1/2, any integer, bool or float
            dtype; numpy arrays or torch tensors (kept on their device without a spacing).
        spacing: ``None`` scores Dice only, on any grid and shape (fast: what validation on the
            cache grid needs). Otherwise the voxel size in mm along ``(Z, Y, X)`` of
            ``(Z, Y, X)`` label maps (e.g. from :func:`utils.data.kits_layout.spacing_from_affine`;
            anisotropic spacing is honoured), adding surface Dice and HD95.
        tolerance_mm: surface-Dice tolerance in mm (default 2 mm), finite and >= 0; used only
            with a spacing, and only for regions without a tolerance of their own (all of
            KiTS19's; KiTS23's HECs have the challenge's).
        dataset: whose labels and evaluation regions (default KiTS19).
        regions: score only these regions of the dataset, by name (default: all); the keys
            returned are theirs, in the same order.

    Returns:
        Without a spacing ``{"<region>_dice", ...}`` (KiTS19: ``kidney_dice``, ``tumour_dice``);
        with one, the keys of :func:`metric_names` in that order (:data:`METRIC_NAMES` for
        KiTS19). Empty masks: both empty scores Dice 1, surface Dice 1, HD95 0 mm; exactly one
        empty scores Dice 0, surface Dice 0, HD95 ``None`` (missing).

    Raises:
        ValueError: shapes differ, an empty map, labels outside the dataset's, or (with a spacing)
            maps that are not 3-D, an invalid spacing or tolerance.
    """
    if tuple(prediction.shape) != tuple(truth.shape):
        raise ValueError(f"prediction and truth must have the same shape, got prediction {tuple(prediction.shape)} "
                         f"and truth {tuple(truth.shape)}")
    _check_label_map(prediction, "prediction", dataset)
    _check_label_map(truth, "truth", dataset)
    names = [region.name for region in dataset.regions]
    unknown = [name for name in regions or () if name not in names]
    if unknown:
        raise ValueError(f"regions must be among {names} ({dataset.title}), got {unknown}")
    scored = [region for region in dataset.regions if regions is None or region.name in regions]
    if spacing is None:
        return {f"{region.name}_dice": dice(*(_region_mask(region, x, dataset) for x in (prediction, truth)))
                for region in scored}
    prediction, truth = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
                         for x in (prediction, truth))
    if prediction.ndim != 3:
        raise ValueError(f"prediction and truth must be (Z, Y, X) label maps when a spacing is given, "
                         f"got shape {prediction.shape}")
    spacing = check_spacing(spacing)
    box = find_bounding_box([prediction, truth])
    if box is not None:  # every mask lies inside the kidney box: crop once
        prediction, truth = prediction[box], truth[box]
    scores: dict[str, float | None] = {}
    for region in scored:
        tolerance = tolerance_mm if region.tolerance_mm is None else region.tolerance_mm
        masks = (_region_mask(region, x, dataset) for x in (prediction, truth))
        overlap, surface_dice, hd95 = score_structure(*masks, spacing, tolerance)
        name = region.name
        scores.update({f"{name}_dice": overlap, f"{name}_surface_dice": surface_dice, f"{name}_hd95": hd95})
    return {key: scores[key] for key in metric_names(dataset) if key in scores}


def _is_score(value: Any) -> bool:
    """A score value: a real number (not a bool), or ``None`` for a missing one."""
    return value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def _is_missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _score_keys(records: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None,
                dataset: DatasetDefinition) -> list[str]:
    """The keys to summarise, checked to be scores present in every record."""
    if metrics is None:
        if not records:
            raise ValueError("records must hold at least one case's scores when metrics is None, got an empty list")
        keys = list(dict.fromkeys(key for record in records for key, value in record.items() if _is_score(value)))
        required = dice_names(dataset)
        missing = [name for name in required if name not in keys]
        if missing:
            raise ValueError(f"records must include {' and '.join(required)} (their mean is mean_dice, the "
                             f"model-selection criterion), missing {missing}")
    else:
        keys = list(metrics)
    reserved = [key for key in keys if key in SUMMARY_KEYS]
    if reserved:
        raise ValueError(f"score names must differ from the summary's own keys {list(SUMMARY_KEYS)}, got {reserved}")
    for key in keys:
        absent = [index for index, record in enumerate(records) if key not in record]
        if absent:
            raise ValueError(f"every record must hold the same numeric scores; records {absent[:5]} lack {key!r}")
        wrong = [index for index, record in enumerate(records) if not _is_score(record[key])]
        if wrong:
            raise ValueError(f"{key!r} must be a number or None (missing) in every record, got "
                             f"{records[wrong[0]][key]!r} in record {wrong[0]}")
    return keys


def summarise_scores(records: Sequence[Mapping[str, Any]], *, metrics: Sequence[str] | None = None,
                     dataset: DatasetDefinition = KITS19) -> dict[str, Any]:
    """Summarise per-case scores over cases: statistics per score, ``mean_dice`` and ``cases``.

    Args:
        records: one mapping per case, e.g. :func:`score_case`'s with a ``case_id`` or a
            ``val_loss`` added; a value of ``None`` or NaN is missing. Keys whose values are
            not numbers (such as ``case_id``) are ignored.
        metrics: the score keys to summarise, each present in every record (``records`` may
            then be empty). ``None``: every number (or ``None``) key of the records, which must
            include the dataset's Dice keys (KiTS19: ``kidney_dice`` and ``tumour_dice``) and hold
            at least one case.
        dataset: whose Dice keys make ``mean_dice`` (default KiTS19).

    Returns:
        ``{score: {"mean", "std", "median", "n", "missing"}, ..., "mean_dice", "cases"}``:
        statistics over the ``n`` present values (``std`` the population standard deviation,
        ``ddof=0``), ``missing`` the number of cases without a value, the statistics ``None``
        when ``n`` is 0; ``mean_dice`` the mean of the regions' Dice means (KiTS19: kidney and
        tumour; ``None`` when one is not summarised or has no value); ``cases`` the number of records (int).
    """
    summary: dict[str, Any] = {}
    for key in _score_keys(records, metrics, dataset):
        values = np.array([float(r[key]) for r in records if not _is_missing(r[key])], dtype=np.float64)
        present = values.size > 0
        summary[key] = {
            "mean": float(values.mean()) if present else None,
            "std": float(values.std()) if present else None,
            "median": float(np.median(values)) if present else None,
            "n": int(values.size),
            "missing": len(records) - int(values.size),
        }
    dice_means = [summary[name]["mean"] if name in summary else None for name in dice_names(dataset)]
    summary["mean_dice"] = None if None in dice_means else sum(dice_means) / len(dice_means)
    summary["cases"] = len(records)
    return summary
