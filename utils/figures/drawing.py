"""Figures: slice overlays of CT with kidney and tumour labels (and KiTS23's cyst).

Every plotting function returns the matplotlib figure (nothing is shown or saved inside);
:func:`save_figure` writes one atomically. Colours and the display window are defined once here:
:data:`LABEL_COLOURS` for KiTS19's kidney and tumour, :data:`CYST_COLOUR` for KiTS23's cyst
(label 3), :func:`label_colours` for the labels of a dataset and :func:`region_colours` for its
scored regions. A cyst is drawn wherever label 3 occurs, so KiTS19 figures (which never hold it)
look exactly as they always did.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from utils.data.dataset_definitions import CYST_LABEL, KITS19, DatasetDefinition, get_dataset
from utils.data.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL
from utils.data.nifti_io import write_bytes_atomic

#: Soft-tissue display window in HU (level 40, width 400).
DISPLAY_WINDOW_HU = (-160.0, 240.0)
#: Colours of KiTS19's labels, kidney (green) and tumour (red); the cyst has :data:`CYST_COLOUR`.
LABEL_COLOURS = {KIDNEY_LABEL: "#2ca02c", TUMOUR_LABEL: "#d62728"}
#: Colour of KiTS23's cyst (label 3): purple, far from the kidney's green, the tumour's red and the
#: error-map colours.
CYST_COLOUR = "#9467bd"
#: Colour of a scored region that is a union of masses (KiTS23's ``masses``, tumour and cyst).
MASSES_COLOUR = "#ff7f0e"
#: Every label colour there is, by label id: a label drawn wherever it occurs.
ALL_LABEL_COLOURS = {**LABEL_COLOURS, CYST_LABEL: CYST_COLOUR}


def label_colours(dataset: DatasetDefinition | str = KITS19) -> dict[int, str]:
    """Colour of every foreground label of ``dataset``: KiTS19 :data:`LABEL_COLOURS`; KiTS23 adds the cyst."""
    return {label: ALL_LABEL_COLOURS[label] for label in get_dataset(dataset).foreground_labels}


def region_colours(dataset: DatasetDefinition | str = KITS19) -> dict[str, str]:
    """Colour of every scored region of ``dataset`` by name: the kidney's for the region holding the
    kidney label, a label's own for a one-label region, :data:`MASSES_COLOUR` for a union of masses
    (KiTS19: kidney green, tumour red; KiTS23: kidney and masses green, masses orange, tumour red)."""
    colours = {}
    for region in get_dataset(dataset).regions:
        if KIDNEY_LABEL in region.labels:
            colours[region.name] = LABEL_COLOURS[KIDNEY_LABEL]
        elif len(region.labels) == 1:
            colours[region.name] = ALL_LABEL_COLOURS[next(iter(region.labels))]
        else:
            colours[region.name] = MASSES_COLOUR
    return colours


def shows_cyst(dataset: DatasetDefinition | str = KITS19, *label_maps: np.ndarray | None) -> bool:
    """Whether a figure names the cyst: ``dataset`` has a cyst label, or one of ``label_maps`` holds label 3."""
    return get_dataset(dataset).has_label("cyst") or any(
        labels is not None and bool((np.asarray(labels) == CYST_LABEL).any()) for labels in label_maps)


def pick_axial_slice(labels: np.ndarray) -> int:
    """Index of the axial slice through the tumour's centre, else the masses' (tumour or cyst,
    label >= 2), else the kidneys', else the middle."""
    for mask in (labels == TUMOUR_LABEL, labels >= TUMOUR_LABEL, labels > 0):
        if mask.any():
            return int(round(float(np.nonzero(mask.any(axis=(1, 2)))[0].mean())))
    return labels.shape[0] // 2


def plot_axial_overlay(ax: plt.Axes, image: np.ndarray, labels: np.ndarray, spacing: Sequence[float],
                       index: int | None = None, title: str = "") -> None:
    """Draw one axial slice of a ``(Z, Y, X)`` CT with kidney and tumour (and cyst) contours onto ``ax``.

    Args:
        image: CT in HU. labels: {0, 1, 2} (KiTS23: also 3, the cyst, outlined in
            :data:`CYST_COLOUR`). spacing: ``(z, y, x)`` mm, for the aspect ratio.
        index: slice index; default :func:`pick_axial_slice`.
    """
    index = pick_axial_slice(labels) if index is None else index
    ax.imshow(image[index], cmap="gray", vmin=DISPLAY_WINDOW_HU[0], vmax=DISPLAY_WINDOW_HU[1],
              aspect=spacing[1] / spacing[2], interpolation="nearest")
    for label, colour in ALL_LABEL_COLOURS.items():
        mask = labels[index] >= label if label == KIDNEY_LABEL else labels[index] == label
        if mask.any():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.0)
    ax.set_title(f"{title} (slice {index})" if title else f"slice {index}", fontsize=9)
    ax.set_axis_off()


def plot_case_gallery(cases: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[float]]],
                      columns: int = 4, *, dataset: DatasetDefinition | str = KITS19) -> Figure:
    """One axial overlay per case: ``(case_id, image, labels, spacing)`` tuples; returns the figure.

    The legend names the cyst too when ``dataset`` has one (KiTS23) or a label map holds label 3.
    """
    if not cases:
        raise ValueError("plot_case_gallery needs at least one case")
    columns = min(columns, len(cases))
    rows = int(np.ceil(len(cases) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, (case_id, image, labels, spacing) in zip(axes.ravel(), cases, strict=False):
        plot_axial_overlay(ax, image, labels, spacing, title=case_id)
    handles = [Line2D([], [], color=LABEL_COLOURS[KIDNEY_LABEL], label="kidney (label > 0)"),
               Line2D([], [], color=LABEL_COLOURS[TUMOUR_LABEL], label="tumour (label 2)")]
    if shows_cyst(dataset, *(labels for _, _, labels, _ in cases)):
        handles.append(Line2D([], [], color=CYST_COLOUR, label=f"cyst (label {CYST_LABEL})"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return figure


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a figure atomically (PNG, PDF or SVG by the file's suffix) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    write_bytes_atomic(path, buffer.getvalue())
    return path
