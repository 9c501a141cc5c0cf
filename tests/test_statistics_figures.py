import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from utils.analysis.dataset_statistics import HU_HISTOGRAM_RANGE, CaseStatistics
from utils.analysis.slice_statistics import SliceAreas, compare_sampled_classes
from utils.figures.drawing import save_figure
from utils.figures.statistics import (
    plot_class_proportions,
    plot_hu_histograms,
    plot_sampling_shares,
    plot_slice_areas,
    plot_slice_class_counts,
    plot_slice_classes_per_case,
    plot_slice_gallery,
    plot_slice_shares,
    plot_slices_per_case,
    plot_spacing_distributions,
    plot_training_samples,
    plot_tumours_per_case,
    plot_volume_distributions,
)


def _cases() -> list[CaseStatistics]:
    return [CaseStatistics(case_id=f"case_{i:05d}", shape=(40 + 20 * i, 64, 64), spacing=(1.0 + i, 0.8, 0.8),
                           voxel_counts=(40 * 64 * 64 - 3000 - 100 * i, 3000, 100 * i), tumours=i,
                           kidney_components=2, slices_with_kidney=20, slices_with_tumour=2 * i)
            for i in range(3)]


def _histograms() -> np.ndarray:
    histograms = np.zeros((3, HU_HISTOGRAM_RANGE[1] - HU_HISTOGRAM_RANGE[0]), np.int64)
    for label, (centre, count) in enumerate([(-900, 5000), (150, 300), (60, 80)]):
        values = np.random.default_rng(label).normal(centre, 30, count).round().astype(int)
        histograms[label] = np.bincount(values - HU_HISTOGRAM_RANGE[0], minlength=histograms.shape[1])
    return histograms


def _slice_counts() -> dict[str, np.ndarray]:
    return {"case_00000": np.array([30, 8, 4]), "case_00001": np.array([50, 10, 0])}


def _areas() -> SliceAreas:
    return SliceAreas(kidney_mm2=np.array([120.0, 300.0, 450.0, 800.0]), tumour_mm2=np.array([50.0, 90.0]))


def _items(count: int = 3) -> list[dict]:
    """Dataset-like items: a bright disc of kidney with a tumour in its middle on a dark square."""
    yy, xx = np.mgrid[:32, :32]
    label = np.zeros((1, 32, 32), np.uint8)
    label[0][(yy - 16) ** 2 + (xx - 16) ** 2 < 64] = 1
    label[0][(yy - 16) ** 2 + (xx - 16) ** 2 < 9] = 2
    image = np.where(label > 0, 1.0, -1.0).astype(np.float32)
    return [{"image": image, "label": label, "case_id": f"case_{i:05d}", "slice_index": 7 + i, "slice_class": i % 3}
            for i in range(count)]


FIGURES = [
    (plot_slices_per_case, _cases, 1),
    (plot_spacing_distributions, _cases, 2),
    (plot_class_proportions, _cases, 1),
    (plot_volume_distributions, _cases, 2),
    (plot_tumours_per_case, _cases, 1),
    (plot_slice_shares, _cases, 1),
    (plot_hu_histograms, _histograms, 1),
    (plot_slice_class_counts, lambda: np.array([50, 30, 5]), 1),
    (plot_slice_classes_per_case, _slice_counts, 1),
    (plot_slice_areas, _areas, 2),
    (plot_sampling_shares, lambda: compare_sampled_classes([0, 1, 1, 2, 2, 2], [0.2, 0.4, 0.4]), 1),
    (plot_slice_gallery, _items, 3),
]


@pytest.mark.parametrize("plot, data, n_axes", FIGURES, ids=[f[0].__name__ for f in FIGURES])
def test_figures_are_returned_and_saved_without_global_state(plot, data, n_axes, tmp_path):
    settings = dict(matplotlib.rcParams)
    figure = plot(data())
    assert isinstance(figure, Figure) and len(figure.axes) == n_axes
    assert plt.get_fignums() == [] and dict(matplotlib.rcParams) == settings
    path = save_figure(figure, tmp_path / f"{plot.__name__}.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 1000


def test_hu_histogram_axis_and_scale():
    ax = plot_hu_histograms(_histograms()).axes[0]
    assert ax.get_yscale() == "log" and len(ax.patches) == 3
    low, high = ax.get_xlim()
    assert -1100 < low < -900 and 150 < high < 400
    no_tumour = _histograms()
    no_tumour[2] = 0
    assert len(plot_hu_histograms(no_tumour).axes[0].patches) == 2


def test_tumour_bars_count_cases_per_number_of_tumours():
    heights = [patch.get_height() for patch in plot_tumours_per_case(_cases()).axes[0].patches]
    assert heights == [1, 1, 1]


def test_invalid_inputs_are_refused():
    for plot in (plot_slices_per_case, plot_spacing_distributions, plot_class_proportions,
                 plot_volume_distributions, plot_tumours_per_case, plot_slice_shares):
        with pytest.raises(ValueError, match="at least one case"):
            plot([])
    with pytest.raises(ValueError, match=r"histograms must be \(3, 4096\)"):
        plot_hu_histograms(np.zeros((3, 10)))
    with pytest.raises(ValueError, match="hold no voxels"):
        plot_hu_histograms(np.zeros((3, 4096)))
    with pytest.raises(ValueError, match="counts must be 3 slice counts"):
        plot_slice_class_counts([1, 2])


def test_slice_classes_per_case_stack_tumour_kidney_background():
    ax = plot_slice_classes_per_case(_slice_counts()).axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    bottoms = [patch.get_y() for patch in ax.patches]
    assert heights == [4, 0, 8, 10, 30, 50] and bottoms == [0, 0, 4, 0, 12, 10]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["00000", "00001"]


def test_slice_areas_without_tumour_slices_say_so():
    figure = plot_slice_areas(SliceAreas(np.array([10.0, 20.0]), np.array([])))
    assert "no slices" in figure.axes[1].get_title() and "2 slices" in figure.axes[0].get_title()


def test_sampling_share_bars_are_percentages():
    ax = plot_sampling_shares(compare_sampled_classes([0, 1, 1, 2], [0.2, 0.4, 0.4])).axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx([20, 40, 40, 25, 50, 25])


def test_slice_gallery_titles_and_contours():
    figure = plot_slice_gallery(_items(5), columns=2)
    axes = figure.axes
    assert len(axes) == 6 and not axes[5].get_title()
    assert axes[0].get_title() == "case_00000, slice 7\nbackground only"
    assert axes[2].get_title() == "case_00002, slice 9\ncontains tumour"
    assert len(axes[0].collections) == 2  # kidney (label > 0) and tumour contours


def test_training_samples_show_a_3d_patch_by_its_middle_axial_slice():
    label = np.zeros((1, 5, 8, 8), dtype=np.uint8)
    label[0, 2, 2:5, 2:5] = 2  # tumour only in the middle slice (index 2 of 5)
    patch = {"image": np.where(label > 0, 1.0, -1.0).astype(np.float32), "label": label, "case_id": "case_00009",
             "centre_class": "tumour"}
    axes = plot_training_samples([patch, *_items(1)], columns=2).axes
    assert axes[0].get_title() == "case_00009, slice middle of 3D patch (tumour)\ncontains tumour"
    assert axes[1].get_title() == "case_00000, slice 7\nbackground only"
    label[0, 2] = 0  # the same patch without tumour in its middle slice: another class
    assert plot_training_samples([patch]).axes[0].get_title().endswith("background only")


def test_invalid_slice_inputs_are_refused():
    with pytest.raises(ValueError, match="counts must map at least one case id to 3 slice counts"):
        plot_slice_classes_per_case({})
    with pytest.raises(ValueError, match="areas of tumour .* must be a 1D array of areas > 0"):
        plot_slice_areas(SliceAreas(np.array([1.0]), np.array([0.0])))
    with pytest.raises(ValueError, match="items must hold at least one item"):
        plot_slice_gallery([])
    bad = _items(1)
    bad[0]["label"] = bad[0]["label"][0]
    with pytest.raises(ValueError, match=r"items\[0\]: image and label must both be \(1, S, S\)"):
        plot_slice_gallery(bad)
    with pytest.raises(ValueError, match="window must be"):
        plot_slice_gallery(_items(1), window=(1.0, -1.0))
