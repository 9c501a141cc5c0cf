"""How well can intensity alone segment kidney and tumour? A floor that any model must beat.

Two measures, both exact optima over integer HU computed from histograms:

* the best single HU interval ``[low, high]`` used as a kidney+tumour (label > 0) classifier
  over the whole volume, scored with the composite kidney Dice;
* inside the true kidney+tumour region, the best single HU threshold (tumour above it, or
  below it) scored with the tumour (label == 2) Dice.

Both pool voxels over all given cases (one rule for the whole set) and are also reported per
case. A synthetic dataset on which these scores are high would be too easy to say anything
about a model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from utils.analysis.dataset_statistics import HU_HISTOGRAM_RANGE
from utils.data.kits_layout import TUMOUR_LABEL


@dataclass(frozen=True)
class Separability:
    """Best intensity-only scores: composite kidney Dice of a HU interval, tumour Dice of a threshold."""

    kidney_interval_dice: float
    kidney_interval_hu: tuple[int, int]
    tumour_threshold_dice: float
    tumour_threshold_hu: int
    tumour_above_threshold: bool


def _histogram(values: np.ndarray) -> np.ndarray:
    clipped = (np.clip(np.rint(values), HU_HISTOGRAM_RANGE[0], HU_HISTOGRAM_RANGE[1] - 1).astype(np.int64)
               - HU_HISTOGRAM_RANGE[0])
    return np.bincount(clipped.ravel(), minlength=HU_HISTOGRAM_RANGE[1] - HU_HISTOGRAM_RANGE[0]).astype(np.float64)


def best_interval_dice(all_hist: np.ndarray, target_hist: np.ndarray) -> tuple[float, tuple[int, int]]:
    """Best Dice of "voxel HU in [low, high]" against a target, from per-HU histograms.

    Args:
        all_hist: voxel counts per integer HU of the whole volume(s), length ``n``.
        target_hist: counts of the target's voxels per HU (same bins).

    Returns:
        ``(dice, (low, high))`` with inclusive HU bounds; Dice 0 and ``(0, 0)`` for an empty target.
    """
    target_total = target_hist.sum()
    if target_total == 0:
        return 0.0, (0, 0)
    cum_all = np.concatenate([[0.0], np.cumsum(all_hist)])
    cum_target = np.concatenate([[0.0], np.cumsum(target_hist)])
    occupied = np.flatnonzero(target_hist) # optimal bounds lie on bins the target occupies
    best, bounds = 0.0, (0, 0)
    for start in occupied:
        ends = occupied[occupied >= start] + 1
        dice = 2 * (cum_target[ends] - cum_target[start]) / (cum_all[ends] - cum_all[start] + target_total)
        k = int(np.argmax(dice))
        if dice[k] > best:
            best, bounds = float(dice[k]), (int(start) + HU_HISTOGRAM_RANGE[0],
                                            int(ends[k]) - 1 + HU_HISTOGRAM_RANGE[0])
    return best, bounds


def best_threshold_dice(region_hist: np.ndarray, target_hist: np.ndarray) -> tuple[float, int, bool]:
    """Best Dice of "HU >= t" or "HU < t" against a target inside a region, from histograms.

    Returns:
        ``(dice, t, above)``; ``above`` says whether the target is the part at or above ``t``.
    """
    target_total = target_hist.sum()
    if target_total == 0:
        return 0.0, 0, True
    cum_region = np.concatenate([[0.0], np.cumsum(region_hist)])
    cum_target = np.concatenate([[0.0], np.cumsum(target_hist)])
    below = 2 * cum_target / (cum_region + target_total)
    above = 2 * (target_total - cum_target) / (cum_region[-1] - cum_region + target_total)
    k_below, k_above = int(np.argmax(below)), int(np.argmax(above))
    if above[k_above] >= below[k_below]:
        return float(above[k_above]), k_above + HU_HISTOGRAM_RANGE[0], True
    return float(below[k_below]), k_below + HU_HISTOGRAM_RANGE[0], False


def measure_separability(cases: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[Separability, list[Separability]]:
    """Pooled and per-case intensity-only scores of (image HU, KiTS19 labels) pairs.

    Args:
        cases: pairs of ``(Z, Y, X)`` arrays: CT in HU and labels in {0, 1, 2}.

    Returns:
        ``(pooled, per_case)``: one rule for all cases together, and the best rule per case.
    """
    size = HU_HISTOGRAM_RANGE[1] - HU_HISTOGRAM_RANGE[0]
    totals = {key: np.zeros(size) for key in ("all", "foreground", "tumour")}
    per_case = []
    for image, labels in cases:
        if image.shape != labels.shape:
            raise ValueError(f"image and labels must have the same shape, got {image.shape} and {labels.shape}")
        hists = {"all": _histogram(image), "foreground": _histogram(image[labels > 0]),
                 "tumour": _histogram(image[labels == TUMOUR_LABEL])}
        for key, hist in hists.items():
            totals[key] += hist
        per_case.append(_score(hists))
    if not per_case:
        raise ValueError("measure_separability needs at least one case")
    return _score(totals), per_case


def _score(hists: dict[str, np.ndarray]) -> Separability:
    kidney, interval = best_interval_dice(hists["all"], hists["foreground"])
    tumour, threshold, above = best_threshold_dice(hists["foreground"], hists["tumour"])
    return Separability(kidney, interval, tumour, threshold, above)
