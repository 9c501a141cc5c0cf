"""Optuna hyperparameter search over an experiment config: every trial is one short training run.

A search YAML (:class:`~utils.config.search.SearchConfig`) names a base experiment (e.g. ``configs/unetr2d.yaml``),
overrides applied to every trial and to the best config (``experiment_overrides``), overrides
that make trials short (``trial_overrides``, trials only) and the search space: ``section.key``
entries with a range or a list of choices. :func:`run_search` maximises the best validation
``mean_dice`` (mean of the per-case region Dice, KiTS19 kidney and tumour; the score ``best.pt`` follows) with a
seeded TPE sampler; a median pruner stops a trial whose validation score at an epoch is below
the median of earlier trials at that epoch.

The study folder ``output_dir/<study_name>/`` holds ``study.db`` (the SQLite storage unless
another is given), ``search_config.yaml``, ``search.log``, ``trials/trial_NNNN/`` (one run folder
per trial: the study and the trial number name it, so workers never share one), ``workers/``
(one lock file per worker) and ``results.csv``, ``best_config.yaml`` (a full experiment config
for the experiment's training script), ``optimization_history.html``/``.png`` and
``param_importances.html``/``.png``. Every report is rewritten whole, atomically, from the
study's storage (the single source of truth), so workers finishing at once never mix rows.

Storages (:func:`open_storage`): SQLite (the default) for one worker; ``journal:<path>`` (an
Optuna journal file) for several workers on a shared file system; an Optuna RDB URL
(``postgresql://...``, ``mysql://...``) for several workers on a database server. Workers
started with the same command share the study: each asks the storage for the next trial (a
queued retry first), and stops once the study holds the trials asked for; a worker does not
start a trial while the running ones would already reach that number (it waits, in case one
of them dies). Two workers choosing at the same instant can still overshoot by one trial each.

Killed trials: a trial killed mid-run (SIGKILL, power loss, a lost node) stays "running" in the
storage. With SQLite or a database server, trials record heartbeats; one silent for
``grace_seconds`` is failed and a retry with the same parameters is queued, which continues the
killed run from its ``last.pt`` (a search started while some trial is running first waits
``grace_seconds + 1``, so a killed one goes stale). Optuna's journal storage has no heartbeats:
each worker holds an exclusive ``fcntl.flock`` on its lock file in ``workers/`` while it lives,
and records that file on its trials; a running trial whose worker lock can be taken belongs to
a dead worker and is failed and retried the same way (this needs ``flock`` to work across the
machines sharing the file system, as on NFSv4 and Lustre/GPFS mounted with locking). Ctrl-C,
SIGTERM and SIGUSR1 queue the retry at once.
"""

from __future__ import annotations

import copy
import csv
import fcntl
import io
import json
import logging
import os
import socket
import threading
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from utils.config.experiment import load_experiment_config
from utils.config.loading import config_as_dict
from utils.config.search import PrunerConfig, SearchConfig, build_trial_experiment, parameter_overrides
from utils.data.nifti_io import write_bytes_atomic
from utils.networks.checkpoints import load_checkpoint
from utils.training.engine import NonFiniteLossError, TrainingInterrupted, train
from utils.training.run_folder import PROGRESS_FILE, attach_text_log, detach_text_log

logger = logging.getLogger(__name__)

OBJECTIVE = "mean_dice"
STUDY_DB, SEARCH_CONFIG, TRIALS, WORKERS = "study.db", "search_config.yaml", "trials", "workers"
#: ``--storage journal`` without a path: this file in the study folder.
JOURNAL_FILE = "study.journal"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Settings a resumed study must share with the run that started it.
STUDY_DEFINITION = ("experiment", "experiment_overrides", "trial_overrides", "space")


class SearchStopped(RuntimeError):
    """SIGTERM or SIGUSR1 asked the worker to stop between trials (a running trial's retry is queued)."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name} between trials")
        self.signal_name = signal_name


class StopRequest:
    """A stop asked by signal outside a training (the training handles its own): set by the script's handler."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None

    def set(self, signal_name: str) -> None:
        """Record the first signal's name and wake a waiting worker."""
        self.signal_name = self.signal_name or signal_name
        self.event.set()

    def check(self) -> None:
        """Raise :class:`SearchStopped` once a stop was asked."""
        if self.event.is_set():
            raise SearchStopped(self.signal_name or "a signal")


class WorkerLock:
    """This worker's lock file ``<study>/workers/<host>-<pid>-<id>.lock``, held (``fcntl.flock``) while it lives.

    Its trials record the file's name (user attribute ``worker_lock``): another worker that can
    take the lock of a running trial knows the trial's worker is dead (see :func:`recover_dead_trials`).
    """

    def __init__(self, folder: Path) -> None:
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.lock"
        (folder / WORKERS).mkdir(parents=True, exist_ok=True)
        self.path = folder / WORKERS / self.name
        self._handle = open(self.path, "a+")  # noqa: SIM115 - held for the worker's life
        fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._handle.write(f"{self.identity} {datetime.now(tz=timezone.utc).isoformat()}\n")
        self._handle.flush()
        #: Locks of dead workers this worker took over; held, so no other worker fails their trials again.
        self.taken: dict[str, Any] = {}

    def close(self) -> None:
        """Release this worker's lock and those it took over."""
        for handle in (self._handle, *self.taken.values()):
            handle.close()
        self.taken.clear()


class TrialObjective:
    """Optuna objective: train one trial, report each validation ``mean_dice``, return the best one."""

    def __init__(self, config: SearchConfig, study_folder: Path, *, data_dir: str | Path | None = None,
                 show_progress: bool = True, worker: WorkerLock | None = None,
                 stop: StopRequest | None = None) -> None:
        """Args: the search, its study folder (trials go to ``trials/``), the raw data folder, tqdm bars,
        this worker's lock (recorded on each trial) and its stop request (checked before training)."""
        self.config, self.study_folder = config, study_folder
        self.data_dir, self.show_progress = data_dir, show_progress
        self.worker, self.stop = worker, stop

    def __call__(self, trial: optuna.Trial) -> float:
        """Run the trial (continuing a killed predecessor's run folder); raises ``optuna.TrialPruned`` to prune."""
        trial.set_user_attr("worker", self.worker.identity if self.worker else f"{socket.gethostname()}:{os.getpid()}")
        if self.worker is not None:
            trial.set_user_attr("worker_lock", self.worker.name)
        values = {parameter.key: parameter.suggest(trial) for parameter in self.config.space}
        overrides = parameter_overrides(self.config, values)
        resume = _resumable_folder(trial)
        run_folder = resume or self.study_folder / TRIALS / f"trial_{trial.number:04d}"
        experiment = build_trial_experiment(self.config, overrides, run_folder)
        trial.set_user_attr("run_folder", str(run_folder))
        trial.set_user_attr("overrides", overrides)
        if self.stop is not None and self.stop.event.is_set():
            _queue_retry(trial, self.config.max_retries)
            raise SearchStopped(self.stop.signal_name or "a signal")
        if resume is not None:
            _report_history(trial, resume)
        try:
            result = train(experiment, data_dir=self.data_dir, resume=resume, show_progress=self.show_progress,
                           epoch_callback=lambda record: _report_epoch(trial, record))
        except NonFiniteLossError as error:
            trial.set_user_attr("failure", str(error))
            raise
        except (KeyboardInterrupt, TrainingInterrupted):  # Ctrl-C, or SIGTERM/SIGUSR1 after saving last.pt
            _queue_retry(trial, self.config.max_retries)
            raise
        if result.best_score is None:
            raise ValueError(f"trial {trial.number}: no validation {OBJECTIVE} in {run_folder}; the validation set "
                             "may be empty: check split.validation_fraction and training.max_validation_cases")
        return float(result.best_score)


def _report_epoch(trial: optuna.Trial, record: dict[str, Any]) -> None:
    """Report a validation epoch's ``mean_dice`` at step = epoch; prune when the pruner says so."""
    score = record.get(OBJECTIVE)
    if score is None:
        return
    trial.report(float(score), int(record["epoch"]))
    if trial.should_prune():
        raise optuna.TrialPruned(f"{OBJECTIVE} {score:.4f} at epoch {record['epoch']} is below the median "
                                 "of earlier trials")


def _resumable_folder(trial: optuna.Trial) -> Path | None:
    """The run folder a retried trial inherited from the killed one, when it has a ``last.pt``."""
    folder = trial.user_attrs.get("run_folder")
    return Path(folder) if folder and (Path(folder) / "last.pt").is_file() else None


def _report_history(trial: optuna.Trial, folder: Path) -> None:
    """Report the killed run's validation scores up to its checkpoint, then prune if they already say so."""
    epoch = int(load_checkpoint(folder / "last.pt")["epoch"])
    records = json.loads((folder / PROGRESS_FILE).read_text()) if (folder / PROGRESS_FILE).is_file() else []
    logger.info("trial %d continues %s from epoch %d", trial.number, folder, epoch)
    for record in records:
        if record["epoch"] <= epoch:
            _report_epoch(trial, record)


def _queue_retry(trial: optuna.Trial, max_retries: int) -> None:
    """Queue a retry of an interrupted trial (same parameters and run folder), as for a killed one."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    _enqueue_retry(trial.study, frozen, max_retries)


def _enqueue_retry(study: optuna.Study, failed: FrozenTrial, max_retries: int) -> None:
    """Queue ``failed`` again (parameters, run folder; not its worker), unless retried ``max_retries`` times."""
    failed = copy.deepcopy(failed)
    failed.user_attrs = {k: v for k, v in failed.user_attrs.items() if k not in ("worker", "worker_lock")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retries)(study, failed)


@dataclass(frozen=True)
class SearchResult:
    """What :func:`run_search` left in the study folder; ``best_*`` are ``None`` without a complete trial."""

    study_folder: Path
    finished_trials: int
    best_trial: int | None
    best_value: float | None
    files: tuple[Path, ...]


def study_folder(config: SearchConfig) -> Path:
    """The study folder, ``output_dir/<study_name>``."""
    return Path(config.output_dir) / config.study_name


def open_storage(config: SearchConfig, storage: str | None = None) -> optuna.storages.BaseStorage:
    """The study's storage for ``--storage``.

    - ``None``: SQLite, ``<study folder>/study.db`` (one worker at a time);
    - ``journal:<path>`` (``journal`` alone: ``<study folder>/study.journal``): an Optuna journal
      file, for several workers on a shared file system (dead workers found by lock files);
    - any other text: an Optuna RDB URL (``postgresql://user@host/db``, ``mysql+pymysql://...``),
      for several workers on a database server.

    SQLite and RDB trials record heartbeats every ``heartbeat_seconds``; one silent for
    ``grace_seconds`` is failed and retried (up to ``max_retries`` times) with the same parameters.
    """
    if storage is not None and (storage == "journal" or storage.startswith("journal:")):
        path = Path(storage[len("journal:"):] or study_folder(config) / JOURNAL_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.journal.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    url = storage or f"sqlite:///{(study_folder(config) / STUDY_DB).resolve()}"
    with warnings.catch_warnings():  # heartbeats and retries are marked experimental in optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=config.max_retries)
        return optuna.storages.RDBStorage(url, heartbeat_interval=config.heartbeat_seconds,
                                          grace_period=config.grace_seconds, heartbeat_stale_trial_callback=retry)


def uses_heartbeats(study: optuna.Study) -> bool:
    """Whether the study's storage finds killed trials by heartbeat (SQLite, RDB), not by worker lock (journal)."""
    return isinstance(study._storage, optuna.storages.RDBStorage)


def _sampler(config: SearchConfig, trials_in_study: int, worker_rank: int = 0) -> optuna.samplers.TPESampler:
    """TPE seeded by ``sampler_seed``, the trials already in the study and the worker's rank (1000 apart)."""
    return optuna.samplers.TPESampler(seed=config.sampler_seed + trials_in_study + 1000 * worker_rank,
                                      n_startup_trials=config.sampler_startup_trials)


def open_study(config: SearchConfig, storage: str | None = None) -> optuna.Study:
    """Create the study, or load it to continue (storage: :func:`open_storage`).

    The study keeps its definition (experiment, overrides, space) as a user attribute.

    Raises:
        ValueError: the study exists with another definition (its trials would not be comparable).
    """
    study_folder(config).mkdir(parents=True, exist_ok=True)
    backend = open_storage(config, storage)
    try:
        existing = len(optuna.load_study(study_name=config.study_name, storage=backend).trials)
    except KeyError:
        existing = 0
    study = optuna.create_study(storage=backend, study_name=config.study_name, direction="maximize",
                                sampler=_sampler(config, existing), pruner=build_pruner(config.pruner),
                                load_if_exists=True)
    resolved = json.loads(json.dumps(config_as_dict(config)))
    definition = {key: resolved[key] for key in STUDY_DEFINITION}
    started = study.user_attrs.get("definition")
    if started is None:
        study.set_user_attr("definition", definition)
    elif changed := [key for key in STUDY_DEFINITION if started.get(key) != definition[key]]:
        where = storage or f"sqlite:///{study_folder(config) / STUDY_DB}"
        raise ValueError(f"study {config.study_name} ({where}) was started with other {changed}: its trials would "
                         f"not be comparable. Restore them, or choose another study_name (--study-name)")
    return study


def build_pruner(config: PrunerConfig) -> optuna.pruners.MedianPruner:
    """The median pruner; steps are epochs, values the validation ``mean_dice`` of each validation epoch."""
    return optuna.pruners.MedianPruner(n_startup_trials=config.n_startup_trials, n_warmup_steps=config.n_warmup_steps)


def recover_killed_trials(study: optuna.Study, grace_seconds: int, stop: StopRequest | None = None) -> None:
    """Fail and queue for retry the trials a killed search left "running" (heartbeat storages).

    Waits ``grace_seconds + 1`` first (only when some trial is marked running), so a trial whose
    process died is stale while one still running in another process keeps its heartbeat.
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return
    logger.info("trial(s) %s marked running: waiting %d s to tell killed runs from live ones",
                [t.number for t in running], grace_seconds + 1)
    (stop.event if stop is not None else threading.Event()).wait(grace_seconds + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def recover_dead_trials(study: optuna.Study, folder: Path, worker: WorkerLock, *, grace_seconds: int,
                        max_retries: int) -> list[int]:
    """Journal storage: fail and queue for retry the running trials whose worker is dead; returns their numbers.

    A trial's worker is dead when its lock file (user attribute ``worker_lock``) can be locked;
    a running trial without one (its worker died between taking it and starting it) is dead
    once it started more than ``grace_seconds`` ago. The taken locks stay held by ``worker``.
    """
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        name = trial.user_attrs.get("worker_lock")
        if name == worker.name:
            continue
        if name is None:
            start = trial.datetime_start
            now = datetime.now(tz=start.tzinfo) if start is not None else None
            if start is None or (now - start).total_seconds() <= grace_seconds:
                continue
        elif name not in worker.taken:
            handle = open(folder / WORKERS / name, "a+")  # noqa: SIM115 - kept while this worker lives
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue  # its worker lives
            worker.taken[name] = handle
        try:
            failed = study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            failed = False
        if failed:
            logger.warning("trial %d: its worker %s is dead; queueing a retry from its last.pt",
                           trial.number, trial.user_attrs.get("worker", "?"))
            _enqueue_retry(study, study._storage.get_trial(trial._trial_id), max_retries)
            recovered.append(trial.number)
    return recovered


def _recover(study: optuna.Study, config: SearchConfig, folder: Path, worker: WorkerLock) -> None:
    if uses_heartbeats(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    else:
        recover_dead_trials(study, folder, worker, grace_seconds=config.grace_seconds, max_retries=config.max_retries)


def run_search(config: SearchConfig, *, trials: int, storage: str | None = None, data_dir: str | Path | None = None,
               show_progress: bool = True, worker_rank: int = 0, stop: StopRequest | None = None) -> SearchResult:
    """Run (or continue, or join) the search until ``trials`` trials are finished, then write the reports.

    Several processes running this on the same study and storage (journal file or database
    server) share the work; see the module docstring.

    Args:
        config: the search (:func:`load_search_config`).
        trials: finished (complete or pruned) trials wanted in the study, counting earlier runs' and
            other workers'.
        storage: see :func:`open_storage` (default ``sqlite:///<study folder>/study.db``).
        data_dir: raw KiTS19-layout folder for every trial (default: the experiment's ``data_dir``).
        show_progress: the trainings' tqdm bars.
        worker_rank: this worker's index among those started together (varies its sampler seed).
        stop: set by the caller's signal handler; checked before each trial and while waiting.

    Raises:
        ValueError: ``trials`` < 1, the study was started with another definition, or a trial's
            settings or data were refused (that trial is marked failed).
        RuntimeError: ``max_failed_trials`` trials failed with a non-finite loss.
        SearchStopped: ``stop`` was set between trials.
        TrainingInterrupted: a stop signal during a trial's training (its ``last.pt`` is saved and
            its retry queued).
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stop = stop or StopRequest()
    study = open_study(config, storage)
    folder = study_folder(config)
    resolved = json.loads(json.dumps(config_as_dict(config)))
    write_bytes_atomic(folder / SEARCH_CONFIG, yaml.safe_dump(resolved, sort_keys=False).encode("utf-8"))
    handler = attach_text_log(folder, "search.log")
    worker = WorkerLock(folder)
    try:
        logger.info("worker %s (rank %d) joins study %s in %s", worker.identity, worker_rank, config.study_name,
                    folder)
        if uses_heartbeats(study):
            recover_killed_trials(study, config.grace_seconds, stop)
        objective = TrialObjective(config, folder, data_dir=data_dir, show_progress=show_progress, worker=worker,
                                   stop=stop)
        callbacks = [_log_trial, _failure_limit(config.max_failed_trials)]
        poll = min(config.heartbeat_seconds, 5)
        waiting_logged = False
        while True:
            stop.check()
            _recover(study, config, folder, worker)
            all_trials = study.get_trials(deepcopy=False)
            states = Counter(t.state for t in all_trials)
            finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
            if finished >= trials:
                logger.info("study %s: %d of %d trials finished", config.study_name, finished, trials)
                break
            if not states[TrialState.WAITING] and finished + states[TrialState.RUNNING] >= trials:
                if not waiting_logged:
                    logger.info("%d trials finished and %d running in other workers: waiting for them",
                                finished, states[TrialState.RUNNING])
                    waiting_logged = True
                stop.event.wait(poll)
                continue
            waiting_logged = False
            study.sampler = _sampler(config, len(all_trials), worker_rank)
            study.optimize(objective, n_trials=1, catch=(NonFiniteLossError,), callbacks=callbacks)
            write_results_table(study, config, folder / "results.csv")
        return write_search_reports(study, config, folder)
    finally:
        worker.close()
        detach_text_log(handler)


def _log_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """One line per finished trial: number, state, value, parameters."""
    score = "no value" if trial.value is None else f"{OBJECTIVE} {trial.value:.4f}"
    params = ", ".join(f"{key}={value}" for key, value in trial.params.items())
    best = _best_trial(study)
    logger.info("trial %d %s: %s | %s | best so far: %s", trial.number, trial.state.name, score, params,
                "none" if best is None else f"trial {best.number} ({best.value:.4f})")


def _failure_limit(limit: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """A callback stopping the search once ``limit`` trials failed with a non-finite loss."""
    def check(study: optuna.Study, trial: FrozenTrial) -> None:
        failed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                  if t.user_attrs.get("failure")]
        if len(failed) >= limit:
            raise RuntimeError(f"trials {failed} failed with a non-finite loss (max_failed_trials={limit}): narrow "
                               "the space (e.g. a lower optimiser.learning_rate high) or raise max_failed_trials")
    return check


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


def write_search_reports(study: optuna.Study, config: SearchConfig, folder: Path) -> SearchResult:
    """Write ``results.csv``, ``best_config.yaml`` and the figures into ``folder`` (each atomically)."""
    files = [write_results_table(study, config, folder / "results.csv")]
    best = _best_trial(study)
    if best is None:
        logger.warning("no complete trial: best_config.yaml and the figures are not written")
    else:
        files.append(write_best_config(config, best, folder / "best_config.yaml", study.study_name))
        files += write_search_figures(study, folder)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    return SearchResult(folder, finished, None if best is None else best.number,
                        None if best is None else best.value, tuple(files))


def write_results_table(study: optuna.Study, config: SearchConfig, path: Path) -> Path:
    """One CSV row per trial: number, state, mean_dice, best and last validated epoch, parameters, run folder."""
    keys = [parameter.key for parameter in config.space]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["number", "state", OBJECTIVE, "best_epoch", "last_epoch", *keys, "retry_of", "run_folder",
                     "duration_s"])
    for trial in study.get_trials(deepcopy=False):
        steps = trial.intermediate_values
        best_epoch = max(sorted(steps), key=lambda step: steps[step]) if steps else None
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        writer.writerow([trial.number, trial.state.name, trial.value, best_epoch, max(steps, default=None),
                         *[trial.params.get(key) for key in keys], trial.system_attrs.get("failed_trial"),
                         trial.user_attrs.get("run_folder"), None if duration is None else round(duration, 1)])
    write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))
    return path


def write_best_config(config: SearchConfig, best: FrozenTrial, path: Path, study_name: str) -> Path:
    """The best trial's experiment: base + ``experiment_overrides`` + its parameters (not the trial overrides).

    ``training.run_name`` is null (a new dated run) and ``training.output_dir`` the base's.
    """
    values = {parameter.key: parameter.decode(best.params[parameter.key]) for parameter in config.space}
    experiment = load_experiment_config(config.experiment, (*config.experiment_overrides,
                                                            *parameter_overrides(config, values),
                                                            "training.run_name=null"))
    header = (f"# Best trial {best.number} of study {study_name}: {OBJECTIVE} {best.value:.4f} in a short trial "
              f"({', '.join(config.trial_overrides) or 'no trial overrides'}).\n"
              f"# {config.experiment} + experiment_overrides + {', '.join(parameter_overrides(config, values))}\n")
    body = yaml.safe_dump(json.loads(json.dumps(config_as_dict(experiment))), sort_keys=False)
    write_bytes_atomic(path, (header + body).encode("utf-8"))
    return path


def write_search_figures(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances, as HTML (plotly) and PNG (matplotlib)."""
    from optuna import visualization

    written = _save_figure_pair(folder / "optimization_history", visualization.plot_optimization_history,
                                visualization.matplotlib.plot_optimization_history, study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [key for key in complete[0].params if len({repr(t.params.get(key)) for t in complete}) > 1]
    if len(complete) < 2 or not varied:
        logger.warning("param_importances not drawn: it needs at least 2 complete trials with different parameters, "
                       "the study has %d complete trial(s)%s", len(complete), "" if varied else ", all alike")
        return written
    return written + _save_figure_pair(folder / "param_importances", visualization.plot_param_importances,
                                       visualization.matplotlib.plot_param_importances, study)


def _save_figure_pair(stem: Path, plot_plotly: Callable[..., Any], plot_matplotlib: Callable[..., Any],
                      study: optuna.Study) -> list[Path]:
    """Write ``stem.html`` (self-contained plotly) and ``stem.png`` (matplotlib) atomically."""
    import matplotlib.pyplot as plt

    html = stem.with_suffix(".html")
    page = plot_plotly(study, target_name=OBJECTIVE).to_html(include_plotlyjs=True, full_html=True)
    write_bytes_atomic(html, page.encode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figure = plot_matplotlib(study, target_name=OBJECTIVE).figure
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    png = stem.with_suffix(".png")
    write_bytes_atomic(png, buffer.getvalue())
    return [html, png]
