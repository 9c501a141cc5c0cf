"""Segmenting a raw CT back onto its own grid: a perfect fake predictor, tiny real checkpoints, TTA."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import utils.inference.segment as ct_inference
from utils.config.experiment import ExperimentConfig
from utils.config.loading import build_config, config_as_dict
from utils.data.nifti_io import read_voxels
from utils.inference.segment import (
    find_checkpoint,
    flip_axes_for_tta,
    load_segmentation_model,
    predict_preprocessed_labels,
    segment_ct,
    segment_file,
)
from utils.metrics.scoring import score_case
from utils.networks.checkpoints import save_checkpoint
from utils.networks.models import build_model, model_input_size
from utils.preprocessing.preprocess import preprocess_volume
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

TINY_3D = {
    "preprocessing": {"target_spacing": [4.0, 4.0, 4.0], "image_dtype": "float32"},
    "patches": {"patch_size": [8, 16, 16]},
    "model": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "sliding_window": {"roi_size": [8, 16, 16], "overlap": 0.25, "sw_batch_size": 4},
}
TINY_2D = {
    "preprocessing": {"target_spacing": [4.0, 4.0, 4.0], "image_dtype": "float32"},
    "model": {"name": "unetr2d", "feature_size": 4, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2},
    "slices": {"image_size": 32}, "slice_inference": {"batch_size": 16},
}
NORMALISATION = {"clip_low_hu": -100.0, "clip_high_hu": 300.0, "mean_hu": 100.0, "std_hu": 80.0}


def write_tiny_checkpoint(folder: Path, sections: dict, name: str = "best.pt", seed: int = 0) -> Path:
    """A checkpoint as the training engine writes it, of a freshly initialised tiny model."""
    config = build_config(ExperimentConfig, sections)
    torch.manual_seed(seed)
    model = build_model(config.model, model_input_size(config))
    folder.mkdir(parents=True, exist_ok=True)
    plan = {"preprocessing": config_as_dict(config.preprocessing), "normalisation": dict(NORMALISATION)}
    return save_checkpoint(folder / name, {"model": model.state_dict(), "config": config_as_dict(config),
                                           "preprocessing_plan": plan})


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path]:
    """One synthetic CT of (185, 64, 64) voxels of 1.25 x 6.57 x 6.57 mm, KiTS19's permuted affine."""
    folder = tmp_path_factory.mktemp("ct") / "data"
    generate_dataset(folder, 1, seed=1, options=SyntheticOptions(matrix=64), show_progress=False)
    image = nib.load(folder / "case_00000" / "imaging.nii.gz")
    labels = np.asarray(nib.load(folder / "case_00000" / "segmentation.nii.gz").dataobj).astype(np.uint8)
    return read_voxels(image), labels, image.affine, folder / "case_00000" / "imaging.nii.gz"


@pytest.fixture(scope="module")
def segmenter_3d(tmp_path_factory) -> ct_inference.SegmentationModel:
    return load_segmentation_model(write_tiny_checkpoint(tmp_path_factory.mktemp("run") / "tiny3d", TINY_3D).parent)


def _reoriented(array: np.ndarray, affine: np.ndarray, axcodes: tuple[str, str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored in another axis order (``axcodes``), with the matching affine."""
    image = nib.Nifti1Image(array, affine).as_reoriented(
        nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(axcodes)))
    return np.ascontiguousarray(image.dataobj), image.affine


@pytest.mark.parametrize("restore", ["probabilities", "labels"])
@pytest.mark.parametrize("axcodes", [("I", "P", "L"), ("R", "A", "S")])
def test_a_perfect_predictor_gives_the_truth_back_on_the_original_grid(synthetic_case, segmenter_3d, monkeypatch,
                                                                        axcodes, restore):
    image_hu, truth, affine, _ = synthetic_case
    assert nib.aff2axcodes(affine) == ("I", "P", "L") and affine[0, 0] == 0  # KiTS19: permuted, not diagonal
    image_hu, affine = _reoriented(image_hu, affine, axcodes)  # RAS: the preprocessing must reorient and back
    truth = _reoriented(truth, synthetic_case[2], axcodes)[0]
    assert nib.aff2axcodes(affine) == axcodes
    _, cache_labels, _ = preprocess_volume(image_hu.copy(), truth, affine, segmenter_3d.preprocessing,
                                           segmenter_3d.normalisation)

    def perfect(model, image, config, **kwargs):
        assert tuple(image.shape[2:]) == cache_labels.shape  # the predictor sees exactly the cache grid
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(cache_labels).long(), 3)
        return one_hot.permute(3, 0, 1, 2)[None].float() * 10

    monkeypatch.setattr(ct_inference, "predict_volume_logits", perfect)
    original = image_hu.copy()
    prediction = segment_ct(image_hu, affine, segmenter_3d, restore=restore)
    assert prediction.shape == truth.shape and prediction.dtype == np.uint8
    np.testing.assert_array_equal(image_hu, original)  # the caller's array is not used as scratch
    scores = score_case(prediction, truth)
    assert scores["kidney_dice"] >= 0.9, scores
    assert scores["tumour_dice"] >= 0.8, scores


def test_post_processing_removes_a_detached_tumour_in_both_restore_modes(synthetic_case, segmenter_3d, monkeypatch):
    image_hu, truth, affine, _ = synthetic_case
    _, cache_labels, _ = preprocess_volume(image_hu.copy(), truth, affine, segmenter_3d.preprocessing,
                                           segmenter_3d.normalisation)
    labels = cache_labels.copy()
    far = tuple(slice(0, 3) for _ in range(3))  # a corner block, far from the kidneys
    assert not labels[far].any()
    labels[far] = 2

    def with_blob(model, image, config, **kwargs):
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 3)
        return one_hot.permute(3, 0, 1, 2)[None].float() * 10

    monkeypatch.setattr(ct_inference, "predict_volume_logits", with_blob)
    for restore in ct_inference.RESTORE_MODES:
        raw = segment_ct(image_hu.copy(), affine, segmenter_3d, restore=restore)
        kept = segment_ct(image_hu.copy(), affine, segmenter_3d, restore=restore, postprocess=True)
        assert (raw == 2).sum() > (truth == 2).sum(), restore  # the blob reaches the original grid
        assert score_case(kept, truth)["tumour_dice"] > score_case(raw, truth)["tumour_dice"], restore
        assert score_case(kept, truth)["tumour_dice"] >= 0.8, restore
    with pytest.raises(ValueError, match="restore must be one of"):
        segment_ct(image_hu.copy(), affine, segmenter_3d, restore="nearest")


def test_segment_file_writes_labels_with_the_input_shape_and_affine(synthetic_case, segmenter_3d, tmp_path):
    _, truth, affine, path = synthetic_case
    before = path.read_bytes()
    written = segment_file(path, tmp_path / "out" / "pred.nii.gz", segmenter_3d)
    assert written == tmp_path / "out" / "pred.nii.gz"
    result = nib.load(written)
    assert result.shape == truth.shape and result.get_data_dtype() == np.uint8
    np.testing.assert_allclose(result.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(result.dataobj))) <= {0, 1, 2}
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="would overwrite the input"):
        segment_file(path, path, segmenter_3d)
    with pytest.raises(ValueError, match=r"must end in \.nii or \.nii\.gz"):
        segment_file(path, tmp_path / "pred.npy", segmenter_3d)


def test_a_2d_model_segments_slice_by_slice(synthetic_case, tmp_path):
    image_hu, truth, affine, _ = synthetic_case
    segmenter = load_segmentation_model(write_tiny_checkpoint(tmp_path / "tiny2d", TINY_2D, name="last.pt"))
    assert segmenter.config.model.name == "unetr2d" and segmenter.run_name == "tiny2d"
    prediction = segment_ct(image_hu, affine, segmenter)
    assert prediction.shape == truth.shape and prediction.dtype == np.uint8


def test_tta_averages_over_every_mirroring(segmenter_3d, monkeypatch):
    """A pointwise predictor is mirror-equivariant: TTA returns its labels, after 8 (3D) or 4 (2D) passes."""
    image = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    seen = []

    def pointwise(model, tensor, config, **kwargs):
        seen.append(tensor.clone())
        return torch.cat([tensor, -tensor, 0.5 * tensor.abs()], dim=1)

    monkeypatch.setattr(ct_inference, "predict_volume_logits", pointwise)
    plain = predict_preprocessed_labels(segmenter_3d, image)
    assert len(seen) == 1
    seen.clear()
    mirrored = predict_preprocessed_labels(segmenter_3d, image, tta=True)
    np.testing.assert_array_equal(mirrored, plain)
    original = torch.from_numpy(image)[None, None]
    expected = [original.flip(axes) if axes else original for axes in flip_axes_for_tta(3)]
    assert len(seen) == 8 and all(torch.equal(s, e) for s, e in zip(seen, expected, strict=False))
    assert flip_axes_for_tta(2) == [(), (3,), (4,), (3, 4)]  # in-plane only for 2D models
    # only the mirrorings the model was trained with: left-right only gives two passes
    assert flip_axes_for_tta(3, (2,)) == [(), (4,)] and flip_axes_for_tta(2, (0, 2)) == [(), (4,)]
    assert flip_axes_for_tta(3, ()) == [()]
    config = segmenter_3d.config
    left_right = dataclasses.replace(segmenter_3d, config=dataclasses.replace(
        config, augmentation=dataclasses.replace(config.augmentation, flip_axes=(2,))))
    seen.clear()
    np.testing.assert_array_equal(predict_preprocessed_labels(left_right, image, tta=True), plain)
    assert len(seen) == 2 and torch.equal(seen[1], original.flip((4,)))
    never = dataclasses.replace(segmenter_3d, config=dataclasses.replace(
        config, augmentation=dataclasses.replace(config.augmentation, flip_prob=0.0)))
    seen.clear()
    predict_preprocessed_labels(never, image, tta=True)
    assert len(seen) == 1


def test_checkpoint_lookup_and_bad_checkpoints(tmp_path):
    run = tmp_path / "run"
    write_tiny_checkpoint(run, TINY_3D, name="last.pt")
    assert find_checkpoint(run) == run / "last.pt"
    write_tiny_checkpoint(run, TINY_3D, name="best.pt")
    assert find_checkpoint(run) == run / "best.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: run folder holds no checkpoint"):
        load_segmentation_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_segmentation_model(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "weights_only.pt", {"model": {}})
    with pytest.raises(ValueError, match=r"weights_only\.pt: not a training checkpoint: missing key"):
        load_segmentation_model(tmp_path / "weights_only.pt")
    state = torch.load(run / "best.pt", weights_only=True)
    state["config"]["model"]["channels"] = [4, 8, 32]
    save_checkpoint(tmp_path / "other.pt", state)
    with pytest.raises(ValueError, match=r"other\.pt: the weights do not fit the resunet3d model"):
        load_segmentation_model(tmp_path / "other.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda_is_refused(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_segmentation_model(write_tiny_checkpoint(tmp_path, TINY_3D), device="cuda")


def test_bad_arrays_are_refused(segmenter_3d):
    with pytest.raises(ValueError, match="image_hu must be a non-empty 3D array"):
        segment_ct(np.zeros((4, 4), np.float32), np.eye(4), segmenter_3d)
    with pytest.raises(ValueError, match="affine must be a finite, invertible"):
        segment_ct(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4)), segmenter_3d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_logits_stitched_on_the_cpu_match(synthetic_case, tmp_path, monkeypatch):
    image_hu, truth, affine, _ = synthetic_case
    segmenter = load_segmentation_model(write_tiny_checkpoint(tmp_path, TINY_3D), device="cuda")
    on_gpu = segment_ct(image_hu, affine, segmenter, tta=True)
    monkeypatch.setattr(ct_inference, "_GPU_STITCH_SHARE", 0.0)  # force the CPU buffers
    on_cpu = segment_ct(image_hu, affine, segmenter, tta=True)
    assert on_gpu.shape == truth.shape
    assert (on_gpu == on_cpu).mean() > 0.999


def test_segment_file_reports_the_seconds_of_each_stage(synthetic_case, segmenter_3d, tmp_path):
    import time
    _, _, _, path = synthetic_case
    timings: dict[str, float] = {}
    started = time.perf_counter()
    segment_file(path, tmp_path / "pred.nii.gz", segmenter_3d, timings=timings)
    total = time.perf_counter() - started
    assert list(timings) == ["read", "preprocess", "predict", "restore", "write"]
    assert all(seconds >= 0 for seconds in timings.values()) and sum(timings.values()) <= total
