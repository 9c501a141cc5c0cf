"""Evaluating a trained run: its validation cases segmented from raw CTs, scored on the original grid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_training_engine import TINY_UNETR, tiny_config

from utils.evaluation.run import evaluate_run
from utils.metrics.scoring import METRIC_NAMES
from utils.training.engine import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_runs(tiny_cache, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A one-epoch tiny 3D run and 2D run on the tiny synthetic cases, and their raw data folder."""
    data = Path(tiny_cache.plan["source_data"])
    root = tmp_path_factory.mktemp("runs")
    resunet = train(tiny_config(root, training={"run_name": "tiny3d", "epochs": 1}), data_dir=data,
                    show_progress=False)
    unetr = train(tiny_config(root, **TINY_UNETR, training={"run_name": "tiny2d", "epochs": 1}), data_dir=data,
                  show_progress=False)
    return resunet.run_folder, unetr.run_folder, data


@pytest.mark.parametrize("which", [0, 1])
def test_a_run_is_scored_on_its_validation_cases_in_the_original_grid(trained_runs, tiny_cache, tmp_path, which):
    run, data = trained_runs[which], trained_runs[2]
    result = evaluate_run(run, data_dir=data, reports_dir=tmp_path, show_progress=False)
    assert result.report_folder == tmp_path / run.name
    _, validation_ids = tiny_cache.split(0)
    metrics = json.loads((result.report_folder / "metrics.json").read_text())
    assert [case["case_id"] for case in metrics["cases"]] == sorted(validation_ids)
    assert metrics["warnings"] == [] and metrics["refused"] == []
    for case in metrics["cases"]:
        assert set(METRIC_NAMES) <= set(case) and 0 <= case["kidney_dice"] <= 1
        truth = nib.load(data / case["case_id"] / "segmentation.nii.gz")
        prediction = nib.load(result.report_folder / "predictions" / f"{case['case_id']}.nii.gz")
        assert prediction.shape == truth.shape and np.allclose(prediction.affine, truth.affine)
        assert prediction.get_data_dtype() == np.uint8
    inference = json.loads((result.report_folder / "inference.json").read_text())
    assert inference["model"] == ("resunet3d", "unetr2d")[which] and inference["parameters"] > 0
    assert [c["case_id"] for c in inference["cases"]] == sorted(validation_ids)
    assert all(c["seconds"] > 0 for c in inference["cases"])
    assert (result.report_folder / "case_scores.png").read_bytes()[:4] == b"\x89PNG"
    for case_id in validation_ids:
        for kind in ("overlay", "errors"):
            assert (result.report_folder / "figures" / f"{case_id}_{kind}.png").read_bytes()[:4] == b"\x89PNG"


def test_all_cases_can_be_evaluated(trained_runs, tmp_path):
    result = evaluate_run(trained_runs[0], data_dir=trained_runs[2], cases="all", out_dir=tmp_path / "all",
                          show_progress=False)
    assert len(result.evaluation.cases) == 4


def test_a_report_folder_inside_the_data_is_refused_before_anything_is_written(trained_runs):
    data = trained_runs[2]
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    with pytest.raises(ValueError, match="inside the input data folder"):
        evaluate_run(trained_runs[0], data_dir=data, out_dir=data / "reports", show_progress=False)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_each_eval_script_refuses_the_other_models_run_and_runs_its_own(trained_runs, tmp_path):
    resunet, unetr, data = trained_runs
    wrong = subprocess.run([sys.executable, "scripts/eval_unet.py", "--run", str(unetr), "--data", str(data)],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert wrong.returncode == 2 and "scripts/eval_unetr.py" in wrong.stderr
    right = subprocess.run([sys.executable, "scripts/eval_unetr.py", "--run", str(unetr), "--data", str(data),
                            "--reports", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert right.returncode == 0, right.stderr[-2000:]
    assert "kidney_dice" in right.stdout and (tmp_path / unetr.name / "metrics.csv").is_file()


def test_the_latest_run_of_a_model_is_found(trained_runs, tmp_path):
    from utils.evaluation.run import find_latest_run

    resunet, unetr, _ = trained_runs
    assert find_latest_run(resunet.parent, "resunet3d") == resunet
    assert find_latest_run(resunet.parent, "unetr2d") == unetr
    assert find_latest_run(tmp_path, "unetr2d") is None


@pytest.mark.parametrize("script", ["scripts/eval_unet.py", "scripts/eval_unetr.py"])
def test_eval_scripts_refuse_a_report_inside_the_data_before_loading_the_run(tiny_data, tmp_path, script):
    """The run does not even exist: the refusal comes from the output guard, before any loading."""
    inside = tiny_data / "case_00000" / "report"
    done = subprocess.run([sys.executable, script, "--run", str(tmp_path / "no_run"), "--data", str(tiny_data),
                           "--out", str(inside)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{Path(script).name}: error: report folder {inside.resolve()} is inside the input data folder" \
        in done.stderr
    assert "no such checkpoint" not in done.stderr and not inside.exists()


def test_the_data_folder_from_the_environment_is_protected_too(tiny_data, tmp_path, monkeypatch):
    from utils.data.output_guard import OutputGuardError

    monkeypatch.setenv("KITS19_DATA", str(tiny_data))
    with pytest.raises(OutputGuardError, match="inside the input data folder"):
        evaluate_run(tmp_path / "no_run", reports_dir=tiny_data / "reports", show_progress=False)
    assert not (tiny_data / "reports").exists()


def test_foreign_files_in_the_report_folder_are_never_replaced(trained_runs, tmp_path):
    from utils.data.nifti_io import save_nifti
    from utils.data.output_guard import OutputGuardError

    report = tmp_path / "report"
    (report / "predictions").mkdir(parents=True)
    foreign = report / "predictions" / "case_00000.nii.gz"
    save_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4), foreign)  # no prediction mark in its header
    payload = foreign.read_bytes()
    with pytest.raises(OutputGuardError, match="not written by this command") as error:
        evaluate_run(trained_runs[0], data_dir=trained_runs[2], cases="all", out_dir=report, show_progress=False)
    assert str(foreign.resolve()) in str(error.value)
    assert foreign.read_bytes() == payload and sorted(p.name for p in report.rglob("*")) == [
        "case_00000.nii.gz", "predictions"]
    foreign.unlink()
    (report / "metrics.json").write_text('{"mine": 1}\n')
    with pytest.raises(OutputGuardError, match="metrics.json"):
        evaluate_run(tmp_path / "no_run", data_dir=trained_runs[2], out_dir=report, show_progress=False)
