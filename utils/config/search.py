"""The search space and settings of a hyperparameter search (see :mod:`utils.training.search`).

A search YAML becomes a :class:`SearchConfig`: the base experiment, the overrides for every
trial and for the best config, the overrides that make trials short, and the searched settings
(:class:`SearchParameter`: a numeric range or a list of choices, keyed ``section.key``). Every
entry is checked against the experiment when the file is loaded, so a wrong key or type fails
before the first trial.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from utils.config.experiment import ExperimentConfig, load_experiment_config
from utils.config.loading import load_config, parse_override

#: Settings each trial's run folder takes; neither the space nor the overrides may set them.
RUN_FOLDER_KEYS = ("training.output_dir", "training.run_name")


def format_yaml_value(value: Any) -> str:
    """One-line YAML text of plain data that ``yaml.safe_load`` reads back equal (``1e-05`` as ``1.0e-05``)."""
    lines = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip().splitlines()
    text = "\n".join(lines[:-1] if lines[-1] == "..." else lines)  # a scalar document ends with "..."
    if "\n" in text or yaml.safe_load(text) != value:
        raise ValueError(f"value {value!r} cannot be written as one line of YAML")
    return text


@dataclass(frozen=True)
class SearchParameter:
    """One searched setting: a numeric range or a list of choices.

    Attributes:
        key: ``section.key`` of the experiment (e.g. ``optimiser.learning_rate``); also the
            parameter's name in Optuna, ``results.csv`` and the figures.
        low, high: inclusive range; integers when both (and ``step``) are integers, else floats.
        log: draw on a log scale (needs ``low`` > 0; not with ``step``).
        step: grid spacing of the range (``None``: continuous floats, or 1 for integers).
        choices: values to choose from instead of a range; lists (e.g. class weights) are passed
            to Optuna as their YAML text, e.g. ``"[1.0, 1.0, 3.0]"``.
    """

    key: str = ""
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or "." not in self.key or "=" in self.key or " " in self.key:
            raise ValueError(f"key must be a config key like optimiser.learning_rate, got {self.key!r}")
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError(f"{self.key}: give either choices or low/high (with log or step), not both")
            encoded = self.encoded_choices
            if not encoded or len(set(map(repr, encoded))) != len(encoded):
                raise ValueError(f"{self.key}: choices must be a non-empty list of distinct values, got {self.choices}")
            return
        for name in ("low", "high", "step"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{self.key}: {name} must be a number, got the text {value!r} (YAML reads 1e-4 as "
                                 f"text: write 1.0e-4)")
            if (value is not None or name != "step") and (isinstance(value, bool) or
                                                          not isinstance(value, (int, float))):
                raise ValueError(f"{self.key}: give choices, or low and high numbers; {name} is {value!r}")
        if not self.low < self.high:
            raise ValueError(f"{self.key}: low must be < high, got low={self.low}, high={self.high}")
        if self.step is not None and (self.step <= 0 or self.log):
            raise ValueError(f"{self.key}: step must be > 0 and cannot be combined with log, got step={self.step}")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.key}: log needs low > 0, got low={self.low}")

    @property
    def encoded_choices(self) -> tuple[Any, ...]:
        """The choices as Optuna stores them: scalars unchanged, lists and mappings as YAML text."""
        return tuple(c if c is None or isinstance(c, (bool, int, float, str)) else format_yaml_value(c)
                     for c in self.choices or ())

    def decode(self, value: Any) -> Any:
        """The setting's value for a stored Optuna parameter value (inverse of :attr:`encoded_choices`)."""
        if self.choices is None:
            return value
        for choice, encoded in zip(self.choices, self.encoded_choices, strict=False):
            if type(encoded) is type(value) and encoded == value:
                return choice
        raise ValueError(f"{self.key}: {value!r} is not one of the choices {list(self.encoded_choices)}")

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw this parameter for ``trial`` (a retried trial gets its stored value back)."""
        if self.choices is not None:
            return self.decode(trial.suggest_categorical(self.key, list(self.encoded_choices)))
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1)):
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass(frozen=True)
class PrunerConfig:
    """Optuna's median pruner on the per-epoch validation ``mean_dice`` (step = epoch).

    Attributes:
        n_startup_trials: trials that finish before any is pruned.
        n_warmup_steps: epochs a trial trains before it can be pruned.
    """

    n_startup_trials: int = 5
    n_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.n_startup_trials < 0 or self.n_warmup_steps < 0:
            raise ValueError(f"n_startup_trials and n_warmup_steps must be >= 0, "
                             f"got {self.n_startup_trials} and {self.n_warmup_steps}")


@dataclass(frozen=True)
class SearchConfig:
    """A hyperparameter search (see the module docstring); the objective is fixed: maximise ``mean_dice``.

    Attributes:
        experiment: base experiment YAML (path relative to the working folder).
        experiment_overrides: ``section.key=value`` changes for the trials and the best config.
        trial_overrides: changes for the trials only, to make them short (``training.epochs=50``).
        output_dir: root of study folders; the study folder is ``output_dir/<study_name>``.
        study_name: the Optuna study's name and its folder name.
        sampler_seed: TPE seed (plus the number of trials already in the study, so a resumed
            search does not redraw its first trials' parameters).
        sampler_startup_trials: random trials before TPE models the results.
        heartbeat_seconds, grace_seconds: a running trial records a heartbeat every
            ``heartbeat_seconds``; one silent for ``grace_seconds`` counts as killed.
        max_retries: how often a killed trial is retried (continuing its run folder).
        max_failed_trials: stop the search once this many trials failed with a non-finite loss.
        space: the searched settings (:class:`SearchParameter`).
    """

    experiment: str = ""
    experiment_overrides: tuple[str, ...] = ()
    trial_overrides: tuple[str, ...] = ()
    output_dir: str = "checkpoints"
    study_name: str = "unetr2d_search"
    sampler_seed: int = 0
    sampler_startup_trials: int = 10
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    heartbeat_seconds: int = 20
    grace_seconds: int = 60
    max_retries: int = 3
    max_failed_trials: int = 3
    space: tuple[SearchParameter, ...] = ()

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("experiment must be the path of the base experiment YAML, e.g. configs/unetr2d.yaml")
        if not self.study_name or any(c in self.study_name for c in "/\\") or self.study_name in (".", ".."):
            raise ValueError(f"study_name must be a folder name without '/' or '\\', got {self.study_name!r}")
        trial_keys = [".".join(parse_override(text)[0]) for text in (*self.experiment_overrides, *self.trial_overrides)]
        keys = [parameter.key for parameter in self.space]
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"space must list at least one setting, each key once, got {keys}")
        clashes = sorted(set(keys + trial_keys) & set(RUN_FOLDER_KEYS)) + sorted(set(keys) & set(trial_keys))
        if clashes:
            raise ValueError(f"space and the overrides must not set {clashes}: each trial's run folder is "
                             f"<study>/trials/trial_NNNN, and a searched key cannot also be overridden")
        if self.heartbeat_seconds < 1 or self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(f"heartbeat_seconds must be >= 1 and grace_seconds > heartbeat_seconds, "
                             f"got {self.heartbeat_seconds} and {self.grace_seconds}")
        if self.max_retries < 0 or self.max_failed_trials < 1 or self.sampler_startup_trials < 0:
            raise ValueError(f"max_retries and sampler_startup_trials must be >= 0 and max_failed_trials >= 1, got "
                             f"{self.max_retries}, {self.sampler_startup_trials} and {self.max_failed_trials}")


def load_search_config(path: str | Path, overrides: Sequence[str] = ()) -> SearchConfig:
    """Read a search YAML (with ``key=value`` overrides) and check every space entry against the experiment.

    Raises:
        FileNotFoundError: the search YAML or its experiment YAML does not exist.
        ValueError: a bad setting; a space entry's message names the entry (``space[i]``) and its key.
    """
    config = load_config(path, SearchConfig, overrides)
    check_search_space(config)
    return config


def check_search_space(config: SearchConfig) -> None:
    """Build the trial experiment with each bound of every space entry, so a wrong key or type fails now.

    Raises:
        ValueError: names the entry (``space[i] key``), the value tried and the experiment's complaint.
    """
    base = (*config.experiment_overrides, *config.trial_overrides)
    load_experiment_config(config.experiment, base)  # the base alone must be valid first
    for index, parameter in enumerate(config.space):
        for value in parameter.choices if parameter.choices is not None else (parameter.low, parameter.high):
            try:
                load_experiment_config(config.experiment, (*base, f"{parameter.key}={format_yaml_value(value)}"))
            except ValueError as error:
                raise ValueError(f"space[{index}] {parameter.key}: value {value!r} is not accepted by "
                                 f"{config.experiment}: {error}") from None


def parameter_overrides(config: SearchConfig, values: dict[str, Any]) -> list[str]:
    """``section.key=value`` overrides for decoded parameter values (keyed by space key)."""
    return [f"{parameter.key}={format_yaml_value(values[parameter.key])}" for parameter in config.space]


def build_trial_experiment(config: SearchConfig, overrides: Sequence[str], run_folder: Path) -> ExperimentConfig:
    """The experiment of one trial: base, experiment and trial overrides, parameters, and its run folder."""
    folder = [f"training.output_dir={format_yaml_value(str(run_folder.parent))}",
              f"training.run_name={format_yaml_value(run_folder.name)}"]
    return load_experiment_config(config.experiment, (*config.experiment_overrides, *config.trial_overrides,
                                                      *overrides, *folder))
