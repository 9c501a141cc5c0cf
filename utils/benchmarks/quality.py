"""The held-out quality benchmark behind ``scripts/benchmark_quality.py``: both models trained from their
quick recipes on one train set, then scored on CTs they never saw.

It answers "how well do the 3D Residual U-Net (``resunet3d``) and the 2D UNETR (``unetr2d``) segment
kidney and tumour on unseen CTs?" with the package's own functions, in this order:

1. **Data** (:func:`plan_data_split`, :func:`generate_split_data`): CTs synthesised around real
   KiTS19 masks (:func:`utils.synthetic.dataset.generate_from_masks`) into two folders, split by
   case id: test = ``case_00150`` … ``case_00169`` (:data:`TEST_CASE_IDS`, or its first
   ``test_cases``), train = ``case_00000`` … ``case_{N-1}`` (N = ``train_cases`` <= 150). Without
   the mask folder: procedural cases (:func:`utils.synthetic.dataset.generate_dataset`), train with
   master seed ``seed`` and test with ``seed + 1`` (the same case ids, other cases), with a warning
   that the numbers are not comparable with results on real masks. With ``extra_masks_dir`` (e.g.
   KiTS23's new patients) the cases of a second mask folder join the train set only
   (:func:`plan_extra_cases`), in a folder that links both. Each data folder is named after its
   generation settings and reused when complete.
2. **Training** (:func:`train_model`): :func:`utils.training.engine.train` on the train folder; the
   engine's own validation (best epoch, learning curve) holds out part of the *train* cases with
   the config's ``split``. Wall minutes and CPU seconds (user + system of this process and its
   finished children) are measured around the call, after the shared preprocessing cache is
   built; optimiser steps come from ``last.pt``.
3. **Evaluation** (:func:`score_test_cases`): with ``choose_postprocessing``, the run's validation
   cases (held-out *train* cases) are segmented first and choose its smallest tumour component
   (:mod:`utils.evaluation.postprocessing_choice`); then the run's final weights (``last.pt``: no
   choice is made on any test case) segment every test case from its raw CT and are scored in its original
   grid (:func:`utils.evaluation.run.evaluate_run`). A test case without a score counts as a failure
   (Dice 0, surface Dice 0, HD95 missing, as an empty prediction of a present structure), never skipped.
4. **Comparison** of the two report folders (:func:`utils.evaluation.report.write_comparison_report`).
5. **Report** (:func:`write_quality_report`): ``quality.json``, ``quality.md`` and figures, atomically,
   with every model's tumour Dice grouped by the kind of test tumour (isodense or not, small or
   not: :mod:`utils.analysis.tumour_profiles`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.analysis.tumour_profiles import (
    GROUPS,
    ISODENSE_HU,
    SMALL_TUMOUR_ML,
    TumourProfile,
    dice_by_group,
    profile_case_folder,
)
from utils.config.experiment import ExperimentConfig, load_experiment_config
from utils.data.dataset_definitions import KITS19, KITS23
from utils.data.kits_layout import case_id_for_index
from utils.data.nifti_io import save_json_atomic, write_bytes_atomic
from utils.evaluation.postprocessing_choice import PostprocessingChoice, choose_min_tumour_ml, write_choice
from utils.evaluation.predictions import check_output_dir
from utils.evaluation.report import write_comparison_report
from utils.evaluation.run import RunEvaluation, evaluate_run
from utils.figures.comparison import plot_metric_boxplots
from utils.figures.drawing import save_figure
from utils.figures.training_curves import plot_training_runs
from utils.inference.segment import RESTORE_MODES
from utils.metrics.scoring import DICE_NAMES, METRIC_NAMES, summarise_scores
from utils.networks.checkpoints import load_checkpoint
from utils.preprocessing.preprocess import prepare_training_cache
from utils.synthetic.dataset import (
    SyntheticOptions,
    combine_case_folders,
    find_masks,
    generate_dataset,
    generate_from_masks,
    select_masks,
)
from utils.training.engine import TrainingResult, train
from utils.training.performance import experiment_precision

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
#: Real KiTS19 segmentations (labels only): ``../shared/kits19`` beside the repository.
DEFAULT_MASKS_DIR = REPO.parent / "shared" / "kits19"
#: The fixed held-out test cases; training takes cases from ``case_00000`` up, never these.
TEST_CASE_IDS = tuple(case_id_for_index(index) for index in range(150, 170))
#: Model keys of the command line and the model each trains.
MODELS = {"3d": "resunet3d", "2d": "unetr2d"}
#: Scores of a test case that has no scored prediction: a failure, by the empty-mask rule.
FAILED_CASE_SCORES = {"kidney_dice": 0.0, "tumour_dice": 0.0, "kidney_surface_dice": 0.0,
                      "tumour_surface_dice": 0.0, "kidney_hd95": None, "tumour_hd95": None}
#: Per-case tumour Dice at or above this counts as a detected tumour in the distribution.
TUMOUR_HIT_DICE = 0.5
GENERATION_JSON = "generation.json"
FALLBACK_WARNING = ("no KiTS19 masks at {folder} ({reason}): training and testing on procedural synthetic cases "
                    "instead; these numbers are NOT comparable with the README's table, which uses CTs synthesised "
                    "around the real masks (give --masks DIR, or --require-masks to refuse this fallback)")


@dataclass(frozen=True)
class QualityPlan:
    """Settings of one quality benchmark (see the module docstring).

    Attributes:
        out_dir: ``quality.json``, ``quality.md``, figures, one report folder per model, ``comparison/``.
        work_dir: synthetic data, preprocessing cache and training runs (reused by later runs).
        masks_dir: KiTS19-layout folder of real segmentations, only ever read.
        train_cases: N: train on ``case_00000`` … ``case_{N-1}``; 1 to 150.
        test_cases: M: test on the first M of :data:`TEST_CASE_IDS`; 1 to 20.
        models: keys of :data:`MODELS` to run, in order (``("3d", "2d")``).
        config_3d, config_2d: experiment YAML files of the two models.
        epochs_3d, epochs_2d: training epochs, >= 1 (``None``: the config's ``training.epochs``).
        overrides_3d, overrides_2d: further ``section.key=value`` overrides, applied last.
        locator_3d: makes the 3D model a second stage (:mod:`utils.inference.cascade`): the
            experiment YAML of its first stage, trained first on the same train set; the 3D
            model's ``cascade.locator`` is then that run, and its budget includes the locator's.
        locator_epochs: the locator's training epochs (``None``: its config's).
        locator_overrides: further overrides of the locator's config, applied last.
        extra_masks_dir: a second folder of real masks whose cases join the *training* set (never the
            test set): KiTS23's (``kits23.json``; CT rendered with its cysts, which are then labelled
            kidney as KiTS19 labels them) or another KiTS19-layout folder. Its case ids that
            ``masks_dir`` also holds are left out: KiTS23 keeps KiTS19's ids for the same patients,
            so no test patient trains.
        require_masks: refuse to run without masks instead of falling back to procedural cases.
        matrix: in-plane size in voxels of procedural fallback cases (64 to 1024).
        seed: master seed of the synthetic CTs (procedural test cases: ``seed + 1``) and of the bootstrap.
        workers: processes generating cases, >= 1.
        bootstrap_resamples: resamples of the comparison's confidence intervals, >= 1.
        postprocess: score the post-processed predictions (largest kidneys, tumour touching
            kidney only; :mod:`utils.inference.postprocessing`) instead of the raw ones.
        choose_postprocessing: before the test cases, choose each model's smallest tumour
            component on its own validation cases (:mod:`utils.evaluation.postprocessing_choice`;
            needs ``postprocess``); the test cases are then segmented with it.
        restore: how predictions go back onto each test CT's grid
            (:data:`utils.inference.segment.RESTORE_MODES`; see :func:`utils.inference.segment.segment_ct`).
        command: the command line, recorded in the reports.
    """

    out_dir: Path = Path("reports/quality")
    work_dir: Path = Path("data/quality")
    masks_dir: Path = DEFAULT_MASKS_DIR
    train_cases: int = 60
    test_cases: int = len(TEST_CASE_IDS)
    models: tuple[str, ...] = ("3d", "2d")
    config_3d: Path = REPO / "configs" / "resunet3d_quick.yaml"
    config_2d: Path = REPO / "configs" / "unetr2d_quick.yaml"
    epochs_3d: int | None = None
    epochs_2d: int | None = None
    overrides_3d: tuple[str, ...] = ()
    overrides_2d: tuple[str, ...] = ()
    locator_3d: Path | None = None
    locator_epochs: int | None = None
    locator_overrides: tuple[str, ...] = ()
    extra_masks_dir: Path | None = None
    require_masks: bool = False
    matrix: int = 160
    seed: int = 0
    workers: int = 1
    bootstrap_resamples: int = 10000
    postprocess: bool = False
    choose_postprocessing: bool = False
    restore: str = RESTORE_MODES[0]
    command: str = ""

    def __post_init__(self) -> None:
        first_test = int(TEST_CASE_IDS[0].split("_")[1])
        if not 1 <= self.train_cases <= first_test:
            raise ValueError(f"train_cases must be between 1 and {first_test} (training stops before the first test "
                             f"case {TEST_CASE_IDS[0]}), got {self.train_cases}")
        if not 1 <= self.test_cases <= len(TEST_CASE_IDS):
            raise ValueError(f"test_cases must be between 1 and {len(TEST_CASE_IDS)}, got {self.test_cases}")
        if not self.models or len(set(self.models)) != len(self.models) or set(self.models) - set(MODELS):
            raise ValueError(f"models must name each of {sorted(MODELS)} at most once, got {list(self.models)}")
        if self.locator_3d is not None and "3d" not in self.models:
            raise ValueError("a locator (locator_3d) makes the 3D model a second stage, but models has no '3d'")
        for name in ("epochs_3d", "epochs_2d", "locator_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the config's), got {getattr(self, name)}")
        for name in ("workers", "bootstrap_resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        SyntheticOptions(matrix=self.matrix)  # validates the matrix
        if self.restore not in RESTORE_MODES:
            raise ValueError(f"restore must be one of {', '.join(RESTORE_MODES)}, got {self.restore!r}")
        if self.choose_postprocessing and not self.postprocess:
            raise ValueError("choose_postprocessing chooses a step of the post-processing: it needs postprocess")


@dataclass(frozen=True)
class DataSplit:
    """The train and test folders, their case ids and where the cases come from.

    Attributes:
        source: ``"kits19_masks"`` (CT synthesised around real masks) or ``"procedural"`` (fallback).
        disjoint_by: ``"case id"`` (masks) or ``"master seed"`` (procedural: the same ids, other cases).
        settings: the generation settings of each folder (``{"train": ..., "test": ...}``; with extra
            masks also ``"extra"`` and ``"combined"``).
        train_dir: the folder the models train on: the train ids' CTs, or with extra masks a folder
            linking those (``base_train_dir``) and the extra cases' (``extra_dir``).
        extra_ids: the extra training cases (from ``extra_masks_dir``), ``()`` without.
    """

    source: str
    disjoint_by: str
    masks_dir: Path
    train_dir: Path
    test_dir: Path
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    settings: dict[str, dict[str, Any]]
    warning: str | None = None
    extra_masks_dir: Path | None = None
    extra_ids: tuple[str, ...] = ()
    base_train_dir: Path | None = None
    extra_dir: Path | None = None


@dataclass(frozen=True)
class TrainingBudget:
    """What one model's training cost: epochs, samples, optimiser steps, wall minutes, CPU seconds."""

    epochs: int
    samples_per_epoch: int
    batch_size: int
    optimiser_steps: int
    wall_minutes: float
    cpu_seconds: float


@dataclass(frozen=True)
class ModelQuality:
    """One model's result on the test cases.

    Attributes:
        cases: per test case, in test-id order, the scores of :data:`utils.metrics.scoring.METRIC_NAMES`
            (a failure scored as :data:`FAILED_CASE_SCORES`).
        summary: :func:`utils.metrics.scoring.summarise_scores` of ``cases``.
        failures: ``{"case_id", "reason"}`` of test cases without a scored prediction.
        learning_curve: per epoch ``epoch``, ``train_loss``, ``learning_rate``, ``epoch_seconds`` and,
            on validated epochs, ``val_loss``, ``kidney_dice``, ``tumour_dice`` (the engine's validation
            on held-out *train* cases, on the cache grid; ``None`` on other epochs) and ``unpredicted``
            (the labels those cases hold and the model hardly predicts, ``""`` when none).
        locator: for a second-stage model (``cascade.locator``), the first stage it runs after:
            :func:`describe_locator`; its training is not in ``budget``.
        postprocessing: with ``choose_postprocessing``, the choice made on the validation cases
            (:func:`describe_choice`), else ``None``.
    """

    model: str
    config_path: Path
    run_folder: Path
    report_folder: Path
    budget: TrainingBudget
    cases: tuple[dict[str, Any], ...]
    summary: dict[str, Any]
    failures: tuple[dict[str, str], ...]
    learning_curve: tuple[dict[str, Any], ...]
    locator: dict[str, Any] | None = None
    postprocessing: dict[str, Any] | None = None

    @property
    def whole_budget(self) -> TrainingBudget:
        """``budget`` plus the locator's, when the benchmark trained it (its wall and CPU time, its epochs)."""
        measured = (self.locator or {}).get("budget")
        if not measured:
            return self.budget
        return replace(self.budget, epochs=self.budget.epochs + measured["epochs"],
                       optimiser_steps=self.budget.optimiser_steps + measured["optimiser_steps"],
                       wall_minutes=self.budget.wall_minutes + measured["wall_minutes"],
                       cpu_seconds=self.budget.cpu_seconds + measured["cpu_seconds"])

    @property
    def tumour_dice_distribution(self) -> dict[str, float]:
        """Min, quartiles, max and share >= :data:`TUMOUR_HIT_DICE` of the per-case tumour Dice."""
        return describe_dice([case["tumour_dice"] for case in self.cases])


@dataclass(frozen=True)
class PreparedBenchmark:
    """A checked plan: the data split and each model's resolved config; nothing written yet."""

    plan: QualityPlan
    split: DataSplit
    configs: dict[str, ExperimentConfig]
    locator_config: ExperimentConfig | None = None


@dataclass(frozen=True)
class QualityResult:
    """What :func:`run_quality_benchmark` produced and wrote."""

    prepared: PreparedBenchmark
    models: tuple[ModelQuality, ...]
    machine: dict[str, Any]
    seconds: float
    comparison: dict[str, Path] | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    json_path: Path | None = None
    markdown_path: Path | None = None
    tumour_profiles: tuple[TumourProfile, ...] = ()


def split_case_ids(train_cases: int, test_cases: int = len(TEST_CASE_IDS)) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The documented split by case id: ``(case_00000 … case_{N-1}, first M of case_00150 … case_00169)``."""
    QualityPlan(train_cases=train_cases, test_cases=test_cases)  # the same bounds
    return tuple(case_id_for_index(i) for i in range(train_cases)), TEST_CASE_IDS[:test_cases]


def check_plan_paths(plan: QualityPlan) -> None:
    """Refuse an output or work folder on or inside the mask folder, before any work.

    Raises:
        ValueError: naming the option, the folder and the rule.
    """
    for option, folder in (("--out", plan.out_dir), ("--work", plan.work_dir)):
        for masks in (plan.masks_dir, plan.extra_masks_dir):
            if masks is None:
                continue
            try:
                check_output_dir(folder, masks, masks)
            except ValueError as error:
                raise ValueError(f"{option} {folder} lies inside the mask folder {masks}, which is only ever "
                                 f"read: {error}") from None


def plan_data_split(plan: QualityPlan) -> DataSplit:
    """Decide the data folders and case ids (nothing is written); fall back to procedural cases without masks.

    Raises:
        FileNotFoundError: no masks with ``require_masks``. ValueError: a split id has no mask.
    """
    train_ids, test_ids = split_case_ids(plan.train_cases, plan.test_cases)
    try:
        masks = find_masks(plan.masks_dir)
    except FileNotFoundError as error:
        if plan.require_masks:
            raise FileNotFoundError(f"{error}; --require-masks refuses the procedural fallback") from None
        if plan.extra_masks_dir is not None:
            raise FileNotFoundError(f"{error}; extra training masks ({plan.extra_masks_dir}) join a train set of "
                                    f"CTs around real KiTS19 masks, which needs them") from None
        warning = FALLBACK_WARNING.format(folder=plan.masks_dir, reason=error)
        logger.warning("%s", warning)
        settings = {role: {"source": "procedural", "cases": len(ids), "seed": plan.seed + offset,
                           "matrix": plan.matrix} for role, ids, offset in (("train", train_ids, 0),
                                                                            ("test", test_ids, 1))}
        ids = {role: tuple(case_id_for_index(i) for i in range(settings[role]["cases"])) for role in settings}
        return DataSplit("procedural", "master seed", plan.masks_dir, _data_folder(plan, "train", settings["train"]),
                         _data_folder(plan, "test", settings["test"]), ids["train"], ids["test"], settings, warning)
    for ids in (train_ids, test_ids):
        select_masks(masks, ids, plan.masks_dir)  # every id has a mask, checked before any work
    masks_dir = str(Path(plan.masks_dir).resolve())
    settings = {role: {"source": "kits19_masks", "masks_dir": masks_dir, "case_ids": list(ids), "seed": plan.seed}
                for role, ids in (("train", train_ids), ("test", test_ids))}
    train_dir, test_dir = _data_folder(plan, "train", settings["train"]), _data_folder(plan, "test", settings["test"])
    if plan.extra_masks_dir is None:
        return DataSplit("kits19_masks", "case id", plan.masks_dir, train_dir, test_dir, train_ids, test_ids, settings)
    extra_ids, settings["extra"] = plan_extra_cases(plan, {mask.parent.name for mask in masks})
    settings["combined"] = {"source": "combined", "parts": [settings["train"], settings["extra"]]}
    return DataSplit("kits19_masks", "case id", plan.masks_dir, _data_folder(plan, "train", settings["combined"]),
                     test_dir, train_ids, test_ids, settings, extra_masks_dir=plan.extra_masks_dir,
                     extra_ids=extra_ids, base_train_dir=train_dir,
                     extra_dir=_data_folder(plan, "extra", settings["extra"]))


def plan_extra_cases(plan: QualityPlan, main_ids: set[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The extra training cases of ``plan.extra_masks_dir`` and their generation settings.

    The folder's dataset is KiTS23 when it holds ``kits23.json``, else KiTS19; its cases are written
    with KiTS19's labels. Ids in ``main_ids`` (the main mask folder's: the same patients) are left out.

    Raises:
        FileNotFoundError: no such folder or no mask in it. ValueError: no case left.
    """
    folder = Path(plan.extra_masks_dir)
    dataset = KITS23 if (folder / KITS23.metadata_name).is_file() else KITS19
    found = [mask.parent.name for mask in find_masks(folder, dataset)]
    extra_ids = tuple(case_id for case_id in found if case_id not in main_ids)
    if not extra_ids:
        raise ValueError(f"{folder}: each of its {len(found)} masks has the id of a case of {plan.masks_dir} (the "
                         f"same patient), so none can be an extra training case")
    if len(extra_ids) < len(found):
        logger.info("%s: %d of %d masks left out, their ids being cases of %s (the same patients)", folder,
                    len(found) - len(extra_ids), len(found), plan.masks_dir)
    return extra_ids, {"source": f"{dataset.name}_masks", "masks_dir": str(folder.resolve()),
                       "case_ids": list(extra_ids), "seed": plan.seed, "dataset": dataset.name,
                       "labels_as": KITS19.name}


def _data_folder(plan: QualityPlan, role: str, settings: dict[str, Any]) -> Path:
    """``WORK/data/<role>_<hash of the settings>``: other settings never reuse a folder."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(plan.work_dir) / "data" / f"{role}_{settings['source']}_{digest}"


def generate_split_data(split: DataSplit, plan: QualityPlan, show_progress: bool = True) -> None:
    """Write the train and test folders (a folder whose ``generation.json`` matches is reused as is);
    with extra masks, their cases' folder and the training folder that links both train parts."""
    folders = [("train", split.base_train_dir or split.train_dir), ("test", split.test_dir)]
    folders += [("extra", split.extra_dir), ("combined", split.train_dir)] if split.extra_dir is not None else []
    for role, folder in folders:
        settings = split.settings[role]
        marker = folder / GENERATION_JSON
        if marker.is_file() and json.loads(marker.read_text()) == settings:
            logger.info("%s cases: reusing %s", role, folder)
            continue
        if settings["source"] == "procedural":
            generate_dataset(folder, settings["cases"], seed=settings["seed"],
                             options=SyntheticOptions(matrix=settings["matrix"]), workers=plan.workers,
                             show_progress=show_progress)
        elif role == "combined":
            combine_case_folders([split.base_train_dir, split.extra_dir], folder)
        else:
            generate_from_masks(split.extra_masks_dir if role == "extra" else split.masks_dir, folder,
                                case_ids=settings["case_ids"], seed=settings["seed"], workers=plan.workers,
                                show_progress=show_progress, dataset=settings.get("dataset", KITS19.name),
                                labels_as=settings.get("labels_as"))
        save_json_atomic(marker, settings)  # last: an interrupted folder is generated again


def load_model_config(plan: QualityPlan, key: str, split: DataSplit) -> ExperimentConfig:
    """The experiment of model ``key`` (``"3d"`` or ``"2d"``): its config with the benchmark's overrides.

    Data, cache and runs go to the train folder and the work folder; ``epochs_3d`` / ``epochs_2d``
    set ``training.epochs``; the plan's free overrides come last.

    Raises:
        ValueError: an invalid config or override, a config of the other model, or bf16 on a CPU
            that would emulate it.
    """
    path, epochs, extra = {"3d": (plan.config_3d, plan.epochs_3d, plan.overrides_3d),
                           "2d": (plan.config_2d, plan.epochs_2d, plan.overrides_2d),
                           "locator": (plan.locator_3d, plan.locator_epochs, plan.locator_overrides)}[key]
    work = Path(plan.work_dir)
    overrides = [f"data_dir={json.dumps(str(split.train_dir))}",
                 f"preprocessing.cache_dir={json.dumps(str(work / 'cache'))}",
                 f"training.output_dir={json.dumps(str(work / 'checkpoints'))}"]
    overrides += [f"training.epochs={epochs}"] if epochs is not None else []
    config = load_experiment_config(path, [*overrides, *extra])
    experiment_precision(config)  # bf16 that this machine would emulate is refused now, not after the data work
    if key == "locator":
        return config
    if key == "3d" and plan.locator_3d is not None and config.cascade.locator is not None:
        raise ValueError(f"{path}: cascade.locator is {config.cascade.locator!r}, but the benchmark also trains a "
                         f"locator ({plan.locator_3d}): give one or the other")
    if config.model.name != MODELS[key]:
        raise ValueError(f"{path}: model.name is {config.model.name!r}, but --config{key} must train "
                         f"{MODELS[key]!r}")
    return config


def prepare_quality_benchmark(plan: QualityPlan) -> PreparedBenchmark:
    """Check everything that can be checked before any work: folders, masks and ids, configs.

    Raises:
        ValueError, FileNotFoundError: the message names the folder or file and the reason.
    """
    check_plan_paths(plan)
    split = plan_data_split(plan)
    locator = load_model_config(plan, "locator", split) if plan.locator_3d is not None else None
    return PreparedBenchmark(plan, split, {key: load_model_config(plan, key, split) for key in plan.models}, locator)


def measure_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children so far."""
    usages = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def train_model(config: ExperimentConfig, data_dir: Path, show_progress: bool = True
                ) -> tuple[TrainingResult, TrainingBudget]:
    """Train one model with the engine and measure its budget (wall minutes, CPU seconds, steps).

    The preprocessing cache is built (or checked) before the clock starts, so the model that
    happens to train first does not pay for the cache both share.
    """
    prepare_training_cache(config, data_dir, show_progress=show_progress)
    logger.info("training %s for %d epochs on %s", config.model.name, config.training.epochs, data_dir)
    cpu_before, wall_before = measure_cpu_seconds(), time.perf_counter()
    result = train(config, data_dir=data_dir, show_progress=show_progress)
    wall, cpu = time.perf_counter() - wall_before, measure_cpu_seconds() - cpu_before
    steps = int(load_checkpoint(result.run_folder / "last.pt")["iteration"])
    samples = (config.patches if config.model.name == "resunet3d" else config.slices).samples_per_epoch
    return result, TrainingBudget(config.training.epochs, samples, config.training.batch_size, steps, wall / 60, cpu)


def score_test_cases(evaluation: RunEvaluation,
                     test_ids: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every test case's scores in test-id order; a case without a score is a failure, not skipped.

    Returns:
        ``(cases, failures)``: per case ``case_id`` and the :data:`METRIC_NAMES` scores (a failure
        as :data:`FAILED_CASE_SCORES`); ``{"case_id", "reason"}`` of each failure.
    """
    scored = {case["case_id"]: case for case in evaluation.evaluation.cases}
    reasons = {refusal["case_id"]: refusal["reason"] for refusal in evaluation.evaluation.refused}
    cases, failures = [], []
    for case_id in test_ids:
        if case_id in scored:
            cases.append({"case_id": case_id, **{name: scored[case_id][name] for name in METRIC_NAMES}})
            continue
        cases.append({"case_id": case_id, **FAILED_CASE_SCORES})
        failures.append({"case_id": case_id, "reason": reasons.get(case_id, "no prediction was scored")})
        logger.error("%s: %s", evaluation.inference["model"], failures[-1]["reason"])
    return cases, failures


def describe_dice(values: list[float]) -> dict[str, float]:
    """Min, quartiles (linear interpolation), median, max and share of values >= :data:`TUMOUR_HIT_DICE`."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("values must hold at least one Dice score, got none")
    q1, median, q3 = np.percentile(array, [25, 50, 75])
    return {"min": float(array.min()), "q1": float(q1), "median": float(median), "q3": float(q3),
            "max": float(array.max()), f"share_at_least_{TUMOUR_HIT_DICE}": float(np.mean(array >= TUMOUR_HIT_DICE)),
            "cases": int(array.size)}


def describe_machine() -> dict[str, Any]:
    """CPU model and cores, torch and Python versions, and the device training and inference use."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device}


def describe_locator(config: ExperimentConfig) -> dict[str, Any] | None:
    """The first stage of a second-stage model: run folder, epochs and the seconds its epochs took.

    ``epoch_minutes`` adds up the epochs' own seconds from its ``training_progress.json``
    (validation and start-up excluded); ``None`` for a single-stage model.
    """
    if config.cascade.locator is None:
        return None
    folder = Path(config.cascade.locator)
    folder = folder if folder.is_dir() else folder.parent
    progress = folder / "training_progress.json"
    records = json.loads(progress.read_text()) if progress.is_file() else []
    return {"run_folder": str(folder), "epochs": records[-1]["epoch"] if records else None,
            "epoch_minutes": sum(r.get("epoch_seconds", 0.0) for r in records) / 60 if records else None}


def _learning_curve(records: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    keys = ("epoch", "train_loss", "val_loss", "kidney_dice", "tumour_dice", "unpredicted", "learning_rate",
            "epoch_seconds")
    return tuple({key: record.get(key) for key in keys} for record in records)


def profile_test_tumours(split: DataSplit) -> tuple[TumourProfile, ...]:
    """Size and kidney contrast of every test case's tumour, read from its raw files.

    Raises:
        FileNotFoundError, ValueError: a test case's files are missing or unreadable (named).
    """
    return tuple(profile_case_folder(Path(split.test_dir) / case_id) for case_id in split.test_ids)


def tumour_dice_by_group(model: ModelQuality, profiles: tuple[TumourProfile, ...]) -> dict[str, dict[str, Any]]:
    """The model's mean tumour Dice per kind of test tumour (:func:`utils.analysis.tumour_profiles.dice_by_group`)."""
    return dice_by_group(profiles, {case["case_id"]: case["tumour_dice"] for case in model.cases})


def run_quality_benchmark(prepared: PreparedBenchmark, show_progress: bool = True) -> QualityResult:
    """Generate the data, train and evaluate each model, compare them and write the reports.

    Raises:
        Whatever training or evaluation raises (e.g. ``NonFiniteLossError``, ``OSError``).
    """
    started = time.perf_counter()
    plan, split = prepared.plan, prepared.split
    generate_split_data(split, plan, show_progress)
    profiles = profile_test_tumours(split)
    out = Path(plan.out_dir)
    models = []
    for key, config in prepared.configs.items():
        locator = None
        if key == "3d" and prepared.locator_config is not None:
            located, locator_budget = train_model(prepared.locator_config, split.train_dir, show_progress)
            config = replace(config, cascade=replace(config.cascade, locator=str(located.run_folder)))
            locator = {**describe_locator(config), "config": str(plan.locator_3d), "budget": asdict(locator_budget)}
        result, budget = train_model(config, split.train_dir, show_progress)
        chosen = None
        if plan.choose_postprocessing:  # on the run's validation cases, before any test case is seen
            validation = evaluate_run(result.run_folder / "last.pt", data_dir=split.train_dir, cases="validation",
                                      out_dir=out / f"{config.model.name}_validation", postprocess=True,
                                      restore=plan.restore, show_progress=show_progress)
            choice = choose_min_tumour_ml(validation.report_folder, show_progress=show_progress)
            write_choice(choice)
            chosen = describe_choice(choice)
        evaluation = evaluate_run(result.run_folder / "last.pt", data_dir=split.test_dir, cases="all",
                                  out_dir=out / config.model.name, postprocess=plan.postprocess,
                                  restore=plan.restore,
                                  show_progress=show_progress)
        cases, failures = score_test_cases(evaluation, split.test_ids)
        models.append(ModelQuality(config.model.name, plan.config_3d if key == "3d" else plan.config_2d,
                                   result.run_folder, evaluation.report_folder, budget, tuple(cases),
                                   summarise_scores(cases, metrics=METRIC_NAMES), tuple(failures),
                                   _learning_curve(result.records), locator or describe_locator(config),
                                   chosen))
    comparison = None
    if len(models) == 2:
        comparison = write_comparison_report(models[0].report_folder, models[1].report_folder, out / "comparison",
                                             n_resamples=plan.bootstrap_resamples, seed=plan.seed)
    result = QualityResult(prepared, tuple(models), describe_machine(), time.perf_counter() - started, comparison,
                           save_quality_figures(models, out), tumour_profiles=profiles)
    return write_quality_report(result)


def describe_choice(choice: PostprocessingChoice) -> dict[str, Any]:
    """What the reports say of a model's post-processing choice: the threshold, where and on what it was chosen,
    and the validation tumour Dice and HD95 without and with it."""
    def scores(score: Any) -> dict[str, Any]:
        summary = score.summary
        return {"tumour_dice": summary["tumour_dice"]["mean"], "tumour_hd95": summary["tumour_hd95"]["mean"],
                "tumour_hd95_missing": summary["tumour_hd95"]["missing"]}
    return {"min_tumour_ml": choice.min_tumour_ml, "validation_report": str(choice.report),
            "validation_cases": list(choice.case_ids), "candidates_ml": [s.min_tumour_ml for s in choice.scores],
            "without": scores(choice.baseline), "with": scores(choice.chosen)}


def save_quality_figures(models: list[ModelQuality], out_dir: Path) -> dict[str, Path]:
    """The learning curves of every model and, with two models, their per-case Dice side by side."""
    figures = {"learning_curves": save_figure(
        plot_training_runs({m.model: list(m.learning_curve) for m in models}, title="learning curves (validation on "
                           "held-out train cases, cache grid)"), out_dir / "learning_curves.png")}
    if len(models) == 2:
        figures["dice_per_case"] = out_dir / "dice_per_case.png"
        plot_metric_boxplots(*(list(m.cases) for m in models), [m.model for m in models], metrics=DICE_NAMES,
                             path=figures["dice_per_case"])
    return figures


#: Columns of the quality table after the model: header and how a model fills it.
TABLE_HEADER = ("model", "kidney Dice", "tumour Dice", "kidney surface Dice", "tumour surface Dice",
                "kidney HD95 (mm)", "tumour HD95 (mm)", "tumour Dice q1 / median / q3", "training (min)",
                "training CPU (s)", "epochs")


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread_cell(stats: dict[str, Any]) -> str:
    """``mean ± sd (median m)`` of one summarised score."""
    if stats["mean"] is None:
        return "-"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f} (median {stats['median']:.3f})"


def _hd95_cell(stats: dict[str, Any]) -> str:
    text = _number(stats["mean"], 1)
    return text + (f" ({stats['missing']} missing)" if stats["missing"] else "")


def format_quality_table(models: tuple[ModelQuality, ...] | list[ModelQuality]) -> str:
    """The markdown table, one row per model: test-set metrics in the original grid and the training budget."""
    rows = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for m in models:
        s, spread, budget = m.summary, m.tumour_dice_distribution, m.whole_budget
        cells = [m.model + (" (two stages)" if m.locator is not None else ""), _spread_cell(s["kidney_dice"]),
                 _spread_cell(s["tumour_dice"]),
                 _number(s["kidney_surface_dice"]["mean"]), _number(s["tumour_surface_dice"]["mean"]),
                 _hd95_cell(s["kidney_hd95"]), _hd95_cell(s["tumour_hd95"]),
                 " / ".join(_number(spread[k]) for k in ("q1", "median", "q3")), f"{budget.wall_minutes:.2f}",
                 f"{budget.cpu_seconds:.0f}", str(budget.epochs)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_group_table(models: tuple[ModelQuality, ...] | list[ModelQuality],
                       profiles: tuple[TumourProfile, ...]) -> str:
    """Markdown table: each model's mean tumour Dice per kind of test tumour, with the case counts."""
    words = {"isodense": f"isodense (within {ISODENSE_HU:.0f} HU of the kidney)", "distinct": "distinct",
             "small": f"small (< {SMALL_TUMOUR_ML:.0f} ml)", "large": f"large (>= {SMALL_TUMOUR_ML:.0f} ml)"}
    rows = ["| model | " + " | ".join(words[g] for g in GROUPS) + " |", "|---|" + "---|" * len(GROUPS)]
    for m in models:
        groups = tumour_dice_by_group(m, profiles)
        rows.append(f"| {m.model} | " + " | ".join(f"{_number(groups[g]['mean'])} ({groups[g]['cases']} cases)"
                                                  for g in GROUPS) + " |")
    return "\n".join(rows)


def _id_range(ids: tuple[str, ...]) -> str:
    return f"{ids[0]} … {ids[-1]} ({len(ids)} cases)" if len(ids) > 1 else f"{ids[0]} (1 case)"


_RESTORE_WORDS = {"probabilities": "by trilinear resampling of the class probabilities, then the argmax",
                  "labels": "by a nearest-neighbour copy of the coarse labels"}


def render_quality_markdown(result: QualityResult) -> str:
    """``quality.md``: what was measured, the table, the training budget in full, the machine and the command."""
    split, plan, machine = result.prepared.split, result.prepared.plan, result.machine
    source = ("CTs synthesised around the real KiTS19 masks" if split.source == "kits19_masks"
              else "procedural synthetic cases (fallback: no masks)")
    lines = ["# Held-out segmentation quality", ""]
    if split.warning:
        lines += [f"**WARNING:** {split.warning}", ""]
    extra = (f" plus {_id_range(split.extra_ids)} around the masks of {split.extra_masks_dir} "
             f"({split.settings['extra']['dataset']}; written with KiTS19's labels: a cyst is kidney)"
             if split.extra_ids else "")
    lines += [f"Test set: {_id_range(split.test_ids)}; train set: {_id_range(split.train_ids)}{extra}; {source}, "
              f"disjoint by {split.disjoint_by}. Each model trained from its config on the train set only "
              "(its validation epochs use held-out train cases) and was scored with its final weights (`last.pt`) "
              "on every test case, from the raw CT, in the CT's original grid: kidney = label > 0, tumour = "
              "label 2, surface Dice at 2 mm, HD95 in mm (mean over cases with a value, missing counted). A test "
              "case without a scored prediction counts as Dice 0. Predictions went back onto each CT's grid "
              f"{_RESTORE_WORDS[plan.restore]}{', post-processed' if plan.postprocess else ''}.", "",
              format_quality_table(result.models), "",
              "| model | config | epochs | samples per epoch | batch | optimiser steps | training (min) | CPU (s) | "
              "tumour Dice >= 0.5 | failed test cases |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result.models:
        b = m.budget
        share = m.tumour_dice_distribution[f"share_at_least_{TUMOUR_HIT_DICE}"]
        lines.append(f"| {m.model} | `{m.config_path}` | {b.epochs} | {b.samples_per_epoch} | {b.batch_size} | "
                     f"{b.optimiser_steps} | {b.wall_minutes:.2f} | {b.cpu_seconds:.0f} | {share:.0%} | "
                     f"{len(m.failures)} |")
    for m in result.models:
        if m.locator is None:
            continue
        measured = m.locator.get("budget")
        if measured:
            lines.append(f"| {m.model}'s locator | `{m.locator['config']}` | {measured['epochs']} | "
                         f"{measured['samples_per_epoch']} | {measured['batch_size']} | "
                         f"{measured['optimiser_steps']} | {measured['wall_minutes']:.2f} | "
                         f"{measured['cpu_seconds']:.0f} | | |")
            lines += ["", f"{m.model} is a second stage: it segments the boxes around the kidneys its locator "
                      f"(`{m.locator['run_folder']}`, trained first on the same train set) found; the first table's "
                      "training minutes, CPU seconds and epochs add both stages."]
        else:
            minutes = m.locator["epoch_minutes"]
            lines += ["", f"{m.model} is a second stage: it segments the boxes around the kidneys that the locator "
                      f"`{m.locator['run_folder']}` found ({m.locator['epochs']} epochs, "
                      f"{'-' if minutes is None else f'{minutes:.2f}'} min of training epochs), trained before this "
                      "benchmark: its training is not in the figures above; add it for the model's whole budget."]
    for m in result.models:
        if m.postprocessing is not None:
            c = m.postprocessing
            lines += ["", f"{m.model}'s post-processing was chosen on its {len(c['validation_cases'])} validation "
                      f"cases (held-out train cases, original grid; `{c['validation_report']}`) before any test case: "
                      f"tumour components under **{c['min_tumour_ml']:g} ml**, but the largest, become kidney (tried "
                      f"{', '.join(f'{v:g}' for v in c['candidates_ml'])} ml; validation tumour Dice "
                      f"{_number(c['without']['tumour_dice'])} -> {_number(c['with']['tumour_dice'])}, tumour HD95 "
                      f"{_number(c['without']['tumour_hd95'], 1)} -> {_number(c['with']['tumour_hd95'], 1)} mm)."]
    for m in result.models:
        final = m.learning_curve[-1].get("unpredicted") if m.learning_curve else None
        if final:
            lines += ["", f"**WARNING:** {m.model}'s final validation (held-out train cases, cache grid) hardly "
                      f"predicts {final} of the true voxels: it has not learnt that class, whatever its Dice says."]
    if result.tumour_profiles:
        lines += ["", "Tumour Dice by kind of test tumour (contrast: the tumour's mean HU minus its kidney's, in the "
                  "raw CT; a case without tumour is in no group; per-case profiles in `quality.json`):", "",
                  format_group_table(result.models, result.tumour_profiles)]
    lines += ["", f"Machine: {machine['cpu']}, {machine['cpu_cores']} CPU cores ({machine['torch_threads']} torch "
              f"threads), device {machine['device']}, torch {machine['torch']}. Whole benchmark: "
              f"{result.seconds / 60:.1f} min.", ""]
    if result.comparison is not None:
        lines += [f"Paired comparison: `{result.comparison['markdown']}`.", ""]
    lines += ["Command:", "", "```bash", plan.command or "(called from Python)", "```", ""]
    return "\n".join(lines)


def quality_as_dict(result: QualityResult) -> dict[str, Any]:
    """Everything ``quality.json`` holds: settings, split, machine, per model budget, scores and curves."""
    split = result.prepared.split
    models = {m.model: {"config": str(m.config_path), "run_folder": str(m.run_folder),
                        "report_folder": str(m.report_folder), "weights": "last.pt", "budget": asdict(m.budget),
                        "summary": m.summary, "tumour_dice_per_case": [
                            {"case_id": c["case_id"], "tumour_dice": c["tumour_dice"]} for c in m.cases],
                        "tumour_dice_distribution": m.tumour_dice_distribution, "cases": list(m.cases),
                        "failures": list(m.failures), "learning_curve": list(m.learning_curve),
                        "locator": m.locator, "postprocessing": m.postprocessing,
                        "tumour_dice_by_group": tumour_dice_by_group(m, result.tumour_profiles)}
              for m in result.models}
    return {"command": result.prepared.plan.command,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result.prepared.plan).items()},
            "split": {"source": split.source, "disjoint_by": split.disjoint_by, "warning": split.warning,
                      "train_dir": str(split.train_dir), "test_dir": str(split.test_dir),
                      "train_ids": list(split.train_ids), "test_ids": list(split.test_ids),
                      "extra_masks_dir": None if split.extra_masks_dir is None else str(split.extra_masks_dir),
                      "extra_ids": list(split.extra_ids)},
            "machine": result.machine, "seconds": result.seconds, "models": models,
            "test_tumours": [profile.as_dict() for profile in result.tumour_profiles],
            "comparison": {k: str(v) for k, v in result.comparison.items()} if result.comparison else None,
            "figures": {k: str(v) for k, v in result.figures.items()}}


def write_quality_report(result: QualityResult) -> QualityResult:
    """Write ``quality.json`` and ``quality.md`` into the plan's ``out_dir`` atomically; return their paths."""
    out = Path(result.prepared.plan.out_dir)
    json_path = save_json_atomic(out / "quality.json", quality_as_dict(result))
    markdown_path = out / "quality.md"
    write_bytes_atomic(markdown_path, render_quality_markdown(result).encode())
    logger.info("quality report: %s and %s", json_path, markdown_path)
    return replace(result, json_path=json_path, markdown_path=markdown_path)
