"""Segmentation losses on logits and integer label maps, built from :class:`~utils.config.experiment.LossConfig`.

Every loss here is called as ``loss(logits, labels)``:

* ``logits``: ``(B, C, *spatial)`` float (any float dtype; no softmax applied), ``C`` classes
  in label order, one per label of the dataset (KiTS19: 0 background, 1 kidney, 2 tumour;
  KiTS23 adds 3 cyst), ``C == len(class_weights)``;
* ``labels``: ``(B, 1, *spatial)`` integer or bool class ids (``uint8`` from the cache is
  fine; converted to ``int64`` inside), values in ``[0, C)``;
* returns a scalar float tensor.

How ``class_weights`` ``w = (w_0, ..., w_{C-1})`` act (MONAI 1.6.1, checked in its source; the
examples name KiTS19's classes, KiTS23's cyst channel behaves as the tumour's):

* Dice term (both losses): MONAI ``DiceLoss`` on softmax probabilities and one-hot labels
  computes ``1 - Dice`` per sample and class, multiplies class ``c`` by ``w_c`` and averages
  over ``B * C`` (zero-weight classes still count in the denominator). ``w_0 = 0`` drops the
  background Dice; false positives still cost through the kidney and tumour Dice. A class
  absent from a sample (a patch without tumour) costs nearly ``w_c`` unless its predicted
  probabilities sum to about 0 (MONAI's smoothing terms are 1e-5). With ``batch_dice`` the
  sums run over the whole batch (MONAI ``batch=True``): one Dice per class, averaged over
  ``C``, so a tumour-free patch costs only through its false-positive tumour probabilities.
* Focal term (``dice_focal``): MONAI ``DiceFocalLoss`` does not pass ``softmax`` on to its
  ``FocalLoss`` (MONAI issue #8242), so the focal term is the *sigmoid* focal loss of each
  channel against its one-hot channel, one-vs-rest: element ``(b, c, v)`` costs
  ``w_c * (1 - p_t)^gamma * -log p_t`` with ``p = sigmoid(logit_c)``, ``p_t = p`` where the
  voxel is class ``c`` and ``1 - p`` elsewhere; the mean is over ``B * C * voxels``. So ``w_c``
  weights the whole channel ``c``, positives and negatives alike: ``w_0 = 0`` drops the
  background channel, while background voxels still cost through the negatives of the kidney
  and tumour channels (a false kidney is penalised by both terms).
* Region Dice (``dice_ce`` with ``region_dice``): the Dice term is computed on the dataset's
  evaluation regions instead of its classes. A region's probability is the sum of its labels'
  softmax probabilities (KiTS19: kidney region ``p_1 + p_2`` against label > 0, tumour ``p_2``
  against label 2; KiTS23: its three nested regions), its target the union of its labels; the
  term is ``1 - Dice`` averaged over the regions, unweighted, per sample or (``batch_dice``) over
  the batch, with MONAI's smoothing. Background is not a region. A tumour voxel called kidney
  then costs only the tumour region's Dice: the kidney region, which holds the tumour, is right.
* Cross-entropy term (``dice_ce``): softmax cross-entropy weighted by the true class,
  ``sum(w_y * -log p_y) / sum(w_y)`` over all voxels, as ``torch.nn.CrossEntropyLoss(weight=w)``
  in MONAI ``DiceCELoss``. ``w_0 = 0``: voxels whose truth is background contribute nothing,
  so false positives cost only through the Dice term. Where no voxel of the batch has a
  positive-weight class (a background-only batch with ``w_0 = 0``) torch and MONAI return NaN
  (0/0); here the term is 0 instead and the batch trains on the Dice term alone.
"""

from __future__ import annotations

import torch
from monai.losses import DiceFocalLoss, DiceLoss
from torch.nn import functional as F

from utils.config.experiment import LOSS_NAMES, LossConfig
from utils.data.dataset_definitions import get_dataset


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Validate shapes and dtypes; return ``labels`` as ``int64``."""
    if not torch.is_floating_point(logits):
        raise ValueError(f"logits must be a float tensor, got dtype {logits.dtype}")
    if logits.ndim < 3 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must have shape (B, {num_classes}, *spatial), got {tuple(logits.shape)}")
    expected = (logits.shape[0], 1, *logits.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(f"labels must have shape (B, 1, *spatial) = {expected} to match logits, "
                         f"got {tuple(labels.shape)}")
    if torch.is_floating_point(labels) or torch.is_complex(labels):
        raise ValueError(f"labels must be an integer or bool tensor of class ids, got dtype {labels.dtype}")
    return labels.long()


class DiceFocal(torch.nn.Module):
    """MONAI ``DiceFocalLoss``: softmax Dice plus per-channel sigmoid focal, background included, class-weighted."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.num_classes = len(config.class_weights)
        self.loss = DiceFocalLoss(
            include_background=True, to_onehot_y=True, softmax=True, weight=list(config.class_weights),
            gamma=config.focal_gamma, lambda_dice=config.dice_weight, lambda_focal=config.other_weight,
            batch=config.batch_dice)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss of ``(B, C, *spatial)`` float logits against ``(B, 1, *spatial)`` integer labels."""
        return self.loss(logits, _check_inputs(logits, labels, self.num_classes))


class RegionDice(torch.nn.Module):
    """``1 - Dice`` of softmax probabilities summed into label regions, averaged over the regions.

    Args:
        regions: one tuple of label ids per region (each a union of labels, e.g. ``(1, 2)``).
        num_classes: the number of logit channels.
        batch: one Dice per region over the whole batch instead of one per sample.
    """

    def __init__(self, regions: tuple[tuple[int, ...], ...], num_classes: int, batch: bool) -> None:
        super().__init__()
        if not regions:
            raise ValueError("region Dice needs at least one region")
        bad = sorted({label for region in regions for label in region if not 0 <= label < num_classes})
        if bad:
            raise ValueError(f"region labels {bad} are not among the {num_classes} classes")
        membership = torch.zeros(len(regions), num_classes)
        for index, region in enumerate(regions):
            membership[index, list(region)] = 1.0
        # (R, C): row r sums the probabilities (and one-hot labels) of region r's classes.
        self.register_buffer("membership", membership)
        self.dice = DiceLoss(include_background=True, to_onehot_y=False, softmax=False, batch=batch)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(B, C, *spatial)`` float, ``labels`` ``(B, 1, *spatial)`` int64; a scalar."""
        membership = self.membership.to(device=logits.device, dtype=torch.float32)
        probabilities = torch.softmax(logits.float(), dim=1)
        region_probabilities = torch.einsum("rc,bc...->br...", membership, probabilities)
        region_targets = membership[:, labels[:, 0]].movedim(0, 1)
        return self.dice(region_probabilities, region_targets)


class DiceCrossEntropy(torch.nn.Module):
    """Dice plus class-weighted cross-entropy, as MONAI ``DiceCELoss``, with 0 for an all-zero-weight batch.

    Equal to ``DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, weight=w,
    lambda_dice=dice_weight, lambda_ce=other_weight)`` whenever some voxel's class has a
    positive weight; see the module docstring for the other case.
    """

    def __init__(self, config: LossConfig, regions: tuple[tuple[int, ...], ...] | None = None) -> None:
        super().__init__()
        self.num_classes = len(config.class_weights)
        if regions is None:
            self.dice = DiceLoss(include_background=True, to_onehot_y=True, softmax=True,
                                 weight=list(config.class_weights), batch=config.batch_dice)
        else:
            self.dice = RegionDice(regions, self.num_classes, batch=config.batch_dice)
        self.register_buffer("class_weights", torch.tensor(config.class_weights, dtype=torch.float32))
        self.dice_weight, self.ce_weight = config.dice_weight, config.other_weight

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``sum(w_y * -log p_y) / sum(w_y)`` over all voxels; 0 when ``sum(w_y) == 0``.

        Args:
            logits: ``(B, C, *spatial)`` float. labels: ``(B, *spatial)`` int64.
        """
        weights = self.class_weights.to(device=logits.device, dtype=torch.float32)
        per_voxel = F.cross_entropy(logits.float(), labels, weight=weights, reduction="sum")
        total_weight = weights[labels].sum()
        # The numerator is exactly 0 when the total weight is 0, so the clamp only avoids 0/0.
        return per_voxel / total_weight.clamp_min(torch.finfo(torch.float32).tiny)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss of ``(B, C, *spatial)`` float logits against ``(B, 1, *spatial)`` integer labels."""
        labels = _check_inputs(logits, labels, self.num_classes)
        dice = self.dice(logits, labels)
        return self.dice_weight * dice + self.ce_weight * self.cross_entropy(logits, labels[:, 0])


_LOSSES: dict[str, type[torch.nn.Module]] = {"dice_focal": DiceFocal, "dice_ce": DiceCrossEntropy}


def build_loss(config: LossConfig, dataset: str = "kits19") -> torch.nn.Module:
    """Build the loss named by ``config.name`` (``"dice_focal"`` or ``"dice_ce"``).

    Args:
        config: the loss section: name, ``class_weights`` (one per label: background, kidney,
            tumour, and for KiTS23 cyst; used by both terms), ``dice_weight`` and
            ``other_weight`` (the focal or cross-entropy term's factor), ``focal_gamma``,
            ``batch_dice``, ``region_dice``.
        dataset: the experiment's dataset (``kits19`` or ``kits23``): its evaluation regions are
            the regions of ``region_dice``.

    Returns:
        A module called as ``loss(logits, labels)``: logits ``(B, C, *spatial)`` float, labels
        ``(B, 1, *spatial)`` integer (e.g. uint8), ``C == len(class_weights)``; returns a scalar.
        Works for 3D ``(Z, Y, X)`` and 2D ``(Y, X)`` spatial axes alike.
    """
    if config.name not in _LOSSES:
        raise ValueError(f"loss name must be one of {list(LOSS_NAMES)}, got {config.name!r}")
    if config.region_dice:
        definition = get_dataset(dataset)
        if len(config.class_weights) != len(definition.labels):
            raise ValueError(f"loss.class_weights has {len(config.class_weights)} entries, but dataset "
                             f"{dataset} has {len(definition.labels)} labels, background included")
        regions = tuple(tuple(sorted(region.labels)) for region in definition.regions)
        return DiceCrossEntropy(config, regions)
    return _LOSSES[config.name](config)
