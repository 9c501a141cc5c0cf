"""Optional clean-up of a predicted label map: keep the kidneys, drop tumour that touches no kidney.

Two steps, both off unless asked for (``scripts/segment.py --postprocess``):

1. :func:`keep_largest_kidneys`: the connected components of the foreground (label > 0, kidney
   and tumour together) are ranked by volume; at most ``max_components`` (2: a person has at
   most two kidneys) are kept, and only those of at least ``min_component_ml`` millilitres. The
   threshold is a physical volume, converted to voxels with the spacing, so it means the same
   on a 0.5 mm and a 5 mm grid.
2. :func:`remove_detached_tumour`: tumour (label 2) components that do not touch kidney
   (label 1) are set to background.

Components are 26-connected (voxels sharing a face, an edge or a corner).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from utils.data.kits_layout import BACKGROUND_LABEL, KIDNEY_LABEL, TUMOUR_LABEL

logger = logging.getLogger(__name__)

#: Default smallest kidney component kept, in ml (a whole kidney is about 100-200 ml).
DEFAULT_MIN_COMPONENT_ML = 10.0
#: Default largest number of kidney components kept.
DEFAULT_MAX_COMPONENTS = 2
_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
_MM3_PER_ML = 1000.0


def _check_labels(labels: np.ndarray, spacing_mm: Sequence[float] | None = None) -> None:
    if not isinstance(labels, np.ndarray) or labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        description = f"{labels.shape} {labels.dtype}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise ValueError(f"labels must be a 3D integer numpy array, got {description}")
    if spacing_mm is not None and (len(spacing_mm) != 3 or min(float(s) for s in spacing_mm) <= 0):
        raise ValueError(f"spacing_mm must be three voxel sizes > 0 mm, one per array axis, got {tuple(spacing_mm)}")


def keep_largest_kidneys(labels: np.ndarray, spacing_mm: Sequence[float], *,
                         min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
                         max_components: int = DEFAULT_MAX_COMPONENTS) -> np.ndarray:
    """Keep the ``max_components`` largest foreground components of at least ``min_component_ml``.

    Args:
        labels: ``(Z, Y, X)`` integer labels (0 background, 1 kidney, 2 tumour); not modified.
        spacing_mm: voxel size along each array axis, in mm, in the array's axis order.
        min_component_ml: smallest component volume kept, in ml (>= 0; 0 keeps any size).
        max_components: most components kept (>= 1), the largest first.

    Returns:
        A new array of the same shape and dtype; removed components are background.
    """
    _check_labels(labels, spacing_mm)
    if min_component_ml < 0:
        raise ValueError(f"min_component_ml must be >= 0 ml, got {min_component_ml}")
    if max_components < 1:
        raise ValueError(f"max_components must be >= 1, got {max_components}")
    components, count = ndimage.label(labels > 0, structure=_CONNECTIVITY)
    voxel_ml = float(np.prod([float(s) for s in spacing_mm])) / _MM3_PER_ML
    volumes_ml = np.bincount(components.ravel(), minlength=count + 1)[1:] * voxel_ml
    ranked = np.argsort(-volumes_ml, kind="stable")[:max_components]
    kept = [int(i) + 1 for i in ranked if volumes_ml[i] >= min_component_ml]
    logger.debug("foreground components %s ml; kept %d", np.round(volumes_ml, 2).tolist(), len(kept))
    out = labels.copy()
    out[~np.isin(components, kept)] = BACKGROUND_LABEL
    return out


def remove_detached_tumour(labels: np.ndarray) -> np.ndarray:
    """Set to background every tumour component (label 2) that touches no kidney voxel (label 1).

    Args:
        labels: ``(Z, Y, X)`` integer labels; not modified.

    Returns:
        A new array of the same shape and dtype.
    """
    _check_labels(labels)
    tumours, count = ndimage.label(labels == TUMOUR_LABEL, structure=_CONNECTIVITY)
    out = labels.copy()
    if count == 0:
        return out
    near_kidney = ndimage.binary_dilation(labels == KIDNEY_LABEL, structure=_CONNECTIVITY)
    touching = np.unique(tumours[near_kidney & (tumours > 0)])
    out[(tumours > 0) & ~np.isin(tumours, touching)] = BACKGROUND_LABEL
    return out


def postprocess_labels(labels: np.ndarray, spacing_mm: Sequence[float], *,
                       min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
                       max_components: int = DEFAULT_MAX_COMPONENTS) -> np.ndarray:
    """:func:`keep_largest_kidneys`, then :func:`remove_detached_tumour`.

    Args:
        labels: ``(Z, Y, X)`` integer labels; not modified.
        spacing_mm: voxel size per array axis in mm. min_component_ml, max_components: as in
            :func:`keep_largest_kidneys`.

    Returns:
        The cleaned labels, same shape and dtype.
    """
    kept = keep_largest_kidneys(labels, spacing_mm, min_component_ml=min_component_ml, max_components=max_components)
    return remove_detached_tumour(kept)
