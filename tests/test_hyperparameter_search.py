"""The hyperparameter search: a search killed mid-trial and resumed, pruning, and the search config's checks."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from utils.config.experiment import load_experiment_config
from utils.config.search import format_yaml_value, load_search_config
from utils.training.engine import NonFiniteLossError, TrainingResult, train
from utils.training.search import SEARCH_CONFIG, TrialObjective, build_pruner, open_study, run_search, study_folder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "unetr_hyperparameter_search.py"

#: A tiny 2D UNETR on the four 64 x 64 synthetic cases; trials shorten it to 2 epochs.
TINY_UNETR = {
    "preprocessing": {"target_spacing": [4.0, 4.0, 4.0], "image_dtype": "float32"},
    "split": {"validation_fraction": 0.25},
    "slices": {"image_size": 32, "samples_per_epoch": 8},
    "augmentation": {"affine_prob": 0.0, "elastic_prob": 0.0},
    "model": {"name": "unetr2d", "feature_size": 4, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2},
    "optimiser": {"learning_rate": 0.01, "warmup_epochs": 1},
    "slice_inference": {"batch_size": 16},
    "training": {"epochs": 20, "batch_size": 2, "num_workers": 0, "validate_every": 5, "mixed_precision": "no",
                 "deterministic": True},
}
SPACE = [{"key": "optimiser.learning_rate", "low": 1.0e-3, "high": 3.0e-2, "log": True},
         {"key": "loss.name", "choices": ["dice_ce", "dice_focal"]},
         {"key": "loss.class_weights", "choices": [[1.0, 1.0, 3.0], [0.0, 1.0, 3.0]]},
         {"key": "model.feature_size", "choices": [4, 8]}]


def write_search(tmp_path: Path, **changes) -> Path:
    """A tiny search YAML (and its experiment) under ``tmp_path``; ``changes`` replace search settings."""
    experiment = json.loads(json.dumps(TINY_UNETR))
    experiment["preprocessing"]["cache_dir"] = str(tmp_path / "cache")
    experiment["training"]["output_dir"] = str(tmp_path / "final_runs")
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    search = {"experiment": str(tmp_path / "experiment.yaml"),
              "trial_overrides": ["training.epochs=2", "training.validate_every=1"],
              "output_dir": str(tmp_path / "searches"), "study_name": "tiny", "sampler_startup_trials": 10,
              "pruner": {"n_startup_trials": 5}, "heartbeat_seconds": 1, "grace_seconds": 2, "space": SPACE,
              **changes}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    return path


@pytest.fixture
def tiny_data(tiny_cache) -> Path:
    """The raw synthetic folder behind the shared tiny cache (four 64 x 64 cases)."""
    return Path(tiny_cache.plan["source_data"])


@pytest.fixture
def one_thread():
    """Train on one thread: two test processes sharing two cores with two threads each crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _wait_for_first_epoch_of_trial_1(process: subprocess.Popen, folder: Path) -> None:
    progress = folder / "trials" / "trial_0001" / "training_progress.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text() or "[]")) >= 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"trial 1 did not finish an epoch (exit status {process.poll()})")


def test_a_search_killed_mid_trial_resumes_it_and_writes_its_reports(tiny_data, tmp_path, one_thread):
    search = write_search(tmp_path)
    command = [sys.executable, str(SCRIPT), "--config", str(search), "--trials", "3", "--data", str(tiny_data)]
    environment = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    folder = tmp_path / "searches" / "tiny"
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO, env=environment)
        _wait_for_first_epoch_of_trial_1(process, folder)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    storage = f"sqlite:///{folder / 'study.db'}"
    killed = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.state.name for t in killed] == ["COMPLETE", "RUNNING"], "trial 1 finished before it could be killed"

    resumed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    retry = trials[2]  # the killed trial 1 again: same parameters, its run folder continued from epoch 2
    assert retry.params == trials[1].params and retry.system_attrs["failed_trial"] == 1
    assert retry.user_attrs["run_folder"] == str(folder / "trials" / "trial_0001")
    assert sorted(retry.intermediate_values) == [1, 2]
    progress = json.loads((folder / "trials" / "trial_0001" / "training_progress.json").read_text())
    assert [r["epoch"] for r in progress] == [1, 2]
    assert sorted(p.name for p in (folder / "trials").iterdir()) == ["trial_0000", "trial_0001", "trial_0003"]

    with open(folder / "results.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["number"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "FAIL"), ("2", "COMPLETE"),
                                                         ("3", "COMPLETE")]
    assert rows[2]["retry_of"] == "1" and rows[2]["best_epoch"] in ("1", "2")
    best_trial = max((trials[i] for i in (0, 2, 3)), key=lambda t: t.value)
    best = load_experiment_config(folder / "best_config.yaml")
    assert best.optimiser.learning_rate == best_trial.params["optimiser.learning_rate"]
    assert best.loss.name == best_trial.params["loss.name"]
    assert list(best.loss.class_weights) == yaml.safe_load(best_trial.params["loss.class_weights"])
    assert best.model.feature_size == best_trial.params["model.feature_size"]
    assert best.training.epochs == 20 and best.training.run_name is None  # the base's, not the trials' 2 epochs
    assert best.training.output_dir == str(tmp_path / "final_runs")
    for name in ("optimization_history", "param_importances"):
        for suffix in (".html", ".png"):
            assert (folder / (name + suffix)).stat().st_size > 1000
    assert (folder / SEARCH_CONFIG).is_file() and "trial 3 COMPLETE" in (folder / "search.log").read_text()

    config = load_experiment_config(folder / "best_config.yaml", ["training.epochs=1"])
    result = train(config, data_dir=tiny_data, show_progress=False)
    assert result.run_folder.parent == tmp_path / "final_runs" and [r["epoch"] for r in result.records] == [1]


def test_a_trial_below_the_median_is_pruned_and_keeps_its_checkpoint(tiny_data, tmp_path, one_thread):
    config = load_search_config(write_search(tmp_path, pruner={"n_startup_trials": 2}))
    study = optuna.create_study(direction="maximize", pruner=build_pruner(config.pruner))
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(value=0.99, intermediate_values={1: 0.99, 2: 0.99}))
    study.optimize(TrialObjective(config, study_folder(config), data_dir=tiny_data, show_progress=False), n_trials=1)
    trial = study.trials[-1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1] and trial.intermediate_values[1] < 0.99
    run_folder = Path(trial.user_attrs["run_folder"])
    assert run_folder == study_folder(config) / "trials" / "trial_0002" and (run_folder / "last.pt").is_file()
    assert len(json.loads((run_folder / "training_progress.json").read_text())) == 1  # stopped after epoch 1 of 2


@pytest.mark.parametrize("entry, message", [
    ({"key": "optimiser.learning_rate", "low": 0.0, "high": 1.0e-3, "log": True}, "log needs low > 0"),
    ({"key": "optimiser.learning_rate", "low": "1e-4", "high": 1.0e-3}, "write 1.0e-4"),
    ({"key": "optimiser.learning_rate", "low": 1.0e-3, "high": 1.0e-4}, "low must be < high"),
    ({"key": "optimiser.learning_rate", "low": 1.0e-4, "high": 1.0e-3, "log": True, "step": 1.0e-4}, "step"),
    ({"key": "model.feature_size", "choices": [8, 16], "low": 8}, "either choices or low/high"),
    ({"key": "model.feature_size", "choices": []}, "non-empty"),
    ({"key": "model.feature_size"}, "give choices, or low and high"),
    ({"key": "model.feature_siz", "choices": [8, 16]}, "unknown key"),
    ({"key": "loss.name", "choices": ["dice_ce", "dice"]}, "'dice'"),
    ({"key": "model.feature_size", "low": 8.0, "high": 32.0}, "must be of type int"),
    ({"key": "loss.class_weights", "choices": [[1.0, 1.0], [1.0, 1.0, 3.0]]}, "list of 3 values"),
])
def test_a_bad_space_entry_is_named(tmp_path, entry, message):
    with pytest.raises(ValueError, match=r"space\[1\]") as error:
        load_search_config(write_search(tmp_path, space=[SPACE[0], entry]))
    assert message in str(error.value) and entry["key"] in str(error.value)


def test_the_search_config_refuses_clashes_and_a_changed_study(tmp_path):
    with pytest.raises(ValueError, match="each key once"):
        load_search_config(write_search(tmp_path, space=[SPACE[0], SPACE[0]]))
    with pytest.raises(ValueError, match="training.run_name"):
        load_search_config(write_search(tmp_path, space=[SPACE[0], {"key": "training.run_name", "choices": ["a"]}]))
    with pytest.raises(ValueError, match="optimiser.learning_rate"):
        load_search_config(write_search(tmp_path, trial_overrides=["optimiser.learning_rate=0.1"]))
    with pytest.raises(ValueError, match="grace_seconds"):
        load_search_config(write_search(tmp_path, grace_seconds=1))
    open_study(load_search_config(write_search(tmp_path)))  # the study remembers its definition
    changed = load_search_config(write_search(tmp_path, space=SPACE[:2]))
    with pytest.raises(ValueError, match=r"other \['space'\]"):
        run_search(changed, trials=1)


def test_diverging_trials_stop_the_search_and_a_run_without_a_score_is_an_error(tmp_path, monkeypatch):
    import utils.training.search as search

    def diverge(config, **kwargs):
        raise NonFiniteLossError("non-finite loss at epoch 1, step 1")

    monkeypatch.setattr(search, "train", diverge)
    config = load_search_config(write_search(tmp_path, max_failed_trials=2))
    with pytest.raises(RuntimeError, match=r"trials \[0, 1\] failed with a non-finite loss"):
        run_search(config, trials=3, show_progress=False)
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_folder(config) / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"] and "epoch 1" in trials[0].user_attrs["failure"]
    monkeypatch.setattr(search, "train", lambda config, **kwargs: TrainingResult(Path("run"), [], None, None))
    with pytest.raises(ValueError, match="split.validation_fraction"):
        optuna.create_study().optimize(TrialObjective(config, tmp_path / "other"), n_trials=1)


def test_the_shipped_search_config_is_valid(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_search_config("configs/unetr2d_search.yaml")
    assert config.experiment == "configs/unetr2d.yaml" and "training.epochs=50" in config.trial_overrides


def test_values_are_written_as_yaml_that_reads_back_equal():
    assert format_yaml_value(1e-05) == "1.0e-05" and yaml.safe_load("1.0e-05") == 1e-05
    assert format_yaml_value([0.0, 1.0, 3.0]) == "[0.0, 1.0, 3.0]"
    assert format_yaml_value("dice_ce") == "dice_ce" and format_yaml_value("123") == "'123'"


def test_a_trial_stopped_by_a_scheduler_signal_is_queued_for_a_retry_with_its_parameters(tmp_path, monkeypatch):
    import utils.training.search as search
    from utils.training.engine import TrainingInterrupted

    def stopped(config, **kwargs):
        raise TrainingInterrupted("stopped by SIGTERM at epoch 1, batch 3", Path(config.training.output_dir),
                                  "SIGTERM")

    monkeypatch.setattr(search, "train", stopped)
    config = load_search_config(write_search(tmp_path))
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        run_search(config, trials=2, show_progress=False)
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_folder(config) / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[1].params == trials[0].params  # the retry keeps the interrupted trial's parameters
