"""k-fold cross-validation training: the folds partition the cases, all folds train into one experiment
folder, reruns skip finished folds and continue an interrupted one, bad input is refused clearly, the
SLURM array template trains one fold.

Every test trains for real (a tiny 3D Residual U-Net, one or two epochs) on six small synthetic CTs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_training_engine import tiny_config, write_config
from utils.cli.cross_validate import run_cross_validation_command
from utils.networks.checkpoints import load_checkpoint
from utils.preprocessing.cache import open_cache
from utils.training.cross_validation import (
    MANIFEST,
    CrossValidationError,
    fold_config,
    load_cross_validation,
    train_cross_validation,
)
from utils.training.engine import train

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "slurm" / "cross_validate.sbatch"
CASES = 6
FOLDS = 3


def _config(root: Path, **training):
    return tiny_config(root, split={"scheme": "kfold", "folds": FOLDS},
                       patches={"patch_size": [8, 16, 16], "samples_per_epoch": 4},
                       training={"epochs": 1, "validate_every": 1, "max_validation_cases": 1, **training})


def _cli(*argv) -> int:
    return run_cross_validation_command([str(a) for a in argv])


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _epochs(run: Path) -> list[dict]:
    return json.loads((run / "training_progress.json").read_text())


@pytest.fixture(scope="module")
def data6(tmp_path_factory) -> Path:
    """Six small synthetic cases (64 x 64, 4 mm voxels once preprocessed)."""
    from utils.synthetic.dataset import SyntheticOptions, generate_dataset

    root = tmp_path_factory.mktemp("cv_data") / "data"
    generate_dataset(root, CASES, seed=3, options=SyntheticOptions(matrix=64), show_progress=False)
    return root


@pytest.fixture(scope="module")
def finished(data6, tmp_path_factory) -> Path:
    """A finished three-fold experiment trained with the command (one epoch per fold); tests copy it."""
    root = tmp_path_factory.mktemp("cv_finished")
    config_path = write_config(root, _config(root))
    assert _cli("--config", config_path, "--data", data6, "--experiment", "cv") == 0
    return root


def _copy_experiment(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished / "runs" / "cv", tmp_path / "cv"))


def test_all_folds_train_partition_the_cases_and_a_rerun_changes_nothing(finished, data6, capsys):
    folder = finished / "runs" / "cv"
    manifest = _manifest(folder)
    assert manifest["model_name"] == "resunet3d" and "fold" not in manifest["config"]["training"]
    assert manifest["split"]["scheme"] == "kfold" and manifest["split"]["folds"] == FOLDS
    assert manifest["data_dir"] == str(data6.resolve()) and manifest["plan_hash"]
    assert [f["status"] for f in manifest["folds"]] == ["finished"] * FOLDS
    assert all(f["best_epoch"] == 1 and f["best_score"] is not None for f in manifest["folds"])

    # every case is validated by exactly one fold, and trained on by the others
    case_ids = sorted(p.name for p in data6.iterdir() if p.name.startswith("case_"))
    validation = [case for split in manifest["split"]["splits"] for case in split["val"]]
    assert sorted(validation) == case_ids and len(validation) == CASES
    for split in manifest["split"]["splits"]:
        assert sorted(split["train"] + split["val"]) == case_ids

    # each fold is an ordinary run folder, trained on its own fold of the cache's split
    experiment = load_cross_validation(folder)
    assert experiment.model_name == "resunet3d" and len(experiment.folds) == FOLDS == len(experiment.finished)
    for fold in experiment.folds:
        assert fold.run_folder == folder / f"fold_{fold.fold}" and fold.best_checkpoint.is_file()
        saved = yaml.safe_load((fold.run_folder / "config.yaml").read_text())
        assert saved["training"]["fold"] == fold.fold and saved["training"]["run_name"] == f"fold_{fold.fold}"
        record = json.loads((fold.run_folder / "data.json").read_text())
        assert record["plan_hash"] == experiment.plan_hash
        assert open_cache(record["plan_folder"]).split(fold.fold)[1] == list(fold.validation_case_ids)
        assert load_checkpoint(fold.best_checkpoint)["config"]["training"]["fold"] == fold.fold

    before = _files(folder)
    capsys.readouterr()
    assert _cli("--config", finished / "config.yaml", "--data", data6, "--experiment", "cv") == 0
    assert capsys.readouterr().out.count("(skipped)") == FOLDS
    assert _files(folder) == before  # no fold retrained, no file rewritten


def test_a_rerun_continues_the_interrupted_fold_and_leaves_finished_ones_alone(data6, tmp_path, caplog):
    config = _config(tmp_path, epochs=2)
    config_path = write_config(tmp_path, config)
    for fold in (0, 2):
        assert _cli("--config", config_path, "--data", data6, "--experiment", "cv", "--fold", fold) == 0
    folder = tmp_path / "runs" / "cv"
    assert [f["status"] for f in _manifest(folder)["folds"]] == ["finished", "pending", "finished"]

    # fold 1 killed after its first epoch: a last.pt at epoch 1, the manifest still saying "running"
    train(fold_config(_config(tmp_path, epochs=1), folder, 1), data_dir=data6, show_progress=False)
    manifest = _manifest(folder)
    manifest["folds"][1]["status"] = "running"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    first_epoch = _epochs(folder / "fold_1")
    assert [r["epoch"] for r in first_epoch] == [1]
    partial = load_cross_validation(folder)  # partial results can be read already
    assert [f.fold for f in partial.finished] == [0, 2] and partial.folds[1].status == "running"
    untouched = {fold: _files(folder / f"fold_{fold}") for fold in (0, 2)}

    caplog.clear()
    caplog.set_level(logging.INFO)
    assert _cli("--config", config_path, "--data", data6, "--experiment", "cv") == 0
    assert "fold 0 (1 of 3): already finished" in caplog.text
    assert "fold 1 (2 of 3): continuing from last.pt" in caplog.text
    records = _epochs(folder / "fold_1")
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["train_loss"] == first_epoch[0]["train_loss"]  # continued, not retrained
    assert load_checkpoint(folder / "fold_1" / "last.pt")["epoch"] == 2
    for fold in (0, 2):
        assert _files(folder / f"fold_{fold}") == untouched[fold]
    assert [f["status"] for f in _manifest(folder)["folds"]] == ["finished"] * FOLDS
    assert len(load_cross_validation(folder).finished) == FOLDS


def test_a_config_that_is_not_kfold_is_refused(data6, tmp_path, capsys):
    config = tiny_config(tmp_path, training={"epochs": 1})  # holdout split
    with pytest.raises(CrossValidationError, match="split.scheme: kfold"):
        train_cross_validation(config, "cv", data_dir=data6, show_progress=False)
    config_path = write_config(tmp_path, config)
    assert _cli("--config", config_path, "--data", data6, "--experiment", "cv") == 2
    assert "split.scheme" in capsys.readouterr().err
    assert _cli("--config", config_path, "--data", data6, "--experiment", "cv", "--set", "split.scheme=kfold",
                "--set", "split.folds=3", "--fold", "3") == 2  # folds 0 to 2
    assert "between 0 and 2" in capsys.readouterr().err
    assert _cli("--config", config_path, "--data", data6, "--experiment", "../cv", "--set",
                "split.scheme=kfold") == 2
    assert not (tmp_path / "runs").exists()


def test_a_rerun_with_another_config_or_split_is_refused_naming_the_keys(finished, data6, tmp_path, capsys, caplog):
    folder = _copy_experiment(finished, tmp_path)
    config = _config(tmp_path)
    config_path = write_config(tmp_path, config)
    runs = tmp_path
    before = _files(folder)
    args = ["--config", config_path, "--data", data6, "--experiment", "cv", "--set", f"training.output_dir={runs}"]
    for change, key in (("optimiser.learning_rate=0.5", "optimiser.learning_rate"),
                        ("split.seed=7", "split.seed"), ("training.epochs=3", "training.epochs")):
        capsys.readouterr()
        caplog.clear()
        assert _cli(*args, "--set", change) == 2
        output = capsys.readouterr().err + caplog.text
        assert key in output and "--experiment NEW" in output
    assert _files(folder) == before
    # where the data and cache are, or how fast, may change: the finished folds are kept as they are
    assert _cli(*args, "--set", "training.num_workers=0", "--set", "preprocessing.cache_dir="
                f"{finished / 'cache'}") == 0
    assert _files(folder) == before


def test_load_cross_validation_refuses_a_missing_fold_mixed_splits_and_no_finished_fold(finished, tmp_path):
    with pytest.raises(CrossValidationError, match="no cross_validation.json"):
        load_cross_validation(tmp_path)

    folder = _copy_experiment(finished, tmp_path / "missing")
    shutil.rmtree(folder / "fold_1")
    with pytest.raises(CrossValidationError, match=r"fold 1.*is missing"):
        load_cross_validation(folder)

    folder = _copy_experiment(finished, tmp_path / "mixed")
    saved = yaml.safe_load((folder / "fold_2" / "config.yaml").read_text())
    saved["split"]["seed"] = 7  # fold 2 trained on another split than folds 0 and 1
    (folder / "fold_2" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(CrossValidationError, match=r"fold 2 .*another split.*split\.seed"):
        load_cross_validation(folder)

    folder = _copy_experiment(finished, tmp_path / "other_data")
    record = json.loads((folder / "fold_0" / "data.json").read_text())
    record["plan_hash"] = "0" * 16
    (folder / "fold_0" / "data.json").write_text(json.dumps(record))
    with pytest.raises(CrossValidationError, match=r"fold 0 .*other data.*plan hash"):
        load_cross_validation(folder)

    folder = _copy_experiment(finished, tmp_path / "unfinished")
    manifest = _manifest(folder)
    for entry in manifest["folds"]:
        entry["status"] = "running"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CrossValidationError, match="no finished fold"):
        load_cross_validation(folder)


def test_sbatch_array_task_trains_its_fold_outside_slurm(data6, tmp_path):
    config_path = write_config(tmp_path, _config(tmp_path))
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/scontrol.calls\n")
    scontrol.chmod(0o755)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHON=sys.executable,
               SCONTROL=str(scontrol), CONFIG=str(config_path), EXPERIMENT="cv", SLURM_ARRAY_TASK_ID="1",
               SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=str(REPO), KITS19_PROGRESS="off")
    result = subprocess.run(["bash", str(SBATCH), "--data", str(data6)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fold 1 exited with status 0" in result.stderr
    statuses = [f["status"] for f in _manifest(tmp_path / "runs" / "cv")["folds"]]
    assert statuses == ["pending", "finished", "pending"]
    assert (tmp_path / "runs" / "cv" / "fold_1" / "best.pt").is_file() and not (tmp_path / "scontrol.calls").exists()


def test_sbatch_passes_a_stop_signal_to_the_fold_and_requeues_it(data6, tmp_path):
    config_path = write_config(tmp_path, _config(tmp_path, epochs=1000))
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/scontrol.calls\n")
    scontrol.chmod(0o755)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHON=sys.executable,
               SCONTROL=str(scontrol), CONFIG=str(config_path), EXPERIMENT="cv", SLURM_ARRAY_TASK_ID="2",
               SLURM_JOB_ID="78", SLURM_SUBMIT_DIR=str(REPO), KITS19_PROGRESS="off")
    job = subprocess.Popen(["bash", str(SBATCH), "--data", str(data6)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    progress = tmp_path / "runs" / "cv" / "fold_2" / "training_progress.json"
    deadline = time.monotonic() + 240
    while not progress.is_file() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output[-3000:]
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 78"], output[-3000:]
    assert "stopped by SIGUSR1" in output and (progress.parent / "last.pt").is_file()
    manifest = _manifest(tmp_path / "runs" / "cv")
    assert manifest["folds"][2]["status"] == "pending" and "SIGUSR1" in manifest["folds"][2]["message"]
