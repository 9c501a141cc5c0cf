"""KiTS19 scores of a predicted label map against the truth: kidney and tumour Dice.

Label maps hold ``0`` background, ``1`` kidney, ``2`` tumour, in any shape (usually
``(Z, Y, X)``), as numpy arrays or torch tensors of any integer, bool or float dtype. As in
the KiTS19 challenge:

* kidney Dice: the composite region ``label > 0`` (kidney and tumour together);
* tumour Dice: ``label == 2``;
* ``mean_dice``: the mean of the two, the model-selection criterion.

Dice of two masks ``A`` (prediction) and ``B`` (truth) is ``2 |A and B| / (|A| + |B|)``, counted
in integers (no float copy of a volume). Empty masks: both empty gives 1.0 (nothing to find,
nothing found), exactly one empty gives 0.0.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from utils.data.kits_layout import TUMOUR_LABEL

Array = np.ndarray | torch.Tensor


def _as_same_kind(first: Array, second: Array) -> tuple[Array, Array]:
    """Both as torch tensors when both are tensors (kept on their device), else both as numpy arrays."""
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return first, second.to(first.device)
    as_numpy = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (first, second)]
    return as_numpy[0], as_numpy[1]


def _count(mask: Array) -> int:
    """Number of true (non-zero) elements, as a Python int."""
    if isinstance(mask, torch.Tensor):
        return int(torch.count_nonzero(mask).item())
    return int(np.count_nonzero(mask))


def _check_same_shape(prediction: Array, truth: Array, what: str) -> None:
    if tuple(prediction.shape) != tuple(truth.shape):
        raise ValueError(f"{what} must have the same shape, got prediction {tuple(prediction.shape)} "
                         f"and truth {tuple(truth.shape)}")


def dice(prediction_mask: Array, truth_mask: Array) -> float:
    """Dice coefficient ``2 |A and B| / (|A| + |B|)`` of two binary masks of equal shape.

    Args:
        prediction_mask, truth_mask: arrays or tensors of equal shape; non-zero means inside.

    Returns:
        Dice in ``[0, 1]``; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    prediction_mask, truth_mask = _as_same_kind(prediction_mask, truth_mask)
    _check_same_shape(prediction_mask, truth_mask, "prediction_mask and truth_mask")
    prediction_mask, truth_mask = prediction_mask != 0, truth_mask != 0
    total = _count(prediction_mask) + _count(truth_mask)
    if total == 0:
        return 1.0
    return 2 * _count(prediction_mask & truth_mask) / total


def _check_label_values(labels: Array, name: str) -> None:
    """``ValueError`` unless every label is in ``[0, TUMOUR_LABEL]``."""
    size = labels.numel() if isinstance(labels, torch.Tensor) else labels.size
    if size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(labels.shape)}")
    low, high = float(labels.min()), float(labels.max())
    if low < 0 or high > TUMOUR_LABEL:
        raise ValueError(f"{name} must hold labels 0 (background), 1 (kidney), 2 (tumour), "
                         f"got values from {low:g} to {high:g}")


def score_case(prediction_labels: Array, truth_labels: Array) -> dict[str, float]:
    """KiTS19 Dice scores of one case.

    Args:
        prediction_labels, truth_labels: label maps of equal shape (e.g. ``(Z, Y, X)`` in the
            original image space), values 0/1/2; numpy or torch.

    Returns:
        ``{"kidney_dice": ..., "tumour_dice": ...}``: Dice of ``label > 0`` and of
        ``label == 2``, with the empty rules of :func:`dice`.
    """
    prediction_labels, truth_labels = _as_same_kind(prediction_labels, truth_labels)
    _check_same_shape(prediction_labels, truth_labels, "prediction_labels and truth_labels")
    _check_label_values(prediction_labels, "prediction_labels")
    _check_label_values(truth_labels, "truth_labels")
    return {
        "kidney_dice": dice(prediction_labels > 0, truth_labels > 0),
        "tumour_dice": dice(prediction_labels == TUMOUR_LABEL, truth_labels == TUMOUR_LABEL),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def mean_scores(per_case: list[dict[str, Any]]) -> dict[str, float | int]:
    """Average per-case scores over cases, plus the selection criterion.

    Args:
        per_case: one dict per case, e.g. from :func:`score_case`; every dict has the same
            numeric keys, including ``kidney_dice`` and ``tumour_dice``. Keys whose values are
            not numbers (such as a case id) are left out of the result.

    Returns:
        The mean of every numeric key over cases, ``"mean_dice"`` (mean of the averaged
        kidney and tumour Dice) and ``"cases"`` (number of cases, an int).
    """
    if not per_case:
        raise ValueError("per_case must hold at least one case's scores, got an empty list")
    keys = [key for key, value in per_case[0].items() if _is_number(value)]
    for index, case in enumerate(per_case):
        numeric = {key for key, value in case.items() if _is_number(value)}
        if numeric != set(keys):
            raise ValueError(f"every case must have the same numeric scores; case 0 has {sorted(keys)}, "
                             f"case {index} has {sorted(numeric)}")
    missing = {"kidney_dice", "tumour_dice"} - set(keys)
    if missing:
        raise ValueError(f"per_case scores must include kidney_dice and tumour_dice, missing {sorted(missing)}")
    means: dict[str, float | int] = {key: float(np.mean([float(case[key]) for case in per_case])) for key in keys}
    means["mean_dice"] = (means["kidney_dice"] + means["tumour_dice"]) / 2
    means["cases"] = len(per_case)
    return means
