"""Tests for utils.data.nifti_io: round trips, reproducible atomic writes, clear errors, verified reads."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from utils.data.kits_layout import build_kits_affine
from utils.data.nifti_io import NiftiReadError, load_nifti, load_nifti_verified, read_voxels, save_nifti


def test_round_trip_keeps_dtype_values_and_affine(tmp_path):
    image = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    affine = build_kits_affine((3.0, 0.8, 0.8))
    path = save_nifti(image, affine, tmp_path / "imaging.nii.gz")
    loaded = load_nifti(path)
    assert loaded.get_data_dtype() == np.int16
    np.testing.assert_array_equal(read_voxels(loaded), image.astype(np.float32))
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-6)


def test_same_input_gives_identical_bytes(tmp_path):
    labels = np.random.default_rng(0).integers(0, 3, (3, 4, 5)).astype(np.uint8)
    affine = build_kits_affine((1.0, 1.0, 1.0))
    first = save_nifti(labels, affine, tmp_path / "a.nii.gz").read_bytes()
    second = save_nifti(labels, affine, tmp_path / "b.nii.gz").read_bytes()
    assert first == second
    assert gzip.decompress(first)[:4] == (348).to_bytes(4, "little")  # a NIfTI-1 header inside


def test_write_leaves_no_temporary_file_and_readable_permissions(tmp_path):
    save_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "x.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]
    assert os.stat(tmp_path / "x.nii.gz").st_mode & 0o044  # group/other may read, as with open()


def test_truncated_file_gives_error_naming_it(tmp_path):
    path = save_nifti(np.random.default_rng(1).normal(size=(8, 16, 16)).astype(np.float32), np.eye(4),
                      tmp_path / "imaging.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NiftiReadError, match="imaging.nii.gz.*truncated"):
        read_voxels(load_nifti(path))


def test_bad_destination_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="must end in .nii or .nii.gz"):
        save_nifti(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "x.npy")


def _random_ct(tmp_path: Path, name: str = "imaging.nii.gz") -> tuple[Path, np.ndarray]:
    """A small random int16 CT (random so that its deflate stream is not trivially short)."""
    image = np.random.default_rng(0).integers(-1000, 1000, size=(6, 16, 16), dtype=np.int16)
    return save_nifti(image, build_kits_affine((2.0, 0.8, 0.8)), tmp_path / name), image


@pytest.mark.parametrize("name", ["imaging.nii.gz", "imaging.nii"])
def test_verified_load_round_trip_keeps_file_name(tmp_path: Path, name: str) -> None:
    path, image = _random_ct(tmp_path, name)
    loaded = load_nifti_verified(path)
    assert isinstance(loaded, nib.Nifti1Image) and loaded.get_filename() == str(path)
    np.testing.assert_array_equal(read_voxels(loaded, np.int16), image)
    np.testing.assert_allclose(loaded.affine, build_kits_affine((2.0, 0.8, 0.8)), atol=1e-6)


def test_verified_load_reads_nifti2(tmp_path: Path) -> None:
    labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) % 3
    nib.save(nib.Nifti2Image(labels, np.eye(4)), tmp_path / "seg.nii.gz")
    loaded = load_nifti_verified(tmp_path / "seg.nii.gz")
    assert isinstance(loaded, nib.Nifti2Image)
    np.testing.assert_array_equal(read_voxels(loaded, np.uint8), labels)


def test_corrupt_deflate_stream_caught_only_by_verified_load(tmp_path: Path) -> None:
    path, image = _random_ct(tmp_path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)  # the gzip trailer (CRC-32, ISIZE) is left intact
    path.write_bytes(bytes(data))
    silently_wrong = np.asarray(nib.load(str(path)).dataobj)  # plain nibabel raises nothing...
    assert silently_wrong.shape == image.shape and not np.array_equal(silently_wrong, image)  # ...and is wrong
    assert not np.array_equal(read_voxels(load_nifti(path), np.int16), image)  # so is the lazy loader
    with pytest.raises(NiftiReadError, match="imaging.nii.gz: compressed data corrupt.*CRC check failed") as info:
        load_nifti_verified(path)
    assert info.value.path == path and "re-download" in info.value.reason


@pytest.mark.parametrize(
    ("name", "reason"),
    [("imaging.nii.gz", "compressed data corrupt or truncated"), ("imaging.nii", "truncated: the data hold")],
)
def test_verified_load_refuses_truncated_file(tmp_path: Path, name: str, reason: str) -> None:
    path, _ = _random_ct(tmp_path, name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NiftiReadError, match=f"{name}: {reason}"):
        load_nifti_verified(path)


@pytest.mark.parametrize("loader", [load_nifti, load_nifti_verified])
def test_loaders_refuse_non_nifti_and_missing_file(tmp_path: Path, loader) -> None:
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"hello world" * 100))
    with pytest.raises(NiftiReadError, match="junk.nii.gz: not a"):
        loader(junk)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        loader(tmp_path / "missing.nii.gz")
