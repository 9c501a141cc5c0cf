"""Launching training on a workstation or a cluster: the tmux launcher, the SLURM batch template, the
accelerate launch configs and the project's Jupyter kernel (``make kernel``)."""

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
import yaml

from utils.networks.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "scripts" / "launch_tmux.sh"
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

#: A 3D Residual U-Net small enough to train one epoch on synthetic 64 x 64 cases in seconds.
TINY_RUN = {
    "preprocessing": {"target_spacing": [4.0, 4.0, 4.0], "image_dtype": "float32"},
    "split": {"validation_fraction": 0.25},
    "patches": {"patch_size": [8, 16, 16], "samples_per_epoch": 8},
    "augmentation": {"affine_prob": 0.0, "elastic_prob": 0.0},
    "model": {"name": "resunet3d", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "optimiser": {"learning_rate": 0.01, "warmup_epochs": 1},
    "sliding_window": {"roi_size": [8, 16, 16], "overlap": 0.25, "sw_batch_size": 2},
    "training": {"epochs": 1, "batch_size": 2, "num_workers": 0, "validate_every": 1, "mixed_precision": "no",
                 "deterministic": True},
    "wandb": {"enabled": False},
}


def write_tiny_config(tmp_path: Path, data_dir: Path | None = None) -> Path:
    """The tiny experiment as a YAML file, its cache and run folders under ``tmp_path``."""
    mapping = json.loads(json.dumps(TINY_RUN))
    if data_dir is not None:
        mapping["data_dir"] = str(data_dir)
    mapping["preprocessing"]["cache_dir"] = str(tmp_path / "cache")
    mapping["training"]["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def quiet_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.update(extra)
    return env


@pytest.fixture
def tmux_socket():
    """An isolated tmux server (``tmux -L NAME``), killed after the test."""
    name = f"kits19-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)
    socket_file = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}" / name
    socket_file.unlink(missing_ok=True)


def _has_session(socket: str, name: str) -> bool:
    return subprocess.run(["tmux", "-L", socket, "has-session", "-t", f"={name}"], capture_output=True).returncode == 0


def _launch(socket: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCHER), *args], capture_output=True, text=True, cwd=cwd, timeout=60,
                          env=quiet_env(TMUX_SOCKET=socket, **env))


def _wait_until_session_ends(socket: str, name: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _has_session(socket, name):
        if time.monotonic() > deadline:
            pytest.fail(f"the run did not finish within {timeout} s; console.log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


# --- scripts/launch_tmux.sh ------------------------------------------------------------------------

@needs_tmux
def test_tmux_launcher_trains_in_a_detached_session_and_continues_the_run(tiny_cache, tmp_path, tmux_socket):
    data = Path(tiny_cache.plan["source_data"])
    config = write_tiny_config(tmp_path, data)
    folder = tmp_path / "runs" / "tiny_run"

    launched = _launch(tmux_socket, "tiny_run", str(config), cwd=tmp_path)
    assert launched.returncode == 0, launched.stderr
    assert (folder / "console.log").is_file()  # created before the training starts
    assert f"tmux -L {tmux_socket} attach -t tiny_run" in launched.stdout
    assert str(folder / "console.log") in launched.stdout and "kill -TERM" in launched.stdout
    _wait_until_session_ends(tmux_socket, "tiny_run", folder / "console.log")

    log = (folder / "console.log").read_text()
    assert (folder / "last.pt").is_file(), log[-3000:]
    records = json.loads((folder / "training_progress.json").read_text())
    assert [r["epoch"] for r in records] == [1]
    assert "epoch 1/1" in log and f"run folder: {folder}" in log  # the training's own output, teed
    assert yaml.safe_load((folder / "config.yaml").read_text())["training"]["run_name"] == "tiny_run"

    # The same name again: --auto-resume continues the run from its last.pt, the log is appended.
    again = _launch(tmux_socket, "tiny_run", str(config), "--set", "training.epochs=2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    _wait_until_session_ends(tmux_socket, "tiny_run", folder / "console.log")
    log = (folder / "console.log").read_text()
    records = json.loads((folder / "training_progress.json").read_text())
    assert [r["epoch"] for r in records] == [1, 2], log[-3000:]
    assert log.count("launch_tmux.sh: training started") == 2 and "epoch 1/1" in log and "epoch 2/2" in log

    # The printed stop command: SIGTERM to the training, which saves last.pt and stops early.
    long_run = _launch(tmux_socket, "long_run", str(config), "--set", "training.epochs=500", cwd=tmp_path)
    assert long_run.returncode == 0, long_run.stderr
    stop = next(line for line in long_run.stdout.splitlines() if line.strip().startswith("stop:"))
    pid = int(stop.split("kill -TERM", 1)[1].split()[0])
    long_folder = tmp_path / "runs" / "long_run"
    deadline = time.monotonic() + 120
    while not (long_folder / "training_progress.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    _wait_until_session_ends(tmux_socket, "long_run", long_folder / "console.log")
    log = (long_folder / "console.log").read_text()
    assert "stopped by SIGTERM" in log and (long_folder / "last.pt").is_file(), log[-3000:]
    assert len(json.loads((long_folder / "training_progress.json").read_text())) < 500


@needs_tmux
def test_tmux_launcher_refuses_a_missing_config(tmp_path, tmux_socket):
    result = _launch(tmux_socket, "missing", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode != 0
    assert "nope.yaml" in result.stderr and "does not exist" in result.stderr
    assert not _has_session(tmux_socket, "missing")


@needs_tmux
def test_tmux_launcher_refuses_a_session_name_that_already_runs(tmp_path, tmux_socket):
    config = write_tiny_config(tmp_path)
    subprocess.run(["tmux", "-L", tmux_socket, "new-session", "-d", "-s", "busy", "sleep 120"], check=True)
    result = _launch(tmux_socket, "busy", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "'busy' is already running" in result.stderr and f"tmux -L {tmux_socket} attach -t busy" in result.stderr
    assert not (tmp_path / "runs" / "busy").exists()
    # The session of that name is the one that was there, untouched.
    command = subprocess.run(["tmux", "-L", tmux_socket, "display-message", "-p", "-t", "=busy:",
                              "#{pane_current_command}"], capture_output=True, text=True)
    assert command.stdout.strip() == "sleep"


def test_tmux_launcher_refuses_without_tmux_and_explains_its_usage(tmp_path):
    config = write_tiny_config(tmp_path)
    missing = subprocess.run([str(LAUNCHER), "run", str(config)], capture_output=True, text=True, cwd=tmp_path,
                             env=quiet_env(TMUX_BIN=str(tmp_path / "no-tmux-here")), timeout=60)
    assert missing.returncode != 0 and "tmux is not installed" in missing.stderr
    assert not (tmp_path / "runs").exists()
    usage = subprocess.run([str(LAUNCHER), "-h"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "usage: launch_tmux.sh RUN_NAME CONFIG" in usage.stdout
    too_few = subprocess.run([str(LAUNCHER), "only_a_name"], capture_output=True, text=True, timeout=60)
    assert too_few.returncode == 2 and "usage:" in too_few.stderr


# --- scripts/slurm/train.sbatch --------------------------------------------------------------------

def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def _stubs(tmp_path: Path, launcher_body: str) -> dict[str, str]:
    """Environment for the batch script with stub ``LAUNCH`` and ``SCONTROL`` commands."""
    scontrol = _stub(tmp_path / "scontrol", f'echo "$@" >> {tmp_path}/scontrol.calls\n')
    launch = _stub(tmp_path / "launch", f'printf "%s\\n" "$@" > {tmp_path}/launch.args\n' + launcher_body)
    return quiet_env(LAUNCH=str(launch), SCONTROL=str(scontrol), PYTHON=sys.executable, SLURM_JOB_ID="4242",
                     SLURM_JOB_NAME="cluster_run", SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(REPO),
                     CONFIG=str(write_tiny_config(tmp_path)))


def _start_batch(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    process = subprocess.Popen(["bash", str(SBATCH), *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the stub launcher did not start:\n{process.communicate()[0]}")
        time.sleep(0.05)
    return process


def test_sbatch_forwards_usr1_and_requeues_when_the_training_exits_75(tmp_path):
    # The training's behaviour on a signal: save, then exit with the resumable status 75.
    env = _stubs(tmp_path, f'trap "echo USR1 > {tmp_path}/received; exit 75" USR1\n'
                           f'touch {tmp_path}/started\nsleep 60 & wait $!\nexit 0\n')
    process = _start_batch(tmp_path, env, "--set", "training.epochs=3")
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert (tmp_path / "received").read_text().strip() == "USR1"
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 4242"], output
    assert (tmp_path / "launch.args").read_text().splitlines() == [
        "--config_file", "configs/accelerate/single_node.yaml", "--num_processes", "4", "scripts/train_3d_unet.py",
        "--config", env["CONFIG"], "--set", "training.run_name=cluster_run", "--auto-resume",
        "--set", "training.epochs=3"]


def test_sbatch_outside_slurm_exits_75_after_the_training_saved(tmp_path):
    env = _stubs(tmp_path, f'trap "exit 75" TERM\ntouch {tmp_path}/started\nsleep 60 & wait $!\nexit 0\n')
    env.pop("SLURM_JOB_ID")
    process = _start_batch(tmp_path, env)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 75, output  # resumable: run it again with the same name to continue
    assert "not requeued" in output and not (tmp_path / "scontrol.calls").exists()


def test_sbatch_does_not_requeue_a_training_that_finished(tmp_path):
    env = _stubs(tmp_path, f"touch {tmp_path}/started\nexit 0\n")
    env.pop("SLURM_GPUS_ON_NODE")
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "scontrol.calls").exists()
    assert (tmp_path / "launch.args").read_text().splitlines()[2:4] == ["--num_processes", "1"]


def test_sbatch_passes_on_a_failure_without_requeueing(tmp_path):
    env = _stubs(tmp_path, f"touch {tmp_path}/started\nexit 1\n")
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "training exited with status 1" in result.stderr
    assert not (tmp_path / "scontrol.calls").exists()


def test_sbatch_requeues_after_a_launcher_died_once_its_worker_saved(tmp_path):
    # A launcher without a handler for SIGUSR1 dies of it, while its worker (same process group)
    # takes a moment to write last.pt and exits 75: the job waits for the worker, then requeues.
    run_folder = tmp_path / "runs" / "cluster_run"
    worker = (f'trap "sleep 1; mkdir -p {run_folder}; echo saved > {run_folder}/last.pt; exit 75" USR1; '
              f'touch {tmp_path}/started; sleep 60 & wait $!')
    env = _stubs(tmp_path, f"bash -c '{worker}' &\nwait $!\n")
    process = _start_batch(tmp_path, env)
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=30)[0]
    assert (run_folder / "last.pt").is_file(), output
    assert "status 138" in output  # the launcher's own death by SIGUSR1
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 4242"], output



def _run_pids(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (the run's unique name)."""
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep")
@pytest.mark.parametrize("stop_signal", [signal.SIGUSR1, signal.SIGTERM])
def test_sbatch_passes_a_stop_signal_to_the_real_launchers_workers_and_requeues(tiny_data, tmp_path, stop_signal):
    # The real accelerate launcher with two processes (gloo on CPU): torch.distributed.elastic starts
    # each worker in a session of its own, so a signal to the job's process group reaches no training
    # process, and SIGUSR1 would kill the launcher; the batch script passes it on to the workers.
    run_name = f"stop_{uuid.uuid4().hex[:10]}"
    folder = tmp_path / "runs" / run_name
    scontrol = _stub(tmp_path / "scontrol", f'echo "$@" >> {tmp_path}/scontrol.calls\n')
    env = quiet_env(SCONTROL=str(scontrol), PYTHON=str(VENV_PYTHON), SLURM_JOB_ID="5151",
                    SLURM_JOB_NAME=run_name, NUM_GPUS="2", SLURM_SUBMIT_DIR=str(REPO),
                    CONFIG=str(write_tiny_config(tmp_path, tiny_data)))
    if not _cuda_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo process group on CPU (utils/training/setup.py)
    output_path = tmp_path / "job.out"
    with open(output_path, "w") as output:
        job = subprocess.Popen(["bash", str(SBATCH), "--set", "training.epochs=1000"], env=env, stdout=output,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not (folder / "training_progress.json").is_file():  # a first epoch is done, training is under way
            if job.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the training did not get under way:\n{output_path.read_text()[-4000:]}")
            time.sleep(0.2)
        workers = _run_pids(run_name)
        signalled = time.time()
        os.killpg(job.pid, stop_signal)  # to the job script's process group (SLURM: --signal=B:USR1@300, scancel)
        status = job.wait(timeout=120)
        log = output_path.read_text()
        assert status == 0, log[-4000:]  # requeued: the template exits 0
        assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 5151"], log[-4000:]
        saved = load_checkpoint(folder / "last.pt")
        assert "epoch_progress" in saved, log[-4000:]  # saved by the stop, not at the end of an epoch
        assert (folder / "last.pt").stat().st_mtime >= signalled - 1.0
        assert f"stopped by {stop_signal.name}" in log and "requeueing job 5151" in log, log[-4000:]
        assert len(workers) >= 3  # the launcher and its two training processes
        assert _run_pids(run_name) == [], log[-4000:]  # nothing of the run outlives the job script
        records = json.loads((folder / "training_progress.json").read_text())
        assert 1 <= len(records) < 1000
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        for pid in _run_pids(run_name):
            os.kill(pid, signal.SIGKILL)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- configs/accelerate ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, machines, processes", [("single_node", 1, 4), ("multi_node", 2, 8)])
def test_accelerate_configs_load_and_take_the_number_of_processes_from_the_command_line(name, machines, processes):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = REPO / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert (config.num_machines, config.num_processes) == (machines, processes)
    assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "bf16"
    if machines > 1:
        assert config.main_process_ip and config.main_process_port and config.machine_rank == 0
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "--machine_rank",
                                               str(machines - 1), "scripts/train_3d_unet.py", "--auto-resume"])
    _validate_launch_command(args)
    assert (args.num_processes, args.num_machines, args.machine_rank) == (2, machines, machines - 1)
    assert args.multi_gpu and args.mixed_precision == "bf16"


# --- make kernel -----------------------------------------------------------------------------------

@pytest.mark.skipif(not (REPO / ".venv" / ".full-installed").exists() or shutil.which("make") is None,
                    reason="needs make and the full virtual environment (make test builds it)")
def test_make_kernel_registers_the_project_kernel_in_the_venv_idempotently():
    specs = []
    for _ in range(2):
        made = subprocess.run(["make", "-C", str(REPO), "kernel"], capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stdout + made.stderr
        listed = subprocess.run([str(REPO / ".venv" / "bin" / "jupyter"), "kernelspec", "list", "--json"],
                                capture_output=True, text=True, timeout=60, check=True)
        specs.append(json.loads(listed.stdout)["kernelspecs"]["kits19-segmentation"])
    spec = specs[-1]
    assert Path(spec["resource_dir"]).resolve().is_relative_to((REPO / ".venv").resolve())
    assert spec["spec"]["argv"][0] == str(VENV_PYTHON)
    assert spec["spec"]["display_name"] == "Python (kits19-segmentation)"
    assert specs[0] == specs[1]
