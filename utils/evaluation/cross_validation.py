"""Out-of-fold evaluation of a cross-validated experiment: every case segmented by the fold that held it out.

A k-fold experiment (:mod:`utils.training.cross_validation`) trains k models; the validation sets
of its folds partition the cases, so each case has exactly one model that never trained on it.
:func:`evaluate_cross_validation` segments every case from its raw CT with that fold's
``best.pt``, back in the CT's original grid, scores all cases together with the metrics of the
experiment's dataset (its config's ``dataset``: KiTS19 kidney and tumour, or KiTS23's hierarchical
evaluation regions; :func:`utils.evaluation.predictions.evaluate_predictions`; a case without a
prediction scores as a failure) and writes ONE report folder, by default ``<reports_dir>/<experiment folder name>/``,
in the format of a single run's evaluation (:func:`utils.evaluation.run.evaluate_run`, through the
same :func:`~utils.evaluation.run.segment_cases` and :func:`~utils.evaluation.run.score_report`):
``predictions/``, ``metrics.json``, ``metrics.csv``, ``inference.json``, ``case_scores.png`` and
``figures/``. :func:`utils.evaluation.comparison.load_evaluation_report` and
:func:`~utils.evaluation.comparison.compare_reports` read it unchanged. On top of that:

* every row of ``metrics.json["cases"]`` and of ``inference.json["cases"]`` holds the case's
  ``fold``, and ``metrics.csv`` ends with a ``fold`` column;
* ``metrics.json["folds"]``: per fold, ``fold``, ``run_folder``, ``checkpoint``, ``n_cases``,
  ``case_ids``, ``mean`` (``{metric: mean over its cases}``) and ``summary``
  (:func:`utils.metrics.scoring.summarise_scores` over its cases);
* ``metrics.json["experiment"]`` and ``inference.json["experiment"]``: :func:`describe_experiment`
  (folder, name, model, k, split seed, plan hash, ``"predictions": "out-of-fold"``);
* ``inference.json["fold_checkpoints"]``: per fold its checkpoint, SHA-256 and (post-processed) the
  ``min_tumour_ml`` it applied; ``inference.json["checkpoint_sha256"]`` is the fold ensemble's
  (:func:`utils.inference.postprocessing.ensemble_sha256`), so the out-of-fold report can choose the
  ensemble's tumour-size rule (:mod:`utils.evaluation.postprocessing_choice`).

Refused, with :class:`~utils.training.cross_validation.CrossValidationError` (a ``ValueError``)
and a message saying what is wrong: a folder that is no experiment, a missing fold folder, folds
trained with another config, split or data (all by
:func:`~utils.training.cross_validation.load_cross_validation`); a fold that is not finished
(each unfinished fold is named); a case held out by two folds or by none; a fold checkpoint whose
own split does not hold out the fold's cases, or whose model predicts another dataset's labels
than the experiment's. The report folder is checked before any model is
loaded (:func:`utils.evaluation.run.check_report_folder`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from utils.data.case_discovery import resolve_data_dir
from utils.data.dataset_definitions import KITS19, DatasetDefinition, get_dataset
from utils.data.nifti_io import save_json_atomic, write_bytes_atomic
from utils.data.splits import make_splits
from utils.evaluation.predictions import METRICS_CSV_NAME, METRICS_JSON_NAME, EvaluationResult
from utils.evaluation.run import (
    check_report_folder,
    discover_model_cases,
    inference_record,
    score_report,
    segment_cases,
)
from utils.inference.postprocessing import ensemble_sha256
from utils.inference.segment import load_segmentation_model
from utils.metrics.scoring import metric_names, summarise_scores
from utils.metrics.surface import DEFAULT_TOLERANCE_MM
from utils.training.cross_validation import MANIFEST, CrossValidation, CrossValidationError, load_cross_validation

logger = logging.getLogger(__name__)

#: What ``metrics.json["experiment"]["predictions"]`` says of an out-of-fold evaluation.
OUT_OF_FOLD = "out-of-fold"


@dataclass(frozen=True)
class CrossValidationEvaluation:
    """What :func:`evaluate_cross_validation` wrote and scored.

    Attributes:
        report_folder: the report folder.
        summary: :func:`utils.metrics.scoring.summarise_scores` over every case.
        fold_summaries: ``metrics.json["folds"]``, one mapping per fold (see the module docstring).
        cases: one row per scored case, sorted by case id: ``case_id``, the metrics and ``fold``.
        experiment: the experiment as :func:`utils.training.cross_validation.load_cross_validation` read it.
        evaluation: the scores as :func:`utils.evaluation.predictions.evaluate_predictions` gave them
            (its ``cases`` with ``fold`` added; refusals and warnings).
        inference: what ``inference.json`` holds.
        figure_path: ``case_scores.png`` (``None`` without figures).
        dataset: the dataset the experiment was scored on (its config's ``dataset``).
    """

    report_folder: Path
    summary: dict[str, Any]
    fold_summaries: tuple[dict[str, Any], ...]
    cases: tuple[dict[str, Any], ...]
    experiment: CrossValidation
    evaluation: EvaluationResult | None = None
    inference: dict[str, Any] | None = None
    figure_path: Path | None = None
    dataset: DatasetDefinition = KITS19


def is_cross_validation_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a cross-validated experiment folder (it holds ``cross_validation.json``)."""
    return Path(folder).is_dir() and (Path(folder) / MANIFEST).is_file()


def describe_experiment(experiment: CrossValidation) -> dict[str, Any]:
    """The experiment as the report records it: folder, name, model, k, split seed, plan hash, data."""
    return {"predictions": OUT_OF_FOLD, "folder": str(experiment.folder.resolve()), "name": experiment.folder.name,
            "model": experiment.model_name, "k": len(experiment.folds), "scheme": experiment.split.get("scheme"),
            "split_seed": experiment.split.get("seed"), "plan_hash": experiment.plan_hash,
            "data_dir": experiment.data_dir, "case_ids": sorted(experiment.split.get("case_ids") or ())}


def out_of_fold_assignment(experiment: CrossValidation) -> dict[str, int]:
    """``{case_id: fold}``: the one fold whose validation set holds each case of the experiment.

    Raises:
        CrossValidationError: a case is in the validation sets of two folds, or of none (a case
            of the split's ``case_ids`` that no fold held out); the message names the cases.
    """
    assignment: dict[str, int] = {}
    twice: dict[str, list[int]] = {}
    for fold in experiment.folds:
        for case_id in fold.validation_case_ids:
            if case_id in assignment:
                twice.setdefault(case_id, [assignment[case_id]]).append(fold.fold)
            else:
                assignment[case_id] = fold.fold
    if twice:
        listing = "; ".join(f"{case_id} by folds {', '.join(map(str, folds))}"
                            for case_id, folds in sorted(twice.items()))
        raise CrossValidationError(f"{experiment.folder}: each case must be held out by exactly one fold, but "
                                   f"{len(twice)} case(s) are held out by several: {listing}")
    expected = sorted(experiment.split.get("case_ids") or assignment)
    none = sorted(set(expected) - set(assignment))
    if none:
        raise CrossValidationError(f"{experiment.folder}: each case must be held out by exactly one fold, but "
                                   f"{len(none)} case(s) are held out by none: {', '.join(none)}")
    unknown = sorted(set(assignment) - set(expected))
    if unknown:
        raise CrossValidationError(f"{experiment.folder}: fold validation sets hold case(s) outside the split's "
                                   f"case_ids: {', '.join(unknown)}")
    return dict(sorted(assignment.items()))


def _check_all_finished(experiment: CrossValidation) -> None:
    unfinished = [fold for fold in experiment.folds if fold.status != "finished"]
    if unfinished:
        listing = ", ".join(f"fold {fold.fold} ({fold.status})" for fold in unfinished)
        raise CrossValidationError(f"{experiment.folder}: out-of-fold evaluation needs every fold finished, but "
                                   f"{listing} {'is' if len(unfinished) == 1 else 'are'} not; finish training with "
                                   "scripts/cross_validate.py (the same command continues it)")


def experiment_dataset(experiment: CrossValidation) -> DatasetDefinition:
    """The dataset of a cross-validated experiment: its config's ``dataset`` (KiTS19 when it does not say)."""
    return get_dataset(experiment.config.get("dataset") or KITS19.name)


def _check_fold_dataset(segmenter, fold, dataset: DatasetDefinition) -> None:
    """Refuse a fold checkpoint whose model predicts another dataset's labels than the experiment's."""
    if segmenter.dataset is not dataset:
        raise CrossValidationError(f"{fold.best_checkpoint} is a {segmenter.dataset.title} model (its config's "
                                   f"'dataset: {segmenter.dataset.name}'), but the experiment's config says "
                                   f"'dataset: {dataset.name}': the checkpoint does not belong to this experiment; "
                                   "retrain that fold")


def _check_fold_holds_out(segmenter, fold) -> None:
    """Refuse a fold checkpoint whose own split does not hold out exactly the fold's validation cases."""
    if not segmenter.training_case_ids:
        return  # an old checkpoint that does not record its cases: the manifest's split is trusted
    own = make_splits(segmenter.training_case_ids, segmenter.config.split)[segmenter.config.training.fold]["val"]
    if sorted(own) != sorted(fold.validation_case_ids):
        raise CrossValidationError(f"{fold.best_checkpoint} held out {sorted(own)}, but the experiment's split "
                                   f"has fold {fold.fold} hold out {sorted(fold.validation_case_ids)}: the "
                                   "checkpoint does not belong to this experiment; retrain that fold")


def fold_summaries(cases: Sequence[Mapping[str, Any]], experiment: CrossValidation,
                   dataset: DatasetDefinition = KITS19) -> tuple[dict[str, Any], ...]:
    """Per fold: ``fold``, ``run_folder``, ``checkpoint``, ``n_cases``, ``case_ids``, ``mean`` and ``summary``,
    over the metrics of ``dataset`` (:func:`utils.metrics.scoring.metric_names`; default KiTS19)."""
    names = metric_names(dataset)
    summaries = []
    for fold in experiment.folds:
        rows = [case for case in cases if case["fold"] == fold.fold]
        summary = summarise_scores(rows, metrics=names, dataset=dataset)
        summaries.append({"fold": fold.fold, "run_folder": str(fold.run_folder.resolve()),
                          "checkpoint": str(fold.best_checkpoint.resolve()), "n_cases": len(rows),
                          "case_ids": [case["case_id"] for case in rows],
                          "mean": {metric: summary[metric]["mean"] for metric in names},
                          "summary": summary})
    return tuple(summaries)


def _report_before_loading(experiment: Path, reports_dir: str | os.PathLike, out_dir: str | os.PathLike | None) -> Path:
    return Path(out_dir) if out_dir is not None else Path(reports_dir) / experiment.resolve().name


def _write_fold_columns(report: Path, cases: Sequence[Mapping[str, Any]], folds: Sequence[Mapping[str, Any]],
                        described: Mapping[str, Any], dataset: DatasetDefinition = KITS19) -> None:
    """Add each case's ``fold``, the per-fold summaries and the experiment to ``metrics.json`` and ``metrics.csv``."""
    metrics = json.loads((report / METRICS_JSON_NAME).read_text(encoding="utf-8"))
    metrics.update(cases=list(cases), folds=list(folds), experiment=dict(described))
    save_json_atomic(report / METRICS_JSON_NAME, metrics)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    names = metric_names(dataset)
    writer.writerow(["case_id", *names, "fold"])
    for case in cases:
        writer.writerow([case["case_id"], *("" if case[m] is None else repr(float(case[m])) for m in names),
                         case["fold"]])
    write_bytes_atomic(report / METRICS_CSV_NAME, table.getvalue().encode("utf-8"))


def evaluate_cross_validation(experiment: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
                              reports_dir: str | os.PathLike = "reports", out_dir: str | os.PathLike | None = None,
                              device: str | None = None, tta: bool = False, postprocess: bool = False,
                              restore: str = "probabilities", show_progress: bool = True,
                              allow_inside_input: bool = False, figures: bool = True,
                              tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> CrossValidationEvaluation:
    """Segment every case of a k-fold experiment with the fold that held it out, score all together, write one report.

    Args:
        experiment: the experiment folder (``cross_validation.json``, ``fold_<k>/``); every fold finished.
        data_dir: KiTS-layout folder with the CTs and segmentations of the experiment's dataset
            (default: the experiment's recorded ``data_dir``, then ``KITS19_DATA``); it must hold
            every case of the split.
        reports_dir: root of report folders; the report goes to ``reports_dir/<experiment name>``
            unless ``out_dir`` is given.
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).
        tta, postprocess, restore: as in :func:`utils.inference.segment.segment_ct`.
        show_progress: progress over cases.
        allow_inside_input: allow a report folder inside the data folder (never onto its files).
        figures: draw ``case_scores.png`` and each case's overlay and error figures.
        tolerance_mm: surface-Dice tolerance in mm.

    Returns:
        The report folder, the summary over all cases, the per-fold summaries, the cases (each
        with its ``fold``) and the experiment; see the module docstring for the files.

    Raises:
        CrossValidationError: (a ``ValueError``) see the module docstring. FileNotFoundError: no
        data folder or a fold checkpoint is missing. ValueError: cases of the split are absent
        from the data folder, or it is laid out for another dataset than the experiment's;
        ``OutputGuardError`` (a ``ValueError``): the report folder lies
        inside the data folder or holds files an evaluation did not write.
    """
    folder = Path(experiment)
    loaded = load_cross_validation(folder)
    _check_all_finished(loaded)
    assignment = out_of_fold_assignment(loaded)
    report = _report_before_loading(folder, reports_dir, out_dir)
    configured = data_dir if data_dir is not None and str(data_dir) else loaded.data_dir
    data = resolve_data_dir(configured)
    dataset = experiment_dataset(loaded)
    labelled = {case.case_id for case in discover_model_cases(data, dataset, f"experiment {folder.name}").cases
                if case.segmentation is not None and case.imaging is not None}
    absent = sorted(set(assignment) - labelled)
    if absent:
        raise ValueError(f"{data}: case(s) {absent} of experiment {folder.name} have no CT and segmentation there; "
                         "give the data folder the experiment was trained on")
    chosen = list(assignment)
    # Before loading or writing anything: never into the data folder, never over files of others.
    check_report_folder(report, data, chosen, allow_inside_input=allow_inside_input)
    described = describe_experiment(loaded)
    timings: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    fold_checkpoints: list[dict[str, Any]] = []
    for fold in loaded.folds:
        case_ids = [case_id for case_id, index in assignment.items() if index == fold.fold]
        segmenter = load_segmentation_model(fold.best_checkpoint, device)
        _check_fold_dataset(segmenter, fold, dataset)
        _check_fold_holds_out(segmenter, fold)
        record = record or inference_record(segmenter, data, tta=tta, postprocess=postprocess, restore=restore)
        fold_checkpoints.append({"fold": fold.fold, "checkpoint": str(fold.best_checkpoint.resolve()),
                                 "checkpoint_sha256": segmenter.checkpoint_sha256(),
                                 **({"min_tumour_ml": segmenter.min_tumour_ml} if postprocess else {})})
        logger.info("fold %d: segmenting its %d held-out case(s) with %s", fold.fold, len(case_ids),
                    fold.best_checkpoint)
        timings += [{**timing, "fold": fold.fold, "checkpoint": str(fold.best_checkpoint.resolve())}
                    for timing in segment_cases(segmenter, case_ids, data, report, tta=tta, postprocess=postprocess,
                                                restore=restore, show_progress=show_progress)]
        del segmenter
    # the experiment's checkpoint is its folder: its SHA-256 is the fold ensemble's (the same files), and the
    # tumour-size rule recorded is the largest any fold applied (each fold reads its own run folder's choice)
    inference = {**record, "run_name": folder.resolve().name, "checkpoint": str(folder.resolve()),
                 "checkpoint_sha256": ensemble_sha256(fold.best_checkpoint for fold in loaded.folds),
                 **({"min_tumour_ml": max(row["min_tumour_ml"] for row in fold_checkpoints)} if postprocess else {}),
                 "fold_checkpoints": fold_checkpoints, "cases_selected": OUT_OF_FOLD, "experiment": described,
                 "cases": sorted(timings, key=lambda timing: timing["case_id"])}
    evaluated = score_report(data, report, chosen, inference,
                             title=f"{folder.resolve().name}: out-of-fold ({len(loaded.folds)} folds), original grid",
                             tolerance_mm=tolerance_mm, show_progress=show_progress,
                             allow_inside_input=allow_inside_input, figures=figures, dataset=dataset)
    cases = tuple({**case, "fold": assignment[case["case_id"]]} for case in evaluated.evaluation.cases)
    summaries = fold_summaries(cases, loaded, dataset)
    _write_fold_columns(report, cases, summaries, described, dataset)
    logger.info("out-of-fold evaluation of %s: %d case(s) from %d fold(s) into %s", folder, len(cases),
                len(loaded.folds), report)
    return CrossValidationEvaluation(report, evaluated.evaluation.summary, summaries, cases, loaded,
                                     replace(evaluated.evaluation, cases=cases), inference, evaluated.figure_path,
                                     dataset)
