import numpy as np
import pytest
from matplotlib.figure import Figure

from utils.figures.drawing import pick_axial_slice, plot_case_gallery, save_figure


def test_slice_choice_follows_the_tumour_then_the_kidney():
    labels = np.zeros((10, 8, 8), np.uint8)
    assert pick_axial_slice(labels) == 5
    labels[2:4, 3, 3] = 1
    assert pick_axial_slice(labels) in (2, 3)
    labels[7, 3, 3] = 2
    assert pick_axial_slice(labels) == 7


def test_gallery_returns_a_figure_and_saves_atomically(tmp_path):
    image = np.random.default_rng(0).normal(40, 30, (6, 32, 32)).astype(np.float32)
    labels = np.zeros((6, 32, 32), np.uint8)
    labels[3, 10:20, 10:20] = 1
    labels[3, 12:15, 12:15] = 2
    figure = plot_case_gallery([("case_00000", image, labels, (3.0, 0.8, 0.8))] * 3, columns=2)
    assert isinstance(figure, Figure) and len(figure.axes) == 4
    path = save_figure(figure, tmp_path / "figs" / "gallery.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and [p.name for p in path.parent.iterdir()] == ["gallery.png"]
    with pytest.raises(ValueError, match="at least one case"):
        plot_case_gallery([])
