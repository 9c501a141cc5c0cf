"""Resuming runs: refused changes leave the run intact, runs remember their data, runs killed early restart,
leftovers of killed writes are removed, a full disk is named, refused runs leave no folder behind.

Every test trains for real (the training command, in this process) on small synthetic CTs.
"""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from tests.test_training_engine import tiny_config, write_config
from utils.cli.train import run_training_script
from utils.data.kits_layout import IMAGING_NAME
from utils.networks import checkpoints
from utils.networks.checkpoints import load_checkpoint
from utils.training import engine

SUMMARY = "Train the tiny test model.\n\nA resunet3d run on small synthetic CTs."
DiskUsage = namedtuple("DiskUsage", "total used free")


def _cli(*argv) -> int:
    return run_training_script("resunet3d", SUMMARY, [str(a) for a in argv])


def _config(root: Path, **training):
    return tiny_config(root, patches={"patch_size": [8, 16, 16], "samples_per_epoch": 4},
                       training={"epochs": 1, "validate_every": 1, "max_validation_cases": 1, **training})


def _copy_data(source: Path, destination: Path) -> Path:
    return Path(shutil.copytree(source, destination, copy_function=shutil.copy2))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _epochs(folder: Path) -> list[int]:
    return [r["epoch"] for r in json.loads((folder / "training_progress.json").read_text())]


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def data_a(tiny_data, tmp_path_factory) -> Path:
    """A copy of the four tiny synthetic cases."""
    return _copy_data(tiny_data, tmp_path_factory.mktemp("resume_data") / "data")


@pytest.fixture(scope="module")
def trained(data_a, tmp_path_factory) -> Path:
    """A finished one-epoch run; tests resume copies of it."""
    root = tmp_path_factory.mktemp("resume_base")
    config_path = write_config(root, _config(root))
    assert _cli("--config", config_path, "--data", data_a, "--set", "training.run_name=base") == 0
    return root / "runs" / "base"


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def test_a_refused_resume_changes_nothing_and_the_next_plain_resume_works(trained, tmp_path, capsys, caplog):
    run = _copy_run(trained, tmp_path)
    before = _files(run)
    status = _cli("--resume", run, "--set", "model.channels=[8,16,32]", "--set", "optimiser.learning_rate=0.5",
                  "--set", "training.epochs=2")
    output = capsys.readouterr().err + caplog.text
    assert status == 2
    assert "model.channels" in output and "optimiser.learning_rate" in output and "start a new run" in output
    assert "model.channels: [4, 8, 16] -> [8, 16, 32]" in output and "training.epochs: " not in output
    assert "size mismatch" not in output and "Traceback" not in output
    assert _files(run) == before  # config.yaml untouched: the next plain resume still fits the checkpoint
    # a resume failing for another reason (no data folder) leaves an allowed change unsaved too
    assert _cli("--resume", run, "--set", "training.epochs=3", "--data", tmp_path / "missing") != 0
    assert _files(run) == before
    assert _cli("--resume", run, "--set", "training.epochs=2") == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["epochs"] == 2
    assert _epochs(run) == [1, 2] and load_checkpoint(run / "last.pt")["epoch"] == 2


def test_a_run_resumes_and_is_evaluated_on_the_data_it_recorded(data_a, tmp_path, capsys, caplog):
    data = _copy_data(data_a, tmp_path / "A")
    other = tmp_path / "B"  # the config file's data_dir: a folder of other cases
    for source, name in (("case_00000", "case_00000"), ("case_00001", "case_00001"), ("case_00002", "case_00007")):
        _copy_data(data / source, other / name)
    config_path = write_config(tmp_path, _config(tmp_path))
    saved = yaml.safe_load(config_path.read_text())
    saved["data_dir"] = str(other)
    config_path.write_text(yaml.safe_dump(saved))
    assert _cli("--config", config_path, "--data", data, "--set", "training.run_name=r") == 0
    run = tmp_path / "runs" / "r"
    record = json.loads((run / "data.json").read_text())
    assert record["data_dir"] == str(data.resolve())
    assert record["case_ids"] == [f"case_0000{i}" for i in range(4)] and record["plan_hash"]
    assert yaml.safe_load((run / "config.yaml").read_text())["data_dir"] == str(data.resolve())
    assert load_checkpoint(run / "last.pt")["config"]["data_dir"] == str(data.resolve())  # what evaluation reads
    plan = Path(record["plan_folder"]) / "plan.json"
    plan_before = (plan.read_bytes(), plan.stat().st_mtime_ns)

    assert _cli("--resume", run, "--set", "training.epochs=2") == 0  # no --data: the recorded folder, not B
    assert _epochs(run) == [1, 2] and json.loads((run / "data.json").read_text()) == record

    caplog.clear()
    capsys.readouterr()
    assert _cli("--resume", run, "--data", other, "--set", "training.epochs=3") == 2
    output = capsys.readouterr().err + caplog.text
    assert "case_00002" in output and "case_00003" in output and "--data" in output

    changed = _copy_data(data, tmp_path / "C")  # the same case ids, another content: another plan hash
    imaging = nib.load(changed / "case_00001" / IMAGING_NAME)
    nib.save(nib.Nifti1Image(np.asarray(imaging.dataobj) + 300, imaging.affine), changed / "case_00001" / IMAGING_NAME)
    caplog.clear()
    assert _cli("--resume", run, "--data", changed, "--set", "training.epochs=3") == 2
    assert "plan hash" in caplog.text and record["plan_hash"] in caplog.text
    assert (plan.read_bytes(), plan.stat().st_mtime_ns) == plan_before  # the run's plan folder was not rebuilt
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["epochs"] == 2

    moved = data.rename(tmp_path / "A_moved")
    caplog.clear()
    capsys.readouterr()
    assert _cli("--resume", run, "--set", "training.epochs=3") == 2
    output = capsys.readouterr().err + caplog.text
    assert str(data.resolve()) in output and "pass --data" in output
    assert _cli("--resume", run, "--data", moved, "--set", "training.epochs=3") == 0
    assert json.loads((run / "data.json").read_text())["data_dir"] == str(moved.resolve())
    assert load_checkpoint(run / "last.pt")["config"]["data_dir"] == str(moved.resolve())
    assert _epochs(run) == [1, 2, 3]


def test_a_run_killed_before_its_first_checkpoint_restarts_from_scratch(data_a, tmp_path, monkeypatch):
    config_path = write_config(tmp_path, _config(tmp_path, epochs=2, validate_every=2))
    assert _cli("--config", config_path, "--data", data_a, "--set", "training.run_name=whole") == 0

    def killed(path, state):  # the process dies as it is about to write its first checkpoint
        raise KeyboardInterrupt

    for name in ("early", "early_resume"):
        monkeypatch.setattr(engine, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            _cli("--config", config_path, "--data", data_a, "--set", f"training.run_name={name}")
        monkeypatch.undo()
        assert (tmp_path / "runs" / name / "config.yaml").is_file()
        assert not (tmp_path / "runs" / name / "last.pt").exists()
    # a requeued job: --auto-resume finds a way forward; so does a plain --resume
    assert _cli("--config", config_path, "--set", "training.run_name=early", "--auto-resume") == 0
    assert _cli("--resume", tmp_path / "runs" / "early_resume") == 0
    whole = json.loads((tmp_path / "runs" / "whole" / "training_progress.json").read_text())
    expected = [r["train_loss"] for r in whole]
    for name in ("early", "early_resume"):
        records = json.loads((tmp_path / "runs" / name / "training_progress.json").read_text())
        assert [r["epoch"] for r in records] == [1, 2]
        assert np.allclose([r["train_loss"] for r in records], expected, rtol=0, atol=1e-6)


def test_leftover_temporary_files_are_removed_when_a_run_resumes(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    for name in (".last.pt.k3j9x2.tmp", ".best.pt.a8b7c6.tmp", ".training_progress.json.q1w2e3.tmp"):
        (run / name).write_bytes(b"\0" * 4096)
    assert _cli("--resume", run, "--set", "training.epochs=2") == 0
    assert _temp_files(run) == []
    assert "removed 3 temporary file(s)" in (run / "train.log").read_text()


def test_a_full_disk_is_named_logged_and_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    run = _copy_run(trained, tmp_path)
    before = (run / "last.pt").read_bytes()

    def short_write(obj, stream, *args, **kwargs):  # what torch.save raises when the disk fills up
        stream.write(b"partial checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4672 vs 4566")

    monkeypatch.setattr(checkpoints.torch, "save", short_write)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda folder: DiskUsage(10**9, 10**9 - 4096, 4096))
    assert _cli("--resume", run, "--set", "training.epochs=2") == 1
    log = (run / "train.log").read_text()
    assert f"the disk holding {run} is full (4096 bytes free" in log and "unexpected pos" not in log
    assert (run / "last.pt").read_bytes() == before and _temp_files(run) == []
    monkeypatch.undo()
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_a_checkpoint_refused_by_safe_loading_is_not_called_corrupt(trained, tmp_path, capsys, caplog):
    run = _copy_run(trained, tmp_path)
    torch.save({"rng": np.random.get_state()}, run / "last.pt")  # a numpy array: refused by weights_only
    assert _cli("--resume", run, "--set", "training.epochs=2") == 1
    output = capsys.readouterr().err + caplog.text
    assert "objects that safe loading refuses" in output and "only checkpoints written by this project" in output
    assert "corrupt" not in output and "weights_only" not in output


def test_a_run_refused_before_it_starts_leaves_no_run_folder(data_a, tmp_path):
    data = _copy_data(data_a, tmp_path / "data")
    config_path = write_config(tmp_path, _config(tmp_path, run_name="refused"))
    folder = tmp_path / "runs" / "refused"
    unusable = tmp_path / "unusable" / "case_00000"  # its only case cannot be read: refused after set-up began
    unusable.mkdir(parents=True)
    (unusable / IMAGING_NAME).write_bytes(b"not a NIfTI file")
    assert _cli("--config", config_path, "--data", unusable.parent) == 1
    assert not folder.exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("where the cache folder should be")
    assert _cli("--config", config_path, "--data", data, "--set", f"preprocessing.cache_dir={blocker / 'cache'}") == 1
    assert not folder.exists()
    # a run folder or a cache inside the data folder is refused before anything is created
    assert _cli("--config", config_path, "--data", data, "--set", f"training.output_dir={data / 'runs'}") == 2
    assert _cli("--config", config_path, "--data", data, "--set", f"preprocessing.cache_dir={data / 'cache'}") == 2
    assert not (data / "runs").exists() and not (data / "cache").exists() and not folder.exists()
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in data_a.iterdir())
