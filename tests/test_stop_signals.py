"""Stop signals: SIGTERM/SIGUSR1 make a training run save ``last.pt`` mid-epoch, exit 75, and resume exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.test_training_engine import REPO, SCRIPT, tiny_config, write_config
from utils.networks.checkpoints import load_checkpoint
from utils.training.stop_signals import EXIT_INTERRUPTED, ForcedStop, StopSignals, ignore_stop_signals


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



def test_a_second_stop_signal_after_the_repeat_window_forces_an_immediate_stop():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(repeat_seconds=0.3) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)  # a copy of the request (several senders): no effect
        time.sleep(0.01)
        assert stop.received == "SIGTERM"
        time.sleep(0.4)
        with pytest.raises(ForcedStop) as forced:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in the main thread, interrupting whatever runs
    assert forced.value.code == 128 + signal.SIGTERM and forced.value.signal_name == "SIGTERM"
    assert not isinstance(forced.value, Exception)  # passes through "except Exception" handlers
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="SIGINT has a handler of its own here")
def test_sigint_after_a_stop_signal_still_interrupts_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert stop.received == "SIGTERM"


def test_a_second_sigterm_stops_a_process_stuck_in_a_long_step(tmp_path):
    # A "training" whose step lasts a minute: the first SIGTERM waits for the step to end, a second
    # one a little later ends the process at once, with the status of a process killed by SIGTERM.
    program = tmp_path / "long_step.py"
    program.write_text(
        "import logging, sys, time\n"
        "from utils.training.stop_signals import StopSignals\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "def long_step():\n"
        "    print('stepping', flush=True)\n"
        "    time.sleep(60)\n"
        "with StopSignals(repeat_seconds=0.5) as stop:\n"
        "    while stop.received is None:\n"
        "        long_step()\n"
        "print('saved after the step', flush=True)\n")
    process = subprocess.Popen([sys.executable, str(program)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        assert process.stdout.readline().strip() == "stepping"
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert process.poll() is None  # the first signal waits for the end of the step
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, errors = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert time.monotonic() - started < 10
    assert process.returncode == 128 + signal.SIGTERM, errors
    assert "saved after the step" not in output
    assert "stopping now without saving" in errors and "long_step" in errors, errors


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
    batches = 480  # of 2 tiny patches: over 3 s on a fast 2-core machine, so the signal lands mid-epoch
    config = tiny_config(tmp_path, patches={"patch_size": [8, 16, 16], "samples_per_epoch": 2 * batches},
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
    time.sleep(1.0)  # into the epoch
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, output
    assert "stopped by SIGTERM" in output and f"--resume {folder}" in output
    saved = load_checkpoint(folder / "last.pt")
    assert saved["epoch"] == 0 and 0 < saved["epoch_progress"]["batches"] < batches, saved.get("epoch_progress")
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
    assert final["iteration"] == reference["iteration"] == batches
    for name, value in reference["model"].items():
        assert torch.equal(final["model"][name], value), name
