"""A training job killed with SIGKILL again and again, each time requeued with ``--auto-resume``, as a scheduler
would: it finishes with exactly the per-epoch losses of an uninterrupted run and leaves no temporary files.

The kills land at seeded random moments (while Python starts, while the cache is built, mid-epoch, during
validation, while checkpoints are written); the first lands before the run has any checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.test_training_engine import REPO, SCRIPT, tiny_config, write_config

KILLS = 7
SEED = 20240611


def _command(config_path: Path, data: Path, run_name: str, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--config", str(config_path), "--data", str(data),
            "--set", f"training.run_name={run_name}", "--auto-resume", *extra]


def _losses(folder: Path) -> list[float]:
    return [r["train_loss"] for r in json.loads((folder / "training_progress.json").read_text())]


def _wait_for(condition, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None and not condition():
        time.sleep(0.002)


def test_a_run_killed_at_random_moments_and_requeued_finishes_with_the_uninterrupted_losses(tiny_data, tmp_path):
    data = tmp_path / "data"
    for case_id in ("case_00000", "case_00001"):
        shutil.copytree(tiny_data / case_id, data / case_id, copy_function=shutil.copy2)
    epochs = 12
    config = tiny_config(tmp_path, split={"validation_fraction": 0.5},
                         patches={"patch_size": [8, 16, 16], "samples_per_epoch": 8},
                         training={"epochs": epochs, "validate_every": 4, "max_validation_cases": 1})
    config_path = write_config(tmp_path, config)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    whole = subprocess.run(_command(config_path, data, "whole"), capture_output=True, text=True, cwd=REPO,
                           timeout=600, env=environment)
    duration = time.monotonic() - started
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = _losses(tmp_path / "runs" / "whole")

    folder = tmp_path / "runs" / "crashed"
    # its own cache, so kills also land while the cache is being built
    command = _command(config_path, data, "crashed", "--set", f"preprocessing.cache_dir={tmp_path / 'cache_crashed'}")
    draw = random.Random(SEED)
    killed_before_checkpoint = False
    for kill in range(KILLS):
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        if kill == 0:  # once the run folder holds its config, before the first checkpoint
            _wait_for(lambda: (folder / "config.yaml").is_file(), process, 300)
        else:
            _wait_for(lambda: False, process, draw.uniform(0.0, duration))
        had_checkpoint = (folder / "last.pt").is_file()
        process.kill()
        process.wait(timeout=60)
        if kill == 0:
            killed_before_checkpoint = process.returncode < 0 and not had_checkpoint
    assert killed_before_checkpoint, "the first kill came too late: the run already had a checkpoint"

    final = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, env=environment)
    assert final.returncode == 0, final.stderr[-3000:]
    records = json.loads((folder / "training_progress.json").read_text())
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert np.allclose(_losses(folder), expected, rtol=0, atol=1e-6)
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")] == []
