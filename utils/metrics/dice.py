"""Dice coefficient of two binary masks, on any grid.

Masks are numpy arrays or torch tensors of any shape, integer, bool or float dtype; non-zero
means inside. Dice of ``A`` (prediction) and ``B`` (truth) is ``2 |A and B| / (|A| + |B|)``,
counted in integers (no float copy of a volume). Empty masks: both empty gives 1.0 (nothing to
find, nothing found), exactly one empty gives 0.0. The KiTS19 structures (kidney, tumour) and
the per-case scores are in :mod:`utils.metrics.scoring`.
"""

from __future__ import annotations

import numpy as np
import torch

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


def dice(prediction_mask: Array, truth_mask: Array) -> float:
    """Dice coefficient ``2 |A and B| / (|A| + |B|)`` of two binary masks of equal shape.

    Args:
        prediction_mask, truth_mask: arrays or tensors of equal shape; non-zero means inside.

    Returns:
        Dice in ``[0, 1]``; 1.0 when both masks are empty, 0.0 when exactly one is.

    Raises:
        ValueError: the shapes differ.
    """
    prediction_mask, truth_mask = _as_same_kind(prediction_mask, truth_mask)
    if tuple(prediction_mask.shape) != tuple(truth_mask.shape):
        raise ValueError(f"prediction_mask and truth_mask must have the same shape, got prediction "
                         f"{tuple(prediction_mask.shape)} and truth {tuple(truth_mask.shape)}")
    prediction_mask, truth_mask = prediction_mask != 0, truth_mask != 0
    total = _count(prediction_mask) + _count(truth_mask)
    if total == 0:
        return 1.0
    return 2 * _count(prediction_mask & truth_mask) / total
