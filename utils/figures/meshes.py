"""Figures: interactive 3D surface meshes of kidney and tumour, and KiTS23's cyst (plotly, self-contained HTML).

:func:`build_surface_mesh` turns a binary ``(Z, Y, X)`` mask into a triangle mesh in mm with
marching cubes, stepping over voxels so the mesh stays under a face budget (that keeps the HTML
small and the browser responsive). :func:`plot_meshes` draws ground truth and prediction side by
side or in one scene with toggle buttons, and returns the figure; colours come from
:data:`utils.figures.drawing.LABEL_COLOURS` (the cyst's from
:data:`utils.figures.drawing.CYST_COLOUR`). A cyst mesh is drawn for a dataset with a cyst
(KiTS23) or a label map holding label 3. Nothing global is changed and nothing is shown.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from skimage.measure import marching_cubes

from utils.data.dataset_definitions import CYST_LABEL, KITS19, DatasetDefinition
from utils.data.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL
from utils.data.nifti_io import write_bytes_atomic
from utils.figures.drawing import ALL_LABEL_COLOURS, shows_cyst

logger = logging.getLogger(__name__)

#: Default face budget per mesh: four meshes (kidney and tumour, truth and prediction) plus
#: plotly.js (~4.5 MB) keep the HTML well under 20 MB.
DEFAULT_MAX_FACES = 100_000
LAYOUTS = ("side_by_side", "toggle")
#: (label, structure name, opacity); kidney structure is label > 0, tumour is label == 2.
_STRUCTURES = ((KIDNEY_LABEL, "kidney", 0.35), (TUMOUR_LABEL, "tumour", 1.0))
#: The cyst's structure (label == 3), drawn after the tumour for a dataset with a cyst.
_CYST_STRUCTURE = (CYST_LABEL, "cyst", 1.0)


def _validate_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three positive (z, y, x) values in mm, got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Tight slices around the non-zero voxels of a 3D array, or None when it is empty."""
    boxes = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        boxes.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(boxes)  # type: ignore[return-value]


def _estimate_faces(mask: np.ndarray) -> int:
    """Rough marching-cubes face count at step 1: two triangles per exposed voxel face."""
    exposed = sum(int(np.count_nonzero(np.diff(mask, axis=axis))) for axis in range(3))
    return 2 * exposed


def build_surface_mesh(mask: np.ndarray, spacing: Sequence[float], *, step: int | None = None,
                       max_faces: int = DEFAULT_MAX_FACES) -> tuple[np.ndarray, np.ndarray]:
    """Surface of a binary mask as a triangle mesh in mm (marching cubes at level 0.5).

    Args:
        mask: ``(Z, Y, X)`` array; non-zero voxels are inside.
        spacing: ``(z, y, x)`` voxel size in mm.
        step: marching-cubes step in voxels (>= 1); default None chooses the smallest step whose
            mesh has at most ``max_faces`` faces (coarser steps decimate the surface).
        max_faces: face budget (>= 1) used when ``step`` is None.

    Returns:
        ``vertices`` ``(N, 3)`` float32 in mm, ``(z, y, x)`` order, in the whole volume's
        coordinates (voxel ``(0, 0, 0)`` at the origin); ``faces`` ``(M, 3)`` int32 indices into
        ``vertices``. An empty mask gives ``(0, 3)`` arrays.
    """
    spacing = _validate_spacing(spacing)
    if mask.ndim != 3:
        raise ValueError(f"mask must be a 3D (Z, Y, X) array, got shape {mask.shape}")
    if step is not None and (int(step) != step or step < 1):
        raise ValueError(f"step must be an integer >= 1 or None, got {step}")
    if int(max_faces) != max_faces or max_faces < 1:
        raise ValueError(f"max_faces must be an integer >= 1, got {max_faces}")
    empty = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    box = _bounding_box(mask)
    if box is None:
        return empty
    # One voxel of zero padding on every side closes surfaces touching the box (or volume) edge.
    inside = np.pad(mask[box] != 0, 1)
    volume = inside.astype(np.float32)
    origin = np.array([b.start - 1 for b in box], np.float32) * np.array(spacing, np.float32)
    if step is None:
        step = max(1, math.ceil(math.sqrt(_estimate_faces(inside) / max_faces)))
        while True:
            vertices, faces = _march(volume, spacing, step)
            if len(faces) <= max_faces:
                break
            step += max(1, math.ceil(step * (math.sqrt(len(faces) / max_faces) - 1)))
    else:
        vertices, faces = _march(volume, spacing, int(step))
    logger.debug("mesh: step %d, %d vertices, %d faces", step, len(vertices), len(faces))
    return (vertices + origin).astype(np.float32), faces.astype(np.int32)


def _march(volume: np.ndarray, spacing: tuple[float, float, float], step: int) -> tuple[np.ndarray, np.ndarray]:
    if min(volume.shape) <= step:  # marching cubes needs at least two samples per axis
        volume = np.pad(volume, [(0, step + 1 - n) if n <= step else (0, 0) for n in volume.shape])
    vertices, faces, _, _ = marching_cubes(volume, level=0.5, spacing=spacing, step_size=step,
                                           allow_degenerate=False)
    return vertices, faces


def _mesh_traces(labels: np.ndarray, spacing: tuple[float, float, float], source: str, max_faces: int,
                 legendgroup: str, structures: tuple[tuple[int, str, float], ...] = _STRUCTURES) -> list[go.Mesh3d]:
    """Kidney (label > 0, semi-transparent) and tumour (label == 2, opaque) meshes of one label map, and
    the cyst's (label == 3, opaque) when ``structures`` has it."""
    box = _bounding_box(labels)
    offset = np.zeros(3, np.float32) if box is None else np.array([b.start for b in box], np.float32)
    cropped = labels if box is None else labels[box]
    traces = []
    for label, name, opacity in structures:
        mask = cropped > 0 if label == KIDNEY_LABEL else cropped == label
        vertices, faces = build_surface_mesh(mask, spacing, max_faces=max_faces)
        vertices = vertices + offset * np.array(spacing, np.float32)
        traces.append(go.Mesh3d(
            x=vertices[:, 2], y=vertices[:, 1], z=vertices[:, 0], i=faces[:, 0], j=faces[:, 1], k=faces[:, 2],
            color=ALL_LABEL_COLOURS[label], opacity=opacity, name=f"{source} {name}", showlegend=True,
            legendgroup=legendgroup, flatshading=False, hoverinfo="name"))
    return traces


def _axis_layout() -> dict:
    return dict(aspectmode="data", xaxis_title="x (mm)", yaxis_title="y (mm)", zaxis_title="z (mm)")


def plot_meshes(truth: np.ndarray, prediction: np.ndarray | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                *, layout: str = "side_by_side", path: str | os.PathLike | None = None, title: str = "",
                max_faces: int = DEFAULT_MAX_FACES, dataset: DatasetDefinition | str = KITS19) -> go.Figure:
    """Interactive 3D kidney and tumour (and cyst) surfaces of a ground truth and, optionally, a prediction.

    Args:
        truth: ``(Z, Y, X)`` label map {0 background, 1 kidney, 2 tumour} (KiTS23: also 3 cyst).
        prediction: label map of the same shape, or None to draw the ground truth alone.
        spacing: ``(z, y, x)`` voxel size in mm; axes are in mm with ``aspectmode="data"``.
        layout: ``"side_by_side"`` (two 3D scenes) or ``"toggle"`` (one scene, buttons to show
            ground truth, prediction or both); one scene either way when ``prediction`` is None.
        path: if given, the figure is written there atomically as self-contained HTML (plotly.js
            embedded, viewable offline).
        title: figure title.
        max_faces: face budget per mesh, see :func:`build_surface_mesh`.
        dataset: whose labels (default KiTS19); a cyst mesh follows each tumour mesh when the
            dataset has a cyst (KiTS23) or a label map holds label 3.

    Returns:
        The figure: traces ``[truth kidney, truth tumour, (prediction kidney, prediction tumour)]``
        (with a cyst: ``truth cyst`` after ``truth tumour``, ``prediction cyst`` last).
    """
    spacing = _validate_spacing(spacing)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if truth.ndim != 3:
        raise ValueError(f"truth must be a 3D (Z, Y, X) label map, got shape {truth.shape}")
    if prediction is not None and prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    sources = [("ground truth", truth)] + ([("prediction", prediction)] if prediction is not None else [])
    structures = _STRUCTURES + ((_CYST_STRUCTURE,) if shows_cyst(dataset, truth, prediction) else ())
    traces = [_mesh_traces(labels, spacing, name, max_faces, legendgroup=name, structures=structures)
              for name, labels in sources]
    if layout == "side_by_side" and len(traces) == 2:
        figure = make_subplots(rows=1, cols=2, specs=[[{"type": "scene"}] * 2],
                               subplot_titles=[name for name, _ in sources], horizontal_spacing=0.02)
        for column, group in enumerate(traces, start=1):
            for trace in group:
                figure.add_trace(trace, row=1, col=column)
        figure.update_layout(scene=_axis_layout(), scene2=_axis_layout())
    else:
        figure = go.Figure(data=[trace for group in traces for trace in group])
        figure.update_layout(scene=_axis_layout())
        if len(traces) == 2:
            figure.update_layout(updatemenus=[_toggle_menu(len(structures))])
    figure.update_layout(title=title, margin=dict(l=0, r=0, t=60 if title else 30, b=0),
                         legend=dict(orientation="h", y=0))
    if path is not None:
        save_mesh_html(figure, path)
    return figure


def _toggle_menu(structures: int = len(_STRUCTURES)) -> dict:
    """Buttons showing both label maps' meshes, the ground truth's or the prediction's (``structures`` each)."""
    choices = [("both", [True] * 2 * structures), ("ground truth", [True] * structures + [False] * structures),
               ("prediction", [False] * structures + [True] * structures)]
    return dict(type="buttons", direction="right", x=0.0, y=1.0, xanchor="left", yanchor="bottom",
                buttons=[dict(label=label, method="restyle", args=[{"visible": visible}])
                         for label, visible in choices])


def save_mesh_html(figure: go.Figure, path: str | os.PathLike) -> Path:
    """Write a plotly figure atomically as one self-contained HTML file and return the path."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"path must end in .html or .htm, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, figure.to_html(include_plotlyjs=True, full_html=True).encode("utf-8"))
    return path
