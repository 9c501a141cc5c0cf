"""Resuming a run safely: what a resume may change, the data the run was trained on, killed writes' leftovers.

A resume is transactional: :func:`plan_resume` checks everything it can *before* the run
folder is touched, and the run folder's ``config.yaml`` is rewritten only once the checkpoint
has been loaded into the model (:func:`utils.training.setup.set_up_run`). So a refused or
failed resume leaves the run exactly as it was, and the next plain ``--resume`` works.

- **Changes.** Only the settings in :data:`RESUMABLE_KEYS` (how long, how often, how fast, what
  is logged; never what is learnt or from what) may differ from the run's saved config and from
  its ``last.pt``; any other change is refused with :class:`ResumeRefused`, naming each key.
- **Data.** A run records what it was trained on in ``data.json`` (:data:`DATA_RECORD`): the
  resolved data folder, the case ids and the cache's plan hash. A resume uses that folder by
  default (``--data`` points elsewhere, e.g. after moving the data) and refuses a dataset with
  other cases or another plan hash (:func:`check_same_data`).
- **No checkpoint yet.** A run killed before its first ``last.pt`` restarts from scratch with
  its saved config, in its own folder.
- **Leftovers.** Temporary files of writes killed half-way (``.last.pt.*.tmp``, ...) are
  removed when a run starts or resumes (:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from utils.config.experiment import ExperimentConfig, load_experiment_config
from utils.config.loading import build_config, config_as_dict
from utils.data.case_discovery import resolve_data_dir
from utils.data.nifti_io import save_json_atomic
from utils.networks.checkpoints import load_checkpoint
from utils.training.run_folder import CONFIG_FILE, CONSOLE_LOG, PROGRESS_FILE

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
#: What a run was trained on: ``data_dir`` (resolved), ``case_ids``, ``plan_hash``, ``plan_folder``.
DATA_RECORD = "data.json"
TEXT_LOG = "train.log"

#: The settings a resume may change (``section.*``: every key of the section). Everything else
#: (model, loss, optimiser, patches or slices, augmentation, preprocessing, split, seed, fold,
#: batch size, precision, ...) would make the resumed run another experiment: start a new run.
#: ``data_dir`` and ``preprocessing.cache_dir`` say where the data and cache are, not what they
#: are: the data itself is checked against the run's ``data.json`` instead.
RESUMABLE_KEYS = (
    "training.epochs",
    "training.validate_every",
    "training.checkpoint_every",
    "training.num_workers",
    "training.max_validation_cases",
    "training.nonfinite_loss",
    "sliding_window.sw_batch_size",
    "slice_inference.batch_size",
    "performance.*",
    "wandb.*",
    "data_dir",
    "preprocessing.cache_dir",
)

#: Files a run writes before its ``config.yaml`` exists (a folder holding only these has no run in it).
_BEFORE_CONFIG = {CONSOLE_LOG}
_TEMP_PREFIXES = (".write-probe-",)


class ResumeRefused(ValueError):
    """A resume that would change what the run is, or continue it on other data; nothing was changed."""


def is_resumable_key(key: str) -> bool:
    """Whether a resume may change the setting ``key`` (``section.name``), per :data:`RESUMABLE_KEYS`."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The dotted keys (``model.channels``) whose values differ between two config mappings, sorted."""
    old, new = _flatten(_plain(before)), _flatten(_plain(after))
    return sorted(key for key in old.keys() | new.keys() if old.get(key, object()) != new.get(key, object()))


def check_resume_changes(saved: dict[str, Any], requested: dict[str, Any], *, where: str) -> None:
    """Refuse a resume whose config changes settings outside :data:`RESUMABLE_KEYS`.

    Args:
        saved: the config the run was trained with (``config.yaml``, or ``last.pt``'s ``config``).
        requested: the config of the resume (the saved one with ``--set`` applied).
        where: names ``saved`` in the message (e.g. ``"checkpoints/run/config.yaml"``).

    Raises:
        ResumeRefused: naming each changed key with its old and new value.
    """
    old, new = _flatten(_plain(saved)), _flatten(_plain(requested))
    refused = [key for key in changed_keys(saved, requested) if not is_resumable_key(key)]
    if refused:
        listing = "; ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in refused)
        raise ResumeRefused(f"cannot resume with changed {', '.join(refused)} ({listing}; the run was trained "
                            f"with {where}): these settings change what the run learns, so start a new run "
                            f"(--config ... --set training.run_name=NEW) instead. A resume may change only "
                            f"{', '.join(RESUMABLE_KEYS)}. Nothing in the run folder was changed")


@dataclass(frozen=True)
class ResumePlan:
    """A checked resume (see :func:`plan_resume`): nothing in the run folder has been changed yet.

    Attributes:
        folder: the run folder. config: the config to continue with (``data_dir`` resolved).
        data_dir: the resolved data folder. checkpoint: ``last.pt``, loaded, or ``None`` when the
        run has none yet (it restarts from scratch). record: what the run was trained on
        (``data.json``, else ``last.pt``'s plan for runs older than ``data.json``), or ``None``.
    """

    folder: Path
    config: ExperimentConfig
    data_dir: Path
    checkpoint: dict[str, Any] | None
    record: dict[str, Any] | None

    @property
    def from_scratch(self) -> bool:
        """The run has no ``last.pt`` yet: it restarts from its first epoch."""
        return self.checkpoint is None


def read_data_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """A run folder's ``data.json``, or ``None`` when it has none (or it is unreadable)."""
    try:
        record = json.loads((Path(folder) / DATA_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def data_record(data_dir: str | os.PathLike, cache: Any) -> dict[str, Any]:
    """What a run trains on: the resolved data folder, the cache's case ids, plan hash and plan folder."""
    return {"data_dir": str(Path(data_dir).expanduser().resolve()), "case_ids": list(cache.case_ids),
            "plan_hash": cache.plan.get("plan_hash"), "plan_folder": str(Path(cache.folder).resolve())}


def write_data_record(folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``data.json`` atomically (unchanged content leaves the file untouched)."""
    return save_json_atomic(Path(folder) / DATA_RECORD, record)


def recorded_data_dir(folder: str | os.PathLike) -> str | None:
    """The data folder a run was trained on: ``data.json``'s, else its ``config.yaml``'s ``data_dir``."""
    record = read_data_record(folder)
    if record is not None and record.get("data_dir"):
        return str(record["data_dir"])
    try:
        return load_experiment_config(Path(folder) / CONFIG_FILE).data_dir
    except (OSError, ValueError):
        return None


def _summarise(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def _config_dict_of_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        return None
    try:  # through the dataclasses, so settings added since the checkpoint take their defaults
        return config_as_dict(build_config(ExperimentConfig, _plain(saved)))
    except (TypeError, ValueError):
        return saved


def plan_resume(folder: str | os.PathLike, config: ExperimentConfig,
                data_dir: str | os.PathLike | None = None) -> ResumePlan:
    """Check a resume of ``folder`` with ``config`` before anything in the folder is touched.

    Args:
        folder: the run folder.
        config: the config to continue with: the run's ``config.yaml`` with any ``--set`` applied.
        data_dir: the data folder to train on (``--data``); default: the one the run recorded
            (``data.json``, else ``config.data_dir``), then ``KITS19_DATA``.

    Returns:
        The plan: the config (its ``data_dir`` the resolved folder), the loaded ``last.pt`` (or
        ``None``: the run restarts from scratch) and what the run was trained on.

    Raises:
        FileNotFoundError: ``folder`` is not a run folder (no ``config.yaml``).
        ResumeRefused: a changed setting outside :data:`RESUMABLE_KEYS`; the recorded data folder
            is missing (pass ``--data``); cases the run was trained on are missing from the data.
        utils.networks.checkpoints.CheckpointError: ``last.pt`` cannot be read.
        ValueError, FileNotFoundError: no data folder can be found at all.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}, so not a run folder (or a run stopped before it "
                                "saved its config): start a new run instead")
    saved = load_experiment_config(config_path)
    requested = config_as_dict(config)
    check_resume_changes(config_as_dict(saved), requested, where=str(config_path))
    checkpoint = None
    if (folder / LAST_CHECKPOINT).is_file():
        checkpoint = load_checkpoint(folder / LAST_CHECKPOINT, map_location="cpu")
        trained = _config_dict_of_checkpoint(checkpoint)
        if trained is not None:
            check_resume_changes(trained, requested, where=f"the config stored in {folder / LAST_CHECKPOINT}")
    record = read_data_record(folder)
    if record is None and checkpoint is not None and isinstance(checkpoint.get("preprocessing_plan"), dict):
        plan = checkpoint["preprocessing_plan"]  # a run older than data.json: its checkpoint says what it used
        record = {"data_dir": plan.get("source_data"), "case_ids": list(plan.get("case_ids", [])),
                  "plan_hash": plan.get("plan_hash")}
    data = _resume_data_dir(folder, config, saved, record, data_dir)
    if record is not None and record.get("case_ids"):
        present = {p.name for p in data.iterdir() if p.is_dir()}
        missing = [case_id for case_id in record["case_ids"] if case_id not in present]
        if missing:
            raise ResumeRefused(f"{data} is not the data {folder} was trained on ({record.get('data_dir')}): "
                                f"{len(missing)} of its {len(record['case_ids'])} cases are missing "
                                f"({_summarise(missing)}); pass --data with the folder it was trained on, "
                                "or start a new run on this data")
    return ResumePlan(folder, replace(config, data_dir=str(data.resolve())), data, checkpoint, record)


def _resume_data_dir(folder: Path, config: ExperimentConfig, saved: ExperimentConfig, record: dict[str, Any] | None,
                     data_dir: str | os.PathLike | None) -> Path:
    """``--data``, else a ``data_dir`` changed by ``--set``, else the recorded folder, else ``KITS19_DATA``."""
    if data_dir is not None:
        return resolve_data_dir(data_dir)
    if config.data_dir and config.data_dir != saved.data_dir:
        return resolve_data_dir(config.data_dir)
    recorded = (record or {}).get("data_dir") or saved.data_dir
    if recorded:
        if not Path(recorded).expanduser().is_dir():
            raise ResumeRefused(f"{folder} was trained on the data folder {recorded}, which does not exist here "
                                "(moved, or another machine): pass --data DIR with the folder holding the same "
                                "cases")
        return resolve_data_dir(recorded)
    return resolve_data_dir(None)


def check_same_data(plan: ResumePlan, cache: Any) -> None:
    """Refuse to resume on a cache of other data than the run's (other case ids, or another plan hash).

    Args:
        plan: from :func:`plan_resume`. cache: the prepared :class:`~utils.preprocessing.cache.PreprocessedCache`.

    Raises:
        ResumeRefused: naming a few added and missing cases, or both plan hashes.
    """
    record = plan.record
    if record is None:
        return
    recorded_ids = list(record.get("case_ids") or [])
    if recorded_ids and set(cache.case_ids) != set(recorded_ids):
        added = sorted(set(cache.case_ids) - set(recorded_ids))
        missing = sorted(set(recorded_ids) - set(cache.case_ids))
        parts = [f"added {_summarise(added)}" if added else "", f"missing {_summarise(missing)}" if missing else ""]
        raise ResumeRefused(f"{plan.data_dir} holds other cases than {plan.folder} was trained on "
                            f"({record.get('data_dir')}): {'; '.join(p for p in parts if p)}. "
                            "Pass --data with the folder it was trained on, or start a new run on this data")
    recorded_hash, hash_now = record.get("plan_hash"), cache.plan.get("plan_hash")
    if recorded_hash and recorded_hash != hash_now:
        raise ResumeRefused(f"{plan.data_dir} preprocesses to plan hash {hash_now}, but {plan.folder} was trained "
                            f"on plan hash {recorded_hash} (same case ids, other content or fingerprint): pass "
                            "--data with the folder it was trained on, or start a new run on this data")


def is_stale_temp_file(path: Path) -> bool:
    """A temporary file of an atomic write or write check killed half-way (``.last.pt.x1y2.tmp``, ...)."""
    name = path.name
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(_TEMP_PREFIXES))


def remove_stale_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temporary files killed writes left in ``folder`` (not its sub-folders); returns how many.

    Only the run's own process writes there, and it calls this before writing anything, so
    every such file found is an orphan (a checkpoint's can be gigabytes).
    """
    folder = Path(folder)
    removed, size = 0, 0
    for path in folder.iterdir() if folder.is_dir() else ():
        if path.is_file() and not path.is_symlink() and is_stale_temp_file(path):
            try:
                size += path.stat().st_size
                path.unlink()
                removed += 1
            except OSError as error:
                logger.warning("cannot remove the leftover %s: %s", path, error)
    if removed:
        logger.info("%s: removed %d temporary file(s) (%d bytes) left by writes that were killed", folder,
                    removed, size)
    return removed


def auto_resume_folder(folder: str | os.PathLike) -> Path | None:
    """For ``--auto-resume``: the run folder to resume, or ``None`` to start the run in it.

    A folder with ``config.yaml`` is resumed (from ``last.pt``, or from scratch when it has none
    yet); a folder that is missing, empty, or holds only what a run writes before its config
    (``console.log``, leftovers of killed writes, which are removed) is started anew.

    Raises:
        FileExistsError: the folder holds other files but no ``config.yaml``: not a run of this project.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / CONFIG_FILE).is_file():
        return folder
    remove_stale_temp_files(folder)
    others = sorted(p.name for p in folder.iterdir() if p.name not in _BEFORE_CONFIG)
    if others:
        raise FileExistsError(f"{folder} holds {_summarise(others)} but no {CONFIG_FILE}, so it is not a run "
                              "folder of this project: move those files away, or pick another run name")
    return None


#: Files a new run writes during set-up, removed again when set-up fails before training starts.
SET_UP_FILES = (CONFIG_FILE, TEXT_LOG, DATA_RECORD, PROGRESS_FILE)
