"""k-fold cross-validation: every fold of an experiment trained as a normal run, and read back as one.

An experiment with ``split.scheme: kfold`` and ``split.folds: k`` is trained by
:func:`train_cross_validation`: all folds one after the other on one device, or one given fold
(one fold per job on a cluster). Its folder holds one ordinary run folder per fold and a manifest::

    <training.output_dir>/<experiment>/
        cross_validation.json        # the manifest (below)
        fold_0/ ... fold_<k-1>/      # run folders: config.yaml, last.pt, best.pt, data.json, ...
        .cross_validation.lock       # serialises updates of the manifest
        .fold_<k>.lock               # held while fold k trains (a second trainer of it is refused)

Each ``fold_<k>`` is a run folder like any other (``training.fold: k``, ``training.run_name:
fold_<k>``), so ``eval_*.py --run``, ``segment.py --checkpoint`` and ``--resume`` work on one
fold as on any run.

**Manifest** (``cross_validation.json``, rewritten atomically under the lock file, so several
jobs may update it at once): ``model_name``; ``config``, the resolved experiment config as a dict
without ``training.fold`` and ``training.run_name``; ``split``: ``scheme``, ``folds``, ``seed``,
``case_ids`` and ``splits`` (one ``{"train": [...], "val": [...]}`` per fold, from the cache's
``splits.json``); ``data_dir`` and ``plan_hash`` (the data and preprocessing the folds train on);
``folds``: one entry per fold with ``fold``, ``run_folder`` (its name), ``status``
(``pending``, ``running``, ``finished`` or ``failed``), ``best_epoch`` and ``best_score`` (the
validation ``mean_dice`` on the cache grid: KiTS19 the mean of kidney and tumour Dice, KiTS23 of
its three regions' Dice; set once finished), ``message`` (why it failed
or stopped) and ``updated`` (UTC time).

**Reruns.** Training the experiment again skips finished folds (their files are not touched),
continues an interrupted fold from its ``last.pt`` exactly like ``--auto-resume`` (from scratch
when it had none yet), and starts pending ones. A rerun whose config changes anything but
:data:`RERUN_KEYS` (where the data and cache are, how fast) or whose data gives another split
or plan hash is refused with :class:`CrossValidationError`, naming each differing key.

**Reading.** :func:`load_cross_validation` returns a :class:`CrossValidation`:

- ``folder``: the experiment folder (:class:`~pathlib.Path`).
- ``model_name``: the model key (``resunet3d`` or ``unetr2d``).
- ``folds``: one :class:`FoldRun` per fold of the split, in fold order, with ``fold`` (index),
  ``run_folder`` (``folder / "fold_<k>"``), ``status``, ``train_case_ids`` and
  ``validation_case_ids`` (tuples of case ids), ``best_epoch`` and ``best_score`` (``None``
  unless finished) and the property ``best_checkpoint`` (``run_folder / "best.pt"``).
  :attr:`CrossValidation.finished` gives the finished folds only.
- ``split``: the manifest's ``split`` mapping (above); the validation sets of its ``splits``
  partition ``case_ids``, so each case is validated by exactly one fold.
- ``config``: the manifest's ``config`` mapping (build a fold's with
  ``build_config(ExperimentConfig, ...)`` after setting ``training.fold``).
- ``data_dir`` and ``plan_hash``: as recorded.

It raises :class:`CrossValidationError` (a ``ValueError``) for a folder without manifest, a fold
folder the manifest expects but that is missing (or a finished fold without ``best.pt``), a fold
trained with another config or split (naming the keys) or on other data (plan hash), and an
experiment with no finished fold yet.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from utils.config.experiment import ExperimentConfig, load_experiment_config
from utils.config.loading import config_as_dict
from utils.data.case_discovery import resolve_data_dir
from utils.data.nifti_io import save_json_atomic
from utils.preprocessing.cache import open_cache
from utils.preprocessing.preprocess import prepare_training_cache
from utils.training.engine import TrainingInterrupted, describe_selection_score, train
from utils.training.resume import (
    BEST_CHECKPOINT,
    DATA_RECORD,
    RESUMABLE_KEYS,
    ResumeRefused,
    auto_resume_folder,
    changed_keys,
    read_data_record,
)
from utils.training.run_folder import CONFIG_FILE, PROGRESS_FILE
from utils.training.stop_signals import StopSignals

logger = logging.getLogger(__name__)

MANIFEST = "cross_validation.json"
LOCK_FILE = ".cross_validation.lock"
STATUSES = ("pending", "running", "finished", "failed")
FORMAT_VERSION = 1

#: Settings a rerun may change (``section.*``: the whole section): where the data, cache and
#: runs are, and how fast training goes; never what a fold learns. Any other change is refused.
RERUN_KEYS = (
    "data_dir",
    "preprocessing.cache_dir",
    "training.output_dir",
    "training.num_workers",
    "sliding_window.sw_batch_size",
    "slice_inference.batch_size",
    "performance.*",
    "wandb.*",
)

#: Keys that differ between the folds by design: left out of the manifest's config.
_PER_FOLD_KEYS = ("training.fold", "training.run_name")


class CrossValidationError(ValueError):
    """A cross-validation experiment that cannot be trained or read as asked; the message says why."""


class FoldBusy(RuntimeError):
    """Another process is training this fold now (it holds the fold's lock file)."""


@dataclass(frozen=True)
class FoldRun:
    """One fold of a cross-validation experiment (see the module docstring)."""

    fold: int
    run_folder: Path
    status: str
    train_case_ids: tuple[str, ...]
    validation_case_ids: tuple[str, ...]
    best_epoch: int | None = None
    best_score: float | None = None

    @property
    def best_checkpoint(self) -> Path:
        """The fold's ``best.pt`` (present once the fold has validated at least once)."""
        return self.run_folder / BEST_CHECKPOINT


@dataclass(frozen=True)
class CrossValidation:
    """A cross-validation experiment read by :func:`load_cross_validation` (see the module docstring)."""

    folder: Path
    model_name: str
    folds: tuple[FoldRun, ...]
    split: dict[str, Any]
    config: dict[str, Any]
    data_dir: str | None = None
    plan_hash: str | None = None

    @property
    def finished(self) -> tuple[FoldRun, ...]:
        """The finished folds, in fold order."""
        return tuple(fold for fold in self.folds if fold.status == "finished")


@dataclass(frozen=True)
class FoldOutcome:
    """What :func:`train_cross_validation` did with one fold.

    Attributes:
        fold: its index. run_folder: its run folder. status: its status afterwards.
        action: ``"trained"``, ``"resumed"``, ``"skipped"`` (already finished) or ``"busy"``
        (another process trains it). best_epoch, best_score: once finished.
    """

    fold: int
    run_folder: Path
    status: str
    action: str
    best_epoch: int | None = None
    best_score: float | None = None


@dataclass(frozen=True)
class CrossValidationResult:
    """The experiment folder and what happened to each requested fold."""

    folder: Path
    folds: tuple[FoldOutcome, ...]

    @property
    def all_finished(self) -> bool:
        """Every requested fold is finished."""
        return all(outcome.status == "finished" for outcome in self.folds)


# --- folders, configs, locks ---------------------------------------------------------------------

def experiment_folder(config: ExperimentConfig, experiment: str) -> Path:
    """``<training.output_dir>/<experiment>``; the name must be a plain folder name."""
    if not isinstance(experiment, str) or not experiment.strip() or experiment in (".", "..") \
            or any(c in experiment for c in "/\\"):
        raise CrossValidationError(f"the experiment name must be a non-empty folder name without '/' or '\\', "
                                   f"got {experiment!r}")
    return Path(config.training.output_dir) / experiment


def fold_folder(folder: str | os.PathLike, fold: int) -> Path:
    """The run folder of ``fold`` in the experiment folder ``folder``: ``folder/fold_<fold>``."""
    return Path(folder) / f"fold_{fold}"


def fold_config(config: ExperimentConfig, folder: str | os.PathLike, fold: int) -> ExperimentConfig:
    """The config of one fold's run: ``training.fold``, ``output_dir`` (the experiment folder) and ``run_name``."""
    training = replace(config.training, fold=fold, output_dir=str(folder), run_name=f"fold_{fold}")
    return replace(config, training=training)


def experiment_config_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The config as the manifest records it: resolved, without ``training.fold`` and ``training.run_name``."""
    mapping = json.loads(json.dumps(config_as_dict(config), default=list))
    for key in _PER_FOLD_KEYS:
        section, name = key.split(".")
        mapping[section].pop(name, None)
    return mapping


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in json.loads(json.dumps(mapping, default=list)).items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def _differing(saved: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...]) -> list[str]:
    return [key for key in changed_keys(saved, new) if not _matches(key, ignore + _PER_FOLD_KEYS)]


@contextmanager
def _manifest_lock(folder: Path) -> Iterator[None]:
    """Hold the experiment's lock file (blocking) while the manifest is read and rewritten."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def _fold_lock(folder: Path, fold: int) -> Iterator[None]:
    """Hold ``.fold_<k>.lock`` while fold ``k`` trains; released by the system even when the process is killed.

    Raises:
        FoldBusy: another process holds it.
    """
    with open(folder / f".fold_{fold}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FoldBusy(f"fold {fold} of {folder} is being trained by another process now; wait for it "
                           "(or stop it) before training that fold here") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["folds"], manifest["split"]["splits"], manifest["config"]  # noqa: B018 - shape check
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CrossValidationError(f"{path}: not a readable cross-validation manifest ({type(error).__name__}: "
                                   f"{error}); move it aside to start the experiment again") from error
    return manifest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _update_fold(folder: Path, fold: int, status: str, **fields: Any) -> None:
    """Set one fold's entry of the manifest (re-read under the lock, so other jobs' updates are kept)."""
    with _manifest_lock(folder):
        manifest = _read_manifest(folder)
        if manifest is None:
            raise CrossValidationError(f"{folder / MANIFEST} disappeared while the experiment was training")
        entry = manifest["folds"][fold]
        entry.update({"status": status, "best_epoch": None, "best_score": None, "message": None})
        entry.update(fields)
        entry["updated"] = _now()
        save_json_atomic(folder / MANIFEST, manifest)


# --- training --------------------------------------------------------------------------------------

def _new_manifest(config: ExperimentConfig, cache: Any, data: Path) -> dict[str, Any]:
    folds = config.split.folds
    splits = []
    for fold in range(folds):
        train_ids, val_ids = cache.split(fold)
        splits.append({"train": sorted(train_ids), "val": sorted(val_ids)})
    if len(splits) != folds:
        raise CrossValidationError(f"{cache.folder} holds {len(splits)} splits, expected {folds}")
    return {
        "format_version": FORMAT_VERSION,
        "model_name": config.model.name,
        "config": experiment_config_dict(config),
        "split": {"scheme": config.split.scheme, "folds": folds, "seed": config.split.seed,
                  "case_ids": sorted(cache.case_ids), "splits": splits},
        "data_dir": str(data.resolve()),
        "plan_hash": cache.plan.get("plan_hash"),
        "folds": [{"fold": fold, "run_folder": f"fold_{fold}", "status": "pending", "best_epoch": None,
                   "best_score": None, "message": None, "updated": _now()} for fold in range(folds)],
    }


def _refuse_rerun(path: Path, problems: list[str]) -> None:
    raise CrossValidationError(f"{path} records another experiment than this one: {'; '.join(problems)} "
                               "differ. Its folds were trained with the recorded settings, so train the "
                               "changed one as a new experiment (--experiment NEW); a rerun may change only "
                               f"{', '.join(RERUN_KEYS)}")


def _check_same_config(saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse a rerun whose config differs from the manifest's outside :data:`RERUN_KEYS`, naming each key."""
    keys = _differing(saved["config"], config, RERUN_KEYS)
    if keys:
        old, now = _flatten(saved["config"]), _flatten(config)
        _refuse_rerun(path, ["the config keys " + "; ".join(f"{key}: {old.get(key)!r} -> {now.get(key)!r}"
                                                             for key in keys)])


def _check_same_experiment(saved: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    """Refuse a rerun whose config, split or data differs from the manifest's, naming what differs."""
    _check_same_config(saved, new["config"], path)
    problems = []
    if saved["split"] != new["split"]:
        what = [key for key in ("scheme", "folds", "seed", "case_ids", "splits")
                if saved["split"].get(key) != new["split"].get(key)]
        problems.append("the split (" + ", ".join(f"split.{key}" for key in what) + ")")
    if saved.get("plan_hash") != new.get("plan_hash"):
        problems.append(f"the data (plan hash {saved.get('plan_hash')} -> {new.get('plan_hash')})")
    if problems:
        _refuse_rerun(path, problems)


def _finished_outcome(run: Path, epochs: int) -> tuple[int | None, float | None] | None:
    """``(best_epoch, best_score)`` when the run folder trained all ``epochs`` epochs, else ``None``."""
    try:
        records = json.loads((run / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(records, list) or not records or not (run / BEST_CHECKPOINT).is_file():
        return None
    if int(records[-1].get("epoch", 0)) < epochs:
        return None
    best_epoch = records[-1].get("best_epoch")
    best = next((r for r in records if r.get("epoch") == best_epoch), None)
    return best_epoch, (best or {}).get("mean_dice")


def _parse_folds(fold: int | str | None, folds: int) -> list[int]:
    if fold is None or fold == "all":
        return list(range(folds))
    try:
        index = int(fold)
    except (TypeError, ValueError):
        raise CrossValidationError(f"fold must be 'all' or a number from 0 to {folds - 1}, got {fold!r}") from None
    if not 0 <= index < folds:
        raise CrossValidationError(f"fold must be between 0 and {folds - 1} (split.folds is {folds}), got {index}")
    return [index]


def check_request(config: ExperimentConfig, experiment: str, fold: int | str | None = "all") -> tuple[Path, list[int]]:
    """The experiment folder and the fold indices to train, checked before any work.

    Raises:
        CrossValidationError: the split scheme is not ``kfold``, a bad experiment name or fold
            index, or several processes launched.
    """
    if config.split.scheme != "kfold":
        raise CrossValidationError(f"cross-validation needs split.scheme: kfold (with split.folds: k), but the "
                                   f"config has split.scheme: {config.split.scheme}; add --set split.scheme=kfold")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CrossValidationError("cross-validation trains its folds in one process on one device; launch it "
                                   "without accelerate/torchrun, or train one fold per job (--fold K)")
    return experiment_folder(config, experiment), _parse_folds(fold, config.split.folds)


def train_cross_validation(config: ExperimentConfig, experiment: str, *, fold: int | str | None = "all",
                           data_dir: str | os.PathLike | None = None, wandb: bool | None = None,
                           show_progress: bool = True) -> CrossValidationResult:
    """Train every fold of a k-fold experiment one after the other, or one fold; see the module docstring.

    Args:
        config: the experiment (``split.scheme: kfold``); ``training.fold`` and ``training.run_name``
            are ignored (each fold sets its own).
        experiment: the experiment's folder name under ``training.output_dir``.
        fold: ``"all"`` (or ``None``) for every fold in order, or one fold index.
        data_dir: raw KiTS19-layout folder (default ``config.data_dir``, then ``KITS19_DATA``).
        wandb: force wandb on or off for every fold (``None``: ``config.wandb.enabled``).
        show_progress: progress bars.

    Returns:
        The experiment folder and what happened to each requested fold (a fold another process
        is training is left alone: status ``running``, action ``busy``).

    Raises:
        CrossValidationError: the split scheme is not ``kfold``, a bad fold index or experiment
            name, several processes, or a rerun with another config, split or data than the manifest's.
        FoldBusy: the one fold asked for is being trained by another process.
        utils.training.engine.TrainingInterrupted: SIGTERM/SIGUSR1 arrived; the fold in training
            saved ``last.pt`` (its status is ``pending`` again) and a rerun continues it.
        utils.training.resume.ResumeRefused: an interrupted fold cannot be continued (its run folder
            was trained with other settings, or on other data).
        Exception: whatever stopped a fold's training (:func:`utils.training.engine.train`); that
            fold is recorded as ``failed`` and the remaining folds are not started.
    """
    folder, requested = check_request(config, experiment, fold)
    data = resolve_data_dir(data_dir if data_dir is not None else config.data_dir)
    config = replace(config, data_dir=str(data.resolve()))
    saved = _read_manifest(folder)
    if saved is not None:  # before the cache is prepared (which would rewrite its splits.json for this config)
        _check_same_config(saved, experiment_config_dict(config), folder / MANIFEST)
    with StopSignals() as stop:  # a stop request between folds stops before the next one
        cache = open_cache(prepare_training_cache(config, data, show_progress=show_progress))
        fresh = _new_manifest(config, cache, data)
        with _manifest_lock(folder):
            saved = _read_manifest(folder)
            if saved is None:
                save_json_atomic(folder / MANIFEST, fresh)
                logger.info("cross-validation %s: %d folds of %d cases, manifest %s", experiment,
                            config.split.folds, len(cache.case_ids), folder / MANIFEST)
            else:
                _check_same_experiment(saved, fresh, folder / MANIFEST)
        outcomes = []
        for index in requested:
            if stop.received:
                raise TrainingInterrupted(f"stopped by {stop.received} before fold {index}; rerun the same "
                                          "command to continue", folder, stop.received)
            outcomes.append(_train_fold(config, folder, index, data, single=len(requested) == 1, wandb=wandb,
                                        show_progress=show_progress))
    return CrossValidationResult(folder, tuple(outcomes))


def _train_fold(config: ExperimentConfig, folder: Path, index: int, data: Path, *, single: bool,
                wandb: bool | None, show_progress: bool) -> FoldOutcome:
    folds = config.split.folds
    run = fold_folder(folder, index)
    name = f"fold {index} ({index + 1} of {folds})"
    try:
        with _fold_lock(folder, index):
            done = _finished_outcome(run, config.training.epochs)
            manifest = _read_manifest(folder) or {"folds": [{}] * folds}
            if done is not None:
                if manifest["folds"][index].get("status") != "finished":  # finished, but not yet recorded
                    _update_fold(folder, index, "finished", best_epoch=done[0], best_score=done[1])
                logger.info("%s: already finished (best epoch %s, mean Dice %s), skipped: %s", name, done[0],
                            done[1], run)
                return FoldOutcome(index, run, "finished", "skipped", *done)
            resume = auto_resume_folder(run)
            action = "resumed" if resume is not None else "trained"
            logger.info("%s: %s in %s", name, "continuing from last.pt" if resume is not None else "starting", run)
            _update_fold(folder, index, "running", message=f"pid {os.getpid()}")
            run_config = fold_config(config, folder, index)
            if resume is not None:  # as --auto-resume: the run folder's own output_dir (it may have moved since)
                saved = load_experiment_config(run / CONFIG_FILE)
                run_config = replace(run_config, training=replace(run_config.training,
                                                                  output_dir=saved.training.output_dir))
            try:
                result = train(run_config, data_dir=data, resume=resume, wandb=wandb, show_progress=show_progress)
            except TrainingInterrupted as error:
                _update_fold(folder, index, "pending", message=f"{error}")
                raise
            except ResumeRefused as error:
                _update_fold(folder, index, "failed", message=f"{error}")
                raise
            except Exception as error:
                _update_fold(folder, index, "failed", message=f"{type(error).__name__}: {error}")
                logger.error("%s: failed: %s", name, error)
                raise
            _update_fold(folder, index, "finished", best_epoch=result.best_epoch, best_score=result.best_score)
            logger.info("%s: finished, best epoch %s (%s on the cache grid: %s): %s", name, result.best_epoch,
                        describe_selection_score(run_config.dataset), result.best_score, run)
            return FoldOutcome(index, run, "finished", action, result.best_epoch, result.best_score)
    except FoldBusy as error:
        if single:
            raise
        logger.warning("%s: %s", name, error)
        return FoldOutcome(index, run, "running", "busy")


# --- reading ---------------------------------------------------------------------------------------

def load_cross_validation(folder: str | os.PathLike) -> CrossValidation:
    """Read a cross-validation experiment folder and check its folds belong together.

    Args:
        folder: ``<training.output_dir>/<experiment>`` (holding ``cross_validation.json``).

    Returns:
        The experiment (see the module docstring for every field).

    Raises:
        CrossValidationError: no (readable) manifest; a fold folder that should exist is missing
            (or a finished fold has no ``best.pt``); a fold trained with another config or split
            (the differing keys are named) or on other data (plan hash); no fold finished yet.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise CrossValidationError(f"{folder} is not a cross-validation experiment folder (no {MANIFEST}); train "
                                   "it with scripts/cross_validate.py --config CONFIG --experiment NAME")
    split, config = manifest["split"], manifest["config"]
    if len(manifest["folds"]) != len(split["splits"]):
        raise CrossValidationError(f"{folder / MANIFEST}: {len(manifest['folds'])} fold entries for "
                                   f"{len(split['splits'])} splits")
    folds = []
    for index, entry in enumerate(manifest["folds"]):
        status = entry.get("status", "pending")
        if status not in STATUSES:
            raise CrossValidationError(f"{folder / MANIFEST}: fold {index} has an unknown status {status!r}")
        run = folder / entry.get("run_folder", f"fold_{index}")
        if status != "pending" and not run.is_dir():
            raise CrossValidationError(f"the folder of fold {index}, {run}, is missing (the manifest says the fold "
                                       f"is {status}); restore it, or retrain that fold")
        if status == "finished" and not (run / BEST_CHECKPOINT).is_file():
            raise CrossValidationError(f"fold {index} is finished but {run / BEST_CHECKPOINT} is missing; restore "
                                       "it, or retrain that fold")
        if (run / CONFIG_FILE).is_file():
            _check_fold_folder(folder, run, index, manifest, finished=status == "finished")
        fold_split = split["splits"][index]
        folds.append(FoldRun(index, run, status, tuple(fold_split["train"]), tuple(fold_split["val"]),
                             entry.get("best_epoch") if status == "finished" else None,
                             entry.get("best_score") if status == "finished" else None))
    if not any(fold.status == "finished" for fold in folds):
        listing = ", ".join(f"fold {fold.fold}: {fold.status}" for fold in folds)
        raise CrossValidationError(f"{folder} has no finished fold yet ({listing}); train it with "
                                   "scripts/cross_validate.py before evaluating it")
    return CrossValidation(folder, str(manifest.get("model_name")), tuple(folds), split, config,
                           manifest.get("data_dir"), manifest.get("plan_hash"))


def _check_fold_folder(folder: Path, run: Path, index: int, manifest: dict[str, Any], *, finished: bool) -> None:
    """Refuse a fold run folder trained with another config, fold, split or data than the manifest's."""
    try:
        fold_run = load_experiment_config(run / CONFIG_FILE)
    except (OSError, ValueError) as error:
        raise CrossValidationError(f"{run / CONFIG_FILE} cannot be read ({error})") from error
    if fold_run.training.fold != index:
        raise CrossValidationError(f"{run} trained fold {fold_run.training.fold}, but the manifest has it as fold "
                                   f"{index}: the folds of {folder} do not belong together")
    ignore = RERUN_KEYS if finished else RERUN_KEYS + RESUMABLE_KEYS  # an unfinished fold may still be extended
    keys = _differing(manifest["config"], experiment_config_dict(fold_run), ignore)
    if keys:
        kind = "split" if all(key.startswith("split.") for key in keys) else "config"
        raise CrossValidationError(f"fold {index} ({run}) was trained with another {kind} than the other folds "
                                   f"of {folder} ({', '.join(keys)} differ from {MANIFEST}); the folds cannot be "
                                   "compared or combined: retrain that fold, or train a new experiment")
    record = read_data_record(run)
    if record is not None and record.get("plan_hash") and manifest.get("plan_hash") \
            and record["plan_hash"] != manifest["plan_hash"]:
        raise CrossValidationError(f"fold {index} ({run}) was trained on other data than the other folds of "
                                   f"{folder} (plan hash {record['plan_hash']} in its {DATA_RECORD}, "
                                   f"{manifest['plan_hash']} in {MANIFEST}), so its split differs: retrain it")
