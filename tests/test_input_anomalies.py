"""Input anomalies of a CT are named by one function, alike in check_data, preprocess and segment.

The same bad files (NaN voxels, a zero pixdim in the qform, an oblique affine, a uint8 CT, a volume
of a few voxels) go through ``scripts/check_data.py``, ``scripts/preprocess.py`` and
``scripts/segment.py`` (each through its ``main``); headers are hand-crafted byte by byte where
nibabel would repair them on writing.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
import os
import struct
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest
from test_ct_inference import TINY_3D, write_tiny_checkpoint

from utils.data import nifti_checks as nc
from utils.data.case_discovery import discover_cases
from utils.data.case_validation import CaseError, load_case, validate_case, validate_dataset
from utils.data.kits_layout import IMAGING_NAME, SEGMENTATION_NAME, build_kits_affine
from utils.data.nifti_io import read_raw_header, save_nifti, write_bytes_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (20, 40, 40)
SPACING = (2.5, 2.0, 2.0)
#: byte offsets in a NIfTI-1 header
PIXDIM_OFFSET, QFORM_CODE_OFFSET, SFORM_CODE_OFFSET = 76, 252, 254
BAD_CASES = {"case_00001": "nan", "case_00002": "zero_pixdim", "case_00003": "oblique", "case_00004": "uint8",
             "case_00005": "tiny"}


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ct(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    """An int16 CT in HU: air around a soft-tissue body with a brighter 'kidney'."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, dtype=np.int16)
    z, y, x = (np.arange(n)[:, None, None] if i == 0 else np.arange(n)[None, :, None] if i == 1 else
               np.arange(n)[None, None, :] for i, n in enumerate(shape))
    body = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (0.4 * min(shape[1:])) ** 2
    image[np.broadcast_to(body, shape)] = 40
    image += rng.integers(-20, 20, size=shape, dtype=np.int16)
    return image


def _labels(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    if min(shape) >= 8:
        labels[shape[0] // 2 - 2: shape[0] // 2 + 2, 12:20, 12:20] = 1
        labels[shape[0] // 2, 14:16, 14:16] = 2
    return labels


def _oblique_affine(degrees: float = 10.0) -> np.ndarray:
    """The KiTS19 affine, rotated by ``degrees`` about the world's S axis."""
    angle = math.radians(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    return rotation @ build_kits_affine(SPACING)


def write_with_header_fields(path: Path, array: np.ndarray, affine: np.ndarray, *, pixdim: dict[int, float],
                             qform_code: int = 1, sform_code: int = 0) -> Path:
    """Write a NIfTI-1 file whose stored pixdim/qform/sform codes are set byte by byte (nibabel would fix them)."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    raw = bytearray(image.to_bytes())
    for index, value in pixdim.items():
        struct.pack_into("<f", raw, PIXDIM_OFFSET + 4 * index, value)
    struct.pack_into("<h", raw, QFORM_CODE_OFFSET, qform_code)
    struct.pack_into("<h", raw, SFORM_CODE_OFFSET, sform_code)
    write_bytes_atomic(path, gzip.compress(bytes(raw), mtime=0) if path.name.endswith(".gz") else bytes(raw))
    return path


def write_bad_ct(path: Path, kind: str) -> Path:
    """One CT with the anomaly ``kind`` (see :data:`BAD_CASES`), or a good one for ``"good"``."""
    affine = build_kits_affine(SPACING)
    if kind == "nan":
        image = _ct().astype(np.float32)
        flat = image.reshape(-1)
        flat[np.random.default_rng(1).choice(flat.size, size=int(0.004 * flat.size), replace=False)] = np.nan
        return save_nifti(image, affine, path)
    if kind == "zero_pixdim":
        return write_with_header_fields(path, _ct(), affine, pixdim={1: 0.0})
    if kind == "oblique":
        return save_nifti(_ct(), _oblique_affine(), path)
    if kind == "uint8":
        return save_nifti(np.clip(_ct() + 1000, 0, 255).astype(np.uint8), affine, path)
    if kind == "tiny":
        return save_nifti(_ct((2, 3, 3)), affine, path)
    return save_nifti(_ct(), affine, path)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A KiTS19-layout folder: case_00000 good, then one case per anomaly, each with matching labels."""
    root = tmp_path_factory.mktemp("anomalies") / "data"
    for case_id, kind in {"case_00000": "good", **BAD_CASES}.items():
        folder = root / case_id
        folder.mkdir(parents=True)
        imaging = write_bad_ct(folder / IMAGING_NAME, kind)
        ct = nib.load(imaging)
        affine = build_kits_affine(SPACING) if kind == "zero_pixdim" else ct.affine
        save_nifti(_labels(ct.shape), affine, folder / SEGMENTATION_NAME)
    return root


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("run") / "tiny3d", TINY_3D).parent


def _problems(report, code: str) -> list[nc.Problem]:
    return [p for p in report.problems if p.code == code]


# --- the one function ---------------------------------------------------------------------------------------------


def test_nibabel_repairs_a_zero_pixdim_but_the_stored_header_keeps_it(tmp_path: Path) -> None:
    path = write_bad_ct(tmp_path / "ct.nii.gz", "zero_pixdim")
    assert np.allclose(nib.load(path).header["pixdim"][1], 1.0)  # what every reader saw: 1 mm
    assert read_raw_header(path)["pixdim"][1] == 0.0
    anomalies = nc.find_ct_anomalies(path)
    [problem] = anomalies.errors
    assert problem.code == nc.BAD_SPACING and "pixdim" in problem.message and "qform" in problem.message


@pytest.mark.parametrize("pixdim, qform_code, sform_code, named", [
    ({2: -0.8}, 1, 0, "pixdim"),              # negative: nibabel would take its absolute value
    ({3: float("nan")}, 1, 0, "pixdim"),
    ({1: 0.0}, 0, 2, "pixdim"),               # the sform is fine, the pixdim still is not
])
def test_zero_negative_or_nan_spacing_in_any_header_field_is_an_error(tmp_path: Path, pixdim, qform_code,
                                                                      sform_code, named) -> None:
    path = write_with_header_fields(tmp_path / "ct.nii.gz", _ct(), build_kits_affine(SPACING), pixdim=pixdim,
                                    qform_code=qform_code, sform_code=sform_code)
    errors = nc.find_ct_anomalies(path).errors
    assert [p.code for p in errors] == [nc.BAD_SPACING] and named in errors[0].message


def test_a_zero_sform_column_is_an_error(tmp_path: Path) -> None:
    affine = build_kits_affine(SPACING)
    affine[:, 1] = 0.0
    path = tmp_path / "ct.nii.gz"
    image = nib.Nifti1Image(_ct(), build_kits_affine(SPACING))
    image.set_sform(affine, code=2)
    write_bytes_atomic(path, gzip.compress(image.to_bytes(), mtime=0))
    errors = nc.find_ct_anomalies(path).errors
    assert [p.code for p in errors] == [nc.BAD_SPACING] and "sform" in errors[0].message


def test_each_anomaly_gets_its_code_and_severity(tmp_path: Path) -> None:
    expected = {"nan": (nc.NON_FINITE, True), "oblique": (nc.OBLIQUE_AFFINE, False),
                "uint8": (nc.NOT_HU, False), "tiny": (nc.TOO_SMALL, True)}
    for kind, (code, is_error) in expected.items():
        path = write_bad_ct(tmp_path / f"{kind}.nii.gz", kind)
        voxels = np.asarray(nib.load(path).get_fdata(dtype=np.float32))
        problems = nc.find_ct_anomalies(path, voxels).problems
        assert [(p.code, p.is_error) for p in problems] == [(code, is_error)], kind
    good = write_bad_ct(tmp_path / "good.nii.gz", "good")
    assert nc.find_ct_anomalies(good, np.asarray(nib.load(good).get_fdata(dtype=np.float32))).problems == []


def test_values_like_0_to_4095_are_not_taken_for_hounsfield_units(tmp_path: Path) -> None:
    path = save_nifti((_ct() + 1024).astype(np.int16), build_kits_affine(SPACING), tmp_path / "ct.nii.gz")
    [problem] = nc.find_ct_anomalies(path, np.asarray(nib.load(path).get_fdata(dtype=np.float32))).problems
    assert problem.code == nc.NOT_HU and not problem.is_error and "scl_inter" in problem.message


def test_a_ct_smaller_than_one_window_is_a_warning_that_says_it_is_padded(tmp_path: Path) -> None:
    path = write_bad_ct(tmp_path / "ct.nii.gz", "good")  # 50 x 80 x 80 mm
    window = ((32, 16, 16), (4.0, 4.0, 4.0))  # 128 x 64 x 64 mm
    [problem] = nc.find_ct_anomalies(path, window=window).problems
    assert problem.code == nc.SMALLER_THAN_WINDOW and not problem.is_error
    assert "padded" in problem.message and "[0]" in problem.message
    assert nc.find_ct_anomalies(path, window=((8, 16, 16), (4.0, 4.0, 4.0))).problems == []


# --- check_data (through case_validation) ---------------------------------------------------------------------------


def test_check_data_names_every_anomaly(bad_data: Path, capsys: pytest.CaptureFixture) -> None:
    report = validate_dataset(bad_data, full=True, show_progress=False)
    by_id = {r.case_id: r for r in report.reports}
    assert by_id["case_00000"].status == "ok" and by_id["case_00000"].problems == ()
    assert by_id["case_00001"].status == "unusable" and _problems(by_id["case_00001"], nc.NON_FINITE)
    assert "0.4 %" in _problems(by_id["case_00001"], nc.NON_FINITE)[0].message
    assert by_id["case_00002"].status == "unusable"
    assert "pixdim" in _problems(by_id["case_00002"], nc.BAD_SPACING)[0].message
    assert by_id["case_00003"].status == "ok" and "rotation is ignored" in _problems(
        by_id["case_00003"], nc.OBLIQUE_AFFINE)[0].message
    assert by_id["case_00004"].status == "ok" and "uint8" in _problems(by_id["case_00004"], nc.NOT_HU)[0].message
    assert by_id["case_00005"].status == "unusable" and _problems(by_id["case_00005"], nc.TOO_SMALL)
    fast = {r.case_id: r for r in validate_dataset(bad_data, show_progress=False).reports}
    assert fast["case_00002"].status == "unusable" and fast["case_00003"].problems  # header-level, no voxels read

    check_data = _load_script("check_data")
    assert check_data.main(["--data", str(bad_data), "--full"]) == 1
    out = capsys.readouterr().out
    for code in (nc.NON_FINITE, nc.BAD_SPACING, nc.OBLIQUE_AFFINE, nc.NOT_HU, nc.TOO_SMALL):
        assert code in out


def test_load_case_refuses_errors_and_logs_warnings(bad_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    cases = {case.case_id: case for case in discover_cases(bad_data).cases}
    for case_id in ("case_00001", "case_00002", "case_00005"):
        with pytest.raises(CaseError, match=str(cases[case_id].imaging)):
            load_case(cases[case_id])
    with caplog.at_level(logging.WARNING, logger="utils.data.input_anomalies"):
        load_case(cases["case_00003"])
        load_case(cases["case_00004"])
    messages = [r.getMessage() for r in caplog.records if r.name == "utils.data.input_anomalies"]
    assert any(nc.OBLIQUE_AFFINE in m and "case_00003" in m for m in messages)
    assert any(nc.NOT_HU in m and "case_00004" in m for m in messages)


# --- preprocess ------------------------------------------------------------------------------------------------------


def test_preprocess_fails_the_bad_cases_and_warns_about_the_odd_ones(bad_data: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    preprocess = _load_script("preprocess")
    with caplog.at_level(logging.WARNING, logger="utils.data.input_anomalies"):
        status = preprocess.main(["--data", str(bad_data), "--out", str(tmp_path / "cache"),
                                  "--set", "preprocessing.target_spacing=[4,4,4]",
                                  "--set", "preprocessing.image_dtype=float32"])
    out = capsys.readouterr().out
    assert status == 1
    assert "3 in the cache" in out
    assert "case_00001" in out and nc.NON_FINITE in out
    assert "excluded: case_00002: bad_spacing" in out and "excluded: case_00005: too_small" in out
    warnings = [r.getMessage() for r in caplog.records if r.name == "utils.data.input_anomalies"]
    assert any(nc.OBLIQUE_AFFINE in m for m in warnings) and any(nc.NOT_HU in m for m in warnings)


# --- segment ---------------------------------------------------------------------------------------------------------


def test_segment_fails_the_bad_cts_by_name_and_warns_about_the_odd_ones(bad_data: Path, run_3d: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    flat = tmp_path / "cts"
    flat.mkdir()
    for case_id, kind in {"case_00000": "good", **BAD_CASES}.items():
        os.link(bad_data / case_id / IMAGING_NAME, flat / f"{kind}.nii.gz")
    segment = _load_script("segment")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="utils.inference.segment"):
        status = segment.main(["--checkpoint", str(run_3d), "--input", str(flat), "--output", str(out),
                               "--device", "cpu"])
    summary = capsys.readouterr().out
    assert status == 1
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["good.nii.gz", "oblique.nii.gz", "uint8.nii.gz"]
    failed = {line.split(":")[1].strip(): line for line in summary.splitlines() if line.startswith("failed: ")}
    assert sorted(failed) == ["nan.nii.gz", "tiny.nii.gz", "zero_pixdim.nii.gz"]
    assert str(flat / "nan.nii.gz") in failed["nan.nii.gz"] and nc.NON_FINITE in failed["nan.nii.gz"]
    assert nc.BAD_SPACING in failed["zero_pixdim.nii.gz"] and "pixdim" in failed["zero_pixdim.nii.gz"]
    assert nc.TOO_SMALL in failed["tiny.nii.gz"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "utils.inference.segment"]
    assert any(nc.OBLIQUE_AFFINE in m and "oblique.nii.gz" in m for m in warnings)
    assert any(nc.NOT_HU in m and "uint8.nii.gz" in m for m in warnings)
    oblique = nib.load(out / "oblique.nii.gz")
    assert oblique.shape == SHAPE and np.allclose(oblique.affine, _oblique_affine(), atol=1e-4)


# --- symbolic link loops ---------------------------------------------------------------------------------------------


def test_symbolic_link_loops_are_named_as_such(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "case_00000").mkdir(parents=True)
    write_bad_ct(root / "case_00000" / SEGMENTATION_NAME, "good")
    os.symlink(IMAGING_NAME, root / "case_00000" / IMAGING_NAME)  # imaging.nii.gz -> itself
    os.symlink("case_00001", root / "case_00001")  # a case folder that is a loop
    listing = discover_cases(root)
    assert [c.case_id for c in listing.cases] == ["case_00000"]
    assert any("case_00001" in w and "symbolic link loop" in w for w in listing.warnings)
    report = validate_case(listing.cases[0])
    [problem] = [p for p in report.problems if p.path == root / "case_00000" / IMAGING_NAME]
    assert problem.code == nc.UNREADABLE and "symbolic link loop" in problem.message
    assert report.status == "unusable"
