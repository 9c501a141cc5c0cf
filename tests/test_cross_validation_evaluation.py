"""Out-of-fold evaluation of cross-validated experiments: every case segmented once, by the fold that held it
out, scored in one report; two experiments compared on every case; bad experiments refused clearly; the
evaluation scripts take an experiment folder.

Two tiny three-fold 3D Residual U-Net experiments (one epoch per fold, differing in their learning rate) are
trained for real on six small synthetic CTs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.test_training_engine import tiny_config
from utils.evaluation.comparison import load_evaluation_report, resolve_report_folder
from utils.evaluation.cross_validation import evaluate_cross_validation, out_of_fold_assignment
from utils.evaluation.postprocessing_choice import choose_min_tumour_ml, write_choice
from utils.evaluation.run import evaluate_run
from utils.inference.postprocessing import CHOICE_FILE, ensemble_sha256, file_sha256
from utils.inference.segment import find_fold_checkpoints, load_segmentation_model, segment_file
from utils.metrics.scoring import METRIC_NAMES
from utils.training.cross_validation import (
    MANIFEST,
    CrossValidationError,
    load_cross_validation,
    train_cross_validation,
)

REPO = Path(__file__).resolve().parents[1]
CASES = 6
FOLDS = 3


def _config(root: Path, learning_rate: float):
    return tiny_config(root, split={"scheme": "kfold", "folds": FOLDS},
                       patches={"patch_size": [8, 16, 16], "samples_per_epoch": 4},
                       optimiser={"learning_rate": learning_rate, "warmup_epochs": 1},
                       training={"epochs": 1, "validate_every": 1, "max_validation_cases": 1})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Six synthetic cases and two finished three-fold experiments on them: ``(data, experiment A, experiment B)``."""
    from utils.synthetic.dataset import SyntheticOptions, generate_dataset

    root = tmp_path_factory.mktemp("cv_eval")
    data = root / "data"
    generate_dataset(data, CASES, seed=5, options=SyntheticOptions(matrix=64), show_progress=False)
    folders = []
    for name, learning_rate in (("cv_a", 0.01), ("cv_b", 0.03)):
        result = train_cross_validation(_config(root, learning_rate), name, data_dir=data, show_progress=False)
        assert result.all_finished
        folders.append(result.folder)
    return data, folders[0], folders[1]


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """Both experiments evaluated out of fold into one reports folder: ``(reports, evaluation A, evaluation B)``."""
    data, experiment_a, experiment_b = trained
    reports = tmp_path_factory.mktemp("cv_reports")
    a = evaluate_cross_validation(experiment_a, data_dir=data, reports_dir=reports, device="cpu", show_progress=False)
    b = evaluate_cross_validation(experiment_b, data_dir=data, reports_dir=reports, device="cpu", show_progress=False,
                                  figures=False)
    return reports, a, b


def _copy(experiment: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(experiment, tmp_path / experiment.name))


def test_every_case_is_segmented_once_by_the_fold_that_held_it_out(trained, evaluated):
    data, experiment_a, _ = trained
    reports, result, _ = evaluated
    manifest = json.loads((experiment_a / MANIFEST).read_text())
    held_out = {case: k for k, split in enumerate(manifest["split"]["splits"]) for case in split["val"]}
    case_ids = sorted(p.name for p in data.iterdir() if p.name.startswith("case_"))
    assert sorted(held_out) == case_ids and len(case_ids) == CASES

    assert result.report_folder == reports / "cv_a" and result.experiment.folder == experiment_a
    metrics = json.loads((result.report_folder / "metrics.json").read_text())
    rows = metrics["cases"]
    assert [row["case_id"] for row in rows] == case_ids  # every case exactly once
    assert {row["case_id"]: row["fold"] for row in rows} == held_out
    assert [dict(row) for row in result.cases] == rows
    assert metrics["refused"] == [] and metrics["missing_predictions"] == []
    assert metrics["experiment"] == {**metrics["experiment"], "predictions": "out-of-fold", "k": FOLDS,
                                     "model": "resunet3d", "split_seed": manifest["split"]["seed"],
                                     "plan_hash": manifest["plan_hash"], "name": "cv_a"}
    csv_lines = (result.report_folder / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(("case_id", *METRIC_NAMES, "fold"))
    assert [line.split(",")[-1] for line in csv_lines[1:]] == [str(held_out[c]) for c in case_ids]

    inference = json.loads((result.report_folder / "inference.json").read_text())
    assert inference["model"] == "resunet3d" and inference["cases_selected"] == "out-of-fold"
    for timing in inference["cases"]:
        fold = held_out[timing["case_id"]]
        assert timing["fold"] == fold and timing["seconds"] > 0
        assert timing["checkpoint"] == str((experiment_a / f"fold_{fold}" / "best.pt").resolve())

    # each prediction is exactly what the fold's own best.pt segments, in the CT's original grid
    models = {k: load_segmentation_model(experiment_a / f"fold_{k}" / "best.pt", "cpu") for k in range(FOLDS)}
    for case_id in case_ids:
        written = nib.load(result.report_folder / "predictions" / f"{case_id}.nii.gz")
        ct = nib.load(data / case_id / "imaging.nii.gz")
        assert written.shape == ct.shape and np.allclose(written.affine, ct.affine)
        again = segment_file(data / case_id / "imaging.nii.gz", reports / "again" / f"{case_id}.nii.gz",
                             models[held_out[case_id]])
        assert np.array_equal(np.asarray(written.dataobj), np.asarray(nib.load(again).dataobj)), case_id
    for kind in ("overlay", "errors"):
        assert all((result.report_folder / "figures" / f"{c}_{kind}.png").is_file() for c in case_ids)
    assert (result.report_folder / "case_scores.png").read_bytes()[:4] == b"\x89PNG"


def test_the_fold_summaries_match_the_cases(evaluated):
    _, result, _ = evaluated
    metrics = json.loads((result.report_folder / "metrics.json").read_text())
    assert metrics["folds"] == [dict(fold) for fold in json.loads(json.dumps(result.fold_summaries))]
    assert [fold["fold"] for fold in metrics["folds"]] == list(range(FOLDS))
    assert sum(fold["n_cases"] for fold in metrics["folds"]) == CASES
    for fold in metrics["folds"]:
        rows = [row for row in metrics["cases"] if row["fold"] == fold["fold"]]
        assert fold["n_cases"] == len(rows) == CASES // FOLDS and fold["case_ids"] == [r["case_id"] for r in rows]
        for metric in METRIC_NAMES:
            values = [r[metric] for r in rows if r[metric] is not None]
            expected = float(np.mean(values)) if values else None
            assert fold["mean"][metric] == pytest.approx(expected)
        assert fold["checkpoint"].endswith(f"fold_{fold['fold']}/best.pt")
    overall = [r["kidney_dice"] for r in metrics["cases"]]
    assert result.summary["kidney_dice"]["mean"] == pytest.approx(np.mean(overall)) and result.summary["cases"] == CASES


def test_the_report_reads_as_any_evaluation_report(trained, evaluated):
    _, experiment_a, _ = trained
    reports, result, _ = evaluated
    assert resolve_report_folder(experiment_a, reports) == result.report_folder
    report = load_evaluation_report(result.report_folder)
    assert sorted(report.cases) == [row["case_id"] for row in result.cases] and report.model == "resunet3d"
    assert report.experiment["k"] == FOLDS and report.folds == {r["case_id"]: r["fold"] for r in result.cases}
    with pytest.raises(FileNotFoundError, match=r"eval_unet.py --run"):
        resolve_report_folder(experiment_a, reports / "elsewhere")


def test_each_case_must_have_exactly_one_out_of_fold_prediction(trained):
    experiment = load_cross_validation(trained[1])
    assert sorted(out_of_fold_assignment(experiment)) == sorted(experiment.split["case_ids"])
    first, second, third = experiment.folds
    moved = first.validation_case_ids[0]
    twice = replace(experiment, folds=(first, replace(second, validation_case_ids=(*second.validation_case_ids, moved)),
                                       third))
    with pytest.raises(CrossValidationError, match=rf"held out by several: {moved} by folds 0, 1"):
        out_of_fold_assignment(twice)
    none = replace(experiment, folds=(replace(first, validation_case_ids=first.validation_case_ids[1:]), second, third))
    with pytest.raises(CrossValidationError, match=rf"held out by none: {moved}"):
        out_of_fold_assignment(none)


def test_two_experiments_are_compared_on_every_out_of_fold_case(trained, evaluated, tmp_path):
    data, experiment_a, experiment_b = trained
    reports, result_a, result_b = evaluated
    out = tmp_path / "comparison"
    done = subprocess.run([sys.executable, "scripts/compare_models.py", str(experiment_a), str(experiment_b),
                           "--out", str(out), "--reports-dir", str(reports), "--bootstrap", "200"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    comparison = json.loads((out / "comparison.json").read_text())
    case_ids = [row["case_id"] for row in result_a.cases]
    assert comparison["shared_cases"] == case_ids and len(case_ids) == CASES
    assert comparison["only_a"] == comparison["only_b"] == []
    for side, result in (("a", result_a), ("b", result_b)):
        run = comparison["runs"][side]
        assert run["predictions"] == f"out-of-fold, k = {FOLDS}" and run["experiment"]["k"] == FOLDS
        assert run["folds"] == {r["case_id"]: r["fold"] for r in result.cases}
    differences = [b["kidney_dice"] - a["kidney_dice"] for a, b in zip(result_a.cases, result_b.cases, strict=True)]
    assert np.count_nonzero(differences) == CASES  # the learning rates differ: no case scores the same
    paired = comparison["paired"]["kidney_dice"]
    assert paired["n_pairs"] == CASES and paired["p_value"] is not None and 0 < paired["p_value"] <= 1
    assert paired["mean_difference"] == pytest.approx(np.mean(differences))
    markdown = (out / "comparison.md").read_text()
    assert "| predictions | out-of-fold, k = 3 | out-of-fold, k = 3 |" in markdown
    assert "Both sides' predictions are out-of-fold" in markdown


def test_an_unfinished_fold_a_missing_fold_or_mixed_configs_are_refused(trained, tmp_path):
    data, experiment_a, _ = trained
    reports = tmp_path / "reports"

    unfinished = _copy(experiment_a, tmp_path / "unfinished")
    manifest = json.loads((unfinished / MANIFEST).read_text())
    manifest["folds"][1]["status"] = "running"
    manifest["folds"][2]["status"] = "failed"
    (unfinished / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CrossValidationError, match=r"every fold finished, but fold 1 \(running\), fold 2 \(failed\)"):
        evaluate_cross_validation(unfinished, data_dir=data, reports_dir=reports, show_progress=False)

    missing = _copy(experiment_a, tmp_path / "missing")
    shutil.rmtree(missing / "fold_2")
    with pytest.raises(CrossValidationError, match=r"fold 2.*is missing"):
        evaluate_cross_validation(missing, data_dir=data, reports_dir=reports, show_progress=False)

    mixed = _copy(experiment_a, tmp_path / "mixed")
    saved = yaml.safe_load((mixed / "fold_0" / "config.yaml").read_text())
    saved["optimiser"]["learning_rate"] = 0.5
    (mixed / "fold_0" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(CrossValidationError, match=r"fold 0 .*another config.*optimiser\.learning_rate"):
        evaluate_cross_validation(mixed, data_dir=data, reports_dir=reports, show_progress=False)

    with pytest.raises(ValueError, match="a cross-validated experiment: use evaluate_cross_validation"):
        evaluate_run(experiment_a, data_dir=data, cases="validation", reports_dir=reports, show_progress=False)
    assert not reports.exists()  # nothing written by any refusal


def test_the_eval_script_evaluates_an_experiment_out_of_fold(trained, tmp_path):
    data, experiment_a, _ = trained
    done = subprocess.run([sys.executable, "scripts/eval_unet.py", "--run", str(experiment_a), "--data", str(data),
                           "--reports", str(tmp_path), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"({CASES} case(s), out-of-fold, {FOLDS} folds, original grid)" in done.stdout
    assert all(f"fold {k}: {CASES // FOLDS} case(s)" in done.stdout for k in range(FOLDS))
    metrics = json.loads((tmp_path / "cv_a" / "metrics.json").read_text())
    assert len(metrics["cases"]) == CASES and len(metrics["folds"]) == FOLDS
    assert len(list((tmp_path / "cv_a" / "predictions").glob("case_*.nii.gz"))) == CASES
    wrong = subprocess.run([sys.executable, "scripts/eval_unetr.py", "--run", str(experiment_a), "--data", str(data),
                            "--reports", str(tmp_path / "wrong")], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
    assert wrong.returncode == 2 and "scripts/eval_unet.py" in wrong.stderr and not (tmp_path / "wrong").exists()


def _run_notebook(name: str, overrides: str) -> list:
    """Execute ``notebooks/<name>`` with ``overrides`` after its parameters cell; return its outputs."""
    import nbformat
    from nbclient import NotebookClient

    from tests.test_notebooks import NOTEBOOKS, _with_overrides

    notebook = _with_overrides(nbformat.read(NOTEBOOKS / name, as_version=4), overrides)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    executed = client.execute()
    outputs = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"], [o for o in outputs if o.output_type == "error"]
    return outputs


def test_the_notebooks_take_cross_validated_experiments(trained, evaluated, tmp_path, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)
    data, experiment_a, experiment_b = trained
    reports = evaluated[0]
    outputs = _run_notebook("evaluate_run.ipynb", f"EXPERIMENT_DIR = Path({str(experiment_a)!r})\n"
                            f"DATA_DIR = Path({str(data)!r})\nREPORTS_DIR = Path({str(tmp_path / 'reports')!r})")
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"out-of-fold, {FOLDS} folds" in text and "fold 2:" in text
    assert len(json.loads((tmp_path / "reports" / "cv_a" / "metrics.json").read_text())["cases"]) == CASES
    _run_notebook("compare_models.ipynb", f"EXPERIMENT_A = Path({str(experiment_a)!r})\n"
                  f"EXPERIMENT_B = Path({str(experiment_b)!r})\nREPORTS_DIR = Path({str(reports)!r})\nBOOTSTRAP = 100")
    comparison = json.loads((reports / "comparison" / "comparison.json").read_text())
    assert len(comparison["shared_cases"]) == CASES and comparison["runs"]["b"]["run_name"] == "cv_b"


def test_the_fold_ensemble_report_does_not_replace_the_out_of_fold_report(trained, evaluated):
    data, experiment_a, _ = trained
    reports, oof, _ = evaluated
    before = (oof.report_folder / "metrics.json").read_bytes()
    ensemble = evaluate_run(experiment_a, data_dir=data, cases="all", reports_dir=reports, device="cpu",
                            show_progress=False)
    assert ensemble.report_folder == reports / f"{experiment_a.name}_ensemble"
    assert (oof.report_folder / "metrics.json").read_bytes() == before
    assert len(json.loads((ensemble.report_folder / "metrics.json").read_text())["cases"]) == CASES


def test_the_out_of_fold_report_chooses_the_fold_ensembles_post_processing(trained, tmp_path):
    data, experiment_a, _ = trained
    experiment = _copy(experiment_a, tmp_path)
    oof = evaluate_cross_validation(experiment, data_dir=data, out_dir=tmp_path / "oof", device="cpu",
                                    postprocess=True, show_progress=False, figures=False)
    record = json.loads((oof.report_folder / "inference.json").read_text())
    folds = find_fold_checkpoints(experiment)
    # the report names the experiment folder, with the SHA-256 of the fold checkpoints the ensemble loads
    assert record["checkpoint"] == str(experiment.resolve())
    assert record["checkpoint_sha256"] == ensemble_sha256(folds.values())
    assert [(row["fold"], row["checkpoint_sha256"], row["min_tumour_ml"]) for row in record["fold_checkpoints"]] == \
        [(k, file_sha256(folds[f"fold_{k}"]), 0.0) for k in range(FOLDS)]
    choice = choose_min_tumour_ml(oof.report_folder, show_progress=False)
    assert choice.out_of_fold and sorted(choice.case_ids) == sorted(case["case_id"] for case in oof.cases)
    assert choice.checkpoint == experiment.resolve() and len(choice.case_ids) == CASES
    # a stored choice (here 2 ml, whatever these one-epoch folds chose) reaches the ensemble's evaluation
    write_choice(replace(choice, min_tumour_ml=2.0))
    assert (experiment / CHOICE_FILE).is_file()
    ensemble = evaluate_run(experiment, data_dir=data, cases="all", out_dir=tmp_path / "ensemble", device="cpu",
                            postprocess=True, show_progress=False)
    assert ensemble.inference["min_tumour_ml"] == 2.0
    assert ensemble.inference["checkpoint_sha256"] == record["checkpoint_sha256"]
    # the folds evaluated out of fold again apply their own (no) choice, not the ensemble's
    again = evaluate_cross_validation(experiment, data_dir=data, out_dir=tmp_path / "oof2", device="cpu",
                                      postprocess=True, show_progress=False, figures=False)
    assert again.inference["min_tumour_ml"] == 0.0
