"""Tests for utils.data.case_validation: case reports and status, the loader guard and the safe loader.

The checks on single files are tested in test_nifti_checks.py; here they are seen through a case.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from utils.data import case_validation as cv
from utils.data import nifti_checks
from utils.data.case_discovery import CaseFiles, discover_cases
from utils.data.kits_layout import IMAGING_NAME, KITS_JSON_NAME, SEGMENTATION_NAME, build_kits_affine
from utils.data.nifti_io import save_nifti

SHAPE = (6, 16, 16)
SPACING = (2.0, 0.8, 0.8)
N_VOXELS = 6 * 16 * 16


def _image(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Random-looking int16 CT in HU (random so that gzip output is not trivially small)."""
    return np.random.default_rng(0).integers(-1000, 1000, size=shape, dtype=np.int16)


def _labels(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """72 labelled voxels: 68 kidney (1) and 4 tumour (2)."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:4, 4:10, 4:10] = 1
    labels[3, 6:8, 6:8] = 2
    return labels


def _write_case(
    root: Path,
    case_id: str = "case_00000",
    *,
    image: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    spacing: tuple[float, float, float] = SPACING,
    label_spacing: tuple[float, float, float] | None = None,
    with_image: bool = True,
    with_labels: bool = True,
) -> CaseFiles:
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    imaging = segmentation = None
    if with_image:
        arr = _image() if image is None else image
        imaging = save_nifti(arr, build_kits_affine(spacing), folder / IMAGING_NAME)
    if with_labels:
        arr = _labels() if labels is None else labels
        segmentation = save_nifti(arr, build_kits_affine(label_spacing or spacing), folder / SEGMENTATION_NAME)
    return CaseFiles(case_id, folder, imaging, segmentation)


def _codes(report: cv.CaseReport) -> set[str]:
    return {p.code for p in report.problems}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_good_case_fast_and_full(tmp_path: Path) -> None:
    case = _write_case(tmp_path)
    fast = cv.validate_case(case)
    assert (fast.status, fast.problems, fast.shape) == ("ok", (), SHAPE)
    assert fast.spacing == pytest.approx(SPACING)
    assert fast.label_counts is None and fast.hu_min is None
    full = cv.validate_case(case, full=True)
    assert full.status == "ok" and full.problems == ()
    assert dict(full.label_counts) == {0: N_VOXELS - 72, 1: 68, 2: 4}
    assert (full.hu_min, full.hu_max) == (float(_image().min()), float(_image().max()))


def test_missing_imaging_is_unusable_and_segmentation_still_checked(tmp_path: Path) -> None:
    labels = _labels()
    labels[0, 0, 0] = 3
    case = _write_case(tmp_path, labels=labels, with_image=False)
    report = cv.validate_case(case, full=True)
    assert report.status == "unusable"
    assert _codes(report) == {nifti_checks.MISSING_IMAGING, nifti_checks.BAD_LABELS}
    assert report.shape == SHAPE  # read from the segmentation


def test_missing_segmentation_is_inference_only_unless_other_errors(tmp_path: Path) -> None:
    report = cv.validate_case(_write_case(tmp_path, with_labels=False), full=True)
    assert report.status == "inference_only" and _codes(report) == {nifti_checks.MISSING_SEGMENTATION}
    image = _image().astype(np.float32)
    image[0, 0, 0] = np.nan
    bad = cv.validate_case(_write_case(tmp_path, "case_00001", image=image, with_labels=False), full=True)
    assert bad.status == "unusable" and _codes(bad) == {nifti_checks.MISSING_SEGMENTATION, nifti_checks.NON_FINITE}


@pytest.mark.parametrize("full", [False, True])
def test_truncated_gzip_is_unreadable(tmp_path: Path, full: bool) -> None:
    case = _write_case(tmp_path)
    _truncate(case.imaging)
    report = cv.validate_case(case, full=full)
    assert report.status == "unusable" and _codes(report) == {nifti_checks.UNREADABLE}
    assert report.problems[0].path == case.imaging and "truncated" in report.problems[0].message


def test_corrupt_deflate_stream_with_intact_trailer_needs_full_mode(tmp_path: Path) -> None:
    case = _write_case(tmp_path)
    data = bytearray(case.imaging.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    case.imaging.write_bytes(bytes(data))
    assert cv.validate_case(case).status == "ok"  # header and gzip trailer look fine
    report = cv.validate_case(case, full=True)
    assert report.status == "unusable" and _codes(report) == {nifti_checks.UNREADABLE}


def test_files_that_do_not_open_leave_shape_unknown(tmp_path: Path) -> None:
    case = _write_case(tmp_path)
    case.imaging.write_bytes(np.random.default_rng(1).bytes(2000))
    case.segmentation.write_bytes(gzip.compress(b"hello, this is not a NIfTI file\n" * 40))
    report = cv.validate_case(case, full=True)
    by_path = {p.path: p.code for p in report.problems}
    assert by_path == {case.imaging: nifti_checks.UNREADABLE, case.segmentation: nifti_checks.NOT_NIFTI}
    assert report.status == "unusable" and report.shape is None and report.spacing is None


def test_not_3d_image_is_unusable_and_not_compared_with_labels(tmp_path: Path) -> None:
    case = _write_case(tmp_path, image=np.zeros((6, 16, 16, 2), dtype=np.int16))
    report = cv.validate_case(case, full=True)
    assert _codes(report) == {nifti_checks.NOT_3D} and report.status == "unusable"  # no shape_mismatch as well


def test_shape_and_affine_mismatch(tmp_path: Path) -> None:
    shape_case = _write_case(tmp_path, labels=_labels((5, 16, 16)))
    assert _codes(cv.validate_case(shape_case)) == {nifti_checks.SHAPE_MISMATCH}
    affine_case = _write_case(tmp_path, "case_00001", label_spacing=(2.0, 0.8, 0.9))
    report = cv.validate_case(affine_case)
    assert _codes(report) == {nifti_checks.AFFINE_MISMATCH} and report.problems[0].path == affine_case.segmentation


def test_bad_labels_listed_in_full_mode_only(tmp_path: Path) -> None:
    labels = _labels()
    labels[0, :2, 0] = 3
    labels[5, 0, 0] = 255
    case = _write_case(tmp_path, labels=labels)
    assert cv.validate_case(case).status == "ok"
    report = cv.validate_case(case, full=True)
    assert _codes(report) == {nifti_checks.BAD_LABELS} and report.problems[0].path == case.segmentation
    assert dict(report.label_counts) == {0: N_VOXELS - 72 - 3, 1: 68, 2: 4}


def test_kits_json_spacing_disagreement_is_only_a_warning(tmp_path: Path) -> None:
    case = _write_case(tmp_path)
    report = cv.validate_case(case, kits_spacing=(3.0, 0.8, 0.8))
    assert report.status == "ok" and _codes(report) == {nifti_checks.SPACING_DIFFERS_FROM_KITS_JSON}
    assert not report.problems[0].is_error and report.errors == ()
    assert cv.validate_case(case, kits_spacing=SPACING).problems == ()


def test_case_validation_reports_the_codes_nifti_checks_defines(tmp_path: Path) -> None:
    """One vocabulary of problem codes: case_validation re-defines none of its own."""
    defined = {value for name, value in vars(nifti_checks).items() if name.isupper() and isinstance(value, str)}
    labels = _labels()
    labels[0, 0, 0] = 3
    report = cv.validate_case(_write_case(tmp_path, labels=labels, with_image=False), full=True)
    assert _codes(report) and _codes(report) <= defined
    assert not any(name.isupper() and isinstance(value, str) and value in defined and name not in vars(nifti_checks)
                   for name, value in vars(cv).items())


def test_validation_never_modifies_input_files(tmp_path: Path) -> None:
    good = _write_case(tmp_path)
    bad = _write_case(tmp_path, "case_00001")
    _truncate(bad.segmentation)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    cv.validate_dataset(tmp_path, full=True, show_progress=False)
    cv.load_case(good)
    with pytest.raises(cv.CaseError):
        cv.load_case(bad)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == before


def _mixed_dataset(root: Path) -> cv.DatasetReport:
    _write_case(root, "case_00000")
    _truncate(_write_case(root, "case_00001").imaging)
    _write_case(root, "case_00002", with_labels=False)
    _write_case(root, "case_00003", label_spacing=(2.0, 0.8, 0.9))
    entries = [
        {"case_id": f"case_{i:05d}", "voxel_spacing": {"x_spacing": 0.8, "y_spacing": 0.8, "z_spacing": 2.0}}
        for i in range(4)
    ]
    (root / KITS_JSON_NAME).write_text(json.dumps(entries), encoding="utf-8")
    return cv.validate_dataset(root, show_progress=False)


def test_validate_dataset_counts(tmp_path: Path) -> None:
    report = _mixed_dataset(tmp_path)
    assert report.counts == {"ok": 1, "inference_only": 1, "unusable": 2}
    assert [r.case_id for r in report.unusable] == ["case_00001", "case_00003"]
    assert report.listing.warnings == ()
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["cases"][1]["problems"][0]["code"] == nifti_checks.UNREADABLE


def test_parallel_validation_gives_the_same_report(tmp_path: Path) -> None:
    serial = _mixed_dataset(tmp_path)
    parallel = cv.validate_dataset(tmp_path, full=True, show_progress=False, workers=2)
    assert [r.to_dict() for r in parallel.reports] == [r.to_dict() for r in cv.validate_dataset(
        tmp_path, full=True, show_progress=False).reports]
    assert parallel.counts == serial.counts
    with pytest.raises(ValueError, match="workers must be >= 1"):
        cv.validate_dataset(tmp_path, workers=0)


def test_select_cases_error_names_every_bad_case(tmp_path: Path) -> None:
    report = _mixed_dataset(tmp_path)
    with pytest.raises(cv.UnusableCaseError) as info:
        cv.select_cases(report)
    message = str(info.value)
    for case_id, file_name, code in [
        ("case_00001", IMAGING_NAME, nifti_checks.UNREADABLE),
        ("case_00002", SEGMENTATION_NAME, nifti_checks.MISSING_SEGMENTATION),
        ("case_00003", SEGMENTATION_NAME, nifti_checks.AFFINE_MISMATCH),
    ]:
        assert any(case_id in line and file_name in line and code in line for line in message.splitlines())
    assert 'on_bad="skip"' in message and "case_00000" not in message
    assert info.value.case_ids == ("case_00001", "case_00002", "case_00003")


def test_select_cases_skip_and_inference(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    report = _mixed_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="utils.data.case_validation"):
        kept = cv.select_cases(report, on_bad="skip")
    assert [c.case_id for c in kept] == ["case_00000"]
    assert sum("skipping" in r.message for r in caplog.records) == 3
    kept = cv.select_cases(report, need_segmentation=False, on_bad="skip")
    assert [c.case_id for c in kept] == ["case_00000", "case_00002"]
    with pytest.raises(ValueError, match="'error', 'skip'"):
        cv.select_cases(report, on_bad="ignore")


def test_load_case_returns_checked_arrays(tmp_path: Path) -> None:
    loaded = cv.load_case(_write_case(tmp_path))
    assert loaded.image.dtype == np.float32 and loaded.image.shape == SHAPE
    np.testing.assert_array_equal(loaded.image, _image())
    assert loaded.segmentation.dtype == np.uint8
    np.testing.assert_array_equal(loaded.segmentation, _labels())
    np.testing.assert_allclose(loaded.affine, build_kits_affine(SPACING))
    assert loaded.spacing == pytest.approx(SPACING)


def test_load_case_missing_segmentation(tmp_path: Path) -> None:
    case = _write_case(tmp_path, with_labels=False)
    with pytest.raises(cv.CaseError) as info:
        cv.load_case(case)
    assert info.value.code == nifti_checks.MISSING_SEGMENTATION and SEGMENTATION_NAME in str(info.value)
    assert cv.load_case(case, need_segmentation=False).segmentation is None


def test_load_case_corrupt_file_raises_case_error_naming_the_file(tmp_path: Path) -> None:
    case = _write_case(tmp_path)
    data = bytearray(case.imaging.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)  # trailer intact: only reading finds it
    case.imaging.write_bytes(bytes(data))
    with pytest.raises(cv.CaseError) as info:
        cv.load_case(case)
    error = info.value
    assert (error.case_id, error.path, error.code) == ("case_00000", case.imaging, nifti_checks.UNREADABLE)
    assert str(case.imaging) in str(error) and error.reason in str(error)


def test_load_case_bad_labels(tmp_path: Path) -> None:
    labels = _labels()
    labels[0, 0, 0] = 7
    with pytest.raises(cv.CaseError, match="7 \\(1 voxel\\)"):
        cv.load_case(_write_case(tmp_path, labels=labels))


def test_real_cases_fast_validation(real_kits19_dir: Path) -> None:
    listing = discover_cases(real_kits19_dir)
    cases = {c.case_id: c for c in listing.cases}
    for case_id in ("case_00000", "case_00030", "case_00160"):
        report = cv.validate_case(cases[case_id], kits_spacing=listing.kits_spacing[case_id])
        assert report.status == "unusable" and _codes(report) == {nifti_checks.MISSING_IMAGING}
        assert report.spacing == pytest.approx(listing.kits_spacing[case_id])
    report = cv.validate_case(cases["case_00000"])
    assert report.spacing == pytest.approx((0.5, 0.919921875, 0.919921875))
    assert report.shape == (611, 512, 512)


def test_real_case_full_validation_labels(real_kits19_dir: Path) -> None:
    case = discover_cases(real_kits19_dir).cases[30]
    assert case.case_id == "case_00030"
    report = cv.validate_case(case, full=True)
    assert _codes(report) == {nifti_checks.MISSING_IMAGING}
    assert set(report.label_counts) == {0, 1, 2} and sum(report.label_counts.values()) == 38 * 512 * 512
    assert report.label_counts[1] > 0
