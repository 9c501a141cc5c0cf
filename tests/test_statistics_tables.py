import numpy as np
import pytest

from utils.analysis.dataset_statistics import compute_label_statistics
from utils.analysis.statistics_tables import (
    SLICE_CLASS_COLUMNS,
    build_slice_class_rows,
    build_statistics_rows,
    format_slice_class_table,
    format_statistics_table,
    load_statistics_csv,
    write_slice_class_csv,
    write_statistics_csv,
)

SPACING = (4.0, 2.5, 2.5)


def test_csv_round_trip_and_table(tmp_path, hand_made_labels):
    labels = hand_made_labels()
    image = np.choose(labels, [-1000, 40, 80]).astype(np.int16)
    stats = [compute_label_statistics("case_00000", labels, SPACING, image),
             compute_label_statistics("case_00001", np.minimum(labels, 1), (3.0, 0.7, 0.7))]
    path = write_statistics_csv(stats, tmp_path / "reports" / "cases.csv")
    assert [p.name for p in path.parent.iterdir()] == ["cases.csv"]
    rows = load_statistics_csv(path)
    assert rows == build_statistics_rows(stats)
    assert rows[0]["tumours"] == 2 and rows[0]["hu_tumour_mean"] == 80.0 and rows[1]["hu_tumour_mean"] is None
    table = format_statistics_table(stats).splitlines()
    assert table[0].split()[:2] == ["case_id", "slices"] and table[2].split()[0] == "case_00001"
    with pytest.raises(ValueError, match="at least one case"):
        write_statistics_csv([], tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="columns must be keys"):
        format_statistics_table(stats, columns=("case_id", "nonsense"))
    with pytest.raises(FileNotFoundError, match="no such statistics file"):
        load_statistics_csv(tmp_path / "missing.csv")


def test_slice_class_rows_csv_and_table(tmp_path):
    counts = {"case_00000": np.array([3, 2, 1]), "case_00001": np.array([10, 0, 0])}
    rows = build_slice_class_rows(counts)
    assert list(rows[0]) == list(SLICE_CLASS_COLUMNS) == ["case_id", "slices", "background_slices",
                                                           "kidney_slices", "tumour_slices"]
    assert rows[0] == {"case_id": "case_00000", "slices": 6, "background_slices": 3, "kidney_slices": 2,
                       "tumour_slices": 1}
    path = write_slice_class_csv(counts, tmp_path / "slices.csv")
    assert path.read_text().splitlines() == ["case_id,slices,background_slices,kidney_slices,tumour_slices",
                                             "case_00000,6,3,2,1", "case_00001,10,10,0,0"]
    table = [line.split() for line in format_slice_class_table(counts).splitlines()]
    assert table[0][0] == "case_id" and table[-1] == ["total", "16", "13", "2", "1"]
    with pytest.raises(ValueError, match=r"case_00002: counts must be 3 integer slice counts >= 0, got \[1, -1, 0\]"):
        build_slice_class_rows({"case_00002": [1, -1, 0]})
    with pytest.raises(ValueError, match="counts must hold at least one case"):
        write_slice_class_csv({}, tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="counts must hold at least one case"):
        format_slice_class_table({})
