"""Tests for utils.training.run_folder: new-run folders, write checks, saved config, progress log, text log."""

from __future__ import annotations

import json
import logging
import math
import os
import re

import numpy as np
import pytest
import yaml

from utils.config.experiment import ExperimentConfig, TrainingConfig
from utils.config.loading import build_config, config_as_dict
from utils.training.run_folder import (
    ProgressLog,
    attach_text_log,
    check_writable,
    create_run_folder,
    detach_text_log,
    save_resolved_config,
)


def test_named_run_folder_is_created_with_parents(tmp_path):
    folder = create_run_folder(tmp_path / "runs" / "deep", "baseline", "resunet3d")
    assert folder == tmp_path / "runs" / "deep" / "baseline" and folder.is_dir()
    assert create_run_folder(tmp_path / "runs" / "deep", "baseline", "resunet3d") == folder  # empty: reused


def test_named_run_folder_that_is_not_empty_is_refused(tmp_path):
    folder = create_run_folder(tmp_path, "baseline", "resunet3d")
    (folder / "train.log").write_text("old run\n")
    with pytest.raises(FileExistsError, match=r"another run name.*--resume .*baseline"):
        create_run_folder(tmp_path, "baseline", "resunet3d")
    assert (folder / "train.log").read_text() == "old run\n"


def test_unnamed_run_folders_get_model_and_time_and_a_suffix_when_taken(tmp_path):
    first = create_run_folder(tmp_path, None, "unetr2d")
    assert re.fullmatch(r"unetr2d_\d{8}-\d{6}", first.name)
    (tmp_path / f"{first.name}_2").mkdir()  # a name that might clash within the same second
    names = {create_run_folder(tmp_path, None, "unetr2d").name for _ in range(2)}
    assert len(names) == 2 and all(re.fullmatch(r"unetr2d_\d{8}-\d{6}(_\d+)?", n) for n in names)


@pytest.mark.parametrize("run_name", ["", "a/b", "..", "x\\y"])
def test_bad_run_names_are_refused(tmp_path, run_name):
    with pytest.raises(ValueError, match="run_name"):
        create_run_folder(tmp_path, run_name, "resunet3d")


def test_check_writable_passes_and_leaves_nothing(tmp_path):
    check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_check_writable_fails_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match=r"file/run: cannot write files there") as info:
        check_writable(tmp_path / "file" / "run")
    assert isinstance(info.value, NotADirectoryError)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_check_writable_fails_in_a_read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="read_only: cannot write files there"):
            check_writable(folder)
    finally:
        folder.chmod(0o700)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = ExperimentConfig(training=TrainingConfig(run_name="1e3", mixed_precision="no"))  # YAML-ambiguous
    path = save_resolved_config(tmp_path, config_as_dict(config))
    text = path.read_text()
    assert "!!python" not in text and text.startswith("data_dir: null\npreprocessing:")
    loaded = yaml.safe_load(text)
    assert loaded["model"]["channels"] == [30, 60, 120, 240, 320]
    assert build_config(ExperimentConfig, loaded) == config


def test_resolved_config_writes_numpy_scalars_as_numbers(tmp_path):
    path = save_resolved_config(tmp_path, {"loss": {"weights": (np.float64(0.5), np.int64(3))}})
    assert yaml.safe_load(path.read_text()) == {"loss": {"weights": [0.5, 3]}}


def test_resolved_config_refuses_objects(tmp_path):
    with pytest.raises(ValueError, match=r"config.training.device must be plain data"):
        save_resolved_config(tmp_path, {"training": {"device": object()}})


def test_progress_log_appends_reads_back_and_writes_null_for_nan(tmp_path):
    log = ProgressLog(tmp_path)
    assert log.records == [] and log.last_epoch is None
    log.append({"epoch": 1, "train_loss": 0.5, "val_loss": float("nan"), "kidney_dice": np.float32(0.75),
                "tumour_dice": None, "learning_rate": 3e-4, "epoch_seconds": 10.0, "samples_per_second": math.inf,
                "steps_skipped": np.int64(2)})
    log.append({"epoch": 2, "train_loss": 0.25})
    on_disk = json.loads((tmp_path / "training_progress.json").read_text())
    assert on_disk[0]["val_loss"] is None and on_disk[0]["samples_per_second"] is None
    assert on_disk[0]["kidney_dice"] == 0.75 and on_disk[0]["steps_skipped"] == 2
    assert ProgressLog(tmp_path).records == on_disk == log.records
    assert [p.name for p in tmp_path.iterdir()] == ["training_progress.json"]


def test_progress_log_truncate_on_resume(tmp_path):
    log = ProgressLog(tmp_path)
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "train_loss": 1.0 / epoch})
    resumed = ProgressLog(tmp_path)
    assert resumed.truncate(after_epoch=2) == 1 and resumed.last_epoch == 2
    assert resumed.truncate(after_epoch=2) == 0
    resumed.append({"epoch": 3, "train_loss": 0.1})
    assert [r["train_loss"] for r in ProgressLog(tmp_path).records] == [1.0, 0.5, 0.1]


def test_progress_log_refuses_bad_records(tmp_path):
    log = ProgressLog(tmp_path)
    log.append({"epoch": 2})
    with pytest.raises(ValueError, match="integer 'epoch'"):
        log.append({"loss": 1.0})
    with pytest.raises(ValueError, match="not after the last logged epoch 2.*truncate"):
        log.append({"epoch": 2})
    with pytest.raises(ValueError, match=r"record.model must be a number"):
        log.append({"epoch": 3, "model": object()})
    (tmp_path / "training_progress.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        ProgressLog(tmp_path)


def test_text_log_appends_and_detaches(tmp_path):
    other = logging.getLogger("utils.some_module")
    handler = attach_text_log(tmp_path)
    try:
        assert attach_text_log(tmp_path) is handler
        other.info("first epoch done")
    finally:
        detach_text_log(handler)
    other.info("not written")
    handler = attach_text_log(tmp_path)  # a resumed run continues the same file
    other.warning("resumed")
    detach_text_log(handler)
    detach_text_log(handler)
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith("INFO utils.some_module: first epoch done")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING", lines[1])
