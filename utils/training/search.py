"""Optuna hyperparameter search over an experiment config: every trial is one short training run.

A search YAML (:class:`~utils.config.search.SearchConfig`) names a base experiment (e.g. ``configs/unetr2d.yaml``),
overrides applied to every trial and to the best config (``experiment_overrides``), overrides
that make trials short (``trial_overrides``, trials only) and the search space: ``section.key``
entries with a range or a list of choices. :func:`run_search` maximises the best validation
``mean_dice`` (mean of per-case kidney and tumour Dice, the score ``best.pt`` follows) with a
seeded TPE sampler; a median pruner stops a trial whose validation score at an epoch is below
the median of earlier trials at that epoch.

The study folder ``output_dir/<study_name>/`` holds ``study.db`` (the SQLite storage unless
another is given), ``search_config.yaml``, ``search.log``, ``trials/trial_NNNN/`` (one run folder
per trial), and at the end ``results.csv``, ``best_config.yaml`` (a full experiment config for
``scripts/train_unetr.py --config``), ``optimization_history.html``/``.png`` and
``param_importances.html``/``.png``.

Resuming: run the same search again. A trial killed mid-run (SIGKILL, power loss) stays
"running" in the storage without heartbeats; at start-up the search waits ``grace_seconds + 1``
so such trials go stale, Optuna marks them failed and queues a retry with the same parameters,
which continues the killed run from its ``last.pt``. Ctrl-C queues the retry at once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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
STUDY_DB, SEARCH_CONFIG, TRIALS = "study.db", "search_config.yaml", "trials"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Settings a resumed study must share with the run that started it.
STUDY_DEFINITION = ("experiment", "experiment_overrides", "trial_overrides", "space")


class TrialObjective:
    """Optuna objective: train one trial, report each validation ``mean_dice``, return the best one."""

    def __init__(self, config: SearchConfig, study_folder: Path, *, data_dir: str | Path | None = None,
                 show_progress: bool = True) -> None:
        """Args: the search, its study folder (trials go to ``trials/``), the raw data folder, tqdm bars."""
        self.config, self.study_folder = config, study_folder
        self.data_dir, self.show_progress = data_dir, show_progress

    def __call__(self, trial: optuna.Trial) -> float:
        """Run the trial (continuing a killed predecessor's run folder); raises ``optuna.TrialPruned`` to prune."""
        values = {parameter.key: parameter.suggest(trial) for parameter in self.config.space}
        overrides = parameter_overrides(self.config, values)
        resume = _resumable_folder(trial)
        run_folder = resume or self.study_folder / TRIALS / f"trial_{trial.number:04d}"
        experiment = build_trial_experiment(self.config, overrides, run_folder)
        trial.set_user_attr("run_folder", str(run_folder))
        trial.set_user_attr("overrides", overrides)
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retries)(trial.study, frozen)


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


def open_study(config: SearchConfig, storage: str | None = None) -> optuna.Study:
    """Create the study, or load it to continue (default storage ``sqlite:///<study folder>/study.db``).

    Trials record heartbeats; one silent for ``grace_seconds`` is failed and retried (up to
    ``max_retries`` times) with the same parameters. The study keeps its definition (experiment,
    overrides, space) as a user attribute.

    Raises:
        ValueError: the study exists with another definition (its trials would not be comparable).
    """
    study_folder(config).mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(study_folder(config) / STUDY_DB).resolve()}"
    with warnings.catch_warnings():  # heartbeats and retries are marked experimental in optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=config.max_retries)
        rdb = optuna.storages.RDBStorage(url, heartbeat_interval=config.heartbeat_seconds,
                                         grace_period=config.grace_seconds, heartbeat_stale_trial_callback=retry)
    try:
        existing = len(optuna.load_study(study_name=config.study_name, storage=rdb).trials)
    except KeyError:
        existing = 0
    sampler = optuna.samplers.TPESampler(seed=config.sampler_seed + existing,
                                         n_startup_trials=config.sampler_startup_trials)
    study = optuna.create_study(storage=rdb, study_name=config.study_name, direction="maximize", sampler=sampler,
                                pruner=build_pruner(config.pruner), load_if_exists=True)
    resolved = json.loads(json.dumps(config_as_dict(config)))
    definition = {key: resolved[key] for key in STUDY_DEFINITION}
    started = study.user_attrs.get("definition")
    if started is None:
        study.set_user_attr("definition", definition)
    elif changed := [key for key in STUDY_DEFINITION if started.get(key) != definition[key]]:
        raise ValueError(f"study {config.study_name} ({url}) was started with other {changed}: its trials would not "
                         f"be comparable. Restore them, or choose another study_name (--study-name)")
    return study


def build_pruner(config: PrunerConfig) -> optuna.pruners.MedianPruner:
    """The median pruner; steps are epochs, values the validation ``mean_dice`` of each validation epoch."""
    return optuna.pruners.MedianPruner(n_startup_trials=config.n_startup_trials, n_warmup_steps=config.n_warmup_steps)


def recover_killed_trials(study: optuna.Study, grace_seconds: int) -> None:
    """Fail and queue for retry the trials a killed search left "running".

    Waits ``grace_seconds + 1`` first (only when some trial is marked running), so a trial whose
    process died is stale while one still running in another process keeps its heartbeat.
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return
    logger.info("trial(s) %s marked running: waiting %d s to tell killed runs from live ones",
                [t.number for t in running], grace_seconds + 1)
    time.sleep(grace_seconds + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_search(config: SearchConfig, *, trials: int, storage: str | None = None, data_dir: str | Path | None = None,
               show_progress: bool = True) -> SearchResult:
    """Run (or continue) the search until ``trials`` trials are finished, then write the reports.

    Args:
        config: the search (:func:`load_search_config`).
        trials: finished (complete or pruned) trials wanted in the study, counting earlier runs'.
        storage: an Optuna RDB URL (default ``sqlite:///<study folder>/study.db``).
        data_dir: raw KiTS19-layout folder for every trial (default: the experiment's ``data_dir``).
        show_progress: the trainings' tqdm bars.

    Raises:
        ValueError: ``trials`` < 1, the study was started with another definition, or a trial's
            settings or data were refused (that trial is marked failed).
        RuntimeError: ``max_failed_trials`` trials failed with a non-finite loss.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(config, storage)
    folder = study_folder(config)
    resolved = json.loads(json.dumps(config_as_dict(config)))
    write_bytes_atomic(folder / SEARCH_CONFIG, yaml.safe_dump(resolved, sort_keys=False).encode("utf-8"))
    handler = attach_text_log(folder, "search.log")
    try:
        recover_killed_trials(study, config.grace_seconds)
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        logger.info("study %s in %s: %d of %d trials finished", config.study_name, folder, finished, trials)
        if finished < trials:
            objective = TrialObjective(config, folder, data_dir=data_dir, show_progress=show_progress)
            callbacks = [optuna.study.MaxTrialsCallback(trials, states=FINISHED), _log_trial,
                         _failure_limit(config.max_failed_trials)]
            study.optimize(objective, catch=(NonFiniteLossError,), callbacks=callbacks)
        return write_search_reports(study, config, folder)
    finally:
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
