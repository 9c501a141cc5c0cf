"""The folder of one training run: its creation, a write check, the resolved config, progress and text logs.

A run folder holds everything one run wrote (``config.yaml``, ``training_progress.json``,
``train.log``, checkpoints, ``wandb/``). A new run always gets a new or empty folder, so it never
appends to another run's files; a resumed run reopens its own folder. Every file here is
rewritten atomically (temporary file, fsync, rename), so a run killed at any moment leaves
valid files behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from utils.data.nifti_io import write_bytes_atomic

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
PROGRESS_FILE = "training_progress.json"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: File name of a run's terminal output, written by launchers (``scripts/launch_tmux.sh``).
CONSOLE_LOG = "console.log"


def _check_folder_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in "/\\"):
        raise ValueError(f"{what} must be a non-empty folder name without '/' or '\\', got {name!r}")


def create_run_folder(output_dir: str | os.PathLike, run_name: str | None, model_name: str) -> Path:
    """Create the folder of a new run, ``output_dir/<run_name>``, and its parents.

    Args:
        output_dir: root of run folders (``training.output_dir``).
        run_name: the folder name; ``None`` makes ``<model_name>_<YYYYmmdd-HHMMSS>`` (local
            time), with ``_2``, ``_3``, ... appended when that folder already exists.
        model_name: model key (e.g. ``"resunet3d"``), used only when ``run_name`` is ``None``.

    Returns:
        The new (or existing but empty) folder; a folder holding only :data:`CONSOLE_LOG` (the
        terminal output a launcher copies into the run folder) counts as empty.

    Raises:
        ValueError: ``run_name`` or ``model_name`` is not a plain folder name.
        FileExistsError: ``run_name`` is given and that folder exists and is not empty (or is a file).
    """
    _check_folder_name(model_name, "model_name")
    output_dir = Path(output_dir)
    if run_name is not None:
        _check_folder_name(run_name, "run_name")
        folder = output_dir / run_name
        if folder.exists() and (not folder.is_dir() or any(p.name != CONSOLE_LOG for p in folder.iterdir())):
            raise FileExistsError(f"{folder} already exists and is not empty: a new run never writes into another "
                                  f"run's folder; pick another run name, or continue that run with "
                                  f"--resume {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    output_dir.mkdir(parents=True, exist_ok=True)
    base = f"{model_name}_{time.strftime('%Y%m%d-%H%M%S')}"
    for index in range(1, 10_000):
        folder = output_dir / (base if index == 1 else f"{base}_{index}")
        try:
            folder.mkdir()  # not exist_ok: two runs started in the same second get different folders
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"{output_dir}: could not find a free folder name starting with {base}")


def check_writable(folder: str | os.PathLike) -> None:
    """Check that files can be written in ``folder``: write, fsync and delete a small probe file.

    Meant to be called before the first epoch, so a read-only or missing output folder stops
    the run at once rather than after hours of training.

    Args:
        folder: the folder to check (usually the run folder).

    Raises:
        OSError: the probe could not be written or deleted; the subclass follows the cause
            (``PermissionError``, ``FileNotFoundError``, ``NotADirectoryError``, ...) and the
            message names the folder and the reason.
    """
    folder = Path(folder)
    probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as stream:
            stream.write(b"write probe\n")
            stream.flush()
            os.fsync(stream.fileno())
        probe.unlink()
    except OSError as error:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass  # the folder refused the probe; there is nothing to remove
        message = (f"{folder}: cannot write files there ({error.strerror or error}); "
                   f"choose a writable output folder or fix its permissions")
        raise (OSError(error.errno, message) if error.errno is not None else OSError(message)) from error


def _to_yaml_data(value: Any, where: str) -> Any:
    """Plain YAML data: tuples become lists, numpy scalars numbers; other objects are refused."""
    if isinstance(value, dict):
        return {str(key): _to_yaml_data(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_yaml_data(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool):
        return value
    for plain in (int, float, str):  # also turns subclasses (numpy float64, enums) into the plain type
        if isinstance(value, plain):
            return plain(value)
    raise ValueError(f"{where} must be plain data (str, int, float, bool, None, list, dict), "
                     f"got {type(value).__name__}: {value!r}")


def save_resolved_config(folder: str | os.PathLike, config_dict: dict) -> Path:
    """Write the resolved config to ``folder/config.yaml`` atomically (replacing any earlier one).

    Tuples are written as YAML lists, so ``yaml.safe_load`` of the file gives a mapping that
    ``utils.config.loading.build_config(ExperimentConfig, ...)`` accepts. Keys keep their order.

    Args:
        folder: an existing run folder.
        config_dict: e.g. ``utils.config.loading.config_as_dict(experiment_config)``.

    Returns:
        The path of ``config.yaml``.

    Raises:
        NotADirectoryError: ``folder`` is not an existing folder.
        ValueError: ``config_dict`` is not a dict or holds values YAML cannot represent plainly.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not an existing folder; create the run folder first")
    if not isinstance(config_dict, dict):
        raise ValueError(f"config_dict must be a dict, got {type(config_dict).__name__}")
    text = yaml.safe_dump(_to_yaml_data(config_dict, "config"), sort_keys=False, allow_unicode=True)
    path = folder / CONFIG_FILE
    write_bytes_atomic(path, text.encode("utf-8"))
    return path


def _to_json_data(value: Any, where: str) -> Any:
    """JSON-safe data: NaN and infinities become None; numpy and 0-d torch scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(key): _to_json_data(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_data(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.generic, np.ndarray)) and value.size == 1:
        return _to_json_data(value.item(), where)
    if callable(getattr(value, "numel", None)) and value.numel() == 1:  # a one-element torch tensor
        return _to_json_data(value.item(), where)
    raise ValueError(f"{where} must be a number, str, bool, None, list or dict, got {type(value).__name__}")


class ProgressLog:
    """Per-epoch records of a run in ``training_progress.json``, rewritten atomically after each epoch.

    The file is a JSON list of records (one dict per epoch, each with an integer ``"epoch"``),
    readable with ``json.load`` or ``pandas.DataFrame(json.load(f))``. JSON has no NaN or
    infinity: non-finite floats are written as ``null`` and read back as ``None``. numpy
    scalars and one-element tensors are written as plain numbers.

    Attributes:
        path: the JSON file. records: the records, oldest first.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        """Open the progress log of ``folder``: read its ``training_progress.json``, or start empty.

        Args:
            folder: an existing run folder.

        Raises:
            NotADirectoryError: ``folder`` is not an existing folder.
            ValueError: the file exists but is not a JSON list of records.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder}: not an existing folder; create the run folder first")
        self.path = folder / PROGRESS_FILE
        self.records: list[dict[str, Any]] = self._read() if self.path.exists() else []

    def _read(self) -> list[dict[str, Any]]:
        try:
            records = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.path}: not valid JSON ({error}); move it aside to start a new log") from error
        if not isinstance(records, list) or not all(isinstance(r, dict) and "epoch" in r for r in records):
            raise ValueError(f"{self.path}: expected a JSON list of records with an 'epoch' key each")
        return records

    @property
    def last_epoch(self) -> int | None:
        """The epoch of the latest record, or ``None`` when there is none."""
        return self.records[-1]["epoch"] if self.records else None

    def append(self, record: dict[str, Any]) -> None:
        """Add one epoch's record and rewrite the file atomically.

        Args:
            record: e.g. ``{"epoch": 3, "train_loss": 0.41, "val_loss": None, "kidney_dice": 0.9,
                "tumour_dice": 0.6, "learning_rate": 3e-4, "epoch_seconds": 812.5,
                "samples_per_second": 0.62}``; ``"epoch"`` (an int, larger than the last
                record's) is required, any other keys are kept as they are.

        Raises:
            ValueError: no integer ``"epoch"``, an epoch not after the last one (call
                :meth:`truncate` first when resuming), or a value JSON cannot hold.
        """
        if not isinstance(record, dict):
            raise ValueError(f"record must be a dict, got {type(record).__name__}")
        epoch = record.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ValueError(f"record must have an integer 'epoch', got {epoch!r}")
        if self.records and epoch <= self.last_epoch:
            raise ValueError(f"epoch {epoch} is not after the last logged epoch {self.last_epoch}; "
                             f"on resume, call truncate(<checkpoint epoch>) first")
        self.records.append(_to_json_data(record, "record"))
        self._write()

    def truncate(self, after_epoch: int) -> int:
        """Drop the records of epochs after ``after_epoch`` and rewrite the file atomically.

        Used on resume: a run may have logged an epoch and died before saving its checkpoint.

        Args:
            after_epoch: the last epoch to keep (the epoch of the checkpoint resumed from).

        Returns:
            The number of records dropped.
        """
        if not isinstance(after_epoch, int) or isinstance(after_epoch, bool):
            raise ValueError(f"after_epoch must be an int, got {after_epoch!r}")
        kept = [r for r in self.records if r["epoch"] <= after_epoch]
        dropped = len(self.records) - len(kept)
        if dropped:
            self.records = kept
            self._write()
            logger.info("%s: dropped %d record(s) after epoch %d", self.path, dropped, after_epoch)
        return dropped

    def _write(self) -> None:
        text = json.dumps(self.records, indent=1, allow_nan=False)
        write_bytes_atomic(self.path, (text + "\n").encode("utf-8"))


class _RunLogHandler(logging.FileHandler):
    """A file handler that remembers the root logger's level from before it was attached."""

    previous_root_level: int = logging.WARNING


def attach_text_log(folder: str | os.PathLike, name: str = "train.log", level: int = logging.INFO) -> logging.Handler:
    """Copy every log record of ``level`` and above to ``folder/name``, appending, with timestamps.

    Append mode lets a resumed run continue its own log. When the root logger's level is above
    ``level`` it is lowered to ``level`` (and put back by :func:`detach_text_log`). Attaching the
    same file twice returns the handler already attached.

    Args:
        folder: an existing run folder.
        name: file name of the log.
        level: lowest level written (``logging.INFO`` by default).

    Returns:
        The handler, to pass to :func:`detach_text_log` at the end of the run.

    Raises:
        NotADirectoryError: ``folder`` is not an existing folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not an existing folder; create the run folder first")
    _check_folder_name(name, "name")
    root = logging.getLogger()
    path = os.path.abspath(folder / name)
    for handler in root.handlers:
        if isinstance(handler, _RunLogHandler) and handler.baseFilename == path:
            return handler
    handler = _RunLogHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(level)
    handler.previous_root_level = root.level
    if root.getEffectiveLevel() > level:
        root.setLevel(level)
    root.addHandler(handler)
    return handler


def detach_text_log(handler: logging.Handler) -> None:
    """Remove a handler from :func:`attach_text_log` from the root logger, close its file, restore the level.

    Args:
        handler: the handler returned by :func:`attach_text_log`; detaching twice does nothing.
    """
    root = logging.getLogger()
    if handler not in root.handlers:
        return
    root.removeHandler(handler)
    handler.close()
    if isinstance(handler, _RunLogHandler):
        root.setLevel(handler.previous_root_level)
