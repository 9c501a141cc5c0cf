"""Static slice figures of one case in any plane: label overlays and per-class error maps.

Arrays are as the toolkit loads them: CT ``(Z, Y, X)`` in HU, label maps ``(Z, Y, X)`` with
{0 background, 1 kidney, 2 tumour} (KiTS23 adds 3 cyst, drawn in
:data:`utils.figures.drawing.CYST_COLOUR`), spacing ``(z, y, x)`` in mm. Error maps have one
column per scored structure of the dataset (:func:`error_map_structures`): KiTS19's kidney and
tumour; KiTS23's hierarchical evaluation regions and the cyst. Each panel is drawn at its
physical aspect ratio (a 5 mm slice thickness does not squash a coronal view). Orientation follows
the KiTS19 axes (axis 0 runs inferior, 1 posterior, 2 to the patient's left), shown without
flips: axial has anterior at the top and the patient's left on the right (radiological);
coronal and sagittal have superior at the top. Every function returns the figure; nothing is
shown, global matplotlib state is never touched, and a figure is saved only when ``path`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from utils.data.dataset_definitions import CYST_LABEL, KITS19, DatasetDefinition, get_dataset
from utils.data.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL
from utils.figures.drawing import (
    ALL_LABEL_COLOURS,
    CYST_COLOUR,
    DISPLAY_WINDOW_HU,
    LABEL_COLOURS,
    save_figure,
    shows_cyst,
)

#: Volume axis held fixed by each plane; the two remaining axes are (rows, columns) of a panel.
PLANE_AXES: Final = {"axial": 0, "coronal": 1, "sagittal": 2}
SLICE_MODES: Final = ("centre", "tumour", "labelled")
OVERLAY_STYLES: Final = ("fill", "contour")
#: Error-map colours (Okabe-Ito, distinct from the label colours and from each other).
ERROR_COLOURS: Final = {"true positive": "#f0e442", "false positive": "#cc79a7",
                        "false negative": "#56b4e9"}
#: Opacity of filled labels and error classes over the CT.
FILL_ALPHA: Final = 0.5
_CLASS_MASKS: Final = {"kidney": lambda labels: labels >= KIDNEY_LABEL,
                       "tumour": lambda labels: labels == TUMOUR_LABEL}

SliceSpec = None | str | int | Sequence[int]


def error_map_structures(dataset: DatasetDefinition | str = KITS19) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The structures an error map shows, one column each, by name: the mask of a label map.

    KiTS19: ``kidney`` (label > 0) and ``tumour`` (label 2), its scored structures. Another
    dataset: its evaluation regions, named in words (KiTS23: ``kidney and masses`` {1, 2, 3},
    ``masses`` {2, 3}, ``tumour`` {2}), then each label no region scores alone (KiTS23:
    ``cyst``, label 3), so a cyst taken for a tumour shows as its own error.
    """
    dataset = get_dataset(dataset)
    if dataset is KITS19:
        return dict(_CLASS_MASKS)
    structures: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        region.name.replace("_", " "): region.mask for region in dataset.regions}
    alone = {next(iter(region.labels)) for region in dataset.regions if len(region.labels) == 1}
    for label in dataset.foreground_labels:
        if label not in alone and label != KIDNEY_LABEL:
            structures[dataset.labels[label]] = lambda labels, label=label: np.asarray(labels) == label
    return structures


def _check_plane(plane: str) -> int:
    if plane not in PLANE_AXES:
        raise ValueError(f"plane must be one of {sorted(PLANE_AXES)}, got {plane!r}")
    return PLANE_AXES[plane]


def _check_inputs(image: np.ndarray, spacing: Sequence[float], **labels: np.ndarray | None) -> None:
    if np.ndim(image) != 3:
        raise ValueError(f"image must be a (Z, Y, X) volume, got shape {np.shape(image)}")
    for name, volume in labels.items():
        if volume is not None and np.shape(volume) != np.shape(image):
            raise ValueError(f"{name} must have the image's shape {np.shape(image)}, got {np.shape(volume)}")
    values = np.asarray(spacing, dtype=float)
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be three positive (z, y, x) values in mm, got {spacing!r}")


def _extent_slices(mask_along_axis: np.ndarray, n: int) -> list[int]:
    """``n`` indices evenly spaced inside the first..last True entry (ends excluded when n > 1)."""
    present = np.nonzero(mask_along_axis)[0]
    low, high = int(present[0]), int(present[-1])
    positions = np.linspace(low, high, n + 2)[1:-1] if n > 1 else [(low + high) / 2]
    return sorted({int(round(float(p))) for p in positions})


def choose_slices(labels: np.ndarray, plane: str = "axial", mode: SliceSpec = "centre",
                  n: int = 3) -> list[int]:
    """Indices of the slices to show along ``plane``'s fixed axis.

    Args:
        labels: ``(Z, Y, X)`` label map {0, 1, 2} (KiTS23: also 3, cyst).
        plane: ``"axial"`` (fixes Z), ``"coronal"`` (fixes Y) or ``"sagittal"`` (fixes X).
        mode: ``"centre"`` (default; one slice through the tumour's centre, else the masses'
            (tumour or cyst, label >= 2), else the kidneys', else the middle), ``"tumour"`` (``n``
            evenly spaced across the tumour's extent, else the masses', else the kidneys', else
            the whole axis), ``"labelled"`` (``n`` evenly spaced across the
            extent of label > 0, else the whole axis), an ``int`` or a sequence of ints (used as
            given after validation; negative indices are rejected).
        n: number of slices for the evenly spaced modes (>= 1); fewer are returned when the
            extent is thinner than ``n`` slices.

    Returns:
        Sorted (modes) or given (indices) list of slice indices.
    """
    axis = _check_plane(plane)
    if np.ndim(labels) != 3:
        raise ValueError(f"labels must be a (Z, Y, X) volume, got shape {np.shape(labels)}")
    size = labels.shape[axis]
    if isinstance(mode, str):
        if mode not in SLICE_MODES:
            raise ValueError(f"slice mode must be one of {list(SLICE_MODES)}, an int or a sequence of ints, "
                             f"got {mode!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        other = tuple(a for a in range(3) if a != axis)
        tumour_first = (labels == TUMOUR_LABEL, labels >= TUMOUR_LABEL, labels > 0)
        masks = {"centre": tumour_first, "tumour": tumour_first, "labelled": (labels > 0,)}[mode]
        for mask in masks:
            along = mask.any(axis=other)
            if along.any():
                if mode == "centre":
                    return [int(round(float(np.nonzero(along)[0].mean())))]
                return _extent_slices(along, n)
        return [size // 2] if mode == "centre" else _extent_slices(np.ones(size, bool), n)
    if not isinstance(mode, (int, np.integer, Sequence, np.ndarray)):
        raise ValueError(f"{plane} slice index must be an integer in 0..{size - 1} "
                         f"(volume shape {labels.shape}), got {mode!r}")
    indices = [mode] if isinstance(mode, (int, np.integer)) else list(mode)
    if not indices:
        raise ValueError(f"slices must name at least one {plane} slice, got an empty sequence")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < size:
            raise ValueError(f"{plane} slice index must be an integer in 0..{size - 1} "
                             f"(volume shape {labels.shape}), got {index!r}")
    return [int(index) for index in indices]


def take_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2-D ``(rows, columns)`` slice: axial ``(Y, X)``, coronal ``(Z, X)``, sagittal ``(Z, Y)``.

    A contiguous copy of that slice only: ``np.take`` would first copy the whole volume when it
    is not C-ordered (a NIfTI's voxels are in Fortran order).
    """
    axis = _check_plane(plane)
    return np.ascontiguousarray(volume[(slice(None),) * axis + (index,)])


def plane_aspect(spacing: Sequence[float], plane: str) -> float:
    """``imshow`` aspect (row spacing / column spacing) of ``plane`` for ``(z, y, x)`` spacing in mm."""
    rows, columns = (a for a in range(3) if a != _check_plane(plane))
    return float(spacing[rows]) / float(spacing[columns])


def window_to_rgb(ct_slice: np.ndarray) -> np.ndarray:
    """Grey ``(H, W, 3)`` float image in [0, 1] of a CT slice in HU under ``DISPLAY_WINDOW_HU``."""
    low, high = DISPLAY_WINDOW_HU
    grey = np.clip((np.asarray(ct_slice, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    return np.repeat(grey[..., None], 3, axis=-1)


def blend_masks(rgb: np.ndarray, masks: Sequence[tuple[np.ndarray, str]], alpha: float = FILL_ALPHA) -> np.ndarray:
    """Alpha-blend each ``(mask, colour)`` onto a copy of ``rgb`` in order (later masks on top)."""
    out = np.array(rgb, dtype=np.float32, copy=True)
    for mask, colour in masks:
        out[mask] = (1.0 - alpha) * out[mask] + alpha * np.asarray(to_rgb(colour), np.float32)
    return out


def compose_overlay(ct_slice: np.ndarray, label_slice: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB of a windowed CT slice with kidney then tumour filled in ``LABEL_COLOURS``, and the
    cyst (label 3, KiTS23) in ``CYST_COLOUR`` where it occurs."""
    masks = [(label_slice == label, LABEL_COLOURS[label]) for label in (KIDNEY_LABEL, TUMOUR_LABEL)]
    cyst = label_slice == CYST_LABEL
    if cyst.any():
        masks.append((cyst, CYST_COLOUR))
    return blend_masks(window_to_rgb(ct_slice), masks)


def compose_error_map(ct_slice: np.ndarray, truth_slice: np.ndarray, prediction_slice: np.ndarray,
                      structure: str, *, dataset: DatasetDefinition | str = KITS19) -> np.ndarray:
    """``(H, W, 3)`` RGB of a windowed CT slice with TP, FP and FN of ``structure`` in ``ERROR_COLOURS``.

    ``structure`` is a name of :func:`error_map_structures` of ``dataset`` (default KiTS19:
    ``"kidney"`` or ``"tumour"``).
    """
    structures = error_map_structures(dataset)
    if structure not in structures:
        raise ValueError(f"structure must be one of {list(structures)} ({get_dataset(dataset).title}), "
                         f"got {structure!r}")
    mask = structures[structure]
    truth, predicted = mask(truth_slice), mask(prediction_slice)
    masks = [(truth & predicted, ERROR_COLOURS["true positive"]),
             (~truth & predicted, ERROR_COLOURS["false positive"]),
             (truth & ~predicted, ERROR_COLOURS["false negative"])]
    return blend_masks(window_to_rgb(ct_slice), masks)


def _draw_panel(ax: Axes, rgb: np.ndarray, aspect: float, title: str) -> None:
    ax.imshow(rgb, aspect=aspect, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _draw_contours(ax: Axes, label_slice: np.ndarray) -> None:
    for label, colour in ALL_LABEL_COLOURS.items():
        mask = label_slice >= label if label == KIDNEY_LABEL else label_slice == label
        if mask.any():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2)


def _new_figure(rows: int, columns: int, aspect: float, shape: tuple[int, int]) -> tuple[Figure, np.ndarray]:
    height, width = shape
    panel_ratio = (height * aspect) / width
    panel_width = 3.2
    panel_height = float(np.clip(panel_width * panel_ratio, 1.5, 8.0)) + 0.4
    figure = Figure(figsize=(panel_width * columns, panel_height * rows + 0.5), layout="constrained")
    return figure, np.atleast_2d(figure.subplots(rows, columns, squeeze=False))


def _finish(figure: Figure, handles: list, path: str | os.PathLike | None) -> Figure:
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=9)
    if path is not None:
        save_figure(figure, path)
    return figure


def plot_overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray | None = None, *,
                 spacing: Sequence[float], plane: str = "axial", slices: SliceSpec = None,
                 n_slices: int = 3, style: str = "fill", path: str | os.PathLike | None = None,
                 dataset: DatasetDefinition | str = KITS19) -> Figure:
    """CT slices with ground truth and (optionally) prediction side by side, one row per slice.

    Args:
        image: ``(Z, Y, X)`` CT in HU, shown under ``DISPLAY_WINDOW_HU``.
        truth: ``(Z, Y, X)`` label map {0, 1, 2} (KiTS23: also 3, cyst, in ``CYST_COLOUR``).
            prediction: same shape, or ``None`` (one column).
        spacing: ``(z, y, x)`` voxel size in mm (keyword, required); sets each panel's aspect ratio.
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        slices: ``None`` (the slice through the tumour's centre), a :func:`choose_slices` mode
            (``"centre"``, ``"tumour"``, ``"labelled"``), an index or a sequence of indices;
            slices are chosen from ``truth``.
        n_slices: number of rows for the evenly spaced modes.
        style: ``"fill"`` (labels blended at ``FILL_ALPHA``) or ``"contour"`` (outlines; kidney
            outline around label > 0, tumour around label 2).
        path: if given, the figure is also saved there atomically (PNG, PDF or SVG by suffix).
        dataset: whose labels (default KiTS19); the legend names the cyst when the dataset has
            one (KiTS23) or a label map holds label 3.

    Returns:
        The figure (never shown).
    """
    _check_inputs(image, spacing, truth=truth, prediction=prediction)
    if style not in OVERLAY_STYLES:
        raise ValueError(f"style must be one of {list(OVERLAY_STYLES)}, got {style!r}")
    indices = choose_slices(truth, plane, "centre" if slices is None else slices, n_slices)
    columns = [("ground truth", truth)] + ([("prediction", prediction)] if prediction is not None else [])
    aspect = plane_aspect(spacing, plane)
    figure, axes = _new_figure(len(indices), len(columns), aspect, take_slice(image, plane, 0).shape)
    for row, index in enumerate(indices):
        ct_slice = take_slice(image, plane, index)
        for column, (name, labels) in enumerate(columns):
            label_slice = take_slice(labels, plane, index)
            ax = axes[row, column]
            if style == "fill":
                _draw_panel(ax, compose_overlay(ct_slice, label_slice), aspect, f"{name}, {plane} {index}")
            else:
                _draw_panel(ax, window_to_rgb(ct_slice), aspect, f"{name}, {plane} {index}")
                _draw_contours(ax, label_slice)
    make = (lambda c, text: Patch(facecolor=c, alpha=FILL_ALPHA, label=text)) if style == "fill" else \
        (lambda c, text: Line2D([], [], color=c, label=text))
    handles = [make(LABEL_COLOURS[KIDNEY_LABEL], "kidney (label 1)" if style == "fill" else "kidney (label > 0)"),
               make(LABEL_COLOURS[TUMOUR_LABEL], "tumour (label 2)")]
    if shows_cyst(dataset, truth, prediction):
        handles.append(make(CYST_COLOUR, f"cyst (label {CYST_LABEL})"))
    return _finish(figure, handles, path)


def plot_error_map(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray,
                   spacing: Sequence[float], *, plane: str = "axial", slices: SliceSpec = None,
                   n_slices: int = 3, path: str | os.PathLike | None = None,
                   dataset: DatasetDefinition | str = KITS19) -> Figure:
    """Per-structure true positives, false positives and false negatives, one row per slice.

    Columns are the structures of :func:`error_map_structures` of ``dataset``: for KiTS19
    (default) kidney (label > 0) and tumour (label 2); for KiTS23 kidney and masses, masses,
    tumour and cyst. Colours are ``ERROR_COLOURS`` blended at ``FILL_ALPHA`` over the windowed
    CT. Arguments are as in :func:`plot_overlay`.

    Returns:
        The figure (never shown).
    """
    _check_inputs(image, spacing, truth=truth, prediction=prediction)
    if prediction is None:
        raise ValueError("plot_error_map needs a prediction, got None")
    indices = choose_slices(truth, plane, "centre" if slices is None else slices, n_slices)
    aspect = plane_aspect(spacing, plane)
    structures = error_map_structures(dataset)
    figure, axes = _new_figure(len(indices), len(structures), aspect, take_slice(image, plane, 0).shape)
    for row, index in enumerate(indices):
        ct_slice = take_slice(image, plane, index)
        truth_slice, prediction_slice = take_slice(truth, plane, index), take_slice(prediction, plane, index)
        for column, structure in enumerate(structures):
            rgb = compose_error_map(ct_slice, truth_slice, prediction_slice, structure, dataset=dataset)
            _draw_panel(axes[row, column], rgb, aspect, f"{structure}, {plane} {index}")
    handles = [Patch(facecolor=colour, alpha=FILL_ALPHA, label=name) for name, colour in ERROR_COLOURS.items()]
    return _finish(figure, handles, path)
