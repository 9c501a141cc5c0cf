"""Which tumours does a model miss? Each case's tumour described by its size and its contrast
against the kidney, and per-case scores grouped by both.

Two properties of a case's tumour (label 2) predict how hard it is to segment:

* its **volume** in ml; a tumour under :data:`SMALL_TUMOUR_ML` is "small";
* its **contrast**: the mean HU of the tumour minus the mean HU of the kidney (label 1) of the
  same CT. A tumour within :data:`ISODENSE_HU` of its kidney is "isodense": no intensity edge
  separates it from the parenchyma, and a model has to find it by its shape (the bulge of the
  kidney's outline, the missing cortex and medulla pattern) instead.

A case without tumour voxels belongs to no size group; one without tumour or kidney voxels to no
contrast group. :func:`dice_by_group` then gives each group's mean score, so that a change of
recipe can be read as "isodense tumours 0.35 -> 0.45" instead of one number over all cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.data.kits_layout import IMAGING_NAME, KIDNEY_LABEL, SEGMENTATION_NAME, TUMOUR_LABEL, spacing_from_affine
from utils.data.nifti_io import load_nifti, read_voxels

#: A tumour whose mean HU lies within this many HU of its kidney's mean HU is "isodense".
ISODENSE_HU = 35.0
#: A tumour under this many ml is "small".
SMALL_TUMOUR_ML = 20.0
#: The groups of :func:`dice_by_group`, in table order.
GROUPS = ("isodense", "distinct", "small", "large")


@dataclass(frozen=True)
class TumourProfile:
    """One case's tumour: volume, mean HU of tumour and kidney, and the groups they put it in.

    Attributes:
        case_id: e.g. ``"case_00150"``.
        tumour_ml: volume of label 2 in ml (0 without tumour).
        tumour_hu: mean HU of the tumour voxels (``None`` without tumour).
        kidney_hu: mean HU of the kidney voxels (``None`` without kidney).
    """

    case_id: str
    tumour_ml: float
    tumour_hu: float | None
    kidney_hu: float | None

    @property
    def contrast_hu(self) -> float | None:
        """Tumour minus kidney mean HU (``None`` when either is absent)."""
        if self.tumour_hu is None or self.kidney_hu is None:
            return None
        return self.tumour_hu - self.kidney_hu

    @property
    def contrast_group(self) -> str | None:
        """``"isodense"`` (within :data:`ISODENSE_HU` of the kidney), ``"distinct"`` or ``None``."""
        contrast = self.contrast_hu
        if contrast is None:
            return None
        return "isodense" if abs(contrast) < ISODENSE_HU else "distinct"

    @property
    def size_group(self) -> str | None:
        """``"small"`` (under :data:`SMALL_TUMOUR_ML`), ``"large"``, or ``None`` without tumour."""
        if self.tumour_hu is None:
            return None
        return "small" if self.tumour_ml < SMALL_TUMOUR_ML else "large"

    def as_dict(self) -> dict[str, Any]:
        """The profile with its contrast and groups, for JSON reports."""
        return {"case_id": self.case_id, "tumour_ml": self.tumour_ml, "tumour_hu": self.tumour_hu,
                "kidney_hu": self.kidney_hu, "contrast_hu": self.contrast_hu,
                "contrast_group": self.contrast_group, "size_group": self.size_group}


def profile_tumour(case_id: str, image: np.ndarray, labels: np.ndarray, spacing: Sequence[float]) -> TumourProfile:
    """The profile of one CT (HU) and its KiTS19 label map, on the same voxel grid.

    Raises:
        ValueError: image and labels differ in shape, or the spacing is not three positive sizes.
    """
    if image.shape != labels.shape:
        raise ValueError(f"{case_id}: image and labels must have the same shape, got {image.shape} and "
                         f"{labels.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"{case_id}: spacing must be three positive voxel sizes in mm, got {tuple(spacing)}")
    tumour, kidney = labels == TUMOUR_LABEL, labels == KIDNEY_LABEL
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return TumourProfile(case_id, float(tumour.sum()) * voxel_ml,
                         float(image[tumour].mean(dtype=np.float64)) if tumour.any() else None,
                         float(image[kidney].mean(dtype=np.float64)) if kidney.any() else None)


def profile_case_folder(folder: str | Path) -> TumourProfile:
    """The profile of a KiTS-layout case folder (``imaging.nii.gz`` and ``segmentation.nii.gz``).

    Raises:
        FileNotFoundError: a file is missing. ValueError (``NiftiReadError``): a file is unreadable,
        or image and labels differ in shape; the message names the folder.
    """
    folder = Path(folder)
    image_file, label_file = load_nifti(folder / IMAGING_NAME), load_nifti(folder / SEGMENTATION_NAME)
    image, labels = read_voxels(image_file, np.float32), read_voxels(label_file, np.uint8)
    if image.shape != labels.shape:
        raise ValueError(f"{folder}: {IMAGING_NAME} is {image.shape} but {SEGMENTATION_NAME} is {labels.shape}")
    return profile_tumour(folder.name, image, labels, spacing_from_affine(image_file.affine))


def dice_by_group(profiles: Sequence[TumourProfile], scores: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Mean score per group of :data:`GROUPS` over the cases in ``scores`` (per case id).

    Args:
        profiles: one per case (cases without a score are left out of every group).
        scores: case id -> the score to average, e.g. the tumour Dice.

    Returns:
        ``{group: {"cases": n, "mean": mean or None, "case_ids": [...]}}`` for every group.
    """
    members: dict[str, list[str]] = {group: [] for group in GROUPS}
    for profile in profiles:
        if profile.case_id not in scores:
            continue
        for group in (profile.contrast_group, profile.size_group):
            if group is not None:
                members[group].append(profile.case_id)
    return {group: {"cases": len(ids), "mean": float(np.mean([scores[i] for i in ids])) if ids else None,
                    "case_ids": ids} for group, ids in members.items()}
