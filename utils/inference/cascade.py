"""Two-stage segmentation: a locator finds the kidneys, a second model segments only around them.

A model trained with ``cascade.locator`` (:class:`utils.config.experiment.CascadeConfig`) is the
second stage. Its run folder holds a copy of the locator's checkpoint, ``locator.pt``
(:func:`copy_locator`, done when training starts), so the folder segments on its own.
:func:`utils.inference.segment.segment_ct` then runs the locator on the whole CT (post-processed:
its largest kidneys and the masses touching them), takes the box of each located kidney in the
CT's own voxel grid, grows it by ``cascade.margin_mm`` (and to at least one sliding window),
merges boxes that overlap, and segments each box with the second model on its own, finer grid.
Its labels are kept within ``cascade.margin_mm`` of the locator's foreground (:func:`near_located`):
the second model has been trained only around kidneys. Every other voxel is background.

This module holds the geometry (:func:`located_boxes`, :func:`box_affine`) and the locator's
copy; the orchestration lives with the rest of the segmentation in :mod:`utils.inference.segment`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from utils.networks.checkpoints import load_checkpoint

#: The locator's checkpoint inside a second-stage run folder.
LOCATOR_NAME = "locator.pt"

Box = tuple[slice, slice, slice]


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis of an image with this ``(4, 4)`` affine."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _grow(box: Box, margin: np.ndarray, min_size: np.ndarray, shape: Sequence[int]) -> Box:
    """``box`` grown by ``margin`` voxels per side (clipped), then about its centre to ``min_size``
    voxels where the volume allows (a box at an edge grows the other way)."""
    grown = []
    for s, m, least, n in zip(box, margin, min_size, shape, strict=True):
        start, stop = max(0, s.start - int(m)), min(n, s.stop + int(m))
        short = min(int(least), n) - (stop - start)
        if short > 0:
            start, stop = start - short // 2, stop + short - short // 2
            start, stop = (0, stop - start) if start < 0 else (start, stop)
            start, stop = (start - (stop - n), n) if stop > n else (start, stop)
        grown.append(slice(start, stop))
    return tuple(grown)  # type: ignore[return-value]


def _overlap(a: Box, b: Box) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b, strict=True))


def _union(a: Box, b: Box) -> Box:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def located_boxes(labels: np.ndarray, spacing_mm: Sequence[float], margin_mm: float,
                  min_size_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> list[Box]:
    """Boxes around the located kidneys, in the voxel grid of ``labels``, disjoint.

    Args:
        labels: ``(I, J, K)`` labels from the locator (foreground is any label > 0).
        spacing_mm: voxel size along each axis of ``labels``, in mm.
        margin_mm: each connected foreground component's box is grown by this much on every side.
        min_size_mm: each box is then grown (about its centre) to at least this size per axis,
            where the volume allows, so that the second stage always sees one whole window.

    Returns:
        The boxes, clipped to the volume; boxes that overlap are merged into their common box,
        so no voxel lies in two. Empty when ``labels`` has no foreground.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D, got shape {labels.shape}")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing_mm must be three positive sizes, got {list(spacing_mm)}")
    margin = np.ceil(float(margin_mm) / spacing)
    min_size = np.ceil(np.asarray(min_size_mm, dtype=np.float64) / spacing)
    components, _ = ndimage.label(labels > 0)
    boxes = [_grow(box, margin, min_size, labels.shape) for box in ndimage.find_objects(components) if box]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if _overlap(boxes[i], boxes[j]):
                    boxes[i] = _union(boxes[i], boxes.pop(j))
                    merged = True
                    break
            if merged:
                break
    return sorted(boxes, key=lambda box: tuple(s.start for s in box))


def near_located(located: np.ndarray, spacing_mm: Sequence[float], margin_mm: float) -> np.ndarray:
    """Voxels within ``margin_mm`` of the locator's foreground (``located > 0``), boolean, same shape.

    The second stage trains on patches centred on kidney and tumour, so it has seen only the
    surroundings of kidneys: its labels count only near the kidneys the locator found, not in the
    corners of a box grown to a window's size (where, trained without them, it may call liver or
    bowel tumour).
    """
    foreground = located > 0
    if not foreground.any():
        return foreground
    return ndimage.distance_transform_edt(~foreground, sampling=spacing_mm) <= margin_mm


def box_affine(affine: np.ndarray, box: Box) -> np.ndarray:
    """The affine of the sub-volume ``image[box]`` of an image with ``affine``: same axes, shifted origin."""
    shifted = np.array(affine, dtype=np.float64)
    start = np.array([s.start for s in box], dtype=np.float64)
    shifted[:3, 3] = shifted[:3, :3] @ start + shifted[:3, 3]
    return shifted


def check_locator_state(state: dict, path: Path, dataset: str) -> None:
    """Refuse a locator checkpoint that is not a training checkpoint, labels another dataset or is a cascade itself."""
    config = state.get("config")
    if not isinstance(config, dict) or "model" not in state:
        raise ValueError(f"{path}: not a training checkpoint, so it cannot be the locator")
    if config.get("dataset", "kits19") != dataset:
        raise ValueError(f"{path}: the locator was trained on {config.get('dataset', 'kits19')} labels but this "
                         f"model on {dataset}: both stages must label the same dataset")
    if (config.get("cascade") or {}).get("locator"):
        raise ValueError(f"{path}: the locator is itself a second stage (cascade.locator is set in its config); "
                         "use a single-stage run as the locator")


def copy_locator(run_folder: str | os.PathLike, source: str | os.PathLike, dataset: str, *,
                 checked: bool = False) -> Path:
    """Copy the locator's checkpoint file into ``run_folder/locator.pt`` (atomically), after checking it.

    Args:
        run_folder: the second stage's run folder.
        source: the locator's checkpoint file (``utils.inference.segment.find_checkpoint`` finds
            it in a run folder).
        dataset: the second stage's dataset; the locator must label the same.
        checked: the caller has already passed ``source`` through :func:`check_locator_state`
            (it is not read again).

    Returns:
        The copy's path. An existing copy (a resumed run) is kept as it is.

    Raises:
        ValueError: the locator is not a usable first stage (see :func:`check_locator_state`).
        utils.networks.checkpoints.CheckpointError: the file is truncated or corrupt.
    """
    target = Path(run_folder) / LOCATOR_NAME
    if target.is_file():
        return target
    source = Path(source)
    if not checked:
        check_locator_state(load_checkpoint(source, map_location="cpu"), source, dataset)
    handle, temporary = tempfile.mkstemp(prefix=".locator-", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
