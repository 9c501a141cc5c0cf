import itertools

import numpy as np
import pytest

from utils.analysis.intensity_separability import measure_separability


def _brute_force(image, labels):
    """Exhaustive search over integer HU intervals and thresholds, for comparison."""
    values = np.unique(image)
    fg, tumour = labels > 0, labels == 2
    best_interval = 0.0
    for low, high in itertools.combinations_with_replacement(values, 2):
        predicted = (image >= low) & (image <= high)
        best_interval = max(best_interval, 2 * (predicted & fg).sum() / (predicted.sum() + fg.sum()))
    region, target = image[fg], tumour[fg]
    best_threshold = 0.0
    for t in list(values) + [values.max() + 1]:
        for predicted in (region >= t, region < t):
            best_threshold = max(best_threshold, 2 * (predicted & target).sum() / (predicted.sum() + target.sum()))
    return best_interval, best_threshold


def test_hand_computed_example():
    # background at 0 and 100 HU, kidney at 50, tumour at 60: the interval [50, 60] is perfect,
    # and tumour is exactly the part of the foreground at or above 60.
    image = np.array([[[0, 100, 50, 50, 60, 60]]], dtype=np.int16)
    labels = np.array([[[0, 0, 1, 1, 2, 2]]], dtype=np.uint8)
    pooled, per_case = measure_separability([(image, labels)])
    assert pooled.kidney_interval_dice == pytest.approx(1.0)
    assert pooled.kidney_interval_hu == (50, 60)
    assert pooled.tumour_threshold_dice == pytest.approx(1.0)
    assert pooled.tumour_above_threshold and 51 <= pooled.tumour_threshold_hu <= 60
    assert per_case == [pooled]


def test_overlapping_intensities_score_what_exhaustive_search_finds():
    rng = np.random.default_rng(3)
    labels = rng.choice([0, 1, 2], size=(4, 8, 8), p=[0.6, 0.3, 0.1]).astype(np.uint8)
    image = np.rint(rng.normal(np.choose(labels, [40, 60, 55]), 12)).astype(np.int16)
    pooled, _ = measure_separability([(image, labels)])
    interval, threshold = _brute_force(image, labels)
    assert pooled.kidney_interval_dice == pytest.approx(interval)
    assert pooled.tumour_threshold_dice == pytest.approx(threshold)
    assert pooled.kidney_interval_dice < 0.9


def test_pooling_uses_one_rule_for_all_cases():
    # each case alone is separable, but with swapped intensities no single rule fits both
    labels = np.array([[[0, 0, 1, 1]]], dtype=np.uint8)
    first = np.array([[[0, 0, 100, 100]]], dtype=np.int16)
    second = np.array([[[100, 100, 0, 0]]], dtype=np.int16)
    pooled, per_case = measure_separability([(first, labels), (second, labels)])
    assert [c.kidney_interval_dice for c in per_case] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert pooled.kidney_interval_dice == pytest.approx(2 * 4 / (8 + 4))


def test_empty_tumour_scores_zero_and_bad_input_is_refused():
    image = np.zeros((1, 2, 2), np.int16)
    pooled, _ = measure_separability([(image, np.ones((1, 2, 2), np.uint8))])
    assert pooled.tumour_threshold_dice == 0.0
    with pytest.raises(ValueError, match="same shape"):
        measure_separability([(image, np.ones((1, 2, 3), np.uint8))])
    with pytest.raises(ValueError, match="at least one case"):
        measure_separability([])
