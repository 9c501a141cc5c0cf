"""The end-to-end demo on built-in synthetic data: generate, validate, preprocess, sample, train
both models, evaluate them in each CT's original grid and write the comparison report.

Each stage calls the package's own functions exactly as a user's script would.

Two modes, by the demo's ``split.scheme``:

* ``holdout`` (``make demo``, ``configs/demo.yaml``): one run of each model, evaluated on its
  validation cases; the README's results block is rewritten when ``readme`` is set.
* ``kfold`` (``configs/demo_cv.yaml``): every fold of each model is trained
  (:func:`utils.training.cross_validation.train_cross_validation`, experiment folder
  ``<training.output_dir>/<model>_cv<k>_<YYYYmmdd-HHMMSS>/``), each model is evaluated
  out-of-fold on every case (:func:`utils.evaluation.cross_validation.evaluate_cross_validation`),
  the two models are compared on all cases, and the figures go to ``<reports_dir>/results.md``
  (never to a README).

Before anything is generated, :func:`check_demo_outputs` checks where the demo writes
(:mod:`utils.data.output_guard`): its synthetic data folder may not hold KiTS19 cases it did not
generate nor lie inside another data folder, and its reports, cache and run folders may not lie
inside a data folder (its own synthetic folder included).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from utils.analysis.intensity_separability import Separability, measure_separability
from utils.cli.demo_results import (
    CV_TITLE,
    cross_validation_results,
    demo_results,
    render_cross_validation_results,
    update_readme_results,
    write_results_file,
)
from utils.config.demo import DemoConfig
from utils.config.experiment import load_experiment_config
from utils.config.loading import config_as_dict
from utils.data.case_discovery import discover_cases
from utils.data.case_validation import DatasetReport, load_case, select_cases, validate_dataset
from utils.data.dataset_definitions import DATASETS, KITS19, DatasetDefinition, get_dataset
from utils.data.kits_layout import is_case_id
from utils.data.nifti_io import load_nifti, read_voxels, write_bytes_atomic
from utils.data.output_guard import ALLOW_FLAG, OutputGuardError, check_output_location, check_overwrite, is_own_text
from utils.datasets.patches import build_patch_datasets
from utils.datasets.slices import build_slice_dataset
from utils.evaluation.cross_validation import CrossValidationEvaluation, evaluate_cross_validation
from utils.evaluation.report import write_comparison_report
from utils.evaluation.run import RunEvaluation, evaluate_run
from utils.figures.drawing import plot_case_gallery, save_figure
from utils.figures.meshes import plot_meshes
from utils.figures.slice_animation import save_slice_animation
from utils.figures.slice_viewer import plot_slice_viewer
from utils.figures.statistics import plot_training_samples
from utils.figures.training_curves import plot_training_progress, plot_training_runs
from utils.metrics.scoring import dice_names, metric_names
from utils.preprocessing.cache import open_cache
from utils.preprocessing.preprocess import PreprocessingResult, preprocess_dataset
from utils.synthetic.dataset import CaseSummary, SyntheticOptions, generate_dataset
from utils.training.cross_validation import CrossValidationResult, train_cross_validation
from utils.training.engine import TrainingResult, train
from utils.training.run_folder import ProgressLog

#: Augmented training samples of each kind drawn for the demo's figure.
SAMPLES_SHOWN = 6
#: Cases drawn in the demo's gallery (``synthetic_cases.png``): the first ones, so the figure stays readable.
GALLERY_CASES = 16
#: The cross-validated demo's results file, in ``reports_dir``.
RESULTS_FILE = "results.md"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedModel:
    """One model the demo trained: its key, the engine's result, wall time, curve figure and dataset."""

    name: str
    result: TrainingResult
    seconds: float
    figure_path: Path
    dataset: DatasetDefinition = KITS19

    @property
    def best_record(self) -> dict | None:
        """The progress record of the best validated epoch (``None`` without one)."""
        return next((r for r in self.result.records if r["epoch"] == self.result.best_epoch), None)


@dataclass(frozen=True)
class CrossValidatedModel:
    """One model the cross-validated demo trained: every fold, their records, wall time and curve figure.

    Attributes:
        name: the model key. result: what :func:`train_cross_validation` did (experiment folder,
            one outcome per fold). records: each fold's per-epoch records, in fold order.
        seconds: wall time of all folds. figure_path: the folds' training curves.
    """

    name: str
    result: CrossValidationResult
    records: tuple[list[dict], ...]
    seconds: float
    figure_path: Path

    @property
    def best_records(self) -> tuple[dict | None, ...]:
        """Each fold's progress record of its best validated epoch (``None`` without one)."""
        return tuple(next((r for r in records if r["epoch"] == outcome.best_epoch), None)
                     for outcome, records in zip(self.result.folds, self.records, strict=True))

    @property
    def per_case(self) -> list[dict]:
        """Out-of-fold cache-grid validation Dice: every case scored by the best epoch of the fold holding it out."""
        cases = [{**case, "fold": outcome.fold} for outcome, best in zip(self.result.folds, self.best_records,
                                                                         strict=True)
                 for case in (best or {}).get("per_case") or []]
        return sorted(cases, key=lambda case: case["case_id"])

    def mean_dice(self, key: str) -> float | None:
        """The mean of ``key`` (``kidney_dice`` or ``tumour_dice``) over :attr:`per_case` (missing values left out)."""
        values = [case[key] for case in self.per_case if case.get(key) is not None]
        return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced: per-case summaries, the validation report, the intensity floor, files."""

    summaries: list[CaseSummary]
    validation: DatasetReport
    separability: Separability
    preprocessing: PreprocessingResult
    split: tuple[list[str], list[str]]
    gallery_path: Path
    samples_path: Path
    summary_path: Path
    trained: tuple[TrainedModel, ...] = ()
    evaluations: tuple[RunEvaluation, ...] = ()
    comparison: dict[str, Path] | None = None
    visuals: tuple[Path, ...] = ()
    cross_validated: tuple[CrossValidatedModel, ...] = ()
    cross_evaluations: tuple[CrossValidationEvaluation, ...] = ()
    folds: tuple[tuple[list[str], list[str]], ...] = ()
    results_path: Path | None = None
    results_markdown: str | None = None
    dataset: DatasetDefinition = KITS19


def _holds_cases(folder: Path) -> bool:
    """Whether ``folder`` is a KiTS19-layout data folder: it holds ``case_XXXXX`` folders."""
    try:
        return folder.is_dir() and any(is_case_id(p.name) and p.is_dir() for p in folder.iterdir())
    except OSError:
        return False


def is_synthetic_data_folder(folder: Path) -> bool:
    """Whether ``folder`` holds data the synthetic generator wrote: its ``kits.json`` lists each case
    with exactly ``case_id`` and ``voxel_spacing``, or its ``kits23.json`` with exactly ``case_id``
    (the challenges' own files hold clinical fields too)."""
    return any(_is_generated_metadata(folder, dataset) for dataset in DATASETS.values())


def _is_generated_metadata(folder: Path, dataset: DatasetDefinition) -> bool:
    """Whether ``folder`` holds the dataset's metadata file as the synthetic generator writes it."""
    try:
        entries = json.loads((folder / dataset.metadata_name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    keys = {"case_id", "voxel_spacing"} if dataset.metadata_has_spacing else {"case_id"}
    return isinstance(entries, list) and bool(entries) and all(isinstance(e, dict) and set(e) == keys for e in entries)


def _demo_output_folders(config: DemoConfig) -> dict[str, Path]:
    """The folders the demo writes besides its synthetic data, by the setting that names them."""
    folders = {"reports_dir": Path(config.reports_dir), "preprocessing.cache_dir": Path(config.preprocessing.cache_dir)}
    for path in config.train_configs:
        try:
            experiment = load_experiment_config(path, train_overrides(config))
        except (ValueError, FileNotFoundError):
            continue  # reported when training starts
        folders[f"training.output_dir ({path})"] = Path(experiment.training.output_dir)
        folders[f"preprocessing.cache_dir ({path})"] = Path(experiment.preprocessing.cache_dir)
    return folders


def train_overrides(config: DemoConfig) -> tuple[str, ...]:
    """The overrides applied to each experiment the demo trains: ``train_overrides``, preceded by the
    demo's own split, so that every model trains and validates on the cases the demo reports
    (holdout: ``split.scheme``, ``split.validation_fraction``, ``split.seed``; cross-validated:
    ``split.scheme``, ``split.folds``, ``split.seed``)."""
    split = config.split
    own = (f"split.folds={split.folds}" if config.cross_validation
           else f"split.validation_fraction={split.validation_fraction}")
    return (f"split.scheme={split.scheme}", own, f"split.seed={split.seed}", *config.train_overrides)


def check_demo_datasets(config: DemoConfig) -> None:
    """Refuse an experiment of ``train_configs`` made for another dataset than the demo's.

    Raises:
        ValueError: naming the experiment file, its dataset and the demo's.
    """
    for path in config.train_configs:
        experiment = load_experiment_config(path, train_overrides(config))
        if experiment.dataset != config.dataset:
            raise ValueError(f"{path}: the experiment trains on dataset {experiment.dataset}, but the demo generates "
                             f"{config.dataset} data (the demo config's 'dataset:'); list experiments of "
                             f"{config.dataset} in train_configs")


def check_demo_outputs(config: DemoConfig, *, allow_inside_input: bool = False) -> None:
    """Refuse demo outputs that would land in, or over, data the demo did not generate.

    * ``synthetic.out_dir`` (rewritten by every run) may not hold ``case_XXXXX`` folders unless
      an earlier run generated them (:func:`is_synthetic_data_folder`), nor lie inside a data folder;
    * the reports, cache and run folders may not be, or lie inside, ``synthetic.out_dir`` or any
      other data folder above them, unless ``allow_inside_input``;
    * the cross-validated demo's ``<reports_dir>/results.md`` may only replace a results file an
      earlier run wrote.

    Raises:
        OutputGuardError: the message names the setting, the output and the data folder.
    """
    data = Path(config.synthetic.out_dir).expanduser().resolve()
    if _holds_cases(data) and not is_synthetic_data_folder(data):
        title = get_dataset(config.dataset).title
        raise OutputGuardError(data, data, f"synthetic.out_dir {data} holds {title} cases the demo did not generate; "
                                           "the demo rewrites its data folder, so choose an empty or new folder")
    for ancestor in data.parents:
        if _holds_cases(ancestor):
            check_output_location(data, [ancestor], what="synthetic.out_dir", allow_inside_input=allow_inside_input)
    for setting, folder in _demo_output_folders(config).items():
        resolved = folder.expanduser().resolve()
        if data.is_dir():
            check_output_location(resolved, [data], what=setting, allow_inside_input=allow_inside_input)
        elif (resolved == data or data in resolved.parents) and not allow_inside_input:  # not generated yet
            raise OutputGuardError(resolved, data, f"{setting} {resolved} is inside the input data folder {data} "
                                                   "(synthetic.out_dir), which is never written to by other stages; "
                                                   f"choose an output outside it (or pass {ALLOW_FLAG})")
        for ancestor in (resolved, *resolved.parents):
            if _holds_cases(ancestor):
                check_output_location(resolved, [ancestor], what=setting, allow_inside_input=allow_inside_input)
    if config.cross_validation:
        check_overwrite(Path(config.reports_dir) / RESULTS_FILE, is_own_text(CV_TITLE), what="results file")


def run_demo(config: DemoConfig, show_progress: bool = True, *, allow_inside_input: bool = False) -> DemoResult:
    """Run the demo: generate, validate, measure, preprocess, sample, train, evaluate, compare, write the summary.

    With ``split.scheme: kfold`` every fold of each model is trained and evaluated out-of-fold
    (see the module docstring); the results go to ``<reports_dir>/results.md``.

    Raises:
        OutputGuardError: an output would land in or over data (:func:`check_demo_outputs`),
            checked before anything is written.
        UnusableCaseError: a generated case failed validation (the message names it).
    """
    check_demo_outputs(config, allow_inside_input=allow_inside_input)
    check_demo_datasets(config)
    started = time.perf_counter()
    synthetic = config.synthetic
    dataset = get_dataset(config.dataset)
    options = SyntheticOptions(matrix=synthetic.matrix, spacing=synthetic.spacing, dataset=dataset.name)
    summaries = generate_dataset(synthetic.out_dir, synthetic.cases, seed=synthetic.seed, options=options,
                                 workers=synthetic.workers, show_progress=show_progress)
    report = validate_dataset(synthetic.out_dir, full=True, show_progress=show_progress, dataset=dataset)
    reports_dir = Path(config.reports_dir)
    pooled, gallery_path = _look_at_cases(report, dataset, reports_dir / "synthetic_cases.png")
    prepared = preprocess_dataset(synthetic.out_dir, config.preprocessing, config.split, workers=synthetic.workers,
                                  show_progress=show_progress, dataset=dataset)
    samples_path, split = _save_training_samples(config, prepared.folder, reports_dir / "training_samples.png")
    summary = {
        "config": config_as_dict(config),
        "cases": [asdict(s) for s in summaries],
        "validation": report.counts,
        "intensity_only_floor": asdict(pooled),
        "cache": {"folder": prepared.folder, "cases": prepared.case_ids, "written": prepared.written,
                  "skipped": prepared.skipped, "failed": prepared.failed, "seconds": prepared.seconds,
                  "normalisation": {"clip_hu": prepared.fingerprint.clip_hu,
                                    "mean_hu": prepared.fingerprint.foreground_mean_hu,
                                    "std_hu": prepared.fingerprint.foreground_std_hu},
                  "split": {"train": split[0], "val": split[1]}},
    }
    if config.cross_validation:
        return _run_cross_validated(config, summary, reports_dir, started, show_progress,
                                    DemoResult(summaries, report, pooled, prepared, split, gallery_path, samples_path,
                                               reports_dir / "dataset_summary.json"),
                                    allow_inside_input=allow_inside_input)
    trained = tuple(_train(config, path, reports_dir, show_progress) for path in config.train_configs)
    summary["training"] = {model.name: _training_summary(model) for model in trained}
    if len(trained) > 1:
        summary["training_curves"] = save_figure(
            plot_training_runs({model.name: model.result.records for model in trained}, title="quick models"),
            reports_dir / "training_progress_models.png")
    evaluations, comparison = _evaluate_and_compare(config, trained, reports_dir, show_progress)
    summary["evaluation"] = {e.inference["model"]: {"report": e.report_folder, "summary": e.evaluation.summary,
                                                    "seconds_per_case": _mean_seconds(e.inference["cases"]),
                                                    "parameters": e.inference["parameters"]}
                             for e in evaluations}
    summary["comparison"] = comparison
    visuals = _save_case_visuals(config, evaluations[0], reports_dir) if evaluations else ()
    summary["visuals"] = visuals
    summary_path = reports_dir / "dataset_summary.json"
    summary["seconds"] = time.perf_counter() - started
    summary = json.loads(json.dumps(summary, default=_jsonable))
    write_bytes_atomic(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    if config.readme is not None and trained:
        _update_readme(config.readme, summary)
    return DemoResult(summaries, report, pooled, prepared, split, gallery_path, samples_path, summary_path, trained,
                      evaluations, comparison, visuals, dataset=dataset)


def _run_cross_validated(config: DemoConfig, summary: dict, reports_dir: Path, started: float, show_progress: bool,
                         partial: DemoResult, *, allow_inside_input: bool) -> DemoResult:
    """The cross-validated demo after sampling: train every fold of each model, evaluate each out-of-fold
    on every case, compare the first two on all cases, write the summary and ``results.md``."""
    cache = open_cache(partial.preprocessing.folder)
    folds = tuple(cache.split(fold) for fold in range(config.split.folds))
    summary["cache"]["split"] = {"scheme": config.split.scheme, "seed": config.split.seed,
                                 "folds": [{"train": train_ids, "val": val_ids} for train_ids, val_ids in folds]}
    trained = tuple(_train_folds(config, path, reports_dir, show_progress) for path in config.train_configs)
    summary["training"] = {model.name: _cross_validation_summary(model) for model in trained}
    if len(trained) > 1:  # fold 0 of each model side by side
        summary["training_curves"] = save_figure(
            plot_training_runs({f"{model.name} fold 0": model.records[0] for model in trained[:4]},
                               title="quick models, fold 0"),
            reports_dir / "training_progress_models.png")
    evaluations = tuple(evaluate_cross_validation(model.result.folder, data_dir=config.synthetic.out_dir,
                                                  reports_dir=reports_dir, show_progress=show_progress,
                                                  postprocess=config.postprocess,
                                                  allow_inside_input=allow_inside_input)
                        for model in trained)
    summary["evaluation"] = {model.name: _out_of_fold_summary(evaluation)
                             for model, evaluation in zip(trained, evaluations, strict=True)}
    comparison = None
    if len(evaluations) > 1:
        comparison = write_comparison_report(evaluations[0].report_folder, evaluations[1].report_folder,
                                             reports_dir / "comparison", n_resamples=config.bootstrap_resamples,
                                             seed=config.seed)
        compared = json.loads(Path(comparison["json"]).read_text(encoding="utf-8"))
        summary["paired_comparison"] = {"a": trained[0].name, "b": trained[1].name,
                                        "cases": len(compared["shared_cases"]), "paired": compared["paired"]}
    summary["comparison"] = comparison
    visuals = ()
    if evaluations:
        first = evaluations[0]
        visuals = _save_report_visuals(config, first.report_folder, first.experiment.model_name,
                                       first.cases[0]["case_id"], reports_dir)
    summary["visuals"] = visuals
    summary_path = reports_dir / "dataset_summary.json"
    summary["seconds"] = time.perf_counter() - started
    summary = json.loads(json.dumps(summary, default=_jsonable))
    write_bytes_atomic(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    results_path, markdown = None, None
    if trained:
        results = cross_validation_results(summary, seconds=summary["seconds"], machine=_machine())
        results_path = write_results_file(reports_dir / RESULTS_FILE, results)
        markdown = render_cross_validation_results(results)
        logger.info("cross-validated demo results written: %s", results_path)
    return replace(partial, split=folds[0], trained=(), evaluations=(), comparison=comparison, visuals=visuals,
                   cross_validated=trained, cross_evaluations=evaluations, folds=folds, results_path=results_path,
                   results_markdown=markdown)


def _train_folds(config: DemoConfig, experiment_path: str, reports_dir: Path,
                 show_progress: bool) -> CrossValidatedModel:
    """Train every fold of one model on the demo's synthetic cases (a new experiment folder) and save its curves."""
    experiment = load_experiment_config(experiment_path, train_overrides(config))
    name = f"{experiment.model.name}_cv{experiment.split.folds}_{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    result = train_cross_validation(experiment, name, data_dir=config.synthetic.out_dir, show_progress=show_progress)
    seconds = time.perf_counter() - started
    unfinished = [outcome.fold for outcome in result.folds if outcome.status != "finished"]
    if unfinished:
        raise RuntimeError(f"{result.folder}: fold(s) {unfinished} did not finish")
    records = tuple(ProgressLog(outcome.run_folder).records for outcome in result.folds)
    shown = {f"fold {outcome.fold}": fold_records
             for outcome, fold_records in zip(result.folds[:4], records, strict=False)}
    figure_path = save_figure(plot_training_runs(shown, title=result.folder.name),
                              reports_dir / f"training_progress_{experiment.model.name}.png")
    return CrossValidatedModel(experiment.model.name, result, records, seconds, figure_path)


def _cross_validation_summary(model: CrossValidatedModel) -> dict:
    """What ``dataset_summary.json`` records of one cross-validated model."""
    folds = []
    for outcome, best in zip(model.result.folds, model.best_records, strict=True):
        best = best or {}
        folds.append({"fold": outcome.fold, "run_folder": outcome.run_folder, "status": outcome.status,
                      "best_epoch": outcome.best_epoch, "kidney_dice": best.get("kidney_dice"),
                      "tumour_dice": best.get("tumour_dice"), "validation_cases": len(best.get("per_case") or [])})
    return {"experiment": model.result.folder, "seconds": model.seconds,
            "folds_finished": sum(outcome.status == "finished" for outcome in model.result.folds), "folds": folds,
            "kidney_dice": model.mean_dice("kidney_dice"), "tumour_dice": model.mean_dice("tumour_dice"),
            "per_case": model.per_case}


def _out_of_fold_summary(evaluation: CrossValidationEvaluation) -> dict:
    """What ``dataset_summary.json`` records of one out-of-fold evaluation."""
    inference = evaluation.inference or {}
    return {"report": evaluation.report_folder, "summary": evaluation.summary, "cases": len(evaluation.cases),
            "fold_means": {str(fold["fold"]): fold["mean"] for fold in evaluation.fold_summaries},
            "seconds_per_case": _mean_seconds(inference.get("cases") or []),
            "parameters": inference.get("parameters")}


def _train(config: DemoConfig, experiment_path: str, reports_dir: Path, show_progress: bool) -> TrainedModel:
    """Train one model on the demo's synthetic cases and save its training curves."""
    experiment = load_experiment_config(experiment_path, train_overrides(config))
    started = time.perf_counter()
    result = train(experiment, data_dir=config.synthetic.out_dir, show_progress=show_progress)
    seconds = time.perf_counter() - started
    figure_path = save_figure(plot_training_progress(result.records, title=result.run_folder.name),
                              reports_dir / f"training_progress_{experiment.model.name}.png")
    return TrainedModel(experiment.model.name, result, seconds, figure_path, get_dataset(experiment.dataset))


def _evaluate_and_compare(config: DemoConfig, trained: tuple[TrainedModel, ...], reports_dir: Path,
                          show_progress: bool) -> tuple[tuple[RunEvaluation, ...], dict[str, Path] | None]:
    """Evaluate each trained run on its validation cases in the original grid; compare the first two."""
    evaluations = tuple(evaluate_run(model.result.run_folder, data_dir=config.synthetic.out_dir,
                                     reports_dir=reports_dir, postprocess=config.postprocess,
                                     show_progress=show_progress) for model in trained)
    if len(evaluations) < 2:
        return evaluations, None
    comparison = write_comparison_report(evaluations[0].report_folder, evaluations[1].report_folder,
                                         reports_dir / "comparison", n_resamples=config.bootstrap_resamples,
                                         seed=config.seed)
    return evaluations, comparison


def _save_case_visuals(config: DemoConfig, evaluation: RunEvaluation, reports_dir: Path) -> tuple[Path, ...]:
    """For the first evaluated case: 3D meshes (HTML), a slice viewer (HTML) and a sagittal sweep (GIF)."""
    return _save_report_visuals(config, evaluation.report_folder, evaluation.inference["model"],
                                evaluation.evaluation.cases[0]["case_id"], reports_dir)


def _save_report_visuals(config: DemoConfig, report_folder: Path, model: str, case_id: str,
                         reports_dir: Path) -> tuple[Path, ...]:
    """For one case of a report folder: 3D meshes (HTML), a slice viewer (HTML) and a sagittal sweep (GIF)."""
    dataset = get_dataset(config.dataset)
    case = load_case(next(c for c in discover_cases(config.synthetic.out_dir, dataset).cases if c.case_id == case_id),
                     dataset=dataset)
    prediction = read_voxels(load_nifti(report_folder / "predictions" / f"{case_id}.nii.gz"), np.uint8)
    name = f"{case_id}_{model}"
    plot_meshes(case.segmentation, prediction, case.spacing, path=reports_dir / f"3d_{name}.html",
                title=f"{case_id}: ground truth | {model}", dataset=dataset)
    plot_slice_viewer(case.image, case.segmentation, case.spacing, prediction=prediction,
                      path=reports_dir / f"viewer_{name}.html", dataset=dataset)
    animation = save_slice_animation(case.image, case.segmentation, case.spacing,
                                     reports_dir / f"sagittal_{name}.gif", prediction=prediction)
    return reports_dir / f"3d_{name}.html", reports_dir / f"viewer_{name}.html", animation


def _look_at_cases(report: DatasetReport, dataset: DatasetDefinition, gallery_path: Path) -> tuple[Separability, Path]:
    """The intensity-only floor over every case, and a gallery of the first :data:`GALLERY_CASES`.

    Cases are read one at a time, so memory holds the gallery's cases only, however many were generated.
    """
    shown: list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]] = []

    def images_and_labels() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for files in select_cases(report, on_bad="error"):
            case = load_case(files, dataset=dataset)
            if len(shown) < GALLERY_CASES:
                shown.append((case.case_id, case.image, case.segmentation, case.spacing))
            yield case.image, case.segmentation

    pooled, _ = measure_separability(images_and_labels())
    return pooled, save_figure(plot_case_gallery(shown, dataset=dataset), gallery_path)


def _mean_seconds(cases: list[dict]) -> float | None:
    """Mean seconds per case of an evaluation's segmentation timings."""
    return sum(case["seconds"] for case in cases) / len(cases) if cases else None


def _machine() -> str:
    """Where the demo ran, in a few words (the README's results say it)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()} CPU cores, no GPU"


def _update_readme(readme: str, summary: dict) -> None:
    """Rewrite the README's results block with this run's figures (a warning when it cannot)."""
    try:
        path = update_readme_results(readme, demo_results(summary, seconds=summary["seconds"], machine=_machine()))
        logger.info("README results updated: %s", path)
    except (OSError, ValueError) as error:
        logger.warning("README results not updated: %s", error)


def _training_summary(model: TrainedModel) -> dict:
    """What ``dataset_summary.json`` records of one trained model."""
    best = model.best_record or {}
    return {"run_folder": model.result.run_folder, "seconds": model.seconds, "best_epoch": model.result.best_epoch,
            **{key: best.get(key) for key in dice_names(model.dataset)},
            "per_case": best.get("per_case"), "validation_space": best.get("validation_space")}


def _save_training_samples(config: DemoConfig, cache_folder: Path,
                           path: Path) -> tuple[Path, tuple[list[str], list[str]]]:
    """Draw augmented 3D patches (their middle axial slice) and 2D slices as the models see them; save a figure."""
    cache = open_cache(cache_folder)
    patches, _ = build_patch_datasets(cache, config.patches, config.augmentation, seed=config.seed)
    slices = build_slice_dataset(cache, config.slices, config.augmentation, seed=config.seed)
    samples = [patches[i] for i in range(SAMPLES_SHOWN)] + [slices[i] for i in range(SAMPLES_SHOWN)]
    figure = plot_training_samples(samples, columns=SAMPLES_SHOWN)
    return save_figure(figure, path), cache.split(0)


def format_demo_result(result: DemoResult) -> str:
    """The demo's summary as text: a per-case table, validation counts and the intensity floor."""
    cyst = result.dataset.has_label("cyst")
    lines = [f"{'case':<12} {'status':<15} {'shape (Z,Y,X)':<17} {'spacing mm (Z,Y,X)':<21} "
             f"{'kidney ml':>9} {'tumour ml':>9}" + (f" {'cyst ml':>9}" if cyst else "")]
    status = {r.case_id: r.status for r in result.validation.reports}
    for s in result.summaries:
        spacing = " x ".join(f"{v:.2f}" for v in s.spacing)
        lines.append(f"{s.case_id:<12} {status.get(s.case_id, '?'):<15} {str(s.shape):<17} {spacing:<21} "
                     f"{s.kidney_ml:>9.1f} {s.tumour_ml:>9.1f}" + (f" {s.cyst_ml or 0.0:>9.1f}" if cyst else ""))
    counts = ", ".join(f"{k}: {v}" for k, v in result.validation.counts.items())
    floor = result.separability
    prepared = result.preprocessing
    low, high = prepared.fingerprint.clip_hu
    lines += [f"validation (full): {counts}",
              f"intensity-only floor: best HU interval {floor.kidney_interval_hu} gives kidney Dice "
              f"{floor.kidney_interval_dice:.3f}; best HU threshold inside kidney gives tumour Dice "
              f"{floor.tumour_threshold_dice:.3f}",
              f"cache: {prepared.folder} ({len(prepared.written)} written, {len(prepared.skipped)} up to date, "
              f"{len(prepared.failed)} failed, {prepared.seconds:.1f} s)",
              f"normalisation: clip to [{low:.0f}, {high:.0f}] HU, z-score with mean "
              f"{prepared.fingerprint.foreground_mean_hu:.1f} HU and std "
              f"{prepared.fingerprint.foreground_std_hu:.1f} HU",
              _split_line(result),
              f"figures: {result.gallery_path}, {result.samples_path}", f"summary: {result.summary_path}"]
    for model in result.trained:
        lines.append(f"training {model.name}: {model.result.run_folder} in {model.seconds:.0f} s, best epoch "
                     f"{model.result.best_epoch}; curves {model.figure_path}")
    if result.trained:
        lines += format_validation_table(result.trained)
    if result.evaluations:
        lines += format_evaluation_table(result.evaluations, result.dataset)
    if result.cross_validated:
        lines += _format_cross_validation(result)
    if result.comparison is not None:
        lines.append(f"comparison report: {result.comparison['markdown']} (and {result.comparison['html'].name})")
    if result.visuals:
        report = (result.evaluations or result.cross_evaluations)[0].report_folder
        lines.append(f"case figures: {', '.join(str(p) for p in result.visuals)}; overlays and error maps in "
                     f"{report / 'figures'}")
    if result.results_path is not None:
        lines += [f"results: {result.results_path}", "", result.results_markdown or ""]
    return "\n".join(lines)


def _split_line(result: DemoResult) -> str:
    if not result.folds:
        return f"split: {len(result.split[0])} train, {len(result.split[1])} validation cases"
    sizes = ", ".join(str(len(val_ids)) for _, val_ids in result.folds)
    return (f"split: {len(result.folds)} folds, each case validated by exactly one fold ({sizes} validation "
            "cases per fold)")


def _format_cross_validation(result: DemoResult) -> list[str]:
    """The cross-validated demo's lines: training of each model's folds, out-of-fold Dice, out-of-fold evaluation."""
    lines = []
    for model in result.cross_validated:
        finished = sum(outcome.status == "finished" for outcome in model.result.folds)
        epochs = ", ".join(str(outcome.best_epoch) for outcome in model.result.folds)
        lines.append(f"cross-validation {model.name}: {model.result.folder}, {finished} of {len(model.result.folds)} "
                     f"folds finished in {model.seconds:.0f} s, best epochs {epochs}; curves {model.figure_path}")
    lines += _validation_table(
        "out-of-fold validation Dice per case (KiTS19: kidney = label > 0, tumour = label 2; cache grid, best "
        "epoch of the fold that held the case out):",
        [(m.name, m.per_case, (m.mean_dice("kidney_dice"), m.mean_dice("tumour_dice")))
         for m in result.cross_validated])
    if result.cross_evaluations:
        lines += _evaluation_table(
            "out-of-fold evaluation in each CT's original grid (every case, segmented by the fold that held it "
            "out; mean, HD95 in mm, missing counted):",
            [(e.experiment.model_name, e.summary) for e in result.cross_evaluations])
        lines += [f"out-of-fold report {e.experiment.model_name}: {e.report_folder} ({len(e.cases)} cases)"
                  for e in result.cross_evaluations]
    return lines


def format_evaluation_table(evaluations: tuple[RunEvaluation, ...], dataset: DatasetDefinition = KITS19) -> list[str]:
    """Each evaluated model's mean metrics in the CTs' original grids (missing HD95 counted)."""
    processed = "post-processed predictions" if any(e.inference.get("postprocess") for e in evaluations) else \
        "raw predictions"
    title = f"evaluation in each CT's original grid (validation cases, {processed}; mean, HD95 in mm, missing counted):"
    return _evaluation_table(title, [(e.inference["model"], e.evaluation.summary) for e in evaluations], dataset)


def _evaluation_table(title: str, summaries: list[tuple[str, dict]], dataset: DatasetDefinition = KITS19) -> list[str]:
    """``title``, then one row of mean metrics per ``(model, summary)``: the dataset's :func:`metric_names`."""
    names = metric_names(dataset)
    width = max(20, *(len(name) for name in names))
    lines = [title, f"{'model':<12}" + "".join(f" {name:>{width}}" for name in names)]
    for model, summary in summaries:
        cells = []
        for name in names:
            stats = summary[name]
            text = "-" if stats["mean"] is None else f"{stats['mean']:.3f}"
            if stats["missing"]:
                text += f" ({stats['missing']} missing)"
            cells.append(f" {text:>{width}}")
        lines.append(f"{model:<12}" + "".join(cells))
    return lines


def _dice_rule(dataset: DatasetDefinition) -> str:
    """How the validation Dice columns are built from the labels, for a table title."""
    if dataset is KITS19:
        return "KiTS19: kidney = label > 0, tumour = label 2"
    return f"{dataset.title}: {dataset.region_rule}"


def format_validation_table(trained: tuple[TrainedModel, ...]) -> list[str]:
    """The models' per-case validation Dice side by side (best epoch of each run), and their means."""
    dataset = trained[0].dataset if trained else KITS19
    keys = dice_names(dataset)
    return _validation_table(
        f"validation Dice per case ({_dice_rule(dataset)}; cache grid, best epoch):",
        [(m.name, (m.best_record or {}).get("per_case") or [],
          tuple((m.best_record or {}).get(key) for key in keys)) for m in trained], dataset)


def _validation_table(title: str, models: list[tuple[str, list[dict], tuple[float | None, ...]]],
                      dataset: DatasetDefinition = KITS19) -> list[str]:
    """``title``, a header, one row per case (each model's Dice of every region) and the models' means."""
    keys = dice_names(dataset)
    regions = [key.removesuffix("_dice").replace("_", " ") for key in keys]
    widths = [[max(17, len(f"{name} {regions[0]}")), *(max(7, len(region)) for region in regions[1:])]
              for name, _, _ in models]
    header = f"{'validation case':<16}" + "".join(
        f" {name + ' ' + regions[0]:>{w[0]}}" + "".join(f" {region:>{width}}" for region, width in
                                                           zip(regions[1:], w[1:], strict=True))
        for (name, _, _), w in zip(models, widths, strict=True))
    per_model = [{case["case_id"]: case for case in per_case} for _, per_case, _ in models]
    lines = [title, header]
    for case_id in sorted(set().union(*per_model)):
        cells = [tuple(scores[case_id].get(key) for key in keys) if case_id in scores else None
                 for scores in per_model]
        lines.append(f"{case_id:<16}" + "".join(_dice_cells(c, w) for c, w in zip(cells, widths, strict=True)))
    lines.append(f"{'mean':<16}" + "".join(_dice_cells(means, w)
                                           for (_, _, means), w in zip(models, widths, strict=True)))
    return lines


def _dice_cells(values: tuple[float | None, ...] | None, widths: list[int]) -> str:
    values = values if values is not None else (None,) * len(widths)
    return "".join(f" {'-' if v is None else f'{v:.3f}':>{w}}" for v, w in zip(values, widths, strict=True))


def _jsonable(value: object) -> object:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
