"""Tests of utils.preprocessing.fingerprint: per-case statistics, pooling and percentiles, worked out by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from utils.analysis.dataset_statistics import HU_HISTOGRAM_RANGE
from utils.data.nifti_io import save_json_atomic
from utils.preprocessing.fingerprint import (
    build_fingerprint,
    compute_case_fingerprint,
    load_case_fingerprint,
    load_fingerprint,
    save_case_fingerprint,
)

SOURCE = {"imaging": {"name": "imaging.nii.gz", "size": 10, "mtime_ns": 1}}


def _case(case_id: str, values: list[float], background: float = -1000.0, spacing=(3.0, 0.8, 0.8)):
    """A one-row case whose foreground voxels hold ``values`` (labels 1 and 2 alternate)."""
    image = np.array([[[background, *values]]], dtype=np.float32)
    labels = np.array([[[0] + [1 + i % 2 for i in range(len(values))]]], dtype=np.uint8)
    return compute_case_fingerprint(case_id, image, labels, spacing, SOURCE)


def test_case_statistics_of_a_hand_made_case() -> None:
    stats = _case("case_00000", [0.0, 10.0, 20.0])
    assert stats.foreground_voxels == 3
    assert stats.hu_sum == 30.0 and stats.hu_sum_squares == 500.0
    assert stats.histogram_start == 0 and len(stats.histogram) == 21
    assert stats.histogram[0] == stats.histogram[10] == stats.histogram[20] == 1 and sum(stats.histogram) == 3
    assert stats.shape == (1, 1, 4) and stats.spacing == (3.0, 0.8, 0.8)
    fingerprint = build_fingerprint([stats], (0.0, 100.0))
    assert fingerprint.foreground_mean_hu == 10.0
    assert fingerprint.foreground_std_hu == pytest.approx(np.std([0.0, 10.0, 20.0]))
    assert fingerprint.clip_hu == (0.0, 20.0)
    assert (fingerprint.foreground_min_hu, fingerprint.foreground_max_hu) == (0.0, 20.0)
    assert fingerprint.foreground_voxels == 3


def test_case_statistics_refuse_different_shapes() -> None:
    with pytest.raises(ValueError, match="case_00000: image shape"):
        compute_case_fingerprint("case_00000", np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), (1.0, 1.0, 1.0), SOURCE)


def test_pooling_two_cases() -> None:
    first, second = _case("case_00000", [0.0, 10.0]), _case("case_00001", [20.0, 30.0, 40.0], spacing=(1.0, 0.7, 0.7))
    assert second.histogram_start == 20
    fingerprint = build_fingerprint([first, second], (20.0, 80.0))
    values = [0.0, 10.0, 20.0, 30.0, 40.0]
    assert fingerprint.case_ids == ("case_00000", "case_00001")
    assert fingerprint.foreground_voxels == 5
    assert fingerprint.foreground_mean_hu == pytest.approx(20.0)
    assert fingerprint.foreground_std_hu == pytest.approx(np.std(values))
    assert fingerprint.clip_hu == (0.0, 30.0)  # 20 % of 5 voxels is the 1st, 80 % the 4th
    assert fingerprint.median_spacing == pytest.approx((2.0, 0.75, 0.75))
    assert fingerprint.shapes == ((1, 1, 3), (1, 1, 4))


def test_a_case_without_foreground_does_not_move_the_fingerprint() -> None:
    empty = _case("case_00001", [])
    assert empty.foreground_voxels == 0 and empty.histogram == ()
    with_empty = build_fingerprint([_case("case_00000", [5.0, 7.0]), empty], (0.5, 99.5))
    assert with_empty.foreground_mean_hu == 6.0 and with_empty.clip_hu == (5.0, 7.0)


def test_out_of_range_values_go_to_the_end_bins() -> None:
    low, high = HU_HISTOGRAM_RANGE  # bins [low, high)
    stats = _case("case_00000", [-3000.0, 0.0, 5000.0])
    assert stats.histogram_start == low and len(stats.histogram) == high - low
    assert stats.histogram[0] == stats.histogram[-1] == 1
    fingerprint = build_fingerprint([stats], (0.0, 100.0))
    assert fingerprint.clip_hu == (low, high - 1)
    assert (fingerprint.foreground_min_hu, fingerprint.foreground_max_hu) == (low, high - 1)
    assert fingerprint.foreground_mean_hu == pytest.approx(2000 / 3)  # the mean uses the values themselves


def test_fingerprint_errors() -> None:
    with pytest.raises(ValueError, match="at least one case"):
        build_fingerprint([], (0.5, 99.5))
    with pytest.raises(ValueError, match="no case has any kidney or tumour voxel"):
        build_fingerprint([_case("case_00000", []), _case("case_00001", [])], (0.5, 99.5))


def test_case_statistics_round_trip(tmp_path: Path) -> None:
    stats = _case("case_00000", [1.0, 2.0, 2.0])
    path = save_case_fingerprint(tmp_path / "case_00000.json", stats)
    assert load_case_fingerprint(path) == stats
    assert load_case_fingerprint(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert load_case_fingerprint(tmp_path / "bad.json") is None
    (tmp_path / "other.json").write_text('{"case_id": "case_00000"}')
    assert load_case_fingerprint(tmp_path / "other.json") is None


def test_fingerprint_round_trip(tmp_path: Path) -> None:
    fingerprint = build_fingerprint([_case("case_00000", [0.0, 10.0]), _case("case_00001", [20.0, 30.5])], (0.5, 99.5))
    path = save_json_atomic(tmp_path / "fingerprint.json", fingerprint.to_dict())
    stored = json.loads(path.read_text())
    assert stored["version"] == 1 and stored["summary"]["cases"] == 2
    assert load_fingerprint(path) == fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["fingerprint.json"]  # no temporary file left


def test_load_fingerprint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run scripts/preprocess.py"):
        load_fingerprint(tmp_path / "fingerprint.json")
    for text in ("{not json", '{"case_ids": []}', "[1, 2]", "null"):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match="not a valid fingerprint file"):
            load_fingerprint(tmp_path / "bad.json")


def test_save_json_atomic_leaves_an_unchanged_file_alone(tmp_path: Path) -> None:
    path = save_json_atomic(tmp_path / "plan.json", {"a": [1, 2]})
    before = path.stat().st_mtime_ns
    os.utime(path, ns=(before - 10**9, before - 10**9))
    save_json_atomic(path, {"a": [1, 2]})
    assert path.stat().st_mtime_ns == before - 10**9
    save_json_atomic(path, {"a": [1, 3]})
    assert json.loads(path.read_text()) == {"a": [1, 3]} and path.stat().st_mtime_ns != before - 10**9
