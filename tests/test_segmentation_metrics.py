"""KiTS19 metrics: hand-computed Dice, the empty-mask rules, case scores, means, agreement with MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from utils.metrics.dice import dice, mean_scores, score_case


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


def test_score_case_uses_the_composite_kidney_and_the_tumour():
    # Truth: kidney 0 1 1 1, tumour at voxel 3; prediction calls voxel 3 kidney and voxel 4 tumour.
    truth = np.array([[0, 1, 1, 2, 0, 0]], np.uint8)
    prediction = np.array([[0, 1, 1, 1, 2, 0]], np.uint8)
    scores = score_case(prediction, truth)
    assert scores["kidney_dice"] == pytest.approx(2 * 3 / (4 + 3))  # label > 0: {1, 2, 3, 4} vs {1, 2, 3}
    assert scores["tumour_dice"] == 0.0
    assert score_case(np.zeros((2, 2)), np.zeros((2, 2))) == {"kidney_dice": 1.0, "tumour_dice": 1.0}


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    prediction, truth = rng.integers(0, 3, (4, 5, 6), dtype=np.uint8), rng.integers(0, 3, (4, 5, 6), dtype=np.uint8)
    expected = score_case(prediction, truth)
    assert score_case(torch.from_numpy(prediction), torch.from_numpy(truth)) == pytest.approx(expected)
    assert score_case(torch.from_numpy(prediction), truth.astype(np.int64)) == pytest.approx(expected)


def test_score_case_rejects_different_shapes_and_unknown_labels():
    with pytest.raises(ValueError, match=r"prediction \(2, 3\) and truth \(3, 2\)"):
        score_case(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="labels 0.*got values from 0 to 3"):
        score_case(np.array([0, 3]), np.array([0, 1]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_matches_monai_dice_metric_on_random_label_maps(seed):
    generator = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 3, (1, 1, 6, 7, 8), generator=generator)
    prediction = torch.where(torch.rand(truth.shape, generator=generator) < 0.3,
                             torch.randint(0, 3, truth.shape, generator=generator), truth)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)

    def one_hot(labels, classes):
        return torch.nn.functional.one_hot(labels[:, 0], classes).movedim(-1, 1)

    tumour = metric(one_hot(prediction, 3), one_hot(truth, 3))[0, 2].item()
    kidney = metric(one_hot((prediction > 0).long(), 2), one_hot((truth > 0).long(), 2))[0, 1].item()
    scores = score_case(prediction[0, 0], truth[0, 0])
    assert scores["tumour_dice"] == pytest.approx(tumour, abs=1e-6)
    assert scores["kidney_dice"] == pytest.approx(kidney, abs=1e-6)


def test_empty_rules_match_monai_without_ignore_empty():
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    empty, full = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    assert metric(empty, empty).item() == dice(empty, empty) == 1.0
    assert metric(full, empty).item() == dice(full, empty) == 0.0


def test_mean_scores_averages_each_key_and_adds_the_selection_criterion():
    per_case = [{"case_id": "case_00001", "kidney_dice": 0.9, "tumour_dice": 0.5},
                {"case_id": "case_00002", "kidney_dice": 0.7, "tumour_dice": 0.1}]
    summary = mean_scores(per_case)
    assert summary == pytest.approx({"kidney_dice": 0.8, "tumour_dice": 0.3, "mean_dice": 0.55, "cases": 2})
    assert isinstance(summary["cases"], int) and "case_id" not in summary


def test_mean_scores_rejects_empty_and_inconsistent_input():
    with pytest.raises(ValueError, match="at least one case"):
        mean_scores([])
    with pytest.raises(ValueError, match="same numeric scores"):
        mean_scores([{"kidney_dice": 1.0, "tumour_dice": 1.0}, {"kidney_dice": 1.0}])
    with pytest.raises(ValueError, match=r"missing \['tumour_dice'\]"):
        mean_scores([{"kidney_dice": 1.0}])
