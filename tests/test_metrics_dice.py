"""Tests of utils/metrics/dice.py: hand-computed Dice, the empty-mask rules, agreement with MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from utils.metrics.dice import dice


def test_dice_of_hand_made_masks():
    prediction = np.array([1, 1, 1, 0, 0, 0], bool)
    truth = np.array([0, 1, 1, 1, 0, 0], bool)
    assert dice(prediction, truth) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(truth, truth) == 1.0
    assert dice(prediction, ~prediction) == 0.0


def test_dice_empty_rules():
    empty, full = np.zeros((2, 3), np.uint8), np.ones((2, 3), np.uint8)
    assert dice(empty, empty) == 1.0  # nothing to find, nothing found
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0


def test_empty_rules_match_monai_without_ignore_empty():
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    empty, full = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    assert metric(empty, empty).item() == dice(empty, empty) == 1.0
    assert metric(full, empty).item() == dice(full, empty) == 0.0


def test_dice_rejects_different_shapes():
    with pytest.raises(ValueError, match=r"prediction_mask and truth_mask must have the same shape.*\(3, 2\)"):
        dice(np.zeros((2, 3)), np.zeros((3, 2)))
