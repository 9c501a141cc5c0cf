import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from utils.figures.drawing import DISPLAY_WINDOW_HU, LABEL_COLOURS
from utils.figures.slices import (
    ERROR_COLOURS,
    FILL_ALPHA,
    choose_slices,
    compose_overlay,
    plane_aspect,
    plot_error_map,
    plot_overlay,
    take_slice,
    window_to_rgb,
)

SPACING = (5.0, 1.0, 1.0)
CT_HU = 40.0  # mid-window: grey 0.5


def _case():
    """20x40x40 CT of constant 40 HU; kidney block z 4..15, y 8..31, x 8..31; tumour z 8..11, y 16..23, x 20..27."""
    image = np.full((20, 40, 40), CT_HU, np.float32)
    truth = np.zeros(image.shape, np.uint8)
    truth[4:16, 8:32, 8:32] = 1
    truth[8:12, 16:24, 20:28] = 2
    return image, truth


def _render(figure: Figure) -> np.ndarray:
    FigureCanvasAgg(figure).draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(float) / 255


def _pixel(figure: Figure, rgba: np.ndarray, ax, row: int, column: int) -> np.ndarray:
    """Rendered colour at the centre of data voxel (row, column) of ``ax`` (imshow: x = column, y = row)."""
    x, y = ax.transData.transform((column, row))
    return rgba[int(round(rgba.shape[0] - y)), int(round(x))]


def _blend(colour: str, grey: float = 0.5) -> np.ndarray:
    return (1 - FILL_ALPHA) * grey + FILL_ALPHA * np.array(to_rgb(colour))


def test_slice_choice_in_every_plane():
    _, truth = _case()
    assert choose_slices(truth, "axial") == [10]           # tumour z 8..11 -> centre 9.5 -> 10 (round half even)
    assert choose_slices(truth, "coronal") == [20]         # tumour y 16..23 -> 19.5
    assert choose_slices(truth, "sagittal") == [24]        # tumour x 20..27 -> 23.5
    assert choose_slices(truth, "axial", "labelled", 3) == [7, 10, 12]  # kidney z 4..15 evenly, ends excluded
    assert choose_slices(truth, "axial", "tumour", 1) == [10]
    assert choose_slices(np.where(truth == 2, 1, truth), "axial", "centre") == [10]  # kidney centre 9.5
    assert choose_slices(np.zeros_like(truth), "coronal") == [20]  # empty: middle
    assert choose_slices(truth, "sagittal", [0, 39]) == [0, 39]
    assert choose_slices(truth, "axial", np.int64(3)) == [3]


@pytest.mark.parametrize("plane, slices, message", [
    ("oblique", None, r"plane must be one of \['axial', 'coronal', 'sagittal'\], got 'oblique'"),
    ("axial", 20, r"axial slice index must be an integer in 0\.\.19 .*got 20"),
    ("coronal", [3, -1], r"coronal slice index must be an integer in 0\.\.39 .*got -1"),
    ("sagittal", 2.0, r"sagittal slice index .*got 2\.0"),
    ("axial", "middle", r"slice mode must be one of \['centre', 'tumour', 'labelled'\]"),
    ("axial", [], "at least one axial slice"),
])
def test_bad_plane_or_slice_raises(plane, slices, message):
    image, truth = _case()
    with pytest.raises(ValueError, match=message):
        plot_overlay(image, truth, spacing=SPACING, plane=plane, slices=slices)


def test_bad_inputs_raise():
    image, truth = _case()
    with pytest.raises(ValueError, match="spacing must be three positive"):
        plot_overlay(image, truth, spacing=(0, 1, 1))
    with pytest.raises(ValueError, match="prediction must have the image's shape"):
        plot_overlay(image, truth, truth[:, :, :10], spacing=SPACING)
    with pytest.raises(ValueError, match="style must be one of"):
        plot_overlay(image, truth, spacing=SPACING, style="outline")
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        choose_slices(truth, "axial", "tumour", 0)


def test_slices_and_aspect_follow_the_plane():
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert take_slice(volume, "axial", 1).shape == (3, 4)
    assert take_slice(volume, "coronal", 1).shape == (2, 4)
    assert take_slice(volume, "sagittal", 1).shape == (2, 3)
    assert [plane_aspect((5, 0.8, 0.5), p) for p in ("axial", "coronal", "sagittal")] == [1.6, 10.0, 6.25]
    rgb = window_to_rgb(np.array([[DISPLAY_WINDOW_HU[0] - 500, 40.0, DISPLAY_WINDOW_HU[1] + 500]]))
    np.testing.assert_allclose(rgb[0, :, 0], [0.0, 0.5, 1.0])


def test_overlay_pixel_at_a_tumour_voxel_has_the_tumour_colour(tmp_path):
    image, truth = _case()
    prediction = truth.copy()
    prediction[prediction == 2] = 1  # prediction misses the tumour: kidney colour there
    figure = plot_overlay(image, truth, prediction, spacing=SPACING, plane="axial", slices=[10],
                          path=tmp_path / "overlay.png")
    assert (tmp_path / "overlay.png").stat().st_size > 0 and len(figure.axes) == 2
    composed = figure.axes[0].images[0].get_array()
    np.testing.assert_allclose(composed[20, 24], _blend(LABEL_COLOURS[2]), atol=1e-6)
    rgba = _render(figure)
    truth_ax, prediction_ax = figure.axes
    np.testing.assert_allclose(_pixel(figure, rgba, truth_ax, 20, 24), _blend(LABEL_COLOURS[2]), atol=2 / 255)
    np.testing.assert_allclose(_pixel(figure, rgba, prediction_ax, 20, 24), _blend(LABEL_COLOURS[1]), atol=2 / 255)
    np.testing.assert_allclose(_pixel(figure, rgba, truth_ax, 2, 2), [0.5] * 3, atol=2 / 255)  # background
    legend_texts = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend_texts == ["kidney (label 1)", "tumour (label 2)"]


def test_coronal_view_is_drawn_at_the_physical_aspect(tmp_path):
    image, truth = _case()
    figure = plot_overlay(image, truth, spacing=SPACING, plane="coronal", slices="tumour", n_slices=2,
                          style="contour", path=tmp_path / "coronal.svg")
    assert (tmp_path / "coronal.svg").stat().st_size > 0
    assert len(figure.axes) == 2  # two rows, one column (no prediction)
    ax = figure.axes[0]
    assert ax.get_aspect() == pytest.approx(5.0)
    assert ax.images[0].get_array().shape[:2] == (20, 40)  # (Z, X)
    FigureCanvasAgg(figure).draw()
    box = ax.get_window_extent()
    # 40 columns x 1 mm wide, 20 rows x 5 mm tall: displayed height / width = 100 / 40
    assert box.height / box.width == pytest.approx(100 / 40, rel=0.02)
    assert len(ax.collections) >= 2  # kidney and tumour contours


def test_error_map_colours_a_known_false_positive_and_false_negative(tmp_path):
    image, truth = _case()
    prediction = truth.copy()
    prediction[10, 2, 2] = 1            # kidney false positive in the background
    prediction[10, 16:24, 20:24] = 1    # tumour false negatives (still kidney: kidney true positives)
    prediction[10, 30, 10] = 2          # tumour false positive inside the kidney
    figure = plot_error_map(image, truth, prediction, SPACING, plane="axial", slices=10,
                            path=tmp_path / "errors.png")
    assert (tmp_path / "errors.png").stat().st_size > 0
    kidney_ax, tumour_ax = figure.axes
    rgba = _render(figure)
    tp, fp, fn = (_blend(ERROR_COLOURS[k]) for k in ("true positive", "false positive", "false negative"))
    check = lambda ax, row, column, want: np.testing.assert_allclose(  # noqa: E731
        _pixel(figure, rgba, ax, row, column), want, atol=2 / 255)
    check(kidney_ax, 2, 2, fp)
    check(kidney_ax, 20, 22, tp)
    check(tumour_ax, 20, 22, fn)
    check(tumour_ax, 20, 26, tp)
    check(tumour_ax, 30, 10, fp)
    check(tumour_ax, 2, 2, [0.5] * 3)
    assert [t.get_text() for t in figure.legends[0].get_texts()] == list(ERROR_COLOURS)
    assert len({tuple(to_rgb(c)) for c in ERROR_COLOURS.values()}
               | {tuple(to_rgb(c)) for c in LABEL_COLOURS.values()}) == 5


def test_figures_leave_global_state_alone():
    import matplotlib.pyplot as plt

    image, truth = _case()
    params = dict(matplotlib.rcParams)
    open_figures = plt.get_fignums()
    figure = plot_error_map(image, truth, truth, SPACING, plane="sagittal", slices="labelled", n_slices=2)
    assert isinstance(figure, Figure) and len(figure.axes) == 4
    assert plt.get_fignums() == open_figures and dict(matplotlib.rcParams) == params
    composed = compose_overlay(np.full((2, 2), CT_HU), np.array([[0, 1], [2, 0]], np.uint8))
    np.testing.assert_allclose(composed[1, 0], _blend(LABEL_COLOURS[2]), atol=1e-6)
