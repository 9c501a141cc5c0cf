"""Tests for utils.networks.checkpoints: atomic saves (old file kept on failure), clear load errors, RNG round trips."""

from __future__ import annotations

import errno
import random
from collections import namedtuple

import numpy as np
import pytest
import torch

from utils.networks import checkpoints
from utils.networks.checkpoints import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

shutil_usage = namedtuple("shutil_usage", "total used free")


def _draw() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(2).tolist(),
            torch.rand(3).tolist(), torch.randint(0, 100, (4,)).tolist())


def test_save_then_load_round_trip(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "wandb_run_id": None, "best": [0.5, 1]}
    path = save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["wandb_run_id"] is None and loaded["best"] == [0.5, 1]
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_failed_save_keeps_previous_file_and_removes_temporary(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    before = path.read_bytes()

    def disk_full(obj, stream, *args, **kwargs):
        stream.write(b"partial bytes of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"disk holding .* is full \(\d+ bytes free.*previous checkpoint.*intact"
                       ) as info:
        save_checkpoint(path, {"epoch": 2})
    assert str(path) in str(info.value) and isinstance(info.value, RuntimeError)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_full_disk_hidden_by_torch_save_is_named_as_such(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    before = path.read_bytes()

    def short_write(obj, stream, *args, **kwargs):  # what torch.save raises when the disk fills up
        stream.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4672 vs 4566")

    monkeypatch.setattr(checkpoints.torch, "save", short_write)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda folder: shutil_usage(total=10**9, used=10**9 - 100,
                                                                                      free=100))
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {"epoch": 2, "w": torch.ones(1000)})
    message = str(info.value)
    assert f"the disk holding {tmp_path} is full (100 bytes free" in message and "unexpected pos" not in message
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_save_into_removed_folder_raises_checkpoint_error(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    folder.rmdir()
    with pytest.raises(CheckpointError, match="run/last.pt"):
        save_checkpoint(folder / "last.pt", {"epoch": 1})
    assert not folder.exists()


def test_save_refuses_values_that_could_not_be_loaded_back(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    with pytest.raises(CheckpointError, match=r"state\['metrics'\]\['dice'\] is a numpy.float64.*intact"):
        save_checkpoint(path, {"epoch": 2, "metrics": {"dice": np.float64(0.5)}})
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_save_refuses_non_dict(tmp_path):
    with pytest.raises(TypeError, match="dict"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])


def test_load_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    path = save_checkpoint(tmp_path / "last.pt", {"w": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match="last.pt.*truncated or corrupt"):
        load_checkpoint(path)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"state": np.random.get_state()}, path)  # numpy arrays are not allowed by weights_only
    with pytest.raises(CheckpointError, match="unsafe.pt") as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "objects that safe loading refuses" in message and "numpy" in message
    assert "only checkpoints written by this project" in message
    assert "truncated" not in message and "corrupt" not in message
    assert "weights_only" not in message and "trust" not in message  # never the advice to load unsafely
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_rng_state_restores_every_generator():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave cached Gaussians in both states
    state = capture_rng_state()
    first = _draw()
    restore_rng_state(state)
    assert _draw() == first


def test_rng_state_survives_checkpoint_round_trip(tmp_path):
    state = capture_rng_state()
    first = _draw()
    _draw()
    path = save_checkpoint(tmp_path / "last.pt", {"rng": state})
    restore_rng_state(load_checkpoint(path)["rng"])
    assert _draw() == first
    assert set(state) == {"python", "numpy", "torch", "cuda"}
    assert state["cuda"] == [] or torch.cuda.is_available()


def test_restore_refuses_incomplete_state():
    with pytest.raises(ValueError, match="capture_rng_state"):
        restore_rng_state({"python": None})
