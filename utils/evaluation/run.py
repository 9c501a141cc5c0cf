"""Evaluating a trained run: segment its validation cases (or any data folder) in each CT's
original grid, score them with the metrics of the model's dataset and write the report folder.

The dataset is the model's (its experiment config's ``dataset``,
:attr:`utils.inference.segment.SegmentationModel.dataset`): a KiTS19 model is scored on kidney
and tumour, a KiTS23 model on KiTS23's hierarchical evaluation regions (kidney and masses,
masses, tumour), with that dataset's labels read from the ground truth and its layout expected
in the data folder (``kits23.json``); a data folder laid out for another dataset is refused.

:func:`evaluate_run` is what ``scripts/eval_unet.py``, ``scripts/eval_unetr.py`` and their
notebooks call. It writes into ``reports/<run-name>/``:

* ``predictions/case_XXXXX.nii.gz``: uint8 label maps with each CT's own shape and affine
  (exactly what ``scripts/segment.py`` writes for the same checkpoint);
* ``metrics.json`` / ``metrics.csv``: :func:`utils.evaluation.predictions.evaluate_predictions` on those files;
* ``inference.json``: run name, model, parameter count, device, checkpoint and the wall time of
  each case from reading its CT to writing its prediction (and, for a model of another dataset
  than KiTS19, its ``dataset``);
* ``case_scores.png``: per-case Dice and HD95;
* ``figures/<case>_overlay.png`` and ``figures/<case>_errors.png``: for every case, the CT with
  truth and prediction side by side and the per-class error map (true positives, false
  positives, false negatives), axial slice through the tumour's centre, at the physical aspect.

The validation cases are the run's own: the split of its training cache's cases made with its
``split`` settings (the split depends only on those case ids and ``split.seed``), fold
``training.fold``.

A cross-validated experiment folder has no validation split of its own (each fold has one):
:func:`utils.evaluation.cross_validation.evaluate_cross_validation` evaluates it out of fold,
through the same :func:`segment_cases` and :func:`score_report` as a single run.

The report folder is checked before the model is loaded (:mod:`utils.data.output_guard`): it
may not be, or lie inside, the data folder, and its ``metrics.json``, ``metrics.csv``,
``inference.json`` and predictions are only replaced when an earlier evaluation wrote them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.config.experiment import load_experiment_config
from utils.data.case_discovery import CaseFiles, DatasetListing, discover_cases, resolve_data_dir
from utils.data.case_validation import load_case
from utils.data.dataset_definitions import DATASETS, KITS19, DatasetDefinition, DatasetLayoutError
from utils.data.nifti_io import load_nifti, read_voxels, save_json_atomic
from utils.data.output_guard import check_output_location, check_overwrite, is_own_json, is_own_prediction
from utils.data.progress import progress
from utils.data.splits import make_splits
from utils.evaluation.predictions import EvaluationResult, check_metrics_files, evaluate_predictions
from utils.figures.drawing import save_figure
from utils.figures.evaluation import plot_case_scores
from utils.figures.slices import plot_error_map, plot_overlay
from utils.inference.segment import CHECKPOINT_NAMES, SegmentationModel, load_segmentation_model, segment_file
from utils.metrics.surface import DEFAULT_TOLERANCE_MM
from utils.networks.models import count_parameters
from utils.training.cross_validation import MANIFEST as CROSS_VALIDATION_MANIFEST

logger = logging.getLogger(__name__)

INFERENCE_JSON = "inference.json"
PREDICTIONS = "predictions"
CASE_SELECTIONS = ("validation", "all")
FIGURES = "figures"
#: The evaluation script of each model, named when a run goes to the wrong one.
EVALUATION_SCRIPTS = {"resunet3d": "scripts/eval_unet.py", "unetr2d": "scripts/eval_unetr.py"}
#: Keys every ``inference.json`` holds: how an earlier record is recognised before it is replaced.
INFERENCE_KEYS = ("run_name", "model", "checkpoint", "cases")


@dataclass(frozen=True)
class RunEvaluation:
    """What :func:`evaluate_run` wrote: the report folder, the scores, the inference record, the
    ``case_scores.png`` figure and the dataset the run was scored on (the model's)."""

    report_folder: Path
    evaluation: EvaluationResult
    inference: dict
    figure_path: Path | None
    dataset: DatasetDefinition = KITS19


def discover_model_cases(data_dir: Path, dataset: DatasetDefinition, run_name: str) -> DatasetListing:
    """The cases of ``data_dir`` read as the model's dataset (:func:`utils.data.case_discovery.discover_cases`).

    Raises:
        DatasetLayoutError: (a ``ValueError``) the folder holds another dataset's metadata file;
            the message names the folder, the run and both datasets.
    """
    try:
        return discover_cases(data_dir, dataset)
    except DatasetLayoutError:
        found = next(d for d in DATASETS.values() if d is not dataset and (data_dir / d.metadata_name).exists())
        raise DatasetLayoutError(
            f"{data_dir} holds {found.metadata_name}, the {found.title} layout, but {run_name} is a {dataset.title} "
            f"model (its config's 'dataset: {dataset.name}', labels {dataset.describe_labels()}); evaluate it on "
            f"{dataset.title} data, or evaluate a {found.title} model on this folder") from None


def select_run_cases(segmenter: SegmentationModel, data_dir: Path, cases: str) -> list[str]:
    """Case ids to evaluate: the run's validation split (``"validation"``) or every case with labels (``"all"``).

    ``data_dir`` is read as the model's dataset (:attr:`SegmentationModel.dataset`).

    Raises:
        ValueError: unknown selection; validation cases missing from ``data_dir``; no case; a
            data folder laid out for another dataset than the model's.
    """
    if cases not in CASE_SELECTIONS:
        raise ValueError(f"cases must be one of {list(CASE_SELECTIONS)}, got {cases!r}")
    listing = discover_model_cases(data_dir, segmenter.dataset, segmenter.run_name)
    labelled = sorted(case.case_id for case in listing.cases
                      if case.segmentation is not None and case.imaging is not None)
    if cases == "all":
        chosen = labelled
    else:
        if segmenter.model_count > 1:
            raise ValueError(f"{segmenter.checkpoint} holds the models of several folds, which together were trained "
                             "on every case: it has no validation cases of its own; evaluate it with cases='all' "
                             "on held-out data, or evaluate the experiment out of fold (evaluate_cross_validation, "
                             "eval --run EXPERIMENT)")
        config = segmenter.config
        splits = make_splits(segmenter.training_case_ids, config.split)
        chosen = splits[config.training.fold]["val"]
        absent = sorted(set(chosen) - set(labelled))
        if absent:
            raise ValueError(f"{data_dir}: validation case(s) {absent} of run {segmenter.run_name} have no "
                             "CT and segmentation there; give the data folder the run was trained on, or cases='all'")
    if not chosen:
        raise ValueError(f"{data_dir}: no case with a CT and a segmentation to evaluate")
    return chosen


def _data_dir_before_loading(run: Path, data_dir: str | os.PathLike | None) -> Path | None:
    """The data folder as far as it is known without loading the checkpoint (``None`` when it is not)."""
    if data_dir is not None and str(data_dir):
        return Path(data_dir) if Path(data_dir).is_dir() else None
    config_path = run / "config.yaml" if run.is_dir() else run.parent / "config.yaml"
    try:
        configured = load_experiment_config(config_path).data_dir if config_path.is_file() else None
    except (ValueError, FileNotFoundError):
        configured = None
    configured = configured or os.environ.get("KITS19_DATA")
    return Path(configured) if configured and Path(configured).is_dir() else None


def _report_before_loading(run: Path, reports_dir: str | os.PathLike, out_dir: str | os.PathLike | None) -> Path:
    """The report folder as :func:`evaluate_run` will name it, from the run's path alone."""
    if out_dir is not None:
        return Path(out_dir)
    name = run.name if run.is_dir() else (run.parent.name if run.name in CHECKPOINT_NAMES else run.stem)
    return Path(reports_dir) / _report_name(name, ensemble=run.is_dir() and any(run.glob("fold_*/*.pt")))


def _report_name(run_name: str, *, ensemble: bool) -> str:
    """A run's report folder name; a fold ensemble's gets ``_ensemble`` (the experiment's own name is
    its out-of-fold report's)."""
    return f"{run_name}_ensemble" if ensemble else run_name


def check_report_folder(report: Path, data: Path | None, case_ids: list[str] | tuple[str, ...] = (), *,
                        allow_inside_input: bool = False) -> None:
    """Refuse a report folder inside the data folder, or one holding files an evaluation did not write.

    Raises:
        OutputGuardError: (a ``ValueError``) the report folder is or lies inside ``data``, or its
            ``metrics.json``, ``metrics.csv``, ``inference.json`` or the prediction of one of
            ``case_ids`` exists and was not written by an earlier evaluation.
    """
    check_output_location(report, [data], what="report folder", allow_inside_input=allow_inside_input)
    check_metrics_files(report)
    check_overwrite(report / INFERENCE_JSON, is_own_json(INFERENCE_KEYS), what="report file")
    for case_id in case_ids:
        check_overwrite(report / PREDICTIONS / f"{case_id}.nii.gz", is_own_prediction, what="prediction")


def evaluate_run(run: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, cases: str = "validation",
                 reports_dir: str | os.PathLike = "reports", out_dir: str | os.PathLike | None = None,
                 device: str | None = None, tta: bool = False, postprocess: bool = False,
                 restore: str = "probabilities", tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                 show_progress: bool = True, allow_inside_input: bool = False) -> RunEvaluation:
    """Segment the run's evaluation cases from their raw CTs and score them in the original grid.

    Scores are those of the model's dataset (its config's ``dataset``): KiTS19 kidney and
    tumour, or KiTS23's hierarchical evaluation regions; ``metrics.json`` then records the
    dataset in its ``settings``.

    Args:
        run: a run folder (``best.pt``, else ``last.pt``) or a checkpoint file.
        data_dir: KiTS-layout folder with CTs and segmentations of the model's dataset (default:
            the run's ``data_dir``, then ``KITS19_DATA``).
        cases: ``"validation"`` (the run's validation split) or ``"all"`` (every labelled case).
        reports_dir: root of report folders; the report goes to ``reports_dir/<run-name>``
            (``<experiment>_ensemble`` for the fold ensemble of an experiment, whose plain name
            is its out-of-fold report's) unless ``out_dir`` is given.
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
        tta, postprocess, restore: as in :func:`utils.inference.segment.segment_ct`.
        tolerance_mm: surface-Dice tolerance in mm.
        show_progress: progress over cases (a bar on a terminal, lines otherwise).
        allow_inside_input: allow a report folder inside the data folder (never onto its files).

    Raises:
        FileNotFoundError: no checkpoint or data folder. ValueError: bad arguments or cases, a data
        folder laid out for another dataset than the model's (a
        cross-validated experiment folder with ``cases="validation"``: its out-of-fold evaluation is
        :func:`utils.evaluation.cross_validation.evaluate_cross_validation`);
        ``OutputGuardError`` (a ``ValueError``): the report folder lies inside the data folder or
        holds files an evaluation did not write (checked before the model is loaded, as far as
        the run's path and config tell the data folder and the report folder).
    """
    if Path(run).is_dir() and (Path(run) / CROSS_VALIDATION_MANIFEST).is_file() and cases == "validation":
        raise ValueError(f"{run} is a cross-validated experiment: use evaluate_cross_validation / eval --run "
                         "EXPERIMENT for out-of-fold evaluation (each case segmented by the fold that held it out), "
                         "or cases='all' to evaluate the ensemble of its folds on every case")
    early_data = _data_dir_before_loading(Path(run), data_dir)
    check_report_folder(_report_before_loading(Path(run), reports_dir, out_dir), early_data,
                        allow_inside_input=allow_inside_input)
    segmenter = load_segmentation_model(run, device)
    data = resolve_data_dir(data_dir if data_dir is not None else segmenter.config.data_dir)
    chosen = select_run_cases(segmenter, data, cases)
    report = (Path(out_dir) if out_dir is not None
              else Path(reports_dir) / _report_name(segmenter.run_name, ensemble=segmenter.model_count > 1))
    # Before writing anything: never into the data folder, never over files of others.
    check_report_folder(report, data, chosen, allow_inside_input=allow_inside_input)
    timings = segment_cases(segmenter, chosen, data, report, tta=tta, postprocess=postprocess, restore=restore,
                            show_progress=show_progress)
    inference = {**inference_record(segmenter, data, tta=tta, postprocess=postprocess, restore=restore),
                 "cases_selected": cases, "cases": timings}
    return score_report(data, report, chosen, inference, title=f"{segmenter.run_name}: {cases} cases, original grid",
                        tolerance_mm=tolerance_mm, show_progress=show_progress,
                        allow_inside_input=allow_inside_input, dataset=segmenter.dataset)


def inference_record(segmenter: SegmentationModel, data: Path, *, tta: bool, postprocess: bool,
                     restore: str = "probabilities") -> dict:
    """What ``inference.json`` says of the model: run name, model key, parameters, device, checkpoint (and its
    SHA-256; an ensemble's: of its fold checkpoints together), data, options (TTA, post-processing and, with
    it, the tumour-size rule ``min_tumour_ml``, how predictions were restored to the CT's grid), the model's dataset
    unless it is KiTS19, and for a second-stage model its locator (checkpoint, model, parameters, margin,
    how the stages combine, how the post-processing ranks components)."""
    dataset = segmenter.dataset
    return {"run_name": segmenter.run_name, "model": segmenter.config.model.name,
            "parameters": count_parameters(segmenter.model), "device": str(segmenter.device),
            "checkpoint": str(segmenter.checkpoint.resolve()),
            **({"checkpoint_sha256": digest} if (digest := segmenter.checkpoint_sha256()) else {}),
            "data_dir": str(data.resolve()), "tta": tta, "postprocess": postprocess,
            **({"min_tumour_ml": segmenter.min_tumour_ml} if postprocess else {}), "restore": restore,
            **({} if dataset is KITS19 else {"dataset": dataset.name}),
            **({} if segmenter.locator is None else {
                "locator": {"checkpoint": str(segmenter.locator.checkpoint.resolve()),
                            "model": segmenter.locator.config.model.name,
                            "parameters": count_parameters(segmenter.locator.model),
                            "margin_mm": segmenter.config.cascade.margin_mm,
                            "combine": segmenter.config.cascade.combine,
                            "rank_components": segmenter.config.cascade.rank_components}})}


def segment_cases(segmenter: SegmentationModel, case_ids: Sequence[str], data: Path, report: Path, *,
                  tta: bool = False, postprocess: bool = False, restore: str = "probabilities",
                  show_progress: bool = True) -> list[dict]:
    """Segment each case's raw CT into ``report/predictions/<case>.nii.gz`` (its original grid), in the
    labels of the model's dataset; ``data`` is read as that dataset.

    Returns:
        ``{"case_id", "seconds"}`` per case, in order: the wall time from reading its CT to
        writing its prediction.
    """
    by_id = {case.case_id: case for case in discover_model_cases(data, segmenter.dataset, segmenter.run_name).cases}
    predictions = report / PREDICTIONS
    timings = []
    for case_id in progress(list(case_ids), desc=f"segment ({segmenter.run_name})", unit="case",
                            disable=not show_progress):
        started = time.perf_counter()
        segment_file(by_id[case_id].imaging, predictions / f"{case_id}.nii.gz", segmenter, tta=tta,
                     postprocess=postprocess, restore=restore)
        if segmenter.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append({"case_id": case_id, "seconds": time.perf_counter() - started})
    return timings


def score_report(data: Path, report: Path, case_ids: Sequence[str], inference: dict, *, title: str,
                 tolerance_mm: float = DEFAULT_TOLERANCE_MM, show_progress: bool = True,
                 allow_inside_input: bool = False, figures: bool = True,
                 dataset: DatasetDefinition = KITS19) -> RunEvaluation:
    """Write ``inference.json``, score ``report/predictions/`` on ``case_ids`` and draw the report's figures.

    The second half of every evaluation (:func:`evaluate_run`, and the out-of-fold evaluation of
    a cross-validated experiment): ``metrics.json`` and ``metrics.csv`` from
    :func:`utils.evaluation.predictions.evaluate_predictions` (a case without a prediction scores
    as a failure), then ``case_scores.png`` (titled ``title``) and each case's overlay and error
    figures under ``figures/`` unless ``figures`` is false. ``dataset`` is the model's: whose labels
    the ground truth and predictions hold, and which regions are scored and drawn (default KiTS19).
    """
    save_json_atomic(report / INFERENCE_JSON, inference)
    evaluation = evaluate_predictions(data, report / PREDICTIONS, report, tolerance_mm=tolerance_mm,
                                      case_ids=list(case_ids), show_progress=show_progress,
                                      allow_inside_input=allow_inside_input, dataset=dataset)
    figure_path = None
    if figures:
        by_id = {case.case_id: case for case in discover_cases(data, dataset).cases}
        figure_path = save_figure(plot_case_scores(evaluation.cases, title=title, dataset=dataset),
                                  report / "case_scores.png")
        drawable = [case["case_id"] for case in evaluation.cases  # a case without a prediction: nothing to draw
                    if (report / PREDICTIONS / f"{case['case_id']}.nii.gz").is_file()]
        for case_id in progress(drawable, desc="figures", unit="case", disable=not show_progress):
            save_case_figures(by_id[case_id], report / PREDICTIONS / f"{case_id}.nii.gz", report / FIGURES, dataset)
    logger.info("evaluated %d case(s) of %s into %s", len(evaluation.cases), inference.get("run_name"), report)
    return RunEvaluation(report, evaluation, inference, figure_path, dataset)


def save_case_figures(case: CaseFiles, prediction_path: Path, folder: Path,
                      dataset: DatasetDefinition = KITS19) -> tuple[Path, Path]:
    """Save ``<case>_overlay.png`` (truth and prediction over the CT) and ``<case>_errors.png`` into ``folder``.

    The axial slice through the true tumour's centre (else the masses', else the kidneys', else the
    middle) is shown; labels and error-map columns are those of ``dataset`` (default KiTS19).
    """
    loaded = load_case(case, dataset=dataset)
    prediction = read_voxels(load_nifti(prediction_path), np.uint8)
    overlay = plot_overlay(loaded.image, loaded.segmentation, prediction, spacing=loaded.spacing,
                           path=folder / f"{case.case_id}_overlay.png", dataset=dataset)
    errors = plot_error_map(loaded.image, loaded.segmentation, prediction, loaded.spacing,
                            path=folder / f"{case.case_id}_errors.png", dataset=dataset)
    for figure in (overlay, errors):
        figure.clear()
    return folder / f"{case.case_id}_overlay.png", folder / f"{case.case_id}_errors.png"


def find_latest_run(checkpoints_dir: str | os.PathLike, model_name: str) -> Path | None:
    """The most recently checkpointed run folder of ``model_name`` under ``checkpoints_dir``, or ``None``.

    A run folder counts when its ``config.yaml`` names the model and it holds ``best.pt`` or ``last.pt``.
    """
    candidates = []
    for folder in Path(checkpoints_dir).glob("*/"):
        checkpoints = [folder / name for name in ("best.pt", "last.pt") if (folder / name).is_file()]
        if not checkpoints or not (folder / "config.yaml").is_file():
            continue
        try:
            if load_experiment_config(folder / "config.yaml").model.name != model_name:
                continue
        except (ValueError, FileNotFoundError):
            continue
        candidates.append((max(p.stat().st_mtime for p in checkpoints), folder))
    return max(candidates)[1] if candidates else None
