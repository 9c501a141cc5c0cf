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
Volumes and mean HU come from the dataset statistics (:mod:`utils.analysis.dataset_statistics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.analysis.dataset_statistics import CaseStatistics, compute_case_statistics, compute_label_statistics
from utils.data.case_discovery import CaseFiles
from utils.data.kits_layout import IMAGING_NAME, KIDNEY_LABEL, SEGMENTATION_NAME, TUMOUR_LABEL

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


def profile_from_statistics(statistics: CaseStatistics) -> TumourProfile:
    """The profile of a case whose statistics hold HU (:mod:`utils.analysis.dataset_statistics`).

    Raises:
        ValueError: the statistics were computed without the CT (no HU).
    """
    if statistics.hu is None:
        raise ValueError(f"{statistics.case_id}: its statistics hold no HU (computed without the CT); a tumour "
                         "profile needs them")
    tumour, kidney = statistics.hu[TUMOUR_LABEL], statistics.hu[KIDNEY_LABEL]
    return TumourProfile(statistics.case_id, statistics.tumour_ml, None if tumour is None else tumour.mean,
                         None if kidney is None else kidney.mean)


def profile_tumour(case_id: str, image: np.ndarray, labels: np.ndarray, spacing: Sequence[float]) -> TumourProfile:
    """The profile of one CT (HU) and its KiTS19 label map, on the same voxel grid.

    Raises:
        ValueError: image and labels differ in shape, the spacing is not three positive sizes, or
            the labels are not KiTS19's (the message names the case).
    """
    if np.shape(image) != np.shape(labels):
        raise ValueError(f"{case_id}: image and labels must have the same shape, got {np.shape(image)} and "
                         f"{np.shape(labels)}")
    return profile_from_statistics(compute_label_statistics(case_id, labels, spacing, image))


def profile_case_folder(folder: str | Path) -> TumourProfile:
    """The profile of a KiTS-layout case folder (``imaging.nii.gz`` and ``segmentation.nii.gz``).

    Raises:
        FileNotFoundError: a file is missing. ValueError (``NiftiReadError``): a file is unreadable,
        holds invalid values, or image and labels differ in shape; the message names the folder.
    """
    folder = Path(folder)
    case = CaseFiles(folder.name, folder, folder / IMAGING_NAME, folder / SEGMENTATION_NAME)
    for path in (case.imaging, case.segmentation):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; a tumour profile needs the CT and its segmentation")
    try:
        return profile_from_statistics(compute_case_statistics(case))
    except ValueError as error:
        raise ValueError(f"{folder} ({IMAGING_NAME}, {SEGMENTATION_NAME}): {error}") from error


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
