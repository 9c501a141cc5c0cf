"""Tests for utils.data.case_discovery: case folders, kits.json cross-checks and the data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils.data.case_discovery import DATA_DIR_ENV_VAR, discover_cases, resolve_data_dir
from utils.data.kits_layout import IMAGING_NAME, KITS_JSON_NAME, SEGMENTATION_NAME


def _make_case(root: Path, case_id: str, *, imaging: bool = True, segmentation: bool = True) -> Path:
    """Create a case folder with placeholder files (discovery never opens them)."""
    folder = root / case_id
    folder.mkdir(parents=True)
    if imaging:
        (folder / IMAGING_NAME).write_bytes(b"placeholder")
    if segmentation:
        (folder / SEGMENTATION_NAME).write_bytes(b"placeholder")
    return folder


def _kits_entry(case_id: str, z: float = 3.0, y: float = 0.75, x: float = 0.7) -> dict:
    return {"case_id": case_id, "voxel_spacing": {"x_spacing": x, "y_spacing": y, "z_spacing": z}}


def _write_kits_json(root: Path, entries: object) -> None:
    (root / KITS_JSON_NAME).write_text(json.dumps(entries), encoding="utf-8")


def test_discover_cases_finds_folders_sorted_with_missing_files(tmp_path: Path) -> None:
    _make_case(tmp_path, "case_00002", segmentation=False)
    _make_case(tmp_path, "case_00000")
    _make_case(tmp_path, "case_00001", imaging=False)
    listing = discover_cases(tmp_path)
    assert [c.case_id for c in listing.cases] == ["case_00000", "case_00001", "case_00002"]
    first, second, third = listing.cases
    assert first.imaging == tmp_path / "case_00000" / IMAGING_NAME
    assert first.segmentation == tmp_path / "case_00000" / SEGMENTATION_NAME
    assert second.imaging is None and second.segmentation is not None
    assert third.segmentation is None and third.imaging is not None
    assert listing.kits_json_ids is None and dict(listing.kits_spacing) == {}
    assert listing.warnings == ()


def test_discover_cases_accepts_uncompressed_nii(tmp_path: Path) -> None:
    folder = _make_case(tmp_path, "case_00000", imaging=False)
    (folder / "imaging.nii").write_bytes(b"placeholder")
    assert discover_cases(tmp_path).cases[0].imaging == folder / "imaging.nii"


def test_non_case_folders_are_ignored_with_a_warning(tmp_path: Path) -> None:
    _make_case(tmp_path, "case_00000")
    for name in ("case_0001", "notes", ".cache"):
        (tmp_path / name).mkdir()
    (tmp_path / "README.md").write_text("hello")
    listing = discover_cases(tmp_path)
    assert [c.case_id for c in listing.cases] == ["case_00000"]
    assert len(listing.warnings) == 1
    assert "2 folders" in listing.warnings[0] and "case_0001" in listing.warnings[0]
    assert ".cache" not in listing.warnings[0]


def test_kits_json_cross_check_summarises_missing_folders_and_entries(tmp_path: Path) -> None:
    for index in range(3):
        _make_case(tmp_path, f"case_{index:05d}")
    _make_case(tmp_path, "case_00099")
    entries = [_kits_entry(f"case_{index:05d}") for index in range(10)]
    _write_kits_json(tmp_path, entries)
    listing = discover_cases(tmp_path)
    assert listing.kits_json_ids == tuple(f"case_{index:05d}" for index in range(10))
    missing = [w for w in listing.warnings if "with no case folder" in w]
    assert len(missing) == 1
    assert "7 cases" in missing[0] and "case_00003" in missing[0] and "and 2 more" in missing[0]
    assert "case_00009" not in missing[0]  # summarised, not listed in full
    unlisted = [w for w in listing.warnings if "not listed in" in w]
    assert len(unlisted) == 1 and "1 case folder (case_00099)" in unlisted[0]


def test_kits_spacing_is_in_zyx_order(tmp_path: Path) -> None:
    _make_case(tmp_path, "case_00000")
    _write_kits_json(tmp_path, [_kits_entry("case_00000", z=5.0, y=0.75, x=0.7)])
    listing = discover_cases(tmp_path)
    assert listing.kits_spacing["case_00000"] == (5.0, 0.75, 0.7)
    assert listing.warnings == ()


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{not json", "unreadable"), (json.dumps({"case_id": "case_00000"}), "expected a list")],
)
def test_invalid_kits_json_gives_a_warning_not_an_error(tmp_path: Path, content: str, expected: str) -> None:
    _make_case(tmp_path, "case_00000")
    (tmp_path / KITS_JSON_NAME).write_text(content, encoding="utf-8")
    listing = discover_cases(tmp_path)
    assert listing.kits_json_ids is None
    assert len(listing.cases) == 1
    assert len(listing.warnings) == 1 and expected in listing.warnings[0] and KITS_JSON_NAME in listing.warnings[0]


def test_kits_json_entries_without_id_or_spacing_are_reported(tmp_path: Path) -> None:
    _make_case(tmp_path, "case_00000")
    _write_kits_json(tmp_path, [{"case_id": "case_00000", "voxel_spacing": {"z_spacing": 0}}, {"age": 3}, "x"])
    listing = discover_cases(tmp_path)
    assert listing.kits_json_ids == ("case_00000",)
    assert "case_00000" not in listing.kits_spacing
    assert any("2 entries" in w for w in listing.warnings)
    assert any("voxel_spacing" in w for w in listing.warnings)


def test_empty_folder_warns_and_hints_at_data_subfolder(tmp_path: Path) -> None:
    _make_case(tmp_path / "data", "case_00000")
    listing = discover_cases(tmp_path)
    assert listing.cases == ()
    assert any("no case folders" in w and "did you mean" in w for w in listing.warnings)


def test_discover_cases_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_cases(tmp_path / "nowhere")


def test_resolve_data_dir_prefers_argument_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV_VAR, str(other))
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(None) == other
    assert resolve_data_dir("") == other


def test_resolve_data_dir_without_argument_or_env_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="--data") as info:
        resolve_data_dir(None)
    assert DATA_DIR_ENV_VAR in str(info.value)


def test_resolve_data_dir_rejects_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_data_dir(a_file)


def test_real_kits19_listing(real_kits19_dir: Path) -> None:
    listing = discover_cases(real_kits19_dir)
    assert len(listing.cases) == 170
    assert listing.kits_json_ids is not None and len(listing.kits_json_ids) == 210
    assert all(case.imaging is None and case.segmentation is not None for case in listing.cases)
    assert any("40 cases" in w and "case_00170" in w for w in listing.warnings)
    assert listing.kits_spacing["case_00000"] == pytest.approx((0.5, 0.919921875, 0.919921875))
