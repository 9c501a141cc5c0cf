"""Figures: slice overlays of CT with kidney and tumour labels.

Every plotting function returns the matplotlib figure (nothing is shown or saved inside);
:func:`save_figure` writes one atomically. Colours and the display window are defined once here.
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

from utils.data.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL
from utils.data.nifti_io import write_bytes_atomic

#: Soft-tissue display window in HU (level 40, width 400).
DISPLAY_WINDOW_HU = (-160.0, 240.0)
LABEL_COLOURS = {KIDNEY_LABEL: "#2ca02c", TUMOUR_LABEL: "#d62728"}


def pick_axial_slice(labels: np.ndarray) -> int:
    """Index of the axial slice through the tumour's centre, else the kidneys', else the middle."""
    for mask in (labels == TUMOUR_LABEL, labels > 0):
        if mask.any():
            return int(round(float(np.nonzero(mask.any(axis=(1, 2)))[0].mean())))
    return labels.shape[0] // 2


def plot_axial_overlay(ax: plt.Axes, image: np.ndarray, labels: np.ndarray, spacing: Sequence[float],
                       index: int | None = None, title: str = "") -> None:
    """Draw one axial slice of a ``(Z, Y, X)`` CT with kidney and tumour contours onto ``ax``.

    Args:
        image: CT in HU. labels: {0, 1, 2}. spacing: ``(z, y, x)`` mm, for the aspect ratio.
        index: slice index; default :func:`pick_axial_slice`.
    """
    index = pick_axial_slice(labels) if index is None else index
    ax.imshow(image[index], cmap="gray", vmin=DISPLAY_WINDOW_HU[0], vmax=DISPLAY_WINDOW_HU[1],
              aspect=spacing[1] / spacing[2], interpolation="nearest")
    for label, colour in LABEL_COLOURS.items():
        mask = labels[index] >= label if label == KIDNEY_LABEL else labels[index] == label
        if mask.any():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.0)
    ax.set_title(f"{title} (slice {index})" if title else f"slice {index}", fontsize=9)
    ax.set_axis_off()


def plot_case_gallery(cases: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[float]]],
                      columns: int = 4) -> Figure:
    """One axial overlay per case: ``(case_id, image, labels, spacing)`` tuples; returns the figure."""
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
    figure.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
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
