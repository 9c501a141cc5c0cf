"""Fold ensembles: an experiment folder of ``fold_<k>`` run folders segments as one model.

Tiny real MONAI checkpoints (as the training engine writes them) on a synthetic CT: k copies of
one model predict as that model; different folds average their softmax; folds that disagree on
the model or the preprocessing are refused; ``scripts/segment.py`` and
``scripts/benchmark_ensemble.py`` run end to end.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest
import torch
from test_ct_inference import NORMALISATION, TINY_3D, write_tiny_checkpoint

import utils.inference.segment as ct_inference
from utils.data.nifti_io import read_voxels
from utils.inference.predict import predict_volume_logits
from utils.inference.segment import (
    SegmentationModel,
    find_fold_checkpoints,
    load_segmentation_model,
    predict_preprocessed_labels,
    predict_preprocessed_probabilities,
    segment_file,
)
from utils.networks.checkpoints import save_checkpoint
from utils.preprocessing.preprocess import preprocess_volume
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
FOLDS = 3


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_experiment(folder: Path, seeds: list[int], sections: dict = TINY_3D) -> Path:
    """An experiment folder as cross-validation lays it out: ``fold_<k>/best.pt`` of a tiny model each."""
    for k, seed in enumerate(seeds):
        fold_sections = {**sections, "split": {"scheme": "kfold", "folds": len(seeds)}, "training": {"fold": k}}
        write_tiny_checkpoint(folder / f"fold_{k}", fold_sections, seed=seed)
    (folder / "cross_validation.json").write_text(json.dumps({"folds": len(seeds)}))
    return folder


def _edit_checkpoint(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    save_checkpoint(path, state)


@pytest.fixture(scope="module")
def ct_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct") / "data"
    generate_dataset(folder, 1, seed=3, options=SyntheticOptions(matrix=64), show_progress=False)
    return folder / "case_00000" / "imaging.nii.gz"


@pytest.fixture(scope="module")
def different_folds(tmp_path_factory) -> Path:
    return write_experiment(tmp_path_factory.mktemp("cv") / "experiment", [0, 1, 2])


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> Path:
    return write_experiment(tmp_path_factory.mktemp("cv") / "copies", [0] * FOLDS)


@pytest.fixture(scope="module")
def preprocessed(ct_path, copies) -> np.ndarray:
    """The synthetic CT through the folds' own preprocessing: what every model of the ensemble sees."""
    segmenter = load_segmentation_model(copies / "fold_0")
    image = nib.load(ct_path)
    volume, _, _ = preprocess_volume(read_voxels(image, np.float32), None, np.asarray(image.affine),
                                     segmenter.preprocessing, segmenter.normalisation)
    assert volume.shape[0] > 8 and volume.shape[1] > 16  # more than one window along each axis
    return volume


def _softmax_of(segmenter: SegmentationModel, image: np.ndarray) -> torch.Tensor:
    """``(C, Z, Y, X)`` softmax of one model's logits, computed here without the code under test."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    logits = predict_volume_logits(segmenter.model, tensor, segmenter.config, pad_value=segmenter.background_value)
    return torch.softmax(logits.double(), dim=1)[0]


def test_an_experiment_folder_loads_every_fold(different_folds: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="utils.inference.segment"):
        ensemble = load_segmentation_model(different_folds)
    assert ensemble.model_count == FOLDS and len(ensemble.models) == FOLDS
    assert ensemble.checkpoints == tuple(different_folds / f"fold_{k}" / "best.pt" for k in range(FOLDS))
    assert ensemble.model is ensemble.models[0]
    assert ensemble.run_name == "experiment" and ensemble.checkpoint == different_folds
    assert ensemble.training_case_ids == ()  # no validation cases of its own: every case trained some fold
    assert f"ensemble of {FOLDS} fold model(s)" in caplog.text
    assert all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in ensemble.models)
    assert len({id(m) for m in ensemble.models}) == FOLDS


def test_a_single_run_is_loaded_as_before(different_folds: Path) -> None:
    fold = load_segmentation_model(different_folds / "fold_1")
    assert fold.model_count == 1 and fold.models == (fold.model,) and fold.run_name == "fold_1"
    assert fold.checkpoints == (different_folds / "fold_1" / "best.pt",) == (fold.checkpoint,)
    by_file = load_segmentation_model(different_folds / "fold_1" / "best.pt")
    assert by_file.model_count == 1 and by_file.checkpoint == fold.checkpoint
    assert find_fold_checkpoints(different_folds / "fold_1") == {}  # a run folder, not an experiment
    # built positionally, as callers did before ensembles existed
    rebuilt = SegmentationModel(fold.model, fold.config, fold.preprocessing, fold.normalisation, "run",
                                fold.checkpoint, fold.device)
    assert rebuilt.models == (fold.model,) and rebuilt.checkpoints == (fold.checkpoint,)


def test_copies_of_one_model_predict_as_that_model(copies: Path, preprocessed: np.ndarray) -> None:
    single = load_segmentation_model(copies / "fold_0")
    ensemble = load_segmentation_model(copies)
    assert ensemble.model_count == FOLDS
    crop = np.ascontiguousarray(preprocessed[:12, :24, :24])  # with TTA: 8 passes a model, on a part
    for image, tta in ((preprocessed, False), (crop, True)):
        alone = predict_preprocessed_probabilities(single, image, tta=tta)
        together = predict_preprocessed_probabilities(ensemble, image, tta=tta)
        assert together.shape == (3, *image.shape) and together.dtype == np.float32
        np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)
        np.testing.assert_allclose(together.sum(axis=0), 1.0, atol=1e-5)
        labels = predict_preprocessed_labels(ensemble, image, tta=tta)
        np.testing.assert_array_equal(labels, predict_preprocessed_labels(single, image, tta=tta))
        np.testing.assert_array_equal(labels, alone.argmax(axis=0))


def test_different_folds_average_their_softmax(different_folds: Path, preprocessed: np.ndarray) -> None:
    folds = [load_segmentation_model(different_folds / f"fold_{k}") for k in range(FOLDS)]
    expected = torch.stack([_softmax_of(fold, preprocessed) for fold in folds]).mean(dim=0).numpy()
    first = _softmax_of(folds[0], preprocessed).numpy()
    assert np.abs(first - expected).max() > 1e-3  # the folds really differ
    ensemble = load_segmentation_model(different_folds)
    averaged = predict_preprocessed_probabilities(ensemble, preprocessed)
    np.testing.assert_allclose(averaged, expected, rtol=0, atol=1e-6)
    labels = predict_preprocessed_labels(ensemble, preprocessed)
    top2 = np.sort(expected, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-5  # voxels whose argmax rounding cannot change
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], expected.argmax(axis=0)[clear])
    # one model without TTA keeps the argmax of its logits
    tensor = torch.from_numpy(preprocessed)[None, None]
    logits = predict_volume_logits(folds[0].model, tensor, folds[0].config, pad_value=folds[0].background_value)
    np.testing.assert_array_equal(predict_preprocessed_labels(folds[0], preprocessed),
                                  logits[0].argmax(dim=0).numpy().astype(np.uint8))


def test_an_ensemble_segments_a_ct_file_with_one_preprocessing(different_folds: Path, ct_path: Path,
                                                                 tmp_path: Path, monkeypatch) -> None:
    ensemble = load_segmentation_model(different_folds)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return preprocess_volume(*args, **kwargs)

    monkeypatch.setattr(ct_inference, "preprocess_volume", counted)
    written = segment_file(ct_path, tmp_path / "pred.nii.gz", ensemble)
    assert len(calls) == 1  # one preprocessing pass serves every fold
    prediction, ct = nib.load(written), nib.load(ct_path)
    assert prediction.shape == ct.shape and prediction.get_data_dtype() == np.uint8
    np.testing.assert_allclose(prediction.affine, ct.affine, atol=1e-5)


@pytest.mark.parametrize(("edit", "key"), [
    (lambda s: s["config"]["model"].update(channels=[4, 8, 32]), "config.model.channels"),
    (lambda s: s["config"]["sliding_window"].update(roi_size=[8, 32, 32]), "config.sliding_window.roi_size"),
    (lambda s: s["preprocessing_plan"]["preprocessing"].update(target_spacing=[3.0, 4.0, 4.0]),
     "preprocessing_plan.preprocessing.target_spacing"),
    (lambda s: s["preprocessing_plan"]["normalisation"].update(mean_hu=90.0),
     "preprocessing_plan.normalisation.mean_hu"),
])
def test_folds_that_disagree_are_refused(tmp_path: Path, edit, key: str) -> None:
    experiment = write_experiment(tmp_path / "mixed", [0, 1, 2])
    if key == "config.model.channels":  # other weights to go with the other network
        write_tiny_checkpoint(experiment / "fold_2", {**TINY_3D, "model": {**TINY_3D["model"],
                                                                           "channels": [4, 8, 32]}})
    _edit_checkpoint(experiment / "fold_2" / "best.pt", edit)
    message = f"mixed: the folds cannot be ensembled: fold_0 and fold_2 differ in {key} ("
    with pytest.raises(ValueError, match=re.escape(message)):
        load_segmentation_model(experiment)


def test_folds_may_differ_in_their_split_training_and_cache_folder(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path / "cv", [0, 1])
    _edit_checkpoint(experiment / "fold_1" / "best.pt", lambda s: (
        s["config"]["training"].update(seed=7, epochs=3), s["config"]["optimiser"].update(learning_rate=0.1),
        s["preprocessing_plan"]["preprocessing"].update(cache_dir="elsewhere/cache"),
        s["preprocessing_plan"].update(case_ids=["case_00001"])))
    assert load_segmentation_model(experiment).model_count == 2


def test_folds_without_a_checkpoint(tmp_path: Path, caplog) -> None:
    experiment = tmp_path / "unfinished"
    (experiment / "fold_0").mkdir(parents=True)
    (experiment / "fold_1").mkdir()
    (experiment / "fold_1" / "notes.txt").write_text("still training\n")
    with pytest.raises(FileNotFoundError, match=r"unfinished: experiment folder holds no fold checkpoint: none of "
                                                r"fold_0, fold_1 has best\.pt or last\.pt"):
        load_segmentation_model(experiment)
    write_tiny_checkpoint(experiment / "fold_1", TINY_3D, name="last.pt")
    write_tiny_checkpoint(experiment / "fold_10", TINY_3D, seed=3)
    with caplog.at_level(logging.WARNING, logger="utils.inference.segment"):
        ensemble = load_segmentation_model(experiment)
    assert ensemble.model_count == 2  # fold_0 is left out, with a warning naming it
    assert ensemble.checkpoints == (experiment / "fold_1" / "last.pt", experiment / "fold_10" / "best.pt")
    assert "fold_0 hold(s) no checkpoint" in caplog.text
    (tmp_path / "not_folds" / "fold_x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not_folds: run folder holds no checkpoint"):
        load_segmentation_model(tmp_path / "not_folds")


def test_the_segment_script_uses_every_fold(different_folds: Path, ct_path: Path, tmp_path: Path, capsys) -> None:
    script = _load_script("segment")
    out = tmp_path / "pred.nii.gz"
    assert script.main(["--checkpoint", str(different_folds), "--input", str(ct_path), "--output", str(out),
                        "--device", "cpu"]) == script.EXIT_OK
    stdout = capsys.readouterr().out
    assert "segmented 1 of 1 CT(s)" in stdout and f"ensemble of {FOLDS} models" in stdout
    assert "experiment (resunet3d, cpu, tta off" in stdout
    assert nib.load(out).shape == nib.load(ct_path).shape
    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "ct.nii.gz").write_bytes(ct_path.read_bytes())
    assert script.main(["--checkpoint", str(different_folds), "--input", str(folder), "--output",
                        str(tmp_path / "out"), "--device", "cpu"]) == script.EXIT_OK
    record = json.loads((tmp_path / "out" / "segmentation_run.json").read_text())
    assert record["model_count"] == FOLDS and record["cases"] == {"ct.nii.gz": "written"}
    assert record["checkpoints"] == [str((different_folds / f"fold_{k}" / "best.pt").resolve()) for k in range(FOLDS)]
    assert record["checkpoint"] == str(different_folds.resolve())
    assert script.main(["--checkpoint", str(different_folds / "fold_0"), "--input", str(ct_path), "--output",
                        str(tmp_path / "one.nii.gz"), "--device", "cpu"]) == script.EXIT_OK
    assert "(resunet3d, cpu, tta off, postprocessing off, 1 model)" in capsys.readouterr().out


def test_the_segment_script_refuses_folds_that_disagree(tmp_path: Path, ct_path: Path, capsys) -> None:
    script = _load_script("segment")
    experiment = write_experiment(tmp_path / "mixed", [0, 1])
    _edit_checkpoint(experiment / "fold_1" / "best.pt",
                     lambda s: s["preprocessing_plan"].update(normalisation={**NORMALISATION, "std_hu": 50.0}))
    assert script.main(["--checkpoint", str(experiment), "--input", str(ct_path), "--output",
                        str(tmp_path / "pred.nii.gz"), "--device", "cpu"]) == script.EXIT_USAGE
    assert "fold_0 and fold_1 differ in preprocessing_plan.normalisation.std_hu" in capsys.readouterr().err
    assert not (tmp_path / "pred.nii.gz").exists()


def test_the_ensemble_benchmark_runs_end_to_end(tmp_path: Path, capsys) -> None:
    script = _load_script("benchmark_ensemble")
    out = tmp_path / "timing" / "ensemble.json"
    assert script.main(["--folds", "2", "--repeats", "1", "--matrix", "64", "--device", "cpu", "--out", str(out),
                        "--set", "model.channels=[4,8,16,32]"]) == 0
    stdout = capsys.readouterr().out
    assert "single fold:" in stdout and "ensemble of 2 folds:" in stdout and "ratio ensemble/single:" in stdout
    result = json.loads(out.read_text())
    assert result["folds"] == 2 and result["single_seconds"] > 0 and result["ensemble_seconds"] > 0
    assert result["ratio"] == pytest.approx(result["ensemble_seconds"] / result["single_seconds"])
    assert set(result["stage_seconds"]["ensemble"]) == {"read", "preprocess", "predict", "restore", "write"}
    assert script.main(["--folds", "1", "--device", "cpu"]) == 2
    assert "folds must be >= 2" in capsys.readouterr().err
