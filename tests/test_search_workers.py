"""Several search workers on one study: a journal file, a PostgreSQL server, a killed worker, the 3D model."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from test_hyperparameter_search import write_search

from utils.config.experiment import load_experiment_config
from utils.preprocessing.preprocess import preprocess_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "hyperparameter_search.py"
ENVIRONMENT = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "KITS19_PROGRESS": "off"}


def _postgres_bin() -> Path | None:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").is_file():
            return Path(folder)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A private PostgreSQL server on a Unix socket in a temporary folder, with an empty database."""
    binaries = _postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on PATH: "
                    "install the postgresql package")
    root = Path(tempfile.mkdtemp(prefix="search-pg-"))
    prefix = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"

    def run(*command: str) -> None:
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
        "-o", f"-k {root} -c listen_addresses='' -F")
    try:
        run(str(binaries / "createdb"), "-h", str(root), "-U", "postgres", "search")
        yield f"postgresql+psycopg2://postgres@/search?host={root}"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tiny_data(tiny_cache) -> Path:
    return Path(tiny_cache.plan["source_data"])


def _prepare_cache(experiment: Path, data: Path) -> None:
    """Build the trials' cache once, before the workers start (they would otherwise build it together)."""
    config = load_experiment_config(experiment)
    preprocess_dataset(data, config.preprocessing, config.split, show_progress=False)


def _trials(storage: str, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    if storage.startswith("journal:"):
        backend = optuna.storages.journal.JournalFileBackend(storage[len("journal:"):])
        return optuna.load_study(study_name=name, storage=optuna.storages.journal.JournalStorage(backend)).trials
    return optuna.load_study(study_name=name, storage=storage).trials


def _start(command: list[str], log: Path, rank: int) -> subprocess.Popen:
    with open(log, "w") as stream:
        return subprocess.Popen([*command, "--worker-rank", str(rank)], stdout=stream, stderr=subprocess.STDOUT,
                                cwd=REPO, env=ENVIRONMENT)


def _wait_for_epochs(worker: subprocess.Popen, trial_folder: Path, epochs: int) -> None:
    """Wait (polling the run folder: cheap) until the trial in ``trial_folder`` has trained ``epochs`` epochs."""
    progress = trial_folder / "training_progress.json"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            if progress.is_file() and len(json.loads(progress.read_text() or "[]")) >= epochs:
                return
        except ValueError:  # caught between the write and the rename of another file; look again
            pass
        time.sleep(0.01)
    raise AssertionError(f"{trial_folder.name} did not train {epochs} epoch(s) (worker exit status {worker.poll()})")


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_two_workers_share_a_study_and_a_killed_workers_trial_is_retried(backend, tiny_data, tmp_path, request):
    storage = (f"journal:{tmp_path / 'study.journal'}" if backend == "journal"
               else request.getfixturevalue("postgres_url"))
    search = write_search(tmp_path, heartbeat_seconds=1, grace_seconds=6)
    _prepare_cache(tmp_path / "experiment.yaml", tiny_data)
    folder = tmp_path / "searches" / "tiny"
    command = [sys.executable, str(SCRIPT), "--config", str(search), "--trials", "4", "--data", str(tiny_data),
               "--storage", storage]
    # The second worker starts once the first has trained its first trial; it takes seconds to start, so the
    # first worker's second trial (trial 1) is under way when the first worker is killed after its first epoch.
    killed = _start(command, tmp_path / "worker0.log", 0)
    other = None
    number = 1
    try:
        _wait_for_epochs(killed, folder / "trials" / "trial_0000", 2)
        other = _start(command, tmp_path / "worker1.log", 1)
        _wait_for_epochs(killed, folder / "trials" / f"trial_{number:04d}", 1)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert other.wait(timeout=600) == 0, (tmp_path / "worker1.log").read_text()[-3000:]
    finally:
        for process in (killed, other):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    trials = _trials(storage)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and len({t.number for t in trials}) == len(trials)
    folders = [t.user_attrs["run_folder"] for t in complete]
    assert len(set(folders)) == 4 and all(Path(f).parent == folder / "trials" for f in folders)
    workers = {t.user_attrs["worker"] for t in trials}
    assert {w.rsplit(":", 1)[1] for w in workers} == {str(killed.pid), str(other.pid)}
    assert any(w.endswith(f":{killed.pid}") for w in workers) and any(w.endswith(f":{other.pid}") for w in workers)
    assert any(t.user_attrs["worker"].endswith(f":{killed.pid}") for t in complete)  # it ran one before it died
    assert any(t.user_attrs["worker"].endswith(f":{other.pid}") for t in complete)
    dead = next(t for t in trials if t.number == number)
    assert dead.state.name == "FAIL" and dead.user_attrs["worker"].endswith(f":{killed.pid}")
    retry = next(t for t in complete if t.system_attrs.get("failed_trial") == number)
    assert retry.params == dead.params and retry.user_attrs["worker"].endswith(f":{other.pid}")
    assert retry.user_attrs["run_folder"] == str(folder / "trials" / f"trial_{number:04d}")
    progress = json.loads((folder / "trials" / f"trial_{number:04d}" / "training_progress.json").read_text())
    assert [r["epoch"] for r in progress] == [1, 2]  # continued from its last.pt, not restarted
    rows = (folder / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(trials) and (folder / "best_config.yaml").is_file()


def test_a_search_over_the_3d_quick_config_runs_and_its_best_config_trains(tiny_data, tmp_path):
    tiny = {"preprocessing.cache_dir": str(tmp_path / "cache"), "preprocessing.target_spacing": [4.0, 4.0, 4.0],
            "patches.patch_size": [8, 16, 16], "patches.samples_per_epoch": 4, "augmentation.affine_prob": 0.0,
            "model.channels": [4, 8, 16], "model.strides": [2, 2], "sliding_window.roi_size": [8, 16, 16],
            "training.batch_size": 2, "data_dir": str(tiny_data)}
    search = yaml.safe_load((REPO / "configs" / "resunet3d_search.yaml").read_text())
    search.update(experiment=str(REPO / "configs" / "resunet3d_quick.yaml"),
                  experiment_overrides=[f"{key}={json.dumps(value)}" for key, value in tiny.items()],
                  trial_overrides=["training.epochs=1", "training.validate_every=1", "wandb.enabled=false"],
                  output_dir=str(tmp_path / "searches"), study_name="quick3d", sampler_startup_trials=4)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    found = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path), "--trials", "2"], cwd=REPO,
                           env=ENVIRONMENT, capture_output=True, text=True, timeout=600)
    assert found.returncode == 0, found.stderr[-3000:]
    best = tmp_path / "searches" / "quick3d" / "best_config.yaml"
    assert load_experiment_config(best).model.name == "resunet3d"
    trained = subprocess.run([sys.executable, str(REPO / "scripts" / "train_3d_unet.py"), "--config", str(best),
                              "--set", "training.epochs=1", "--set", "training.run_name=best",
                              "--set", f"training.output_dir={tmp_path / 'final_runs'}"], cwd=REPO,
                             env=ENVIRONMENT, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    progress = json.loads((tmp_path / "final_runs" / "best" / "training_progress.json").read_text())
    assert [r["epoch"] for r in progress] == [1]


def test_the_shipped_3d_search_config_is_valid(monkeypatch):
    from utils.config.search import load_search_config

    monkeypatch.chdir(REPO)
    config = load_search_config("configs/resunet3d_search.yaml")
    assert config.experiment == "configs/resunet3d_quick.yaml"
