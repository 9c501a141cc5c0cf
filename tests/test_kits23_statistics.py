"""Dataset statistics of KiTS23 label maps (cyst, label 3): hand-made NIfTI files and the real KiTS23 masks."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from scipy import ndimage

from utils.analysis.dataset_statistics import (
    HU_HISTOGRAM_RANGE,
    HuSummary,
    accumulate_hu_histograms,
    compute_case_statistics,
    compute_dataset_statistics,
    compute_label_statistics,
)
from utils.analysis.slice_statistics import classify_slices, compute_slice_areas, compute_slice_pixel_counts
from utils.analysis.statistics_tables import (
    TABLE_COLUMNS,
    TABLE_COLUMNS_WITH_CYST,
    build_statistics_rows,
    format_statistics_table,
    load_statistics_csv,
    write_statistics_csv,
)
from utils.data.case_discovery import CaseFiles
from utils.data.dataset_definitions import KITS23
from utils.data.kits_layout import build_kits_affine
from utils.data.nifti_io import save_nifti
from utils.figures.drawing import LABEL_COLOURS
from utils.figures.statistics import (
    CYST_COLOUR,
    plot_class_proportions,
    plot_hu_histograms,
    plot_slice_gallery,
    plot_slice_shares,
    plot_tumours_per_case,
    plot_volume_distributions,
)

SPACING = (4.0, 2.5, 2.5)  # 25 mm³ = 0.025 ml per voxel
REAL_KITS23_CASES = 100
REAL_KITS23_CASES_WITH_CYST = 51
#: The KiTS19 CSV header, column for column: KiTS19 tables must not change.
KITS19_CSV_HEADER = (
    "case_id,slices,rows,columns,spacing_z_mm,spacing_y_mm,spacing_x_mm,voxels_background,voxels_kidney,"
    "voxels_tumour,proportion_background,proportion_kidney,proportion_tumour,kidney_ml,tumour_ml,kidney_tumour_ml,"
    "tumours,kidney_components,kidney_slice_share,tumour_slice_share,"
    + ",".join(f"hu_{name}_{key}" for name in ("background", "kidney", "tumour")
               for key in ("mean", "std", "p0_5", "p99_5")))


def _kits23_labels() -> np.ndarray:
    """``(5, 8, 8)`` KiTS23 labels whose statistics are known by hand.

    Kidney 2 x 4 x 4 = 32 voxels minus the tumour (2 voxels) = 30, tumour 2, cysts 3:
    a 2 x 2 block (4 voxels, slice 0), one voxel (slice 2) and two voxels touching only by a
    corner (slices 3 and 4, one cyst under 26-connectivity): 7 cyst voxels in slices 0, 2, 3, 4.
    """
    labels = np.zeros((5, 8, 8), np.uint8)
    labels[0:2, 0:4, 0:4] = 1
    labels[1, 1, 1:3] = 2
    labels[0, 6:8, 6:8] = 3
    labels[2, 7, 0] = 3
    labels[3, 4, 4] = 3
    labels[4, 5, 5] = 3
    return labels


def _write_case(root: Path, case_id: str, labels: np.ndarray, image: np.ndarray | None = None,
                spacing=SPACING) -> Path:
    folder = root / case_id
    folder.mkdir(parents=True)
    save_nifti(labels, build_kits_affine(spacing), folder / "segmentation.nii.gz")
    if image is not None:
        save_nifti(image, build_kits_affine(spacing), folder / "imaging.nii.gz")
    return folder


def test_cyst_volume_count_and_slices_by_hand(tmp_path):
    labels = _kits23_labels()
    image = np.choose(labels, [-1000, 40, 80, 10]).astype(np.int16)
    _write_case(tmp_path, "case_00400", labels, image)
    (stats,) = compute_dataset_statistics(tmp_path, dataset="kits23", show_progress=False)
    assert stats.dataset == "kits23" and stats.class_names == ("background", "kidney", "tumour", "cyst")
    assert stats.voxel_counts == (320 - 39, 30, 2, 7)
    assert stats.cysts == 3 and stats.tumours == 1
    assert stats.cyst_ml == pytest.approx(7 * 0.025) and stats.tumour_ml == pytest.approx(2 * 0.025)
    assert stats.kidney_ml == pytest.approx(30 * 0.025)
    assert stats.kidney_tumour_ml == pytest.approx(32 * 0.025)  # labels 1 and 2, as for KiTS19
    assert stats.kidney_and_masses_ml == pytest.approx(39 * 0.025)  # labels 1, 2 and 3
    assert stats.class_proportions == pytest.approx((281 / 320, 30 / 320, 2 / 320, 7 / 320))
    assert (stats.slices_with_kidney, stats.slices_with_tumour, stats.slices_with_cyst) == (5, 1, 4)
    assert stats.cyst_slice_share == pytest.approx(4 / 5)
    # the kidney block and the 2 x 2 cyst are apart; the lone cyst voxel and the corner pair are apart too
    assert stats.kidney_components == 4
    assert stats.hu[3] == HuSummary(10.0, 0.0, 10.0, 10.0) and stats.hu[2] == HuSummary(80.0, 0.0, 80.0, 80.0)
    low = HU_HISTOGRAM_RANGE[0]
    assert stats.hu_histogram.shape == (4, 4096) and stats.hu_histogram[3, 10 - low] == 7
    assert accumulate_hu_histograms([stats]).shape == (4, 4096)
    assert compute_label_statistics("case_00400", labels, SPACING, image, dataset=KITS23) == stats


def test_kits19_statistics_have_no_cyst_values(hand_made_labels):
    stats = compute_label_statistics("case_00000", hand_made_labels(), SPACING)
    assert stats.dataset == "kits19" and len(stats.voxel_counts) == 3
    assert (stats.cysts, stats.slices_with_cyst, stats.cyst_ml, stats.cyst_slice_share) == (None,) * 4
    assert stats.kidney_and_masses_ml is None
    # KiTS19 labels read as KiTS23: valid, and simply without cyst
    as_kits23 = compute_label_statistics("case_00000", hand_made_labels(), SPACING, dataset="kits23")
    assert as_kits23.voxel_counts == (*stats.voxel_counts, 0) and as_kits23.cysts == 0
    assert as_kits23.kidney_and_masses_ml == pytest.approx(stats.kidney_tumour_ml)


def test_a_cyst_read_as_kits19_names_the_file_and_the_setting(tmp_path):
    folder = _write_case(tmp_path, "case_00400", _kits23_labels())
    with pytest.raises(ValueError) as raised:
        compute_dataset_statistics(tmp_path, show_progress=False)
    message = str(raised.value)
    assert str(folder / "segmentation.nii.gz") in message
    assert "label values must be in {0, 1, 2}, got values from 0 to 3" in message
    assert "0 (background), 1 (kidney), 2 (tumour)" in message
    assert "label 3 is KiTS23's cyst" in message and "'dataset: kits23'" in message
    labels = _kits23_labels()
    labels[0, 0, 0] = 4  # no known dataset has label 4: the allowed labels, no hint
    with pytest.raises(ValueError, match=r"label values must be in \{0, 1, 2, 3\}, got values from 0 to 4") as raised:
        compute_label_statistics("c", labels, SPACING, dataset="kits23")
    assert "set `dataset" not in str(raised.value)
    with pytest.raises(ValueError, match="unknown dataset 'kits99'"):
        compute_label_statistics("c", labels, SPACING, dataset="kits99")


def test_slice_statistics_follow_the_dataset():
    labels = _kits23_labels()
    kidney, tumour, cyst = compute_slice_pixel_counts(labels, dataset="kits23")
    assert kidney.tolist() == [16, 14, 0, 0, 0] and tumour.tolist() == [0, 2, 0, 0, 0]
    assert cyst.tolist() == [4, 0, 1, 1, 1]
    assert classify_slices(labels, dataset="kits23").tolist() == [1, 2, 1, 1, 1]  # cyst-only slices: class 1
    kidney_mm2, tumour_mm2 = compute_slice_areas(labels, SPACING, dataset="kits23")
    assert kidney_mm2.tolist() == pytest.approx([20 * 6.25, 16 * 6.25, 6.25, 6.25, 6.25])
    assert tumour_mm2.tolist() == pytest.approx([0, 2 * 6.25, 0, 0, 0])
    with pytest.raises(ValueError, match="label 3 is KiTS23's cyst"):
        classify_slices(labels)


def test_kits23_table_has_cyst_columns_and_kits19_none(tmp_path, hand_made_labels):
    labels = _kits23_labels()
    kits23 = [compute_label_statistics("case_00400", labels, SPACING, dataset="kits23"),
              compute_label_statistics("case_00401", np.minimum(labels, 2), SPACING, dataset="kits23")]
    rows = build_statistics_rows(kits23)
    cyst_columns = [key for key in rows[0] if "cyst" in key or "masses" in key]
    assert cyst_columns == ["voxels_cyst", "proportion_cyst", "cyst_ml", "kidney_and_masses_ml", "cysts",
                            "cyst_slice_share", "hu_cyst_mean", "hu_cyst_std", "hu_cyst_p0_5", "hu_cyst_p99_5"]
    assert (rows[0]["cysts"], rows[1]["cysts"]) == (3, 0) and rows[0]["cyst_ml"] == pytest.approx(0.175)
    path = write_statistics_csv(kits23, tmp_path / "kits23.csv")
    assert load_statistics_csv(path) == rows and isinstance(load_statistics_csv(path)[0]["cysts"], int)
    header = format_statistics_table(kits23).splitlines()[0].split()
    assert header == list(TABLE_COLUMNS_WITH_CYST) and {"cyst_ml", "cysts", "cyst_slice_share"} <= set(header)

    kits19 = [compute_label_statistics("case_00000", hand_made_labels(), SPACING)]
    assert not [key for key in build_statistics_rows(kits19)[0] if "cyst" in key or "masses" in key]
    path = write_statistics_csv(kits19, tmp_path / "kits19.csv")
    assert path.read_text().splitlines()[0] == KITS19_CSV_HEADER
    assert format_statistics_table(kits19).splitlines()[0].split() == list(TABLE_COLUMNS)
    with pytest.raises(ValueError, match="one dataset"):
        build_statistics_rows(kits19 + kits23)


def test_kits23_figures_show_the_cyst_in_its_own_colour():
    labels = _kits23_labels()
    cases = [compute_label_statistics(f"case_0040{i}", labels, SPACING,
                                      np.choose(labels, [-1000, 40, 80, 10]).astype(np.int16), dataset="kits23")
             for i in range(3)]
    cyst = to_rgb(CYST_COLOUR)
    assert cyst not in {to_rgb(colour) for colour in LABEL_COLOURS.values()}
    proportions = plot_class_proportions(cases).axes[0]
    assert [to_rgb(patch.get_facecolor()) for patch in proportions.patches].count(cyst) == 3
    assert len(plot_volume_distributions(cases).axes) == 3 and len(plot_tumours_per_case(cases).axes) == 2
    cyst_bars = plot_tumours_per_case(cases).axes[1].patches
    assert [patch.get_height() for patch in cyst_bars] == [0, 0, 0, 3]  # three cases with 3 cysts each
    assert "cyst" in plot_slice_shares(cases).axes[0].get_title()
    hu = plot_hu_histograms(accumulate_hu_histograms(cases), dataset="kits23").axes[0]
    assert len(hu.patches) == 4 and to_rgb(hu.patches[3].get_edgecolor()) == cyst
    with pytest.raises(ValueError, match=r"histograms must be \(3, 4096\).*KiTS19"):
        plot_hu_histograms(accumulate_hu_histograms(cases))
    item = {"image": np.zeros((1, 8, 8), np.float32), "label": labels[:1], "case_id": "case_00400",
            "slice_index": 0, "slice_class": 1}
    legend = plot_slice_gallery([item]).legends[0]
    assert [text.get_text() for text in legend.get_texts()][-1] == "cyst (label 3)"


def test_real_kits23_masks_have_cysts_in_51_of_100_cases(real_kits23_dir):
    statistics = compute_dataset_statistics(real_kits23_dir, workers=2, with_hu=False, show_progress=False,
                                            dataset="kits23")
    assert len(statistics) == REAL_KITS23_CASES
    with_cyst = [case for case in statistics if case.cysts]
    assert len(with_cyst) == REAL_KITS23_CASES_WITH_CYST
    for case in statistics:
        assert (case.voxel_counts[3] > 0) == (case.cysts > 0) == (case.slices_with_cyst > 0)
        assert case.hu is None and case.kidney_and_masses_ml >= case.kidney_tumour_ml
    without_cyst = next(case for case in statistics if not case.cysts)
    most_cysts = max(with_cyst, key=lambda case: (case.cysts, case.case_id))
    for case in (with_cyst[0], most_cysts, without_cyst):
        image = nib.load(real_kits23_dir / case.case_id / "segmentation.nii.gz")
        labels = np.asarray(image.dataobj).astype(np.uint8)
        cyst = labels == 3
        voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000
        assert case.voxel_counts == tuple(int(np.count_nonzero(labels == label)) for label in range(4))
        assert case.cysts == ndimage.label(cyst, structure=np.ones((3, 3, 3), bool))[1]
        assert case.cyst_ml == pytest.approx(np.count_nonzero(cyst) * voxel_ml, rel=1e-6)
        assert case.slices_with_cyst == int(cyst.any(axis=(1, 2)).sum())
    # read as KiTS19, a case with a cyst says which setting to change
    case_id = with_cyst[0].case_id
    segmentation = real_kits23_dir / case_id / "segmentation.nii.gz"
    with pytest.raises(ValueError, match="label 3 is KiTS23's cyst.*'dataset: kits23'") as raised:
        compute_case_statistics(CaseFiles(case_id, segmentation.parent, None, segmentation))
    assert str(segmentation) in str(raised.value)
