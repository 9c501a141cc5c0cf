import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from utils.data.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL
from utils.figures.drawing import LABEL_COLOURS
from utils.figures.meshes import build_surface_mesh, plot_meshes

SPACING = (2.5, 0.8, 0.8)


def _ellipsoid(shape, centre_mm, semi_axes_mm, spacing):
    """Boolean (Z, Y, X) ellipsoid; voxel centres at index * spacing mm."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = sum(((g * s - c) / a) ** 2 for g, s, c, a in zip(grids, spacing, centre_mm, semi_axes_mm, strict=False))
    return inside <= 1.0


def _labels(shape=(24, 64, 64), tumour=True):
    labels = _ellipsoid(shape, (30, 25, 25), (20, 15, 12), SPACING).astype(np.uint8)
    if tumour:
        labels[_ellipsoid(shape, (30, 25, 30), (6, 5, 5), SPACING) & (labels > 0)] = TUMOUR_LABEL
    return labels


def test_ellipsoid_mesh_has_its_physical_size_and_position_in_mm():
    centre, semi_axes = (50.0, 40.0, 35.0), (30.0, 20.0, 15.0)
    mask = _ellipsoid((40, 100, 90), centre, semi_axes, SPACING)
    vertices, faces = build_surface_mesh(mask, SPACING)
    assert vertices.dtype == np.float32 and faces.dtype == np.int32 and faces.shape[1] == 3
    extent = vertices.max(axis=0) - vertices.min(axis=0)
    assert np.all(np.abs(extent - 2 * np.array(semi_axes)) <= np.array(SPACING) + 1e-3)  # one voxel per axis
    np.testing.assert_allclose((vertices.max(axis=0) + vertices.min(axis=0)) / 2, centre, atol=max(SPACING) / 2)


def test_mask_touching_the_volume_edge_gives_a_closed_surface():
    mask = np.ones((4, 5, 6), bool)
    vertices, faces = build_surface_mesh(mask, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(vertices.min(axis=0), [-0.5, -0.5, -0.5])
    np.testing.assert_allclose(vertices.max(axis=0), [3.5, 4.5, 5.5])
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert np.all(counts == 2)  # watertight: every edge shared by exactly two triangles


def test_empty_mask_gives_empty_arrays():
    vertices, faces = build_surface_mesh(np.zeros((5, 6, 7), np.uint8), SPACING)
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)
    assert vertices.dtype == np.float32 and faces.dtype == np.int32


def test_face_budget_is_respected_by_stepping():
    mask = _ellipsoid((80, 200, 200), (100, 80, 80), (90, 70, 70), SPACING)
    _, full = build_surface_mesh(mask, SPACING, step=1)
    vertices, faces = build_surface_mesh(mask, SPACING, max_faces=5_000)
    assert len(full) > 5_000 >= len(faces) > 0
    assert faces.max() < len(vertices)
    extent = vertices.max(axis=0) - vertices.min(axis=0)
    np.testing.assert_allclose(extent, [180, 140, 140], rtol=0.15)  # coarser, same object


def test_invalid_arguments_name_the_rule():
    mask = np.ones((3, 3, 3), bool)
    with pytest.raises(ValueError, match="spacing"):
        build_surface_mesh(mask, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="step"):
        build_surface_mesh(mask, SPACING, step=0)
    with pytest.raises(ValueError, match="max_faces"):
        build_surface_mesh(mask, SPACING, max_faces=0)
    with pytest.raises(ValueError, match="3D"):
        build_surface_mesh(mask[0], SPACING)
    with pytest.raises(ValueError, match="layout must be one of"):
        plot_meshes(_labels(), spacing=SPACING, layout="grid")
    with pytest.raises(ValueError, match="differs"):
        plot_meshes(_labels(), _labels()[:-1], SPACING)


def _check_traces(figure):
    names = [trace.name for trace in figure.data]
    assert names == ["ground truth kidney", "ground truth tumour", "prediction kidney", "prediction tumour"]
    assert all(isinstance(trace, go.Mesh3d) and len(trace.i) > 0 for trace in figure.data)
    assert [trace.color for trace in figure.data] == [LABEL_COLOURS[KIDNEY_LABEL], LABEL_COLOURS[TUMOUR_LABEL]] * 2
    assert figure.data[0].opacity < 1 and figure.data[1].opacity == 1


def _check_html(path):
    text = path.read_text()
    assert len(text) > 1_000_000 and "<script src=" not in text  # plotly.js embedded, no CDN
    assert "Plotly.newPlot" in text and [p.name for p in path.parent.iterdir()] == [path.name]


def test_side_by_side_html_is_self_contained_with_two_scenes(tmp_path):
    template = pio.templates.default
    truth, prediction = _labels(), _labels()
    prediction[prediction == TUMOUR_LABEL] = KIDNEY_LABEL
    prediction[_ellipsoid(truth.shape, (30, 25, 30), (5, 4, 4), SPACING)] = TUMOUR_LABEL
    path = tmp_path / "figs" / "meshes.html"
    figure = plot_meshes(truth, prediction, SPACING, path=path, title="case_00000")
    _check_traces(figure)
    assert [trace.scene for trace in figure.data] == ["scene", "scene", "scene2", "scene2"]
    assert figure.layout.scene.aspectmode == figure.layout.scene2.aspectmode == "data"
    assert figure.layout.scene.xaxis.title.text == "x (mm)"
    _check_html(path)
    assert pio.templates.default == template


def test_toggle_layout_has_one_scene_and_buttons(tmp_path):
    path = tmp_path / "toggle.html"
    figure = plot_meshes(_labels(), _labels(), SPACING, layout="toggle", path=path)
    _check_traces(figure)
    assert "scene2" not in figure.layout and figure.layout.scene.aspectmode == "data"
    assert {trace.scene for trace in figure.data} <= {"scene", None}
    buttons = figure.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["both", "ground truth", "prediction"]
    assert buttons[2].args[0]["visible"] == [False, False, True, True]
    _check_html(path)


def test_truth_alone_and_missing_tumour_still_plot():
    figure = plot_meshes(_labels(tumour=False), spacing=SPACING)
    assert [trace.name for trace in figure.data] == ["ground truth kidney", "ground truth tumour"]
    assert len(figure.data[0].i) > 0 and len(figure.data[1].i) == 0
