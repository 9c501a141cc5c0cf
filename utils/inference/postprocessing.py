"""Optional clean-up of a predicted label map: keep the kidneys, drop masses that touch no kidney,
and (when a run has chosen it on its validation cases) call small tumour components kidney.

Up to three steps, all off unless asked for (``scripts/segment.py --postprocess``), for the labels
of the model's dataset (:mod:`utils.data.dataset_definitions`; KiTS19 by default):

1. :func:`keep_largest_kidneys`: the connected components of the foreground (label > 0: kidney
   and tumour together, and for KiTS23 the cyst too) are ranked by volume; at most
   ``max_components`` (2: a person has at most two kidneys) are kept, and only those of at
   least ``min_component_ml`` millilitres; ``rank_by="kidney"`` ranks them by their kidney
   voxels instead (a two-stage model's default, ``cascade.rank_components``). The threshold is
   a physical volume, converted to voxels with the spacing, so it means the same on a 0.5 mm and
   a 5 mm grid.
2. :func:`remove_detached_tumour`: the components of the masses (label 2 tumour; for KiTS23
   labels 2 tumour and 3 cyst, taken together) that do not touch kidney (label 1) are set to
   background. For KiTS19 that is every tumour component touching no kidney; for KiTS23 a cyst
   or tumour is kept when it, or a mass it touches, touches kidney.
3. :func:`relabel_small_tumours`, only with ``min_tumour_ml > 0``: every tumour component (label
   2) smaller than ``min_tumour_ml`` millilitres but the largest becomes kidney (label 1). The kidney region
   (label > 0) is unchanged, so only the tumour scores move. The threshold is not a constant of
   the project: :mod:`utils.evaluation.postprocessing_choice` chooses it on a run's validation
   cases and stores it next to the checkpoint (:data:`CHOICE_FILE`), or on a cross-validated
   experiment's out-of-fold predictions and stores it in the experiment folder (for its fold
   ensemble), and :func:`utils.inference.segment.load_segmentation_model` reads it back for that
   checkpoint (or that set of fold checkpoints) only.

Components are 26-connected (voxels sharing a face, an edge or a corner).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from utils.config.experiment import COMPONENT_RANKINGS
from utils.data.dataset_definitions import KITS19, DatasetDefinition, get_dataset
from utils.data.kits_layout import BACKGROUND_LABEL, KIDNEY_LABEL, TUMOUR_LABEL

logger = logging.getLogger(__name__)

#: Default smallest kidney component kept, in ml (a whole kidney is about 100-200 ml).
DEFAULT_MIN_COMPONENT_ML = 10.0
#: Default largest number of kidney components kept.
DEFAULT_MAX_COMPONENTS = 2
#: How :func:`keep_largest_kidneys` ranks the foreground components: by whole volume or by kidney voxels.
RANKINGS = COMPONENT_RANKINGS
#: The file beside a checkpoint that holds its chosen post-processing (see :func:`read_min_tumour_ml`).
CHOICE_FILE = "postprocessing.json"
_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
_MM3_PER_ML = 1000.0


def _check_labels(labels: np.ndarray, spacing_mm: Sequence[float] | None = None,
                  dataset: DatasetDefinition = KITS19) -> None:
    if not isinstance(labels, np.ndarray) or labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        description = f"{labels.shape} {labels.dtype}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise ValueError(f"labels must be a 3D integer numpy array, got {description}")
    if spacing_mm is not None and (len(spacing_mm) != 3 or min(float(s) for s in spacing_mm) <= 0):
        raise ValueError(f"spacing_mm must be three voxel sizes > 0 mm, one per array axis, got {tuple(spacing_mm)}")
    if labels.size and (int(labels.min()) < BACKGROUND_LABEL or int(labels.max()) > dataset.max_label):
        raise ValueError(f"labels must hold {dataset.title} labels {dataset.describe_labels()}, got values from "
                         f"{int(labels.min())} to {int(labels.max())}")


def mass_labels(dataset: DatasetDefinition | str = KITS19) -> tuple[int, ...]:
    """The labels that make a mass of ``dataset``, which must touch kidney to be kept: every foreground
    label but the kidney's (KiTS19: ``(2,)`` tumour; KiTS23: ``(2, 3)`` tumour and cyst)."""
    return tuple(label for label in get_dataset(dataset).foreground_labels if label != KIDNEY_LABEL)


def keep_largest_kidneys(labels: np.ndarray, spacing_mm: Sequence[float], *,
                         min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
                         max_components: int = DEFAULT_MAX_COMPONENTS,
                         dataset: DatasetDefinition | str = KITS19, rank_by: str = "foreground") -> np.ndarray:
    """Keep the ``max_components`` largest foreground components of at least ``min_component_ml``.

    Args:
        labels: ``(Z, Y, X)`` integer labels of ``dataset`` (KiTS19: 0 background, 1 kidney,
            2 tumour; KiTS23 adds 3 cyst); not modified. The foreground is label > 0.
        spacing_mm: voxel size along each array axis, in mm, in the array's axis order.
        min_component_ml: smallest component volume kept, in ml (>= 0; 0 keeps any size).
        max_components: most components kept (>= 1), the largest first.
        dataset: whose labels (a definition or its name; default KiTS19).
        rank_by: what "largest" means (:data:`RANKINGS`): ``"foreground"`` ranks the components
            by their whole volume, ``"kidney"`` by their kidney voxels (label 1) only, so that a
            large region labelled almost all tumour (a mass with no kidney, e.g. in a neighbouring organ)
            cannot push out a kidney; ties keep the larger foreground first.

    Returns:
        A new array of the same shape and dtype; removed components are background.

    Raises:
        ValueError: not a 3D integer array, a bad spacing, threshold or ranking, or labels outside the
            dataset's.
    """
    dataset = get_dataset(dataset)
    _check_labels(labels, spacing_mm, dataset)
    if min_component_ml < 0:
        raise ValueError(f"min_component_ml must be >= 0 ml, got {min_component_ml}")
    if max_components < 1:
        raise ValueError(f"max_components must be >= 1, got {max_components}")
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")
    components, count = ndimage.label(labels > 0, structure=_CONNECTIVITY)
    voxel_ml = float(np.prod([float(s) for s in spacing_mm])) / _MM3_PER_ML
    volumes_ml = np.bincount(components.ravel(), minlength=count + 1)[1:] * voxel_ml
    if rank_by == "kidney":  # kidney voxels first, then the whole volume
        kidney = np.bincount(components[labels == KIDNEY_LABEL], minlength=count + 1)[1:]
        ranked = np.lexsort((-volumes_ml, -kidney))[:max_components]
    else:
        ranked = np.argsort(-volumes_ml, kind="stable")[:max_components]
    kept = [int(i) + 1 for i in ranked if volumes_ml[i] >= min_component_ml]
    logger.debug("foreground components %s ml; kept %d", np.round(volumes_ml, 2).tolist(), len(kept))
    out = labels.copy()
    out[~np.isin(components, kept)] = BACKGROUND_LABEL
    return out


def remove_detached_tumour(labels: np.ndarray, dataset: DatasetDefinition | str = KITS19) -> np.ndarray:
    """Set to background every mass component that touches no kidney voxel (label 1).

    The masses are :func:`mass_labels`: the tumour (label 2) for KiTS19; tumour and cyst
    (labels 2 and 3, one component where they touch) for KiTS23.

    Args:
        labels: ``(Z, Y, X)`` integer labels of ``dataset``; not modified.
        dataset: whose labels (a definition or its name; default KiTS19).

    Returns:
        A new array of the same shape and dtype.

    Raises:
        ValueError: not a 3D integer array, or labels outside the dataset's.
    """
    dataset = get_dataset(dataset)
    _check_labels(labels, dataset=dataset)
    masses = mass_labels(dataset)
    mask = labels == TUMOUR_LABEL if masses == (TUMOUR_LABEL,) else np.isin(labels, masses)
    components, count = ndimage.label(mask, structure=_CONNECTIVITY)
    out = labels.copy()
    if count == 0:
        return out
    near_kidney = ndimage.binary_dilation(labels == KIDNEY_LABEL, structure=_CONNECTIVITY)
    touching = np.unique(components[near_kidney & (components > 0)])
    out[(components > 0) & ~np.isin(components, touching)] = BACKGROUND_LABEL
    return out


def relabel_small_tumours(labels: np.ndarray, spacing_mm: Sequence[float], min_tumour_ml: float,
                          dataset: DatasetDefinition | str = KITS19) -> np.ndarray:
    """Call every tumour component (label 2) smaller than ``min_tumour_ml`` kidney (label 1), but the largest.

    Meant for the small false tumour components a model scatters through a healthy kidney, beside
    the tumour it found: the kidney region (label > 0) stays as it is, the tumour loses them. The
    largest tumour component is always kept, however small: a small tumour found alone is kept
    (every KiTS case has a tumour). A KiTS23 cyst (label 3) is left alone, and a tumour component
    is measured by its tumour voxels only.

    Args:
        labels: ``(Z, Y, X)`` integer labels of ``dataset``; not modified.
        spacing_mm: voxel size per array axis in mm (converts ``min_tumour_ml`` to voxels).
        min_tumour_ml: components of fewer millilitres are relabelled (>= 0; 0 changes nothing).
        dataset: whose labels (a definition or its name; default KiTS19).

    Returns:
        A new array of the same shape and dtype.

    Raises:
        ValueError: not a 3D integer array, a bad spacing or threshold, or labels outside the dataset's.
    """
    dataset = get_dataset(dataset)
    _check_labels(labels, spacing_mm, dataset)
    if not (isinstance(min_tumour_ml, (int, float)) and math.isfinite(min_tumour_ml) and min_tumour_ml >= 0):
        raise ValueError(f"min_tumour_ml must be a finite volume >= 0 ml, got {min_tumour_ml}")
    out = labels.copy()
    if min_tumour_ml == 0:
        return out
    components, count = ndimage.label(labels == TUMOUR_LABEL, structure=_CONNECTIVITY)
    if count == 0:
        return out
    voxel_ml = float(np.prod([float(s) for s in spacing_mm])) / _MM3_PER_ML
    volumes_ml = np.bincount(components.ravel(), minlength=count + 1)[1:] * voxel_ml
    small = np.flatnonzero(volumes_ml < min_tumour_ml) + 1
    small = small[small != int(np.argmax(volumes_ml)) + 1]  # the largest tumour component always stays
    logger.debug("tumour components %s ml; %d under %g ml relabelled kidney", np.round(volumes_ml, 2).tolist(),
                 small.size, min_tumour_ml)
    out[np.isin(components, small)] = KIDNEY_LABEL
    return out


def postprocess_labels(labels: np.ndarray, spacing_mm: Sequence[float], *,
                       min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
                       max_components: int = DEFAULT_MAX_COMPONENTS,
                       dataset: DatasetDefinition | str = KITS19, rank_by: str = "foreground",
                       min_tumour_ml: float = 0.0) -> np.ndarray:
    """:func:`keep_largest_kidneys`, then :func:`remove_detached_tumour`, then (with ``min_tumour_ml`` > 0)
    :func:`relabel_small_tumours`.

    Args:
        labels: ``(Z, Y, X)`` integer labels of ``dataset``; not modified.
        spacing_mm: voxel size per array axis in mm. min_component_ml, max_components, rank_by: as in
            :func:`keep_largest_kidneys`.
        dataset: whose labels (a definition or its name; default KiTS19): a segmenter's is
            :attr:`utils.inference.segment.SegmentationModel.dataset`.
        min_tumour_ml: as in :func:`relabel_small_tumours` (default 0: off).

    Returns:
        The cleaned labels, same shape and dtype.
    """
    kept = keep_largest_kidneys(labels, spacing_mm, min_component_ml=min_component_ml, max_components=max_components,
                                dataset=dataset, rank_by=rank_by)
    attached = remove_detached_tumour(kept, dataset)
    return relabel_small_tumours(attached, spacing_mm, min_tumour_ml, dataset) if min_tumour_ml else attached


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensemble_sha256(checkpoints: Iterable[str | os.PathLike]) -> str:
    """One hex SHA-256 for the checkpoint files of a fold ensemble.

    The digest of the lines ``"<fold folder>/<file name> <file SHA-256>"``, sorted: it changes when any
    fold's checkpoint changes, is added or is left out, and not with the order the files are given in.
    """
    lines = sorted(f"{Path(path).parent.name}/{Path(path).name} {file_sha256(path)}" for path in checkpoints)
    if not lines:
        raise ValueError("an ensemble needs at least one checkpoint file to hash")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def choice_file(checkpoint: str | os.PathLike) -> Path:
    """Where the choice for ``checkpoint`` is stored: :data:`CHOICE_FILE` beside a checkpoint file, or inside a
    cross-validated experiment's folder (the choice of its fold ensemble)."""
    checkpoint = Path(checkpoint)
    return checkpoint / CHOICE_FILE if checkpoint.is_dir() else checkpoint.parent / CHOICE_FILE


def read_min_tumour_ml(checkpoint: str | os.PathLike, *, sha256: str | None = None) -> float:
    """The ``min_tumour_ml`` chosen for this checkpoint, from its :data:`CHOICE_FILE`; 0 when none.

    A choice holds only for the checkpoint it was made with: the file records that checkpoint's
    name and SHA-256, and a choice made for another file of the folder (e.g. ``best.pt`` when
    ``last.pt`` is loaded), or for an older version of this one (training went on), is not applied
    (a warning says so; 0 is returned).

    Args:
        checkpoint: a checkpoint file, or a cross-validated experiment folder (its fold ensemble).
        sha256: the checkpoint's current SHA-256; required for an experiment folder
            (:func:`ensemble_sha256` of the fold checkpoints the ensemble loads), read from the file
            otherwise.

    Raises:
        ValueError: the choice file is not valid JSON or lacks its fields; the message names the file.
    """
    checkpoint = Path(checkpoint)
    path = choice_file(checkpoint)
    if not path.is_file():
        return 0.0
    try:
        choice = json.loads(path.read_text())
        value, name, recorded = choice["min_tumour_ml"], choice["checkpoint"], choice["checkpoint_sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a post-processing choice ({type(error).__name__}: {error}); expected JSON "
                         "with min_tumour_ml, checkpoint and checkpoint_sha256, as written by "
                         "scripts/choose_postprocessing.py; delete it or choose again") from error
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{path}: min_tumour_ml must be a finite volume >= 0 ml, got {value!r}")
    if name != checkpoint.name:
        logger.info("%s: chosen for %s, not %s; no tumour-size rule applied", path, name, checkpoint.name)
        return 0.0
    if sha256 is None:
        if checkpoint.is_dir():
            raise ValueError(f"{checkpoint}: an experiment folder's choice is checked against the SHA-256 of its "
                             "fold checkpoints (ensemble_sha256); pass sha256")
        sha256 = file_sha256(checkpoint)
    if recorded != sha256:
        logger.warning("%s: chosen for an earlier %s (the checkpoint has changed since, e.g. training went on); "
                       "no tumour-size rule applied: choose again on the new validation predictions", path, name)
        return 0.0
    return float(value)
