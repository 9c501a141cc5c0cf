"""Tests of utils.preprocessing.preprocess on small synthetic datasets: the cache, re-runs, the way back to the CT."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from utils.config.data import PreprocessingConfig, SplitConfig
from utils.data.case_discovery import discover_cases
from utils.data.case_validation import load_case
from utils.data.kits_layout import IMAGING_NAME, SEGMENTATION_NAME
from utils.data.nifti_io import save_nifti
from utils.preprocessing.cache import (
    CASE_STATISTICS_DIR,
    CASES_DIR,
    FINGERPRINT_NAME,
    IMAGE_FILE,
    LABEL_FILE,
    LOCATIONS_FILE,
    META_FILE,
    PLAN_NAME,
    open_cache,
)
from utils.preprocessing.fingerprint import load_case_fingerprint
from utils.preprocessing.preprocess import (
    NO_SEGMENTATION,
    Normalisation,
    PreprocessingResult,
    plan_name,
    preprocess_dataset,
    preprocess_volume,
)
from utils.preprocessing.resampling import crop_to_box, restore_labels
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

FIXED_SPACING = (3.0, 1.5, 1.5)
NORMALISATION = Normalisation(clip_low_hu=-50.0, clip_high_hu=300.0, mean_hu=150.0, std_hu=60.0)


@pytest.fixture(scope="module")
def drawn_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four cases with KiTS19-like spacings drawn at random (slices 1 to 5 mm), 64 x 64 in plane."""
    folder = tmp_path_factory.mktemp("drawn") / "data"
    generate_dataset(folder, 4, seed=0, options=SyntheticOptions(matrix=64), show_progress=False)
    return folder


@pytest.fixture(scope="module")
def fixed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three cases with the fixed spacing ``FIXED_SPACING``."""
    folder = tmp_path_factory.mktemp("fixed") / "data"
    generate_dataset(folder, 3, seed=1, options=SyntheticOptions(matrix=64, spacing=FIXED_SPACING),
                     show_progress=False)
    return folder


@pytest.fixture(scope="module")
def built(drawn_data: Path, tmp_path_factory: pytest.TempPathFactory) -> PreprocessingResult:
    """The cache of ``drawn_data`` with the default parameters (3.22 x 1.62 x 1.62 mm)."""
    cache_dir = tmp_path_factory.mktemp("built") / "cache"
    return preprocess_dataset(drawn_data, PreprocessingConfig(), SplitConfig(), cache_dir=cache_dir,
                              show_progress=False)


def _copy(folder: Path, destination: Path) -> Path:
    """Copy a folder keeping modification times (so a copied cache stays up to date)."""
    return Path(shutil.copytree(folder, destination, copy_function=shutil.copy2))


def _modification_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _original_labels(data_dir: Path, case_id: str) -> nib.Nifti1Image:
    return nib.load(data_dir / case_id / SEGMENTATION_NAME)


def test_the_cache_is_produced(built: PreprocessingResult) -> None:
    case_ids = [f"case_0000{i}" for i in range(4)]
    assert built.case_ids == built.written == case_ids and built.skipped == [] and not built.failed
    assert built.folder.name == plan_name(PreprocessingConfig())
    assert built.folder.name.startswith("spacing_3.22x1.62x1.62_")
    for name in (PLAN_NAME, FINGERPRINT_NAME, "splits.json"):
        assert (built.folder / name).is_file()
    statistics = built.folder.parent / CASE_STATISTICS_DIR
    assert sorted(p.name for p in statistics.iterdir()) == [f"{case_id}.json" for case_id in case_ids]
    cache = open_cache(built.folder)
    assert cache.case_ids == case_ids and cache.fingerprint == built.fingerprint
    train, val = cache.split()
    assert sorted(train + val) == case_ids and len(val) == 1
    moments = np.zeros(3)  # foreground voxels, sum and sum of squares, weighted as in the original grids
    for case in cache.cases():
        assert sorted(p.name for p in case.folder.iterdir()) == [IMAGE_FILE, LABEL_FILE, LOCATIONS_FILE, META_FILE]
        assert case.image.dtype == np.float16 and case.label.dtype == np.uint8
        assert case.image.shape == case.label.shape == case.shape == case.mapping.cropped_shape
        assert set(np.unique(case.label)) == {0, 1, 2}
        foreground = case.image[case.label > 0].astype(np.float64)
        weight = load_case_fingerprint(statistics / f"{case.case_id}.json").foreground_voxels / foreground.size
        moments += weight * np.array([foreground.size, foreground.sum(), np.square(foreground).sum()])
        np.testing.assert_array_equal(case.locations("tumour"), np.argwhere(case.label == 2))
        assert case.slice_classes.tolist() == [2 if (s == 2).any() else 1 if s.any() else 0 for s in case.label]
        assert case.spacing == pytest.approx((3.22, 1.62, 1.62), rel=0.02)
    mean = moments[1] / moments[0]  # roughly z-scored: upsampling 6 mm pixels blurs the kidney edges into fat
    assert abs(mean) < 0.5 and 0.6 < np.sqrt(moments[2] / moments[0] - mean**2) < 1.2


def test_a_second_run_writes_nothing(built: PreprocessingResult, drawn_data: Path) -> None:
    root = built.folder.parent
    before = _modification_times(root)
    again = preprocess_dataset(drawn_data, PreprocessingConfig(), SplitConfig(), cache_dir=root, show_progress=False)
    assert again.written == [] and again.skipped == built.case_ids and again.case_ids == built.case_ids
    assert again.folder == built.folder and again.fingerprint == built.fingerprint
    assert _modification_times(root) == before


def test_a_touched_case_is_redone_alone(built: PreprocessingResult, drawn_data: Path, tmp_path: Path) -> None:
    data, root = _copy(drawn_data, tmp_path / "data"), _copy(built.folder.parent, tmp_path / "cache")
    imaging = data / "case_00002" / IMAGING_NAME
    stat = imaging.stat()
    os.utime(imaging, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = preprocess_dataset(data, PreprocessingConfig(), SplitConfig(), cache_dir=root, show_progress=False)
    assert again.written == ["case_00002"]
    assert again.skipped == ["case_00000", "case_00001", "case_00003"]


def test_changed_parameters_give_a_new_plan_folder(built: PreprocessingResult, drawn_data: Path,
                                                   tmp_path: Path) -> None:
    root = _copy(built.folder.parent, tmp_path / "cache")
    statistics_before = _modification_times(root / CASE_STATISTICS_DIR)
    coarse = PreprocessingConfig(target_spacing=(4.0, 2.0, 2.0))
    result = preprocess_dataset(drawn_data, coarse, SplitConfig(), cache_dir=root, show_progress=False)
    assert result.folder.name.startswith("spacing_4x2x2_") and result.written == built.case_ids
    assert (root / built.folder.name / PLAN_NAME).is_file()  # the old plan stays
    assert _modification_times(root / CASE_STATISTICS_DIR) == statistics_before  # statistics are shared
    assert open_cache(result.folder).case("case_00000").spacing == pytest.approx((4.0, 2.0, 2.0), rel=0.03)
    names = {plan_name(config) for config in (PreprocessingConfig(), PreprocessingConfig(image_dtype="float32"),
                                              PreprocessingConfig(antialias=False), PreprocessingConfig(cache_dir="x"))}
    assert len(names) == 3  # every parameter but the cache location names a plan


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_restored_labels_match_the_original_grid(built: PreprocessingResult, drawn_data: Path,
                                                 tmp_path: Path) -> None:
    cache = open_cache(built.folder)
    for case in cache.cases():
        original = _original_labels(drawn_data, case.case_id)
        restored = restore_labels(case.label, case.mapping)
        assert restored.shape == original.shape and restored.dtype == np.uint8
        truth = np.asarray(original.dataobj)
        assert _dice(restored > 0, truth > 0) >= 0.9, case.case_id
        saved = nib.load(save_nifti(restored, np.asarray(case.mapping.original_affine), tmp_path / "pred.nii.gz"))
        np.testing.assert_array_equal(saved.affine, original.affine)
        np.testing.assert_array_equal(np.asarray(saved.dataobj), restored)


def test_labels_at_the_source_spacing_come_back_identical(fixed_data: Path, tmp_path: Path) -> None:
    config = PreprocessingConfig(target_spacing=FIXED_SPACING, image_dtype="float32")
    result = preprocess_dataset(fixed_data, config, SplitConfig(), cache_dir=tmp_path / "cache", show_progress=False)
    assert len(result.written) == 3
    normalisation = Normalisation.from_fingerprint(result.fingerprint)
    for case in open_cache(result.folder).cases():
        assert case.mapping.resampled_spacing == FIXED_SPACING
        original = np.asarray(_original_labels(fixed_data, case.case_id).dataobj)
        np.testing.assert_array_equal(restore_labels(case.label, case.mapping), original)
        image = np.asarray(nib.load(fixed_data / case.case_id / IMAGING_NAME).dataobj, dtype=np.float32)
        expected = normalisation.apply(crop_to_box(image, case.mapping.crop_box).copy())
        np.testing.assert_allclose(case.image, expected, rtol=1e-6, atol=1e-6)


def _as_ras_file(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, folder: Path) -> None:
    """Write a case stored in RAS order (slice axis last), describing the same voxels in the same world."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(("R", "A", "S")))
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    folder.mkdir(parents=True)
    save_nifti(nib.orientations.apply_orientation(image, ornt).astype(np.int16), ras_affine, folder / IMAGING_NAME)
    save_nifti(nib.orientations.apply_orientation(labels, ornt), ras_affine, folder / SEGMENTATION_NAME)


@pytest.mark.parametrize("target_spacing", [FIXED_SPACING, (3.22, 1.62, 1.62)])
def test_another_orientation_gives_the_same_cache(fixed_data: Path, tmp_path: Path, target_spacing) -> None:
    kits = load_case(discover_cases(fixed_data).cases[0])
    _as_ras_file(kits.image, kits.segmentation, kits.affine, tmp_path / "ras" / "case_00000")
    ras = load_case(discover_cases(tmp_path / "ras").cases[0])
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S") and ras.image.shape == kits.image.shape[::-1]
    config = PreprocessingConfig(target_spacing=target_spacing)
    kits_image, kits_labels, kits_mapping = preprocess_volume(kits.image, kits.segmentation, kits.affine, config,
                                                              NORMALISATION)
    ras_image, ras_labels, ras_mapping = preprocess_volume(ras.image, ras.segmentation, ras.affine, config,
                                                           NORMALISATION)
    np.testing.assert_array_equal(ras_image, kits_image)
    np.testing.assert_array_equal(ras_labels, kits_labels)
    assert ras_mapping.original_axcodes == ("R", "A", "S") and ras_mapping.original_shape == ras.image.shape
    assert ras_mapping.crop_box == kits_mapping.crop_box
    restored = restore_labels(ras_labels, ras_mapping)
    assert restored.shape == ras.segmentation.shape
    if target_spacing == FIXED_SPACING:
        np.testing.assert_array_equal(restored, ras.segmentation)
    else:
        kits_restored = restore_labels(kits_labels, kits_mapping)
        np.testing.assert_array_equal(restored, np.transpose(kits_restored[::-1, ::-1, ::-1]))


def test_preprocess_volume_without_labels(fixed_data: Path) -> None:
    case = load_case(discover_cases(fixed_data).cases[1])
    config = PreprocessingConfig()
    image, labels, mapping = preprocess_volume(case.image, case.segmentation, case.affine, config, NORMALISATION)
    alone, no_labels, same_mapping = preprocess_volume(case.image, None, case.affine, config, NORMALISATION)
    assert no_labels is None and same_mapping == mapping
    np.testing.assert_array_equal(alone, image)
    assert image.dtype == np.float16 and labels.dtype == np.uint8
    with pytest.raises(ValueError, match="labels shape"):
        preprocess_volume(case.image, case.segmentation[1:], case.affine, config, NORMALISATION)
    with pytest.raises(ValueError, match="must be 3D"):
        preprocess_volume(case.image[0], None, case.affine, config, NORMALISATION)


def test_unusable_cases_are_reported_and_the_others_cached(fixed_data: Path, tmp_path: Path) -> None:
    data = _copy(fixed_data, tmp_path / "data")
    segmentation = nib.load(data / "case_00001" / SEGMENTATION_NAME)
    corrupt = np.asarray(segmentation.dataobj).copy()
    corrupt[0, 0, 0] = 7
    save_nifti(corrupt, segmentation.affine, data / "case_00001" / SEGMENTATION_NAME)
    (data / "case_00003").mkdir()
    shutil.copy2(data / "case_00000" / IMAGING_NAME, data / "case_00003" / IMAGING_NAME)  # a test case: no labels
    result = preprocess_dataset(data, PreprocessingConfig(target_spacing=(4.0, 2.0, 2.0)), SplitConfig(),
                                cache_dir=tmp_path / "cache", show_progress=False)
    assert list(result.failed) == ["case_00001"] and "bad_labels" in result.failed["case_00001"]
    assert result.excluded == {"case_00003": NO_SEGMENTATION}
    assert result.case_ids == result.written == ["case_00000", "case_00002"]
    assert sorted(p.name for p in (result.folder / CASES_DIR).iterdir()) == ["case_00000", "case_00002"]
    assert result.fingerprint.case_ids == ("case_00000", "case_00002")


def test_an_interrupted_run_leaves_no_half_written_case(fixed_data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    savez, calls = np.savez, []

    def savez_interrupted_at_the_second_case(*args, **kwargs) -> None:
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        savez(*args, **kwargs)

    config, cache_dir = PreprocessingConfig(target_spacing=(4.0, 2.0, 2.0)), tmp_path / "cache"
    monkeypatch.setattr(np, "savez", savez_interrupted_at_the_second_case)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(fixed_data, config, SplitConfig(), cache_dir=cache_dir, show_progress=False)
    folder = cache_dir / plan_name(config)
    assert sorted(p.name for p in (folder / CASES_DIR).iterdir()) == ["case_00000"]
    assert not (folder / PLAN_NAME).exists()
    monkeypatch.undo()
    result = preprocess_dataset(fixed_data, config, SplitConfig(), cache_dir=cache_dir, show_progress=False)
    assert result.skipped == ["case_00000"] and result.written == ["case_00001", "case_00002"]
    assert [case.case_id for case in open_cache(folder).cases()] == ["case_00000", "case_00001", "case_00002"]


@pytest.mark.parametrize("case_id", ["case_00061", "case_00116"])  # 5 mm slices (upsampled); 0.5 mm (downsampled)
def test_real_masks_survive_the_round_trip_at_the_default_spacing(real_kits19_dir: Path, case_id: str) -> None:
    """A real KiTS19 mask through preprocessing and back: original shape, composite Dice >= 0.9."""
    segmentation = nib.load(real_kits19_dir / case_id / SEGMENTATION_NAME)
    labels = np.asarray(segmentation.dataobj).astype(np.uint8)
    image = np.where(labels > 0, 100.0, -1000.0).astype(np.float32)  # a CT stand-in: only the crop uses it
    _, cached, mapping = preprocess_volume(image, labels, segmentation.affine, PreprocessingConfig(),
                                           Normalisation(-100.0, 300.0, 100.0, 50.0), overwrite_input=True)
    assert mapping.resampled_spacing == pytest.approx((3.22, 1.62, 1.62), rel=0.05)
    restored = restore_labels(cached, mapping)
    assert restored.shape == labels.shape and np.allclose(np.asarray(mapping.original_affine), segmentation.affine)
    for mask in (lambda a: a > 0, lambda a: a == 2):
        overlap = np.count_nonzero(mask(restored) & mask(labels))
        assert 2 * overlap / (np.count_nonzero(mask(restored)) + np.count_nonzero(mask(labels))) >= 0.9


def test_a_single_case_is_cached_without_a_split(fixed_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "one"
    _copy(fixed_data / "case_00000", data / "case_00000")
    result = preprocess_dataset(data, PreprocessingConfig(), SplitConfig(), cache_dir=tmp_path / "cache",
                                show_progress=False)
    assert result.case_ids == ["case_00000"] and "at least 2 cases" in result.split_problem
    cache = open_cache(result.folder)
    assert cache.case("case_00000").shape == tuple(np.load(result.folder / CASES_DIR / "case_00000" / LABEL_FILE).shape)
    with pytest.raises(FileNotFoundError, match="no splits file"):
        cache.split(0)


def test_a_plan_folder_of_other_data_is_never_rebuilt_in_place(built: PreprocessingResult, drawn_data: Path,
                                                              fixed_data: Path, tmp_path: Path) -> None:
    root = _copy(built.folder.parent, tmp_path / "cache")
    base = root / built.folder.name
    before = _modification_times(base)
    other = preprocess_dataset(fixed_data, PreprocessingConfig(), SplitConfig(), cache_dir=root, show_progress=False)
    assert other.folder != base and other.folder.name.startswith(f"{base.name}_data-")
    assert _modification_times(base) == before  # runs trained on the first data still find it as it was
    assert open_cache(base).case_ids == built.case_ids and open_cache(other.folder).case_ids == other.case_ids
    again = preprocess_dataset(fixed_data, PreprocessingConfig(), SplitConfig(), cache_dir=root, show_progress=False)
    assert again.folder == other.folder and again.written == []  # the same other data finds its own folder
    first = preprocess_dataset(drawn_data, PreprocessingConfig(), SplitConfig(), cache_dir=root, show_progress=False)
    assert first.folder == base and first.written == []
