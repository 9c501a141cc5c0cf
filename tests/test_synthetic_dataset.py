import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from utils.analysis.intensity_separability import measure_separability
from utils.data.kits_layout import KITS_AXCODES, build_kits_affine, spacing_from_affine
from utils.data.nifti_io import save_nifti
from utils.synthetic.dataset import (
    SyntheticOptions,
    _write_case_folder,
    combine_case_folders,
    generate_case,
    generate_dataset,
    generate_from_masks,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = SyntheticOptions(matrix=96, spacing=(5.0, 4.0, 4.0), coverage_mm=(240.0, 300.0))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    summaries = generate_dataset(out, 3, seed=11, options=SMALL, show_progress=False)
    return out, summaries


def test_writes_the_kits19_layout(small_dataset):
    out, summaries = small_dataset
    assert sorted(p.name for p in out.iterdir()) == ["case_00000", "case_00001", "case_00002", "kits.json"]
    entries = json.loads((out / "kits.json").read_text())
    assert [e["case_id"] for e in entries] == ["case_00000", "case_00001", "case_00002"]
    for entry, summary in zip(entries, summaries, strict=False):
        folder = out / entry["case_id"]
        assert sorted(p.name for p in folder.iterdir()) == ["imaging.nii.gz", "segmentation.nii.gz"]
        image, labels = nib.load(folder / "imaging.nii.gz"), nib.load(folder / "segmentation.nii.gz")
        assert image.get_data_dtype() == np.int16 and labels.get_data_dtype() == np.uint8
        assert image.shape == labels.shape == summary.shape and image.shape[1:] == (96, 96)
        np.testing.assert_allclose(image.affine, labels.affine)
        assert nib.aff2axcodes(image.affine) == KITS_AXCODES
        spacing = entry["voxel_spacing"]
        assert spacing_from_affine(image.affine) == pytest.approx(
            (spacing["z_spacing"], spacing["y_spacing"], spacing["x_spacing"]))
        assert spacing_from_affine(image.affine) == pytest.approx((5.0, 4.0, 4.0))


def test_labels_and_intensities_are_plausible(small_dataset):
    out, _ = small_dataset
    for folder in sorted(out.glob("case_*")):
        labels = np.asarray(nib.load(folder / "segmentation.nii.gz").dataobj)
        image = np.asarray(nib.load(folder / "imaging.nii.gz").dataobj)
        assert set(np.unique(labels)) == {0, 1, 2}
        assert -1024 <= image.min() and image.max() <= 3071
        assert image[0, 0, 0] < -900  # air outside the body
        components, count = ndimage.label(labels > 0)
        largest = np.argsort(np.bincount(components.ravel())[1:])[::-1][:2] + 1
        assert count >= 2
        for k in largest:  # two kidneys, each with its parenchyma whatever its tumour's size
            assert np.count_nonzero((components == k) & (labels == 1)) * 5 * 4 * 4 / 1000 > 50
        columns = [np.nonzero(components == k)[2].mean() for k in largest]
        assert abs(columns[0] - columns[1]) * 4.0 > 80  # either side of the spine, > 8 cm apart
        # kidneys + tumours in ml: two kidneys of 100-250 ml, tumours up to 16 cm across (KiTS19's largest)
        assert 150 < labels.astype(bool).sum() * 5 * 4 * 4 / 1000 < 3000


def test_same_seed_same_bytes_and_workers_do_not_matter(tmp_path, small_dataset):
    out, _ = small_dataset
    again = tmp_path / "again"
    generate_dataset(again, 2, seed=11, options=SMALL, workers=2, show_progress=False)
    for case in ("case_00000", "case_00001"):
        for name in ("imaging.nii.gz", "segmentation.nii.gz"):
            assert (again / case / name).read_bytes() == (out / case / name).read_bytes()
    seed_11, seed_12 = generate_case(0, 11, SMALL)[0], generate_case(0, 12, SMALL)[0]
    assert seed_11.shape != seed_12.shape or not np.array_equal(seed_11, seed_12)


def test_drawn_spacing_stays_in_kits19_ranges():
    for index in range(6):
        _, labels, affine = generate_case(index, 5, SyntheticOptions(matrix=64, coverage_mm=(200.0, 220.0)))
        thickness, row, column = spacing_from_affine(affine)
        assert thickness in {5.0, 3.0, 0.5, 2.5, 1.0, 1.25, 2.0, 4.0, 1.5, 3.75}
        assert row == column and 0.6 * 8 - 1e-4 <= row <= 1.04 * 8 + 1e-4  # 512/64 = 8x KiTS19 pixels
        assert 190 <= labels.shape[0] * thickness <= 230


def test_task_is_not_trivial_for_intensity_thresholds():
    options = SyntheticOptions(matrix=128, spacing=(4.0, 3.0, 3.0))
    cases = [generate_case(index, 0, options)[:2] for index in range(16)]
    pooled, _ = measure_separability(cases)
    assert pooled.kidney_interval_dice < 0.5, pooled
    assert pooled.tumour_threshold_dice < 0.6, pooled
    assert pooled.kidney_interval_dice > 0.1 and pooled.tumour_threshold_dice > 0.1  # yet not noise


def _two_kidney_mask(shape):
    labels = np.zeros(shape, np.uint8)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for cx in (shape[2] * 0.3, shape[2] * 0.7):
        labels[((z - shape[0] / 2) / 8) ** 2 + ((y - shape[1] * 0.6) / 5) ** 2 + ((x - cx) / 4) ** 2 <= 1] = 1
    labels[((z - shape[0] / 2 - 4) / 3) ** 2 + ((y - shape[1] * 0.6) / 3) ** 2
           + ((x - shape[2] * 0.3 + 3) / 3) ** 2 <= 1] = 2
    return labels


def test_from_masks_copies_mask_and_keeps_its_grid(tmp_path):
    masks = tmp_path / "masks"
    (masks / "case_00042").mkdir(parents=True)
    labels = _two_kidney_mask((30, 80, 80))
    ras_affine = np.array([[0, 0, 4.0, 0], [0, 4.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 1]])
    source = save_nifti(labels, ras_affine, masks / "case_00042" / "segmentation.nii.gz")
    before = source.read_bytes()
    out = tmp_path / "out"
    summaries = generate_from_masks(masks, out, seed=3, show_progress=False)
    assert [s.case_id for s in summaries] == ["case_00042"]
    assert source.read_bytes() == before  # input untouched
    assert (out / "case_00042" / "segmentation.nii.gz").read_bytes() == before
    image = nib.load(out / "case_00042" / "imaging.nii.gz")
    np.testing.assert_allclose(image.affine, ras_affine)
    data = np.asarray(image.dataobj)
    assert data.shape == labels.shape and data.dtype == np.int16
    assert data[labels == 1].mean() > data[labels == 0].mean() + 50  # enhancing kidney over fat and air
    assert json.loads((out / "kits.json").read_text())[0]["voxel_spacing"] == {
        "x_spacing": 4.0, "y_spacing": 4.0, "z_spacing": 5.0}


def test_from_masks_refuses_bad_labels_naming_the_file(tmp_path):
    folder = tmp_path / "masks" / "case_00001"
    folder.mkdir(parents=True)
    labels = _two_kidney_mask((20, 60, 60))
    labels[0, 0, 0] = 3
    save_nifti(labels, build_kits_affine((5.0, 4.0, 4.0)), folder / "segmentation.nii.gz")
    with pytest.raises(ValueError,
                       match=r"case_00001/segmentation.nii.gz: label values must be in \[0, 1, 2\], found \[3\]"):
        generate_from_masks(tmp_path / "masks", tmp_path / "out", show_progress=False)
    with pytest.raises(ValueError, match="must differ"):
        generate_from_masks(tmp_path / "masks", tmp_path / "masks", show_progress=False)
    with pytest.raises(FileNotFoundError, match="no case_XXXXX/segmentation.nii.gz"):
        generate_from_masks(tmp_path, tmp_path / "out2", show_progress=False)


def test_from_real_kits19_mask(real_kits19_dir, tmp_path):
    masks = tmp_path / "one"
    masks.mkdir()
    (masks / "case_00030").symlink_to(real_kits19_dir / "case_00030")
    generate_from_masks(masks, tmp_path / "out", seed=0, show_progress=False)
    source = real_kits19_dir / "case_00030" / "segmentation.nii.gz"
    assert (tmp_path / "out" / "case_00030" / "segmentation.nii.gz").read_bytes() == source.read_bytes()
    image = nib.load(tmp_path / "out" / "case_00030" / "imaging.nii.gz")
    np.testing.assert_allclose(image.affine, nib.load(source).affine)
    assert image.shape == nib.load(source).shape


def test_interrupted_case_leaves_nothing_half_written(tmp_path):
    def failing_writer(folder):
        (folder / "imaging.nii.gz").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _write_case_folder(tmp_path, "case_00000", failing_writer)
    assert list(tmp_path.iterdir()) == []


def test_options_are_validated():
    with pytest.raises(ValueError, match="matrix must be between 64 and 1024"):
        SyntheticOptions(matrix=10)
    with pytest.raises(ValueError, match="spacing must be three values > 0"):
        SyntheticOptions(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="cases must be >= 1"):
        generate_dataset("/nonexistent-never-created", 0)


def test_command_line(tmp_path):
    script = REPO / "scripts" / "make_synthetic_data.py"
    run = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "d"), "--cases", "1", "--matrix", "64",
                          "--spacing", "6", "6", "6"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "case_00000" in run.stdout and (tmp_path / "d" / "case_00000" / "imaging.nii.gz").is_file()
    missing = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "e"), "--from-masks",
                              str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "nowhere: mask folder not found" in missing.stderr


def test_regenerating_fewer_cases_warns_about_stale_folders(tmp_path, caplog):
    generate_dataset(tmp_path, 2, seed=1, options=SyntheticOptions(matrix=64, spacing=(6.0, 6.0, 6.0)),
                     show_progress=False)
    with caplog.at_level("WARNING"):
        generate_dataset(tmp_path, 1, seed=1, options=SyntheticOptions(matrix=64, spacing=(6.0, 6.0, 6.0)),
                         show_progress=False)
    assert "case_00001" in caplog.text and "no longer lists" in caplog.text
    assert [e["case_id"] for e in json.loads((tmp_path / "kits.json").read_text())] == ["case_00000"]


def test_combining_case_folders_links_every_case_and_merges_kits_json(small_dataset, tmp_path):
    first, _ = small_dataset
    second = tmp_path / "second"
    generate_dataset(second, 1, seed=3, options=SMALL, show_progress=False)
    (second / "case_00000").rename(second / "case_00400")
    listing = json.loads((second / "kits.json").read_text())
    listing[0]["case_id"] = "case_00400"
    (second / "kits.json").write_text(json.dumps(listing))
    sources = {p: p.read_bytes() for folder in (first, second) for p in folder.rglob("*") if p.is_file()}
    out = tmp_path / "combined"
    ids = combine_case_folders([first, second], out)
    assert ids == ["case_00000", "case_00001", "case_00002", "case_00400"]
    assert sorted(p.name for p in out.iterdir()) == [*ids, "kits.json"]
    merged = json.loads((out / "kits.json").read_text())
    assert [e["case_id"] for e in merged] == ids and merged[-1] == listing[0]
    for case_id, folder in (("case_00001", first), ("case_00400", second)):
        for name in ("imaging.nii.gz", "segmentation.nii.gz"):
            assert (out / case_id / name).stat().st_ino == (folder / case_id / name).stat().st_ino  # a link
    combine_case_folders([first, second], out)  # again: the folder is replaced whole, sources untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["combined", "second"]
    assert {p: p.read_bytes() for folder in (first, second) for p in folder.rglob("*") if p.is_file()} == sources
    with pytest.raises(ValueError, match="case_00000 is in both"):
        combine_case_folders([first, first], tmp_path / "twice")
    with pytest.raises(ValueError, match="combined folder"):
        combine_case_folders([first, second], second / "inside")
    (second / "kits.json").rename(second / "kits23.json")
    with pytest.raises(ValueError, match=r"second/kits.json: not found; only KiTS19-layout folders"):
        combine_case_folders([first, second], tmp_path / "other")
    assert not (tmp_path / "twice").exists() and not (tmp_path / "other").exists()
    assert not (second / "inside").exists()
