"""Slice viewer: frame composition, physical aspect, slider frames and the self-contained HTML."""

import base64
import io

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

from utils.figures.drawing import DISPLAY_WINDOW_HU, LABEL_COLOURS
from utils.figures.slice_viewer import (
    OVERLAY_ALPHA,
    compose_plane_frame,
    compose_slice_rgb,
    display_shape,
    plot_slice_viewer,
    select_slices,
)

SPACING = (5.0, 1.0, 1.0)
TUMOUR_VOXEL = (10, 20, 12)


def synthetic_case():
    """20 x 40 x 40 HU ramp (every slice distinct, inside the window), a kidney block, a tumour block."""
    z, y, x = np.meshgrid(np.arange(20), np.arange(40), np.arange(40), indexing="ij")
    image = (-100.0 + 3 * x + 2 * y + 4 * z).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[5:15, 10:30, 5:20] = 1
    labels[8:12, 15:25, 10:15] = 2
    return image, labels


def expected_tumour_rgb(hu: float) -> np.ndarray:
    grey = (hu - DISPLAY_WINDOW_HU[0]) / (DISPLAY_WINDOW_HU[1] - DISPLAY_WINDOW_HU[0]) * 255
    colour = np.array([int(LABEL_COLOURS[2][i:i + 2], 16) for i in (1, 3, 5)])
    return np.rint((1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * colour).astype(np.uint8)


def decode(trace: go.Image) -> np.ndarray:
    header, payload = trace.source.split(",", 1)
    assert header == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))


def test_compose_windows_to_grey_and_blends_the_tumour_colour():
    rgb = compose_slice_rgb(np.array([[-1000.0, 40.0], [1000.0, 40.0]]), np.array([[0, 0], [0, 2]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[1, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [128] * 3  # 40 HU is the window's centre
    np.testing.assert_array_equal(rgb[1, 1], expected_tumour_rgb(40.0))


def test_coronal_and_sagittal_frames_repeat_5_mm_rows_five_times():
    image, labels = synthetic_case()
    raw = compose_slice_rgb(image[:, 20, :], labels[:, 20, :])
    frame, pixel = compose_plane_frame(image, labels, SPACING, "coronal", 20)
    assert frame.shape == (100, 40, 3) and pixel == 1.0
    np.testing.assert_array_equal(frame, np.repeat(raw, 5, axis=0))
    assert compose_plane_frame(image, labels, SPACING, "sagittal", 3)[0].shape == (100, 40, 3)
    assert compose_plane_frame(image, labels, SPACING, "axial", 3)[0].shape == (40, 40, 3)


def test_large_frames_are_downsampled_to_the_size_budget():
    assert display_shape((512, 512), (0.8, 0.8), 256) == ((256, 256), 1.6)
    assert display_shape((100, 512), (5.0, 0.8), 256) == ((256, 210), 500 / 256)  # 500 mm x 409.6 mm
    assert select_slices(20, 5).tolist() == [0, 5, 10, 14, 19]
    assert select_slices(3, 64).tolist() == [0, 1, 2]


def test_viewer_has_one_frame_and_slider_step_per_slice():
    image, labels = synthetic_case()
    figure = plot_slice_viewer(image, labels, SPACING)
    assert len(figure.frames) == 20 and len(figure.layout.sliders[0].steps) == 20
    assert all(len(frame.data) == 1 for frame in figure.frames) and len(figure.data) == 1
    frame = {f.name: f for f in figure.frames}[str(TUMOUR_VOXEL[0])]
    rgb = decode(frame.data[0])
    np.testing.assert_array_equal(rgb[TUMOUR_VOXEL[1], TUMOUR_VOXEL[2]], expected_tumour_rgb(image[TUMOUR_VOXEL]))


def test_viewer_with_prediction_shows_two_panels_with_physical_aspect():
    image, labels = synthetic_case()
    prediction = np.where(labels == 2, 1, labels).astype(np.uint8)
    figure = plot_slice_viewer(image, labels, SPACING, prediction=prediction, plane="sagittal", max_slices=5)
    assert [f.name for f in figure.frames] == ["0", "10", "20", "29", "39"]
    assert all(len(frame.data) == 2 for frame in figure.frames) and len(figure.data) == 2
    truth, predicted = (decode(trace) for trace in figure.frames[0].data)
    assert truth.shape == predicted.shape == (100, 40, 3)
    assert figure.frames[0].data[0].dx == figure.frames[0].data[0].dy == 1.0
    assert figure.layout.yaxis.scaleanchor == "x" and figure.layout.yaxis2.scaleanchor == "x2"


def test_viewer_html_is_self_contained_and_atomic(tmp_path):
    image, labels = synthetic_case()
    path = tmp_path / "out" / "viewer.html"
    plot_slice_viewer(image, labels, SPACING, plane="coronal", max_slices=4, path=path)
    html = path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["viewer.html"]
    assert '<script src="http' not in html and "Plotly.newPlot" in html and len(html) > 1_000_000
    with pytest.raises(ValueError, match=".html"):
        plot_slice_viewer(image, labels, SPACING, path=tmp_path / "viewer.png")


def test_invalid_arguments_name_the_rule():
    image, labels = synthetic_case()
    with pytest.raises(ValueError, match="plane must be one of"):
        plot_slice_viewer(image, labels, SPACING, plane="oblique")
    with pytest.raises(ValueError, match="prediction must have"):
        plot_slice_viewer(image, labels, SPACING, prediction=labels[:5])
    with pytest.raises(ValueError, match="spacing"):
        plot_slice_viewer(image, labels, (5.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="max"):
        plot_slice_viewer(image, labels, SPACING, max_slices=0)
