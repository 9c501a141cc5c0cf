"""Interactive slice viewer: CT with kidney and tumour (and KiTS23 cyst) overlay, one slider step per slice.

Each displayed slice is pre-composed here as an RGB ``uint8`` image (soft-tissue window in grey,
labels blended in their fixed colours, the cyst, label 3, in ``CYST_COLOUR`` wherever it occurs)
and resampled to square display pixels, so every plane
keeps its physical aspect. :func:`compose_plane_frame` is shared with
:mod:`utils.figures.slice_animation`. Axis conventions follow KiTS19 ``(Z, Y, X)`` = (inferior,
posterior, patient-left): row 0 is superior (coronal, sagittal) or anterior (axial), column 0
is the patient's right (radiological view).
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from utils.data.dataset_definitions import CYST_LABEL, KITS19, DatasetDefinition
from utils.data.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL
from utils.data.nifti_io import write_bytes_atomic
from utils.figures.drawing import CYST_COLOUR, LABEL_COLOURS, shows_cyst
from utils.figures.slices import blend_masks, window_to_rgb

#: Planes: array axis swept by the slider, and the ``(row, column)`` spacing axes of a frame.
PLANES = {"axial": (0, (1, 2)), "coronal": (1, (0, 2)), "sagittal": (2, (0, 1))}
#: Opacity of the label colours over the CT.
OVERLAY_ALPHA = 0.45


def validate_volumes(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float],
                     prediction: np.ndarray | None, plane: str) -> tuple[float, float, float]:
    """Check shapes, spacing and plane at a public boundary; return the spacing as floats."""
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {sorted(PLANES)}, got {plane!r}")
    image = np.asarray(image)
    if image.ndim != 3 or min(image.shape) < 1:
        raise ValueError(f"image must be a non-empty (Z, Y, X) volume, got shape {image.shape}")
    for name, volume in (("labels", labels), ("prediction", prediction)):
        if volume is not None and np.shape(volume) != image.shape:
            raise ValueError(f"{name} must have the image's shape {image.shape}, got {np.shape(volume)}")
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three positive (z, y, x) sizes in mm, got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def compose_slice_rgb(image_slice: np.ndarray, label_slice: np.ndarray,
                      alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Window a 2-D CT slice to grey and blend the label colours over it.

    Args:
        image_slice: ``(H, W)`` HU. label_slice: ``(H, W)`` {0 background, 1 kidney, 2 tumour},
            KiTS23 also 3 cyst (``CYST_COLOUR``).
        alpha: label opacity in [0, 1].

    Returns:
        ``(H, W, 3)`` uint8 RGB; ``DISPLAY_WINDOW_HU`` maps to 0..255, a labelled pixel is
        ``(1 - alpha) * grey + alpha * LABEL_COLOURS[label]``.
    """
    labels = np.asarray(label_slice)
    masks = [(labels == label, LABEL_COLOURS[label]) for label in (KIDNEY_LABEL, TUMOUR_LABEL)]
    cyst = labels == CYST_LABEL
    if cyst.any():
        masks.append((cyst, CYST_COLOUR))
    rgb = blend_masks(window_to_rgb(image_slice), masks, alpha)
    return np.rint(rgb * 255.0).astype(np.uint8)


def display_shape(shape: tuple[int, int], pixel_mm: tuple[float, float],
                  max_size: int) -> tuple[tuple[int, int], float]:
    """Frame shape with square pixels of the finer spacing, shrunk so neither side exceeds ``max_size``.

    Returns ``((rows, columns), display pixel size in mm)``.
    """
    extent = (shape[0] * pixel_mm[0], shape[1] * pixel_mm[1])
    pixel = max(min(pixel_mm), max(extent) / max_size)
    return (max(1, round(extent[0] / pixel)), max(1, round(extent[1] / pixel))), pixel


def resample_nearest(frame: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``(H, W, ...)`` array to ``shape`` (keeps label colours crisp)."""
    rows = (np.arange(shape[0]) + 0.5) * frame.shape[0] / shape[0]
    cols = (np.arange(shape[1]) + 0.5) * frame.shape[1] / shape[1]
    return frame[np.floor(rows).astype(int)][:, np.floor(cols).astype(int)]


def compose_plane_frame(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], plane: str, index: int,
                        max_size: int = 256) -> tuple[np.ndarray, float]:
    """Slice ``index`` of ``plane`` as an RGB frame with the physical aspect.

    Args:
        image: ``(Z, Y, X)`` HU. labels: ``(Z, Y, X)`` {0, 1, 2} (KiTS23: also 3). spacing: ``(z, y, x)`` mm.
        plane: ``"axial"`` (Y x X), ``"coronal"`` (Z x X) or ``"sagittal"`` (Z x Y).
        max_size: longest frame side in pixels after resampling.

    Returns:
        ``((rows, columns, 3) uint8, display pixel size in mm)``; pixels are square, e.g. a
        sagittal frame of a 5 mm x 1 mm volume repeats each slice row 5 times.
    """
    axis, (row_axis, col_axis) = PLANES[plane]
    take = [slice(None)] * 3
    take[axis] = index
    rgb = compose_slice_rgb(image[tuple(take)], labels[tuple(take)])
    shape, pixel = display_shape(rgb.shape[:2], (spacing[row_axis], spacing[col_axis]), max_size)
    return resample_nearest(rgb, shape), pixel


def select_slices(count: int, max_count: int) -> np.ndarray:
    """At most ``max_count`` evenly spaced indices in ``[0, count)``, first and last included."""
    if max_count < 1:
        raise ValueError(f"the maximum number of slices must be >= 1, got {max_count}")
    return np.unique(np.linspace(0, count - 1, min(count, max_count)).round().astype(int))


def _png_data_uri(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_slice_viewer(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], *,
                      prediction: np.ndarray | None = None, plane: str = "axial", max_slices: int = 64,
                      max_size: int = 256, path: str | os.PathLike | None = None,
                      dataset: DatasetDefinition | str = KITS19) -> go.Figure:
    """Plotly figure with a slider over the slices of one plane, CT plus label overlay.

    Args:
        image: ``(Z, Y, X)`` float32 CT in HU. labels: ``(Z, Y, X)`` uint8 ground truth {0, 1, 2}
            (KiTS23: also 3, the cyst).
        spacing: ``(z, y, x)`` voxel size in mm; frames are resampled to square pixels of
            ``display mm`` and the axes are in mm (``dx``/``dy`` plus ``scaleanchor``).
        prediction: optional ``(Z, Y, X)`` labels, shown to the right of the ground truth.
        plane: ``"axial"`` (default), ``"coronal"`` or ``"sagittal"``.
        max_slices: at most this many evenly spaced slices become frames (default 64).
        max_size: longest in-plane side of a frame in pixels (default 256; larger is downsampled).
        path: if given, the figure is also written atomically as self-contained HTML.
        dataset: whose labels (default KiTS19); the title names the cyst's colour when the
            dataset has a cyst (KiTS23) or a label map holds label 3.

    Size budget: frames are embedded as lossless PNG, at most ``max_slices`` x panels x
    ``max_size``² pixels, about 70 KB per 256² panel for CT-like noise. With the defaults a
    512² case with a prediction gives ~9 MB of frames plus ~4.5 MB of inlined plotly.js
    (~14 MB HTML, ~7 s); lower ``max_slices`` or ``max_size`` for smaller files.

    Returns:
        The figure (``fig.show()`` or the last cell expression displays it in Jupyter).
    """
    spacing = validate_volumes(image, labels, spacing, prediction, plane)
    volumes = [("ground truth", labels)] + ([("prediction", prediction)] if prediction is not None else [])
    indices = select_slices(image.shape[PLANES[plane][0]], max_slices)
    figure = make_subplots(rows=1, cols=len(volumes), subplot_titles=[name for name, _ in volumes],
                           horizontal_spacing=0.03)
    frames = []
    for index in indices:
        traces = []
        for column, (name, volume) in enumerate(volumes, start=1):
            rgb, pixel = compose_plane_frame(image, volume, spacing, plane, int(index), max_size)
            traces.append(go.Image(source=_png_data_uri(rgb), dx=pixel, dy=pixel, name=name,
                                   hoverinfo="x+y", xaxis=f"x{column if column > 1 else ''}",
                                   yaxis=f"y{column if column > 1 else ''}"))
        frames.append(go.Frame(data=traces, name=str(index), traces=list(range(len(volumes)))))
    figure.add_traces(list(frames[0].data), rows=1, cols=list(range(1, len(volumes) + 1)))
    figure.frames = frames
    _lay_out_viewer(figure, [int(i) for i in indices], len(volumes), plane,
                    shows_cyst(dataset, labels, prediction))
    if path is not None:
        save_viewer_html(figure, path)
    return figure


def _lay_out_viewer(figure: go.Figure, indices: list[int], panels: int, plane: str, cyst: bool = False) -> None:
    steps = [{"method": "animate", "label": str(i),
              "args": [[str(i)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                  "transition": {"duration": 0}}]} for i in indices]
    colours = f"kidney {LABEL_COLOURS[KIDNEY_LABEL]}, tumour {LABEL_COLOURS[TUMOUR_LABEL]}"
    figure.update_layout(
        title=f"{plane} slices ({colours}{f', cyst {CYST_COLOUR}' if cyst else ''})",
        sliders=[{"active": 0, "steps": steps, "currentvalue": {"prefix": f"{plane} slice "}, "pad": {"t": 30}}],
        height=520, width=420 * panels + 80, margin={"l": 40, "r": 20, "t": 70, "b": 20}, plot_bgcolor="black")
    for column in range(1, panels + 1):
        suffix = "" if column == 1 else str(column)
        figure.update_xaxes(title_text="mm", showgrid=False, zeroline=False, row=1, col=column)
        figure.update_yaxes(autorange="reversed", scaleanchor=f"x{suffix}", scaleratio=1, showgrid=False,
                            zeroline=False, row=1, col=column)


def save_viewer_html(figure: go.Figure, path: str | os.PathLike) -> Path:
    """Write a viewer figure atomically as one self-contained HTML file (plotly.js inlined)."""
    path = Path(path)
    if path.suffix.lower() not in {".html", ".htm"}:
        raise ValueError(f"viewer path must end in .html, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, figure.to_html(include_plotlyjs=True, full_html=True,
                                            auto_play=False).encode("utf-8"))
    return path
