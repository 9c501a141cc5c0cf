"""Choosing the smallest tumour component on a run's validation cases, storing it, and segmenting with it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_ensemble import write_experiment
from test_training_engine import tiny_config

from utils.data.output_guard import OutputGuardError
from utils.evaluation.postprocessing_choice import (
    CHOICE_FIGURE,
    CHOICE_TABLE,
    check_choice_outputs,
    check_validation_report,
    choose_min_tumour_ml,
    current_sha256,
    write_choice,
)
from utils.evaluation.predictions import evaluate_predictions
from utils.evaluation.run import evaluate_run
from utils.inference.postprocessing import CHOICE_FILE, ensemble_sha256, file_sha256, read_min_tumour_ml
from utils.inference.segment import find_fold_checkpoints, load_segmentation_model, segment_ct
from utils.networks.checkpoints import load_checkpoint, save_checkpoint
from utils.training.engine import train

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "choose_postprocessing.py"
SPACING = 2.0  # mm: a voxel is 0.008 ml


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A one-epoch tiny 3D run folder (a real checkpoint to choose for)."""
    root = tmp_path_factory.mktemp("choice_runs")
    result = train(tiny_config(root, training={"run_name": "tiny3d", "epochs": 1}), data_dir=tiny_data,
                   show_progress=False)
    return result.run_folder


def _save(array: np.ndarray, path: Path, dtype=np.uint8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), np.diag([SPACING] * 3 + [1.0])), path)


def _truth(second_tumour: bool = False) -> np.ndarray:
    """(40, 40, 40) at 2 mm: a 64 ml kidney block holding a 2.7 ml tumour (7 x 7 x 7 voxels) and, with
    ``second_tumour``, a 1 ml one (5 x 5 x 5 voxels)."""
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:25, 5:25, 5:25] = 1
    labels[6:13, 6:13, 6:13] = 2
    if second_tumour:
        labels[16:21, 6:11, 16:21] = 2
    return labels


def _validation_report(root: Path, model_file: Path, **inference) -> tuple[Path, Path]:
    """A data folder of two cases and a validation report of post-processed predictions: case_00000's holds
    a false 0.22 ml tumour component (3 x 3 x 3 voxels) in healthy kidney beside its tumour; case_00001 has
    two tumours (2.7 and 1 ml), and its prediction is the truth."""
    data, report = root / "data", root / "reports" / "val"
    for case_id, second in (("case_00000", False), ("case_00001", True)):
        _save(np.zeros((40, 40, 40)), data / case_id / "imaging.nii.gz", np.float32)
        _save(_truth(second), data / case_id / "segmentation.nii.gz")
    false_tumour = _truth()
    false_tumour[18:21, 18:21, 18:21] = 2
    _save(false_tumour, report / "predictions" / "case_00000.nii.gz")
    _save(_truth(True), report / "predictions" / "case_00001.nii.gz")
    evaluate_predictions(data, report / "predictions", report)
    record = {"run_name": model_file.parent.name, "model": "resunet3d", "checkpoint": str(model_file),
              "checkpoint_sha256": current_sha256(model_file), "data_dir": str(data), "postprocess": True,
              "min_tumour_ml": 0.0, "cases_selected": "validation", **inference}
    (report / "inference.json").write_text(json.dumps(record))
    return data, report


def _run(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, env=env,
                          timeout=300)


def test_the_threshold_that_drops_false_tumour_but_keeps_the_true_one_is_chosen(tiny_run, tmp_path):
    checkpoint = tiny_run / "last.pt"
    data, report = _validation_report(tmp_path, checkpoint)
    choice = choose_min_tumour_ml(report, candidates=(0.1, 0.5, 5.0), show_progress=False)
    by_value = {score.min_tumour_ml: score for score in choice.scores}
    assert list(by_value) == [0.0, 0.1, 0.5, 5.0]
    tumour = {value: score.summary["tumour_dice"]["mean"] for value, score in by_value.items()}
    # 0.1 ml changes nothing (0.216 ml is above it); 0.5 ml drops the false component only; 5 ml the second true
    # tumour too (1 ml), while each case's largest tumour component stays, however small
    assert by_value[0.1].changed_cases == () and tumour[0.1] == tumour[0.0] < 1.0
    assert by_value[0.5].changed_cases == ("case_00000",) and tumour[0.5] == pytest.approx(1.0)
    assert by_value[0.5].relabelled_ml == pytest.approx(27 * 0.008)
    assert by_value[5.0].changed_cases == ("case_00000", "case_00001")
    assert by_value[5.0].relabelled_ml == pytest.approx((27 + 125) * 0.008)
    assert tumour[5.0] == pytest.approx((1.0 + 2 * 343 / (2 * 343 + 125)) / 2)
    assert all(score.summary["kidney_dice"]["mean"] == pytest.approx(1.0) for score in choice.scores)
    assert by_value[0.0].summary["tumour_hd95"]["mean"] > 0 and by_value[0.5].summary["tumour_hd95"]["mean"] == 0
    assert choice.min_tumour_ml == 0.5 and choice.case_ids == ("case_00000", "case_00001")
    # a tie keeps the smaller threshold: 0.4 ml does what 0.5 ml does
    assert choose_min_tumour_ml(report, candidates=(0.4, 0.5), show_progress=False).min_tumour_ml == 0.4

    path = write_choice(choice)
    assert path == tiny_run / CHOICE_FILE
    stored = json.loads(path.read_text())
    assert stored["min_tumour_ml"] == 0.5 and stored["checkpoint"] == "last.pt"
    assert stored["checkpoint_sha256"] == file_sha256(checkpoint)
    assert stored["chosen_on"]["cases"] == ["case_00000", "case_00001"] and len(stored["candidates"]) == 4
    assert "**(chosen)**" in (report / CHOICE_TABLE).read_text()
    assert (report / CHOICE_FIGURE).read_bytes()[:4] == b"\x89PNG"
    # the data folder and the validation predictions are untouched
    assert sorted(p.name for p in (data / "case_00000").iterdir()) == ["imaging.nii.gz", "segmentation.nii.gz"]
    np.testing.assert_array_equal(nib.load(report / "predictions" / "case_00001.nii.gz").get_fdata(), _truth(True))

    # the checkpoint it was chosen for carries it, any other file of the folder does not
    assert read_min_tumour_ml(checkpoint) == 0.5
    assert load_segmentation_model(checkpoint).min_tumour_ml == 0.5
    if (tiny_run / "best.pt").is_file():
        assert load_segmentation_model(tiny_run / "best.pt").min_tumour_ml == 0.0
    path.unlink()


def test_the_rule_reaches_the_segmentation_and_its_record(tiny_run, tiny_data, tmp_path, caplog):
    checkpoint = tiny_run / "last.pt"
    segmenter = load_segmentation_model(checkpoint)
    image = nib.load(tiny_data / "case_00000" / "imaging.nii.gz")
    hu = np.asarray(image.get_fdata(), np.float32)
    ruler = replace(segmenter, min_tumour_ml=1e6)  # every tumour component is under 1e6 ml: all kidney but the largest
    plain = segment_ct(hu, image.affine, segmenter, postprocess=True, min_component_ml=0.0, restore="labels")
    ruled = segment_ct(hu, image.affine, ruler, postprocess=True, min_component_ml=0.0, restore="labels")
    # the rule runs on the model's grid (one tumour component stays there), so on the CT's grid the tumour shrinks
    assert (ruled == 2).any() and not ((ruled == 2) & (plain != 2)).any() and (ruled == 2).sum() < (plain == 2).sum()
    np.testing.assert_array_equal(ruled > 0, plain > 0)  # the kidney region is the same
    np.testing.assert_array_equal(segment_ct(hu, image.affine, replace(segmenter, min_tumour_ml=1e6)),
                                  segment_ct(hu, image.affine, segmenter))  # no rule without --postprocess

    # a stored choice is applied by --postprocess evaluations and recorded in inference.json
    data, report = _validation_report(tmp_path / "hand", checkpoint)
    write_choice(choose_min_tumour_ml(report, candidates=(0.5,), show_progress=False))
    evaluation = evaluate_run(checkpoint, data_dir=tiny_data, out_dir=tmp_path / "val", postprocess=True,
                              show_progress=False)
    assert evaluation.inference["min_tumour_ml"] == 0.5
    assert evaluation.inference["checkpoint_sha256"] == file_sha256(checkpoint)
    # a report made with the rule cannot choose again (its predictions already apply it)
    with pytest.raises(ValueError, match="already apply min_tumour_ml"):
        choose_min_tumour_ml(tmp_path / "val", show_progress=False)

    # once the checkpoint changes (training went on), the old choice is not applied
    state = load_checkpoint(checkpoint)
    state["epoch"] = int(state["epoch"]) + 1
    save_checkpoint(checkpoint, state)
    with caplog.at_level(logging.WARNING):
        assert load_segmentation_model(checkpoint).min_tumour_ml == 0.0
    assert "has changed since" in caplog.text
    # and a report of the old checkpoint can no longer choose for it
    with pytest.raises(ValueError, match="has changed since"):
        choose_min_tumour_ml(report, show_progress=False)
    (tiny_run / CHOICE_FILE).unlink()


def test_reports_that_may_not_choose_are_refused_before_anything_is_written(tiny_run, tmp_path):
    checkpoint = tiny_run / "last.pt"
    data, report = _validation_report(tmp_path / "test", checkpoint, cases_selected="all")
    result = _run(str(report))
    assert result.returncode == 1 and "not the run's validation cases" in result.stderr
    _, unprocessed = _validation_report(tmp_path / "raw", checkpoint, postprocess=False)
    result = _run(str(unprocessed))
    assert result.returncode == 1 and "--postprocess" in result.stderr
    _, ensemble = _validation_report(tmp_path / "ensemble", checkpoint, checkpoint=str(tiny_run))
    result = _run(str(ensemble))
    assert result.returncode == 1 and "checkpoint file its cases were segmented with" in result.stderr
    assert not (tiny_run / CHOICE_FILE).exists()
    assert not (report / CHOICE_TABLE).exists() and not (unprocessed / CHOICE_TABLE).exists()
    # the choice is never written into the data folder, nor over a file this command did not write
    with pytest.raises(OutputGuardError, match="inside the input data folder"):
        check_choice_outputs(checkpoint, tiny_run.parent)
    (tiny_run / CHOICE_FILE).write_text("my notes\n")
    try:
        result = _run(str(_validation_report(tmp_path / "ok", checkpoint)[1]))
        assert result.returncode == 2 and "was not written by this command" in result.stderr
        assert (tiny_run / CHOICE_FILE).read_text() == "my notes\n"
        with pytest.raises(ValueError, match=CHOICE_FILE):  # nor is a malformed choice silently ignored
            read_min_tumour_ml(checkpoint)
    finally:
        (tiny_run / CHOICE_FILE).unlink()


def test_the_script_prints_the_table_and_dry_run_writes_nothing(tiny_run, tmp_path):
    checkpoint = tiny_run / "last.pt"
    _, report = _validation_report(tmp_path, checkpoint)
    result = _run(str(report), "--candidates", "0.5", "5", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "| 0.5 **(chosen)** |" in result.stdout and "dry run: nothing written" in result.stdout
    assert not (tiny_run / CHOICE_FILE).exists() and not (report / CHOICE_TABLE).exists()
    result = _run(str(report), "--candidates", "0.5", "5")
    assert result.returncode == 0, result.stderr
    try:
        assert json.loads((tiny_run / CHOICE_FILE).read_text())["min_tumour_ml"] == 0.5
    finally:
        (tiny_run / CHOICE_FILE).unlink()
    assert _run(str(report), "--candidates", "-1").returncode == 2


def test_an_experiments_out_of_fold_report_chooses_for_its_fold_ensemble(tmp_path, caplog):
    experiment = write_experiment(tmp_path / "experiment", [0, 1, 2])
    folds = find_fold_checkpoints(experiment)
    rows = [{"fold": k, "checkpoint": str(path), "checkpoint_sha256": file_sha256(path), "min_tumour_ml": 0.0}
            for k, path in enumerate(folds.values())]
    data, report = _validation_report(tmp_path, experiment, cases_selected="out-of-fold", fold_checkpoints=rows)
    choice = choose_min_tumour_ml(report, candidates=(0.5, 5.0), show_progress=False)
    assert choice.min_tumour_ml == 0.5 and choice.out_of_fold and choice.cases_name == "out-of-fold"
    assert choice.checkpoint_sha256 == ensemble_sha256(folds.values()) == ensemble_sha256(reversed(folds.values()))
    path = write_choice(choice)
    assert path == experiment / CHOICE_FILE
    stored = json.loads(path.read_text())
    assert stored["checkpoint"] == "experiment" and stored["chosen_on"]["cases_selected"] == "out-of-fold"
    assert stored["fold_checkpoints"] == {f"fold_{k}/best.pt": file_sha256(folds[f"fold_{k}"]) for k in range(3)}
    assert "experiment (fold ensemble): smallest tumour component, chosen on 2 out-of-fold case(s)" in \
        (report / CHOICE_TABLE).read_text()
    # the ensemble loaded from the folder applies it; one fold alone does not (it was chosen for the ensemble)
    assert load_segmentation_model(experiment).min_tumour_ml == 0.5
    assert load_segmentation_model(folds["fold_0"]).min_tumour_ml == 0.0
    # the ensemble's own report cannot choose: every case of the experiment was trained on by some fold
    _, own = _validation_report(tmp_path / "own", experiment, cases_selected="all")
    with pytest.raises(ValueError, match="fold ensemble was trained on every case"):
        check_validation_report(own)
    # an out-of-fold report without its folds' SHA-256 (an older version's) cannot choose
    _, older = _validation_report(tmp_path / "older", experiment, cases_selected="out-of-fold")
    with pytest.raises(ValueError, match="without the SHA-256 of its fold checkpoints"):
        check_validation_report(older)
    # once one fold's checkpoint changes, the ensemble no longer applies the choice and the report cannot choose
    state = load_checkpoint(folds["fold_1"])
    state["model"] = {key: value + 1 if value.is_floating_point() else value for key, value in state["model"].items()}
    save_checkpoint(folds["fold_1"], state)
    with caplog.at_level(logging.WARNING):
        assert load_segmentation_model(experiment).min_tumour_ml == 0.0
    assert "has changed since" in caplog.text
    with pytest.raises(ValueError, match="fold checkpoints of .* have changed"):
        check_validation_report(report)
