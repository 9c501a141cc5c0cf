"""Facts about the KiTS19 dataset layout: file names, label ids, axis order and affine convention.

Every literal that describes the KiTS19 data lives here once, so that loaders, the synthetic
generator, preprocessing and metrics agree.

Axis order: arrays are ``(slices, rows, columns)`` = ``(Z, Y, X)``, exactly as stored in the
KiTS19 NIfTI files. The KiTS19 affine is permuted and negative::

    [[0, 0, -sx, 0],
     [0, -sy, 0, 0],
     [-sz, 0, 0, 0],
     [0, 0, 0, 1]]

so array axis 0 runs inferior (``I``), axis 1 posterior (``P``) and axis 2 to the patient's left
(``L``) in nibabel's RAS+ world. Spacing is therefore read from the norms of the affine's
columns, never from the diagonal.
"""

from __future__ import annotations

import re
from typing import Final

import numpy as np

IMAGING_NAME: Final = "imaging.nii.gz"
SEGMENTATION_NAME: Final = "segmentation.nii.gz"
KITS_JSON_NAME: Final = "kits.json"
CASE_ID_PATTERN: Final = re.compile(r"^case_\d{5}$")

BACKGROUND_LABEL: Final = 0
KIDNEY_LABEL: Final = 1
TUMOUR_LABEL: Final = 2
VALID_LABELS: Final = frozenset({BACKGROUND_LABEL, KIDNEY_LABEL, TUMOUR_LABEL})
LABEL_NAMES: Final = {BACKGROUND_LABEL: "background", KIDNEY_LABEL: "kidney", TUMOUR_LABEL: "tumour"}

#: Lowest and highest HU a stored CT value can take (12-bit CT: air at -1024, top of the scale at 3071).
HU_RANGE: Final = (-1024, 3071)

#: nibabel axis codes of the KiTS19 convention: axis 0 inferior, 1 posterior, 2 patient-left.
KITS_AXCODES: Final = ("I", "P", "L")

#: Largest relative difference between the image and label affines still treated as equal.
AFFINE_RTOL: Final = 1e-4
#: Largest absolute difference (mm) between the image and label affines still treated as equal.
AFFINE_ATOL_MM: Final = 1e-3


def case_id_for_index(index: int) -> str:
    """Return the KiTS19 case id of a case number, e.g. ``7 -> "case_00007"``.

    Args:
        index: case number, 0 <= index <= 99999.
    """
    if not 0 <= index <= 99999:
        raise ValueError(f"case index must be between 0 and 99999, got {index}")
    return f"case_{index:05d}"


def is_case_id(name: str) -> bool:
    """Whether ``name`` is a KiTS19 case folder name (``case_`` followed by five digits)."""
    return bool(CASE_ID_PATTERN.match(name))


def build_kits_affine(spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Return the KiTS19-convention affine for a voxel spacing.

    Args:
        spacing_zyx: voxel size in mm along array axes ``(slice, row, column)``; all > 0.

    Returns:
        ``(4, 4)`` float64 affine mapping ``(z, y, x)`` voxel indices to RAS+ mm.
    """
    sz, sy, sx = (float(s) for s in spacing_zyx)
    if not all(np.isfinite(s) and s > 0 for s in (sz, sy, sx)):
        raise ValueError(f"spacing must be three finite values > 0 mm, got {spacing_zyx}")
    affine = np.zeros((4, 4), dtype=np.float64)
    affine[0, 2] = -sx
    affine[1, 1] = -sy
    affine[2, 0] = -sz
    affine[3, 3] = 1.0
    return affine


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Return the voxel size in mm along each array axis of an image with this affine.

    Works for any orientation, the permuted KiTS19 one included: the spacing of array axis
    ``i`` is the length of the affine's column ``i``.

    Args:
        affine: ``(4, 4)`` voxel-to-world matrix.

    Returns:
        ``(s0, s1, s2)`` in mm, in array-axis order (``(slice, row, column)`` for KiTS19).
    """
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"affine must have shape (4, 4), got {matrix.shape}")
    norms = np.linalg.norm(matrix[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))
