"""The search launchers: N workers in one tmux session (scripts/launch_search_tmux.sh) and the SLURM
array template (scripts/slurm/search.sbatch), each running the real search worker on a tiny study."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_hyperparameter_search import write_search
from test_search_workers import _prepare_cache, _trials

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "scripts" / "launch_search_tmux.sh"
SBATCH = REPO / "scripts" / "slurm" / "search.sbatch"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", KITS19_PROGRESS="off",
               PYTHON=sys.executable)
    env.update(extra)
    return env


@pytest.fixture
def tmux_socket():
    name = f"kits19-search-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)


def _has_session(socket: str, name: str) -> bool:
    return subprocess.run(["tmux", "-L", socket, "has-session", "-t", f"={name}"], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_tmux_search_launcher_runs_one_worker_per_gpu_on_one_journal_study(tiny_data, tmp_path, tmux_socket):
    search = write_search(tmp_path)
    _prepare_cache(tmp_path / "experiment.yaml", tiny_data)
    study = tmp_path / "searches" / "tiny"

    launched = subprocess.run([str(LAUNCHER), "tiny_search", str(search), "3,5", "--trials", "3",
                               "--data", str(tiny_data)], capture_output=True, text=True, cwd=tmp_path,
                              env=_env(TMUX_SOCKET=tmux_socket), timeout=60)
    assert launched.returncode == 0, launched.stderr
    assert "2 search worker(s) on GPU(s) 3,5" in launched.stdout
    assert f"journal:{study / 'study.journal'}" in launched.stdout
    assert (study / "worker_0.log").is_file() and (study / "worker_1.log").is_file()  # before the workers start

    deadline = time.monotonic() + 400
    while _has_session(tmux_socket, "tiny_search"):
        if time.monotonic() > deadline:
            pytest.fail("the workers did not finish:\n" + (study / "worker_0.log").read_text()[-3000:])
        time.sleep(0.5)

    logs = [(study / f"worker_{i}.log").read_text() for i in range(2)]
    assert "worker 0 started" in logs[0] and "on GPU 3" in logs[0], logs[0][-3000:]
    assert "worker 1 started" in logs[1] and "on GPU 5" in logs[1], logs[1][-3000:]
    trials = _trials(f"journal:{study / 'study.journal'}")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3, "\n".join(log[-2000:] for log in logs)
    assert len({t.user_attrs["run_folder"] for t in complete}) == 3
    assert (study / "best_config.yaml").is_file() and (study / "results.csv").is_file()


def test_sbatch_search_task_passes_usr1_to_its_worker_requeues_and_the_trial_continues(tiny_data, tmp_path):
    search = write_search(tmp_path, trial_overrides=["training.epochs=3", "training.validate_every=1"])
    _prepare_cache(tmp_path / "experiment.yaml", tiny_data)
    study = tmp_path / "searches" / "tiny"
    calls = tmp_path / "scontrol.calls"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    env = _env(SCONTROL=str(scontrol), CONFIG=str(search), SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="777",
               SLURM_ARRAY_JOB_ID="770", SLURM_ARRAY_TASK_ID="1")
    command = ["bash", str(SBATCH), "--trials", "2", "--data", str(tiny_data)]

    output_path = tmp_path / "task.out"
    with open(output_path, "w") as output:
        task = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    progress = study / "trials" / "trial_0000" / "training_progress.json"
    try:
        deadline = time.monotonic() + 300
        while not progress.is_file():  # the first trial has trained an epoch
            if task.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the first trial did not get under way:\n" + output_path.read_text()[-3000:])
            time.sleep(0.05)
        task.send_signal(signal.SIGUSR1)  # SLURM: --signal=B:USR1@300, five minutes before the time limit
        status = task.wait(timeout=180)
    finally:
        if task.poll() is None:
            task.kill()
            task.wait()
    log = output_path.read_text()
    assert status == 0, log[-3000:]  # requeued
    assert calls.read_text().splitlines() == ["requeue 777"], log[-3000:]
    assert "worker rank 1" in log and "got SIGUSR1, passing it on" in log, log[-3000:]
    assert (study / "trials" / "trial_0000" / "last.pt").is_file(), log[-3000:]
    saved_epochs = len(json.loads(progress.read_text()))
    assert saved_epochs < 3, log[-3000:]

    # The requeued task runs the same command: the stopped trial continues from its last.pt.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert calls.read_text().splitlines() == ["requeue 777"]  # a finished study is not requeued
    trials = _trials(f"journal:{study / 'study.journal'}")
    assert len([t for t in trials if t.state.name == "COMPLETE"]) == 2, again.stderr[-3000:]
    records = json.loads(progress.read_text())
    assert [r["epoch"] for r in records] == [1, 2, 3]  # continued, not restarted
