"""KiTS23-style synthetic data: labelled simple cysts (label 3), kits23.json, and masks of either dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import utils.synthetic.ct as ct
from utils.data.case_validation import validate_dataset
from utils.data.dataset_definitions import CYST_LABEL, DatasetLayoutError, label_lookup
from utils.data.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL, build_kits_affine, spacing_from_affine
from utils.data.nifti_io import save_nifti
from utils.synthetic.dataset import SyntheticOptions, generate_case, generate_dataset, generate_from_masks

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_synthetic_data.py"
SEED = 7
CASES = 5
SMALL_23 = SyntheticOptions(matrix=64, spacing=(5.0, 6.0, 6.0), coverage_mm=(240.0, 300.0), dataset="kits23")
#: Small real KiTS23 cases (44, 45 and 36 slices): two with cysts and one without.
REAL_WITH_CYSTS = ("case_00470", "case_00473")
REAL_WITHOUT_CYST = "case_00497"


@pytest.fixture(scope="module")
def real_cases(real_kits23_dir) -> Path:
    """The real KiTS23 folder, skipping the test unless it holds the cases these tests use."""
    needed = (*REAL_WITH_CYSTS, REAL_WITHOUT_CYST)
    if not all((real_kits23_dir / case_id / "segmentation.nii.gz").is_file() for case_id in needed):
        pytest.skip(f"real KiTS23 segmentations {', '.join(needed)} not found in {real_kits23_dir}")
    return real_kits23_dir


@pytest.fixture(scope="module")
def kits23_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic23")
    summaries = generate_dataset(out, CASES, seed=SEED, options=SMALL_23, show_progress=False)
    return out, summaries


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).astype(np.uint8)


def _mask_folder(tmp_path: Path, source: Path, case_ids, metadata: bool) -> Path:
    """A folder of symbolic links to real case folders, with a minimal kits23.json when ``metadata``."""
    folder = tmp_path / "masks"
    folder.mkdir()
    for case_id in case_ids:
        (folder / case_id).symlink_to(source / case_id)
    if metadata:
        (folder / "kits23.json").write_text(json.dumps([{"case_id": case_id} for case_id in case_ids]))
    return folder


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, env=env)


def test_kits23_folder_validates_as_kits23_and_is_refused_as_kits19(kits23_dataset):
    out, summaries = kits23_dataset
    case_ids = [f"case_{index:05d}" for index in range(CASES)]
    assert sorted(p.name for p in out.iterdir()) == [*case_ids, "kits23.json"]  # no kits.json
    assert json.loads((out / "kits23.json").read_text()) == [{"case_id": case_id} for case_id in case_ids]
    report = validate_dataset(out, full=True, dataset="kits23", show_progress=False)
    assert report.counts == {"ok": CASES, "inference_only": 0, "unusable": 0}
    assert not report.listing.warnings and not any(r.problems for r in report.reports)
    with_cyst = [r.case_id for r in report.reports if r.label_counts[CYST_LABEL] > 0]
    assert with_cyst and len(with_cyst) < CASES  # about half the patients have a cyst
    for summary, case_report in zip(summaries, report.reports, strict=True):
        voxel_ml = float(np.prod(summary.spacing)) / 1000.0
        assert summary.cyst_ml == pytest.approx(case_report.label_counts[CYST_LABEL] * voxel_ml, abs=0.01)
        assert summary.kidney_ml == pytest.approx(case_report.label_counts[KIDNEY_LABEL] * voxel_ml, abs=0.01)
    with pytest.raises(DatasetLayoutError, match=r"kits23\.json.*--dataset kits23"):
        validate_dataset(out, dataset="kits19", show_progress=False)


def test_cysts_are_simple_cortical_and_apart_from_tumours(kits23_dataset):
    out, _ = kits23_dataset
    cyst_hu = []
    for folder in sorted(out.glob("case_*")):
        labels = _labels(folder / "segmentation.nii.gz")
        image = np.asarray(nib.load(folder / "imaging.nii.gz").dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2, 3} and {1, 2} <= set(np.unique(labels))
        cysts = labels == CYST_LABEL
        assert not (cysts & ndimage.binary_dilation(labels == TUMOUR_LABEL)).any()  # no overlap, no contact
        components, count = ndimage.label(cysts)
        kidney_nearby = ndimage.binary_dilation(labels == KIDNEY_LABEL)
        for component in range(1, count + 1):  # every cyst grows from a kidney
            assert (kidney_nearby & (components == component)).any()
        cyst_hu.append(image[cysts])
    pooled = np.concatenate(cyst_hu)
    assert pooled.size > 20
    assert -10.0 < pooled.mean() < 35.0  # water density, with 8-25 HU of scanner noise


def test_cysts_are_water_and_homogeneous_before_noise_and_tumours_enhance(monkeypatch):
    monkeypatch.setattr(ct, "apply_scanner_effects", lambda image, grid, e, rng: image)
    seen = 0
    for index in range(CASES):
        image, labels, _ = generate_case(index, SEED, SMALL_23)
        cysts = labels == CYST_LABEL
        if not cysts.any():
            continue
        seen += 1
        values = image[cysts].astype(np.float32)
        mean = float(values.mean())
        assert ct.CYST_HU[0] - 2.0 <= mean <= ct.CYST_HU[1] + 2.0
        assert values.std() < 2 * ct.CYST_TEXTURE_HU  # homogeneous
        tumours, count = ndimage.label(labels == TUMOUR_LABEL)
        for tumour in range(1, count + 1):
            voxels = image[tumours == tumour].astype(np.float32)
            assert voxels.mean() > mean + 20.0 or voxels.min() < -30.0  # enhances, or holds fat
    assert seen >= 1


def test_options_default_to_kits19_and_name_the_dataset(tmp_path):
    assert SyntheticOptions().dataset == "kits19"
    assert SyntheticOptions(dataset="KiTS23").dataset == "kits23"
    with pytest.raises(ValueError, match="unknown dataset 'kits99'"):
        SyntheticOptions(dataset="kits99")
    _, labels, _ = generate_case(2, SEED, SyntheticOptions(matrix=64, spacing=(5.0, 6.0, 6.0),
                                                           coverage_mm=(240.0, 300.0)))
    assert set(np.unique(labels)) <= {0, 1, 2}
    summaries = generate_dataset(tmp_path / "k19", 1, seed=1, options=SyntheticOptions(matrix=64,
                                 spacing=(6.0, 6.0, 6.0)), show_progress=False)
    assert summaries[0].cyst_ml is None and (tmp_path / "k19" / "kits.json").is_file()
    with pytest.raises(ValueError, match=r"kits\.json exists.*KiTS19 cases"):
        generate_dataset(tmp_path / "k19", 1, seed=1, options=SyntheticOptions(matrix=64, spacing=(6.0, 6.0, 6.0),
                                                                               dataset="kits23"),
                         show_progress=False)
    assert not (tmp_path / "k19" / "kits23.json").exists()


def _kidney_with_cyst(shape=(24, 64, 64)) -> np.ndarray:
    """Two kidneys, a tumour on one and a 4-voxel-radius cyst (label 3) on the other's surface."""
    labels = np.zeros(shape, np.uint8)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for cx in (shape[2] * 0.3, shape[2] * 0.7):
        labels[((z - shape[0] / 2) / 8) ** 2 + ((y - shape[1] * 0.6) / 6) ** 2 + ((x - cx) / 5) ** 2 <= 1] = 1
    labels[((z - shape[0] / 2) / 3) ** 2 + ((y - shape[1] * 0.6) / 3) ** 2
           + ((x - shape[2] * 0.3 + 4) / 3) ** 2 <= 1] = 2
    labels[(z - shape[0] / 2) ** 2 + (y - shape[1] * 0.6) ** 2 + (x - shape[2] * 0.7 - 5) ** 2 <= 16] = 3
    return labels


def test_from_hand_made_masks_of_either_dataset(tmp_path):
    masks = tmp_path / "masks"
    (masks / "case_00003").mkdir(parents=True)
    labels = _kidney_with_cyst()
    affine = build_kits_affine((4.0, 4.0, 4.0))
    source = save_nifti(labels, affine, masks / "case_00003" / "segmentation.nii.gz")
    out = tmp_path / "out"
    summaries = generate_from_masks(masks, out, seed=2, show_progress=False, dataset="kits23")
    assert sorted(p.name for p in out.iterdir()) == ["case_00003", "kits23.json"]
    assert (out / "case_00003" / "segmentation.nii.gz").read_bytes() == source.read_bytes()
    assert summaries[0].cyst_ml == pytest.approx(np.count_nonzero(labels == 3) * 64 / 1000, abs=0.01)
    image = np.asarray(nib.load(out / "case_00003" / "imaging.nii.gz").dataobj)
    inner = ndimage.binary_erosion(labels == 3)
    assert -10.0 < image[inner].mean() < 35.0 and image[labels == 1].mean() > image[inner].mean() + 80
    assert validate_dataset(out, full=True, dataset="kits23", show_progress=False).counts["ok"] == 1
    with pytest.raises(ValueError, match=r"label values must be in \[0, 1, 2\], found \[3\].*--dataset kits23"):
        generate_from_masks(masks, tmp_path / "as19", show_progress=False)
    assert not (tmp_path / "as19").exists()

    kits19_masks = tmp_path / "masks19"  # KiTS19 masks (kits.json) read as KiTS23: no cyst, kits23.json
    (kits19_masks / "case_00004").mkdir(parents=True)
    labels[labels == 3] = 1
    save_nifti(labels, affine, kits19_masks / "case_00004" / "segmentation.nii.gz")
    (kits19_masks / "kits.json").write_text(json.dumps([{"case_id": "case_00004"}]))
    summaries = generate_from_masks(kits19_masks, tmp_path / "out19", seed=2, show_progress=False, dataset="kits23")
    assert summaries[0].cyst_ml == 0.0
    assert sorted(p.name for p in (tmp_path / "out19").iterdir()) == ["case_00004", "kits23.json"]


def test_from_real_kits23_masks_keeps_the_cysts(real_cases, tmp_path):
    masks = _mask_folder(tmp_path, real_cases, REAL_WITH_CYSTS, metadata=True)
    out = tmp_path / "out"
    run = _run_script("--out", str(out), "--from-masks", str(masks), "--dataset", "kits23", "--workers", "2")
    assert run.returncode == 0, run.stderr
    assert "cyst ml" in run.stdout and "2 with a cyst" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == [*REAL_WITH_CYSTS, "kits23.json"]
    assert json.loads((out / "kits23.json").read_text()) == [{"case_id": case_id} for case_id in REAL_WITH_CYSTS]
    for case_id in REAL_WITH_CYSTS:
        source = real_cases / case_id / "segmentation.nii.gz"
        written = out / case_id / "segmentation.nii.gz"
        assert written.read_bytes() == source.read_bytes()  # copied, never resampled
        labels = _labels(written)
        assert np.count_nonzero(labels == CYST_LABEL) == np.count_nonzero(_labels(source) == CYST_LABEL) > 0
        image = nib.load(out / case_id / "imaging.nii.gz")
        np.testing.assert_allclose(image.affine, nib.load(source).affine)
        assert spacing_from_affine(image.affine) == pytest.approx(spacing_from_affine(nib.load(source).affine))
        data = np.asarray(image.dataobj)
        inner = ndimage.binary_erosion(labels == CYST_LABEL, iterations=2)
        assert -10.0 < data[inner].mean() < 30.0  # water
        assert data[labels == KIDNEY_LABEL].mean() > data[inner].mean() + 80.0  # enhancing parenchyma
    report = validate_dataset(out, full=True, dataset="kits23", show_progress=False)
    assert report.counts["ok"] == 2 and not report.listing.warnings


def test_real_kits23_masks_are_refused_as_kits19_before_any_case_is_written(real_cases, tmp_path):
    masks = _mask_folder(tmp_path, real_cases, (REAL_WITHOUT_CYST, REAL_WITH_CYSTS[0]), metadata=True)
    out = tmp_path / "out"
    run = _run_script("--out", str(out), "--from-masks", str(masks))  # --dataset defaults to kits19
    assert run.returncode == 2
    assert "kits23.json" in run.stderr and "--dataset kits23" in run.stderr
    assert not out.exists()
    (masks / "kits23.json").unlink()  # without the metadata file, the labels give them away
    run = _run_script("--out", str(out), "--from-masks", str(masks), "--dataset", "kits19")
    assert run.returncode == 2
    assert f"{REAL_WITH_CYSTS[0]}/segmentation.nii.gz: label values must be in [0, 1, 2], found [3]" in run.stderr
    assert "--dataset kits23" in run.stderr and "no case was written" in run.stderr
    assert not out.exists()  # case_00497 (no cyst) comes first and was not written either


def test_kits23_masks_written_as_kits19_cases_keep_the_cyst_in_the_ct_and_label_it_kidney(tmp_path):
    assert label_lookup("kits23", "kits19").tolist() == [0, 1, 2, 1]  # KiTS19 labels cysts kidney
    assert label_lookup("kits19", "kits23").tolist() == [0, 1, 2]
    masks = tmp_path / "masks"
    (masks / "case_00401").mkdir(parents=True)
    labels = _kidney_with_cyst()
    source = save_nifti(labels, build_kits_affine((4.0, 4.0, 4.0)), masks / "case_00401" / "segmentation.nii.gz")
    (masks / "kits23.json").write_text(json.dumps([{"case_id": "case_00401"}]))
    before = {p: p.read_bytes() for p in masks.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    summaries = generate_from_masks(masks, out, seed=2, show_progress=False, dataset="kits23", labels_as="kits19")
    assert sorted(p.name for p in out.iterdir()) == ["case_00401", "kits.json"]
    written = _labels(out / "case_00401" / "segmentation.nii.gz")
    expected = labels.copy()
    expected[labels == CYST_LABEL] = KIDNEY_LABEL
    assert np.array_equal(written, expected)
    assert nib.load(out / "case_00401" / "segmentation.nii.gz").get_data_dtype() == np.uint8
    assert summaries[0].cyst_ml is None  # KiTS19: the cyst is counted as kidney
    assert summaries[0].kidney_ml == pytest.approx(np.count_nonzero(labels % 2 == 1) * 64 / 1000, abs=0.01)
    image = np.asarray(nib.load(out / "case_00401" / "imaging.nii.gz").dataobj)
    inner = ndimage.binary_erosion(labels == CYST_LABEL)  # the same CT as written for KiTS23: the cyst is water
    assert -10.0 < image[inner].mean() < 35.0
    reference = tmp_path / "as23"
    generate_from_masks(masks, reference, seed=2, show_progress=False, dataset="kits23")
    assert np.array_equal(image, np.asarray(nib.load(reference / "case_00401" / "imaging.nii.gz").dataobj))
    assert validate_dataset(out, full=True, show_progress=False).counts["ok"] == 1  # a valid KiTS19 folder
    assert {p: p.read_bytes() for p in masks.rglob("*") if p.is_file()} == before and source.is_file()
    cli = _run_script("--out", str(tmp_path / "cli"), "--from-masks", str(masks), "--dataset", "kits23",
                      "--labels-as", "kits19")
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "cli" / "kits.json").is_file() and not (tmp_path / "cli" / "kits23.json").exists()
    refused = _run_script("--out", str(tmp_path / "nothing"), "--cases", "1", "--labels-as", "kits19")
    assert refused.returncode == 2 and "--labels-as rewrites real masks: it needs --from-masks" in refused.stderr
