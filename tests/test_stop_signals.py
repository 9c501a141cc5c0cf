"""Stop signals: SIGTERM/SIGUSR1 make a training run save ``last.pt`` mid-epoch, exit 75, and resume exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from tests.test_training_engine import REPO, SCRIPT, tiny_config, write_config
from utils.networks.checkpoints import load_checkpoint
from utils.training.stop_signals import EXIT_INTERRUPTED, StopSignals, ignore_stop_signals


def test_stop_signals_are_recorded_not_fatal_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert stop.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        time.sleep(0.01)
        assert stop.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_loader_workers_ignore_stop_signals():
    code = ("import os, signal, time\nfrom utils.training.stop_signals import ignore_stop_signals\n"
            "ignore_stop_signals(0)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\nos.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(0.05)\n"
            "print('alive')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0 and "alive" in run.stdout, run.stderr
    assert callable(ignore_stop_signals)


def _command(config_path, data, run_name, *extra):
    return [sys.executable, str(SCRIPT), "--config", str(config_path), "--data", str(data),
            "--set", f"training.run_name={run_name}", *extra]


def test_sigterm_to_the_job_saves_mid_epoch_exits_75_and_auto_resume_continues_exactly(tiny_data, tmp_path):
    config = tiny_config(tmp_path, patches={"patch_size": [8, 16, 16], "samples_per_epoch": 240},
                         training={"epochs": 1, "num_workers": 1, "validate_every": 1, "max_validation_cases": 1})
    config_path = write_config(tmp_path, config)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(_command(config_path, tiny_data, "whole"), capture_output=True, text=True, cwd=REPO,
                           timeout=600, env=environment)
    assert whole.returncode == 0, whole.stderr
    folder = tmp_path / "runs" / "stopped"
    # a new session: the signal goes to the whole process group, loader worker included, as a scheduler does
    process = subprocess.Popen(_command(config_path, tiny_data, "stopped", "--auto-resume"), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        log = folder / "train.log"
        if log.is_file() and "run folder" in log.read_text():
            break
        time.sleep(0.05)
    time.sleep(1.0)  # into the epoch (120 batches of tiny patches take a few seconds)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, output
    assert "stopped by SIGTERM" in output and f"--resume {folder}" in output
    saved = load_checkpoint(folder / "last.pt")
    assert saved["epoch"] == 0 and 0 < saved["epoch_progress"]["batches"] < 120, saved.get("epoch_progress")
    assert saved["iteration"] == saved["epoch_progress"]["steps"]

    resumed = subprocess.run(_command(config_path, tiny_data, "stopped", "--auto-resume"), capture_output=True,
                             text=True, cwd=REPO, timeout=600, env=environment)
    assert resumed.returncode == 0, resumed.stderr
    assert f"batch {saved['epoch_progress']['batches'] + 1} of epoch 1" in (folder / "train.log").read_text()
    records = json.loads((folder / "training_progress.json").read_text())
    expected = json.loads((tmp_path / "runs" / "whole" / "training_progress.json").read_text())
    assert [r["epoch"] for r in records] == [1]
    assert abs(records[0]["train_loss"] - expected[0]["train_loss"]) < 1e-9
    assert records[0]["samples_per_rank"] == expected[0]["samples_per_rank"]
    final, reference = load_checkpoint(folder / "last.pt"), load_checkpoint(tmp_path / "runs" / "whole" / "last.pt")
    assert final["iteration"] == reference["iteration"] == 120
    for name, value in reference["model"].items():
        assert torch.equal(final["model"][name], value), name
