"""Tests for utils.data.nifti_checks: header checks, verified voxel reads and voxel checks of one file."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from utils.data import nifti_checks as nc
from utils.data.kits_layout import build_kits_affine
from utils.data.nifti_io import save_nifti, write_bytes_atomic

SHAPE = (6, 16, 16)
SPACING = (2.0, 0.8, 0.8)
N_VOXELS = 6 * 16 * 16


def _image(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Random-looking int16 CT in HU (random so that gzip output is not trivially small)."""
    return np.random.default_rng(0).integers(-1000, 1000, size=shape, dtype=np.int16)


def _write(path: Path, array: np.ndarray | None = None, spacing: tuple[float, float, float] = SPACING) -> Path:
    return save_nifti(_image() if array is None else array, build_kits_affine(spacing), path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _codes(problems: list[nc.Problem]) -> set[str]:
    return {p.code for p in problems}


def test_problem_severity_and_description() -> None:
    error = nc.Problem(nc.NOT_3D, "has 4 dimensions", Path("a/imaging.nii.gz"))
    warning = nc.Problem(nc.SPACING_DIFFERS_FROM_KITS_JSON, "differs", None)
    assert error.is_error and not warning.is_error
    assert error.describe() == "a/imaging.nii.gz: not_3d: has 4 dimensions"


def test_good_file_has_no_problems(tmp_path: Path) -> None:
    check = nc.inspect_file(_write(tmp_path / "imaging.nii.gz"))
    assert check.problems == [] and check.readable and check.is_3d
    assert check.image.shape == SHAPE and check.spacing == pytest.approx(SPACING)


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    check = nc.inspect_file(tmp_path / "imaging.nii.gz")
    assert _codes(check.problems) == {nc.UNREADABLE} and check.image is None and not check.readable


def test_truncated_gzip_found_from_its_trailer(tmp_path: Path) -> None:
    path = _write(tmp_path / "imaging.nii.gz")
    _truncate(path)
    check = nc.inspect_file(path)
    assert _codes(check.problems) == {nc.UNREADABLE} and not check.readable
    assert "truncated" in check.problems[0].message and check.problems[0].path == path


def test_truncated_uncompressed_nii_is_unreadable(tmp_path: Path) -> None:
    path = _write(tmp_path / "imaging.nii")
    _truncate(path)
    check = nc.inspect_file(path)
    assert _codes(check.problems) == {nc.UNREADABLE}
    assert f"truncated: {path.stat().st_size} bytes on disk, the header needs {352 + 2 * N_VOXELS}" in (
        check.problems[0].message
    )


def test_random_bytes_are_unreadable_and_gzipped_text_is_not_nifti(tmp_path: Path) -> None:
    noise, text = tmp_path / "imaging.nii.gz", tmp_path / "segmentation.nii.gz"
    noise.write_bytes(np.random.default_rng(1).bytes(2000))
    text.write_bytes(gzip.compress(b"hello, this is not a NIfTI file\n" * 40))
    noise_check, text_check = nc.inspect_file(noise), nc.inspect_file(text)
    assert _codes(noise_check.problems) == {nc.UNREADABLE}
    assert "gzip stream unreadable" in noise_check.problems[0].message
    assert _codes(text_check.problems) == {nc.NOT_NIFTI}
    assert noise_check.image is None and text_check.image is None


@pytest.mark.parametrize("shape", [(6, 16, 16, 2), (16, 16)])
def test_not_3d(tmp_path: Path, shape: tuple[int, ...]) -> None:
    check = nc.inspect_file(_write(tmp_path / "imaging.nii.gz", np.zeros(shape, dtype=np.int16)))
    assert _codes(check.problems) == {nc.NOT_3D} and not check.is_3d and check.readable
    assert str(len(shape)) in check.problems[0].message


def _write_zero_spacing_image(path: Path) -> None:
    """A NIfTI whose sform has a zero column 0 and whose pixdim[1] is 0 (nibabel refuses to make one)."""
    image = nib.Nifti1Image(_image(), build_kits_affine(SPACING))
    raw = bytearray(image.to_bytes())
    raw[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    raw[312:328] = struct.pack("<4f", 0.0, 0.0, 0.0, 0.0)  # srow_z: column 0 becomes zero
    write_bytes_atomic(path, gzip.compress(bytes(raw), mtime=0))


def test_zero_spacing_is_bad_spacing(tmp_path: Path) -> None:
    path = tmp_path / "imaging.nii.gz"
    _write_zero_spacing_image(path)
    check = nc.inspect_file(path)
    assert _codes(check.problems) == {nc.BAD_SPACING} and check.spacing is None
    assert "finite and > 0 mm" in check.problems[0].message


def test_image_label_agreement(tmp_path: Path) -> None:
    image = nc.inspect_file(_write(tmp_path / "imaging.nii.gz"))
    same = nc.inspect_file(_write(tmp_path / "same.nii.gz", spacing=(2.0, 0.8, 0.8 + 1e-6)))  # within tolerance
    short = nc.inspect_file(_write(tmp_path / "short.nii.gz", _image((5, 16, 16))))
    tilted = nc.inspect_file(_write(tmp_path / "tilted.nii.gz", spacing=(2.0, 0.8, 0.9)))
    assert nc.check_image_label_agreement(image, same) == []
    assert _codes(nc.check_image_label_agreement(image, short)) == {nc.SHAPE_MISMATCH}
    problems = nc.check_image_label_agreement(image, tilted)
    assert _codes(problems) == {nc.AFFINE_MISMATCH} and problems[0].path == tilted.path
    assert "up to 0.1" in problems[0].message


def test_kits_spacing_disagreement_is_a_warning() -> None:
    path = Path("imaging.nii.gz")
    assert nc.check_kits_spacing(path, SPACING, (2.0, 0.8, 0.8 + 1e-6)) == []
    (warning,) = nc.check_kits_spacing(path, SPACING, (3.0, 0.8, 0.8))
    assert warning.code == nc.SPACING_DIFFERS_FROM_KITS_JSON and not warning.is_error
    assert "(2, 0.8, 0.8)" in warning.message and "(3, 0.8, 0.8)" in warning.message


def test_read_image_gives_float32_hu(tmp_path: Path) -> None:
    image, problem = nc.read_image(_write(tmp_path / "imaging.nii.gz"))
    assert problem is None and image.dtype == np.float32
    np.testing.assert_array_equal(image, _image())


def test_corrupt_deflate_passes_header_checks_but_not_the_verified_read(tmp_path: Path) -> None:
    path = _write(tmp_path / "imaging.nii.gz")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)  # the gzip trailer stays intact
    path.write_bytes(bytes(data))
    assert nc.inspect_file(path).problems == []
    for read in (nc.read_image, nc.read_labels):
        voxels, problem = read(path)
        assert voxels is None and problem.code == nc.UNREADABLE and problem.path == path
        assert "CRC check failed" in problem.message


def test_read_labels_keeps_stored_values(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[0, 0, 0] = 258  # would wrap to 2 in a cast to uint8
    read, problem = nc.read_labels(_write(tmp_path / "segmentation.nii.gz", labels))
    assert problem is None and read.dtype == np.int16 and read[0, 0, 0] == 258
    scaled = nib.Nifti1Image(np.ones(SHAPE, dtype=np.uint8), build_kits_affine(SPACING))
    scaled.header.set_slope_inter(2.0, 0.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    read, problem = nc.read_labels(tmp_path / "scaled.nii.gz")
    assert problem is None and read.dtype == np.float64 and set(np.unique(read)) == {2.0}


def test_non_finite_image_voxels_counted() -> None:
    image = np.zeros((2, 2, 2), dtype=np.float32)
    image[0, 0, 0], image[0, 0, 1], image[1, 1, 1] = np.nan, np.inf, -1000.0
    image[1, 1, 0] = 7.0
    problems, hu_min, hu_max = nc.check_image_voxels(Path("imaging.nii.gz"), image)
    assert _codes(problems) == {nc.NON_FINITE} and "2 of 8 voxels" in problems[0].message
    assert (hu_min, hu_max) == (-1000.0, 7.0)
    problems, hu_min, hu_max = nc.check_image_voxels(Path("imaging.nii.gz"), np.full((2, 2), np.nan, np.float32))
    assert "4 of 4" in problems[0].message and (hu_min, hu_max) == (None, None)
    assert nc.check_image_voxels(Path("imaging.nii.gz"), image[1:, 1:, :])[0] == []


def test_label_voxels_counted_and_bad_values_listed() -> None:
    labels = np.zeros((2, 3, 4), dtype=np.uint8)
    labels[0, 0, :3] = 1
    labels[1, 0, 0] = 2
    assert nc.check_label_voxels(Path("s.nii.gz"), labels) == ([], {0: 20, 1: 3, 2: 1})
    labels[0, 1, :2] = 3
    labels[1, 2, 3] = 255
    problems, counts = nc.check_label_voxels(Path("s.nii.gz"), labels)
    assert counts == {0: 17, 1: 3, 2: 1} and _codes(problems) == {nc.BAD_LABELS}
    assert "3 (2 voxels)" in problems[0].message and "255 (1 voxel)" in problems[0].message
    assert "allowed are 0 background, 1 kidney, 2 tumour" in problems[0].message


@pytest.mark.parametrize("values", [
    np.array([0, 1, 2, 3], np.uint8),                 # a label map: few small values
    np.array([0, 2, 15, 16, 300, 65535], np.uint16),  # past the value-by-value range, then bincount's
    np.array([0, 1, 70000], np.int32),                # beyond bincount's range
    np.array([0, 1, 40], np.uint64),                  # the widest unsigned type, through bincount
    np.array([-1, 0, 2], np.int16),                   # negative values
    np.array([0.0, 1.0, 2.5], np.float64),            # not integers
])
@pytest.mark.parametrize("order", ["C", "F", "transposed"])
def test_label_value_counts_agree_with_numpy_unique_in_any_memory_order(values, order) -> None:
    rng = np.random.default_rng(3)
    labels = values[rng.integers(0, values.size - 1, size=(7, 9, 11))]  # the last value left out
    labels[3, 4, 5] = values[-1]
    if order == "F":
        labels = np.asfortranarray(labels)
    elif order == "transposed":  # how a NIfTI file's (X, Y, Z) voxels are read back as (Z, Y, X)
        labels = np.ascontiguousarray(labels.transpose(2, 1, 0)).transpose(2, 1, 0)
    present, counts = nc.label_value_counts(labels)
    expected_values, expected_counts = np.unique(labels, return_counts=True)
    assert present.tolist() == expected_values.tolist() and counts.tolist() == expected_counts.tolist()
    assert counts.sum() == labels.size and nc.label_value_counts(labels[:0])[0].size == 0


def test_many_bad_label_values_are_summarised() -> None:
    labels = np.arange(0.5, 13.0, 1.0)  # 13 non-integer values, all bad
    problems, counts = nc.check_label_voxels(Path("s.nii.gz"), labels)
    assert counts == {0: 0, 1: 0, 2: 0}
    assert "12.5 (1 voxel)" not in problems[0].message and "and 3 more values" in problems[0].message
