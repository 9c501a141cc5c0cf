"""Losses: hand-computed values, what class weights do, label dtypes, gradients, agreement with MONAI."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceCELoss

from utils.config.experiment import LossConfig
from utils.networks.losses import build_loss

NAMES = ("dice_focal", "dice_ce")


def _confident_logits(labels: torch.Tensor, margin: float = 10.0) -> torch.Tensor:
    """``(B, 3, *spatial)`` logits: ``+margin`` on the class in ``labels`` ``(B, 1, *spatial)``, else ``-margin``.

    Confident under softmax (the Dice and cross-entropy terms) and per-channel sigmoid (the focal term).
    """
    one_hot = torch.nn.functional.one_hot(labels[:, 0].long(), 3).movedim(-1, 1).float()
    return margin * (2 * one_hot - 1)


@pytest.fixture
def labels() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 3, (2, 1, 4, 6, 6), dtype=torch.uint8)


def test_uniform_logits_give_the_hand_computed_values():
    # Labels 0, 1, 2, 2 and zero logits: p = 1/3 everywhere. Dice_c = 2 (n_c / 3) / (4/3 + n_c):
    # 2/7 (background), 2/7 (kidney), 2/5 (tumour). Dice term with weights (0, 1, 3), averaged
    # over the 3 classes: (5/7 + 3 * 3/5) / 3 = 88/105.
    labels = torch.tensor([0, 1, 2, 2], dtype=torch.uint8).view(1, 1, 1, 1, 4)
    logits = torch.zeros(1, 3, 1, 1, 4)
    dice_term = 88 / 105
    # Focal (sigmoid per channel, see utils.networks.losses): sigmoid(0) = 1/2, so every element costs
    # (1/2)^2 ln 2 times its channel's weight; per voxel (0 + 1 + 3) ln 2 / 4 = ln 2, averaged
    # over B * C * N = 12 elements: 4 ln 2 / 12.
    focal_term = math.log(2) / 3
    # Cross-entropy: weighted mean of ln 3 is ln 3.
    ce_term = math.log(3)
    focal = build_loss(LossConfig(name="dice_focal", other_weight=0.5))(logits, labels)
    ce = build_loss(LossConfig(name="dice_ce", other_weight=0.5))(logits, labels)
    assert focal.ndim == 0 and focal.item() == pytest.approx(dice_term + 0.5 * focal_term, abs=1e-4)
    assert ce.item() == pytest.approx(dice_term + 0.5 * ce_term, abs=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_right_logits_score_lower_than_wrong_ones(name, labels):
    loss = build_loss(LossConfig(name=name))
    right = loss(_confident_logits(labels), labels)
    wrong = loss(_confident_logits((labels + 1) % 3), labels)
    assert right.item() < 0.01 < 1.0 < wrong.item()


def test_zero_background_weight_drops_the_background_channel_of_the_focal_term(labels):
    # Focal is per channel, weighted by channel: with w_0 = 0 the background logits do not matter,
    # but background voxels still count through the kidney and tumour channels.
    loss = build_loss(LossConfig(name="dice_focal", class_weights=(0.0, 1.0, 3.0), dice_weight=0.0))
    logits = torch.randn(2, 3, 4, 6, 6)
    new_background_channel = logits.clone()
    new_background_channel[:, 0] = torch.randn(2, 4, 6, 6) * 5
    assert loss(new_background_channel, labels).item() == pytest.approx(loss(logits, labels).item(), rel=1e-6)
    at_background_voxels = torch.where(labels == 0, torch.randn_like(logits) * 5, logits)
    assert loss(at_background_voxels, labels).item() != pytest.approx(loss(logits, labels).item(), rel=1e-3)


def test_zero_background_weight_drops_background_voxels_from_the_cross_entropy_term(labels):
    # Cross-entropy is weighted by the true class: with w_0 = 0 the logits of voxels whose truth is
    # background do not matter; with w_0 = 1 they do.
    loss = build_loss(LossConfig(name="dice_ce", class_weights=(0.0, 1.0, 3.0), dice_weight=0.0))
    logits = torch.randn(2, 3, 4, 6, 6)
    at_background_voxels = torch.where(labels == 0, torch.randn_like(logits) * 5, logits)
    assert loss(at_background_voxels, labels).item() == pytest.approx(loss(logits, labels).item(), rel=1e-6)
    weighted = build_loss(LossConfig(name="dice_ce", class_weights=(1.0, 1.0, 3.0), dice_weight=0.0))
    assert weighted(at_background_voxels, labels).item() != pytest.approx(weighted(logits, labels).item(), rel=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_background_only_batch_is_finite_and_still_penalises_false_kidney(name):
    # MONAI's DiceCELoss returns NaN here (0/0 in the weighted cross-entropy); ours does not.
    labels = torch.zeros(2, 1, 4, 4, 4, dtype=torch.uint8)
    loss = build_loss(LossConfig(name=name))
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    value = loss(logits, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    # Kidney everywhere: the kidney Dice alone costs w_1 / C = 1/3.
    assert loss(_confident_logits(labels), labels) < 0.1 < 0.33 < loss(_confident_logits(labels + 1), labels)


def test_background_only_batch_has_no_cross_entropy_with_zero_background_weight():
    labels = torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8)
    loss = build_loss(LossConfig(name="dice_ce", class_weights=(0.0, 1.0, 3.0), dice_weight=0.0))
    logits = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    value = loss(logits, labels)
    value.backward()
    assert value.item() == 0.0 and torch.all(logits.grad == 0)


@pytest.mark.parametrize("name", NAMES)
def test_uint8_and_int64_labels_give_the_same_loss_and_gradients_flow(name, labels):
    loss = build_loss(LossConfig(name=name))
    logits = torch.randn(2, 3, 4, 6, 6, requires_grad=True)
    value = loss(logits, labels)
    assert value.item() == loss(logits, labels.long()).item()
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_2d_inputs_work(name):
    labels = torch.randint(0, 3, (3, 1, 8, 8))
    assert build_loss(LossConfig(name=name))(torch.randn(3, 3, 8, 8), labels).ndim == 0


def test_dice_ce_matches_monai_when_the_batch_has_foreground(labels):
    config = LossConfig(name="dice_ce", class_weights=(0.0, 1.0, 3.0), dice_weight=0.7, other_weight=1.3)
    reference = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True,
                           weight=torch.tensor(config.class_weights), lambda_dice=0.7, lambda_ce=1.3)
    logits = torch.randn(2, 3, 4, 6, 6)
    assert build_loss(config)(logits, labels).item() == pytest.approx(reference(logits, labels.long()).item(),
                                                                       rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_rejected_with_the_shapes(name):
    loss = build_loss(LossConfig(name=name))
    with pytest.raises(ValueError, match="integer or bool"):
        loss(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 4, 4\).*got \(1, 4, 4, 4\)"):
        loss(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 3, \*spatial\)"):
        loss(torch.randn(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.long))


def test_batch_dice_scores_a_tumour_free_sample_through_the_batch():
    # Two samples, both predicted perfectly except that sample 1 has no tumour (and none is
    # predicted). Per-sample Dice: sample 1's tumour Dice is 0/0 -> smoothed 1e-5/1e-5 = 1, loss 0.
    # Now make sample 1 predict a little tumour where there is none: per sample its tumour Dice
    # is 0 (a full w_2 cost), over the batch it only dilutes sample 0's tumour Dice.
    labels = torch.zeros(2, 1, 1, 1, 8, dtype=torch.uint8)
    labels[0, 0, 0, 0, :4] = 2
    labels[1, 0, 0, 0, :4] = 1
    predicted = labels.clone()
    predicted[1, 0, 0, 0, 7] = 2  # one false tumour voxel in the tumour-free sample
    logits = _confident_logits(predicted, margin=30.0)
    weights = (0.0, 0.0, 1.0)  # the tumour Dice alone
    per_sample = build_loss(LossConfig(name="dice_ce", class_weights=weights, other_weight=0.0))(logits, labels)
    batch = build_loss(LossConfig(name="dice_ce", class_weights=weights, other_weight=0.0, batch_dice=True))(
        logits, labels)
    # per sample: mean over B * C = 6 terms of w_c (1 - Dice): only sample 1's tumour costs 1 -> 1/6
    assert per_sample.item() == pytest.approx(1 / 6, abs=1e-4)
    # batch: one tumour Dice over both samples, 2 * 4 / (4 + 5) -> (1 - 8/9) / 3 over C = 3 terms
    assert batch.item() == pytest.approx((1 - 8 / 9) / 3, abs=1e-4)


def test_region_dice_hand_computed_on_kits19_regions():
    # Labels 0, 1, 2, 2 and zero logits: p = 1/3 per class. Kidney region (labels 1, 2): probability
    # 2/3 everywhere against 0, 1, 1, 1 -> Dice 2 * 2 / (8/3 + 3) = 12/17; tumour region (label 2):
    # 1/3 against 0, 0, 1, 1 -> 2/5. Unweighted mean over the two regions of 1 - Dice: 38/85.
    labels = torch.tensor([0, 1, 2, 2], dtype=torch.uint8).view(1, 1, 1, 1, 4)
    loss = build_loss(LossConfig(name="dice_ce", other_weight=0.0, region_dice=True), "kits19")
    assert loss(torch.zeros(1, 3, 1, 1, 4), labels).item() == pytest.approx(38 / 85, abs=1e-4)
    # the cross-entropy term is the class-weighted one as before: ln 3 at uniform logits
    with_ce = build_loss(LossConfig(name="dice_ce", other_weight=0.5, region_dice=True))
    assert with_ce(torch.zeros(1, 3, 1, 1, 4), labels).item() == pytest.approx(38 / 85 + 0.5 * math.log(3), abs=1e-4)


def test_region_dice_charges_tumour_called_kidney_only_to_the_tumour_region(labels):
    # Every tumour voxel confidently called kidney: the kidney region is perfect, the tumour region's
    # Dice is 0, so the region term is exactly (0 + 1) / 2. The class Dice also charges the kidney.
    called_kidney = torch.where(labels == 2, torch.ones_like(labels), labels)
    logits = _confident_logits(called_kidney, margin=30.0)
    region = build_loss(LossConfig(name="dice_ce", class_weights=(1.0, 1.0, 1.0), other_weight=0.0,
                                   batch_dice=True, region_dice=True))
    classes = build_loss(LossConfig(name="dice_ce", class_weights=(1.0, 1.0, 1.0), other_weight=0.0,
                                    batch_dice=True))
    assert region(logits, labels).item() == pytest.approx(0.5, abs=1e-4)
    kidney_dice = 2 * (labels == 1).sum().item() / ((labels == 1).sum().item() + (labels > 0).sum().item())
    assert classes(logits, labels).item() == pytest.approx((1 - kidney_dice + 1) / 3, abs=1e-4)
    assert region(_confident_logits(labels), labels).item() < 1e-3


def test_region_dice_follows_the_kits23_nested_regions():
    # KiTS23: kidney and masses (1, 2, 3), masses (2, 3), tumour (2). A cyst called tumour leaves the
    # first two regions right and costs the tumour region only.
    labels = torch.tensor([0, 1, 2, 3], dtype=torch.uint8).view(1, 1, 1, 1, 4)
    called = torch.tensor([0, 1, 2, 2]).view(1, 1, 1, 1, 4)
    logits = 30.0 * (2 * torch.nn.functional.one_hot(called[:, 0], 4).movedim(-1, 1).float() - 1)
    loss = build_loss(LossConfig(name="dice_ce", class_weights=(1.0, 1.0, 3.0, 1.0), other_weight=0.0,
                                 region_dice=True), "kits23")
    # tumour region: prediction 2 voxels, truth 1, overlap 1 -> Dice 2/3; mean over 3 regions
    assert loss(logits, labels).item() == pytest.approx((1 - 2 / 3) / 3, abs=1e-4)


def test_region_dice_trains_gradients_and_is_refused_where_it_cannot_apply(labels):
    loss = build_loss(LossConfig(name="dice_ce", region_dice=True))
    logits = torch.randn(2, 3, 4, 6, 6, requires_grad=True)
    value = loss(logits, labels)
    value.backward()
    assert torch.isfinite(value) and logits.grad.abs().sum() > 0
    assert build_loss(LossConfig(name="dice_ce", region_dice=True))(torch.randn(3, 3, 8, 8),
                                                                     torch.randint(0, 3, (3, 1, 8, 8))).ndim == 0
    with pytest.raises(ValueError, match="region_dice needs loss.name 'dice_ce'"):
        LossConfig(name="dice_focal", region_dice=True)
    with pytest.raises(ValueError, match="dataset kits23 has 4 labels"):
        build_loss(LossConfig(name="dice_ce", region_dice=True), "kits23")
