"""Scoring a folder of predicted label maps against a KiTS data folder, on the original grid.

The dataset (:mod:`utils.data.dataset_definitions`; KiTS19 by default) sets the valid labels and
the scored regions: KiTS19's kidney and tumour, or KiTS23's hierarchical evaluation regions
(kidney and masses, masses, tumour) with the challenge's surface-Dice tolerances.

Predictions are NIfTI label maps named ``case_XXXXX.nii.gz`` or, as in KiTS19 submissions,
``prediction_XXXXX.nii.gz`` (``.nii`` also accepted), one per case, on the grid of the case's
CT: the same shape and affine as ``DATA_DIR/case_XXXXX/imaging.nii.gz`` (the segmentation's
header when a labels-only copy holds no CT). The ground truth is
``DATA_DIR/case_XXXXX/segmentation.nii.gz``. Arrays keep the on-disk ``(Z, Y, X)`` order and the
spacing comes from the CT's affine (:func:`utils.data.kits_layout.spacing_from_affine`).

A prediction is *refused* (recorded with the reason, naming the case) when its shape or affine
differs from its CT's, when it holds labels outside the dataset's (0/1/2 for KiTS19), or when it
cannot be read.
A ground-truth case without a prediction is, as in the KiTS19 challenge, a failure by default:
it is scored :data:`MISSING_PREDICTION_SCORES` (Dice and surface Dice 0, HD95 missing) and
listed under ``missing_predictions``; ``only_predicted=True`` leaves such cases out instead.
Predictions without ground truth are warnings, and so are ignored files of the prediction
folder (except ``segmentation_run.json``, which ``scripts/segment.py`` writes beside its
predictions). Results go to ``OUT_DIR/metrics.json`` and ``OUT_DIR/metrics.csv``, written
atomically; the output folder may not lie inside the ground-truth or prediction folder
(:mod:`utils.data.output_guard`), and existing files there are only replaced when an earlier
evaluation wrote them.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.data.case_discovery import CaseFiles, discover_cases
from utils.data.dataset_definitions import DATASETS, KITS19, DatasetDefinition, get_dataset
from utils.data.kits_layout import AFFINE_ATOL_MM, AFFINE_RTOL, spacing_from_affine
from utils.data.nifti_io import load_nifti, read_voxels, save_json_atomic, write_bytes_atomic
from utils.data.output_guard import check_output_location, check_overwrite, is_own_json, is_own_text
from utils.data.progress import progress
from utils.metrics.scoring import EMPTY_MASK_RULES, metric_names, score_case, summarise_scores
from utils.metrics.surface import DEFAULT_TOLERANCE_MM, HAUSDORFF_PERCENTILE

logger = logging.getLogger(__name__)

METRICS_JSON_NAME = "metrics.json"
METRICS_CSV_NAME = "metrics.csv"
#: Prediction file names: ``case_XXXXX`` or ``prediction_XXXXX``, ``.nii.gz`` or ``.nii``.
PREDICTION_NAME_PATTERN = re.compile(r"^(?:case|prediction)_(\d{5})\.nii(?:\.gz)?$")
#: The record ``scripts/segment.py`` writes beside its predictions: expected there, never warned about.
SEGMENTATION_RUN_NAME = "segmentation_run.json"
#: Files of a prediction folder that are not predictions but belong there.
PREDICTION_FOLDER_COMPANIONS = frozenset({SEGMENTATION_RUN_NAME})
#: Top-level keys of every ``metrics.json``: how an earlier report is recognised before it is replaced.
METRICS_JSON_KEYS = ("cases", "summary", "settings")


def metrics_csv_header(dataset: DatasetDefinition = KITS19) -> str:
    """The first line of a ``metrics.csv`` of this dataset (:data:`METRICS_CSV_HEADER` for KiTS19)."""
    return ",".join(("case_id", *metric_names(dataset)))


#: The first line of every KiTS19 ``metrics.csv``.
METRICS_CSV_HEADER = metrics_csv_header(KITS19)


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate_predictions` scored, refused and wrote.

    Attributes:
        cases: one dict per scored case, sorted by case id: ``case_id`` and the scores of
            :func:`utils.metrics.scoring.score_case` with the CT's spacing (HD95 in mm, ``None``
            missing); a case without a prediction holds :data:`MISSING_PREDICTION_SCORES`
            unless ``only_predicted``.
        summary: :func:`utils.metrics.scoring.summarise_scores` over ``cases``:
            ``{metric: {"mean", "std", "median", "n", "missing"}, "mean_dice", "cases"}``.
        refused: ``{"case_id", "reason"}`` per prediction that could not be scored.
        warnings: predictions without ground truth, cases without prediction, ignored files.
        json_path, csv_path: the files written.
        missing: ground-truth cases without a prediction (scored as failures unless ``only_predicted``).
        only_predicted: whether cases without a prediction were left out of ``cases``.
    """

    cases: tuple[dict[str, Any], ...]
    summary: dict[str, Any]
    refused: tuple[dict[str, str], ...]
    warnings: tuple[str, ...]
    json_path: Path
    csv_path: Path
    missing: tuple[str, ...] = ()
    only_predicted: bool = False


def check_output_dir(out_dir: str | os.PathLike, gt_dir: str | os.PathLike, pred_dir: str | os.PathLike, *,
                     allow_inside_input: bool = False) -> Path:
    """Return ``out_dir`` resolved, refusing a folder inside (or equal to) the ground-truth or prediction folder.

    The rule of :func:`utils.data.output_guard.check_output_location`, with both folders as inputs.

    Raises:
        OutputGuardError: (a ``ValueError``) ``out_dir`` is ``gt_dir``, ``pred_dir`` or inside
            either, and ``allow_inside_input`` is false.
    """
    return check_output_location(out_dir, [gt_dir, pred_dir], what="output folder",
                                 allow_inside_input=allow_inside_input)


def check_metrics_files(out_dir: str | os.PathLike) -> None:
    """Refuse an output folder whose ``metrics.json`` or ``metrics.csv`` was not written by an evaluation.

    Raises:
        OutputGuardError: either file exists and is not an earlier evaluation's (or is a folder).
    """
    out = Path(out_dir)
    check_overwrite(out / METRICS_JSON_NAME, is_own_json(METRICS_JSON_KEYS), what="metrics file")
    headers = [is_own_text(metrics_csv_header(dataset)) for dataset in DATASETS.values()]
    check_overwrite(out / METRICS_CSV_NAME, lambda path: any(own(path) for own in headers), what="metrics file")


def missing_prediction_scores(dataset: DatasetDefinition = KITS19) -> dict[str, float | None]:
    """The scores of a case without a prediction (:data:`MISSING_PREDICTION_SCORES` for KiTS19): Dice and
    surface Dice 0, HD95 missing, for every region."""
    return {name: None if name.endswith("_hd95") else 0.0 for name in metric_names(dataset)}


#: The scores of a KiTS19 ground-truth case without a prediction: a failure, as an empty prediction of
#: a present structure scores (Dice 0, surface Dice 0, HD95 missing, counted as missing).
MISSING_PREDICTION_SCORES = missing_prediction_scores(KITS19)


def missing_prediction_case(case_id: str, dataset: DatasetDefinition = KITS19) -> dict[str, Any]:
    """The scores of a case without a prediction: ``case_id`` and :func:`missing_prediction_scores`."""
    return {"case_id": case_id, **missing_prediction_scores(dataset)}


def find_predictions(pred_dir: Path) -> tuple[dict[str, Path], dict[str, str], list[str]]:
    """Map case ids to prediction files in ``pred_dir``.

    Returns:
        ``(predictions, ambiguous, warnings)``: the file of each case id; the reason per case id
        with two files (``case_`` and ``prediction_`` names); one warning for ignored entries.
    """
    found: dict[str, list[Path]] = {}
    ignored = []
    for entry in sorted(pred_dir.iterdir()):
        match = PREDICTION_NAME_PATTERN.match(entry.name)
        if match is None or not entry.is_file():
            if not entry.name.startswith(".") and entry.name not in PREDICTION_FOLDER_COMPANIONS:
                ignored.append(entry.name)
            continue
        found.setdefault(f"case_{match.group(1)}", []).append(entry)
    ambiguous = {case_id: f"{case_id}: more than one prediction file ({', '.join(p.name for p in paths)}); "
                          "keep exactly one" for case_id, paths in found.items() if len(paths) > 1}
    predictions = {case_id: paths[0] for case_id, paths in found.items() if len(paths) == 1}
    warnings = []
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        warnings.append(f"ignored {len(ignored)} entries of {pred_dir} not named case_XXXXX.nii.gz or "
                        f"prediction_XXXXX.nii.gz: {shown}")
    return predictions, ambiguous, warnings


def read_label_map(path: Path, what: str, dataset: DatasetDefinition = KITS19) -> np.ndarray:
    """Read a label map and check its values, without a float copy unless the file stores floats.

    Args:
        path: a NIfTI label map.
        what: how the volume is named in errors, e.g. ``"case_00003: prediction"``.
        dataset: whose labels are valid (KiTS19: 0, 1, 2; KiTS23: 0 to 3).

    Returns:
        ``(Z, Y, X)`` uint8 array of labels, in on-disk axis order.

    Raises:
        ValueError: the file is unreadable or holds values outside the dataset's labels.
    """
    valid = dataset.valid_labels
    image = load_nifti(path)
    proxy = image.dataobj
    scaled = float(getattr(proxy, "slope", 1.0)) != 1.0 or float(getattr(proxy, "inter", 0.0)) != 0.0
    on_disk = image.get_data_dtype()
    voxels = read_voxels(image, np.float32 if scaled or on_disk.kind == "f" else on_disk.type)
    low, high = min(valid), max(valid)
    if voxels.dtype.kind == "f" or voxels.min() < low or voxels.max() > high:
        invalid = ~np.isin(voxels, sorted(valid))
        if invalid.any():
            values = np.unique(voxels[invalid])
            shown = ", ".join(f"{v:g}" for v in values[:5]) + (" ..." if values.size > 5 else "")
            raise ValueError(f"{what} {path} holds labels outside {{{', '.join(map(str, sorted(valid)))}}}: "
                             f"{int(invalid.sum())} voxels with values {shown}"
                             + (f" ({dataset.title} labels are {dataset.describe_labels()})" if dataset is not KITS19
                                else ""))
    return voxels.astype(np.uint8, copy=False)


def _check_same_grid(path: Path, reference: Path, what: str) -> None:
    """``ValueError`` naming ``what`` unless ``path``'s header has the shape and affine of ``reference``'s."""
    image, ct = load_nifti(path), load_nifti(reference)
    if tuple(image.shape) != tuple(ct.shape):
        raise ValueError(f"{what} {path.name} has shape {tuple(image.shape)} but its CT {reference} has "
                         f"{tuple(ct.shape)}; predictions must be on the CT's original grid")
    if not np.allclose(image.affine, ct.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM):
        row, column = np.unravel_index(np.argmax(np.abs(image.affine - ct.affine)), (4, 4))
        raise ValueError(
            f"{what} {path.name} has an affine different from its CT {reference}: entry [{row}, {column}] is "
            f"{image.affine[row, column]:g}, the CT's {ct.affine[row, column]:g} (voxel spacing "
            f"{tuple(round(s, 4) for s in spacing_from_affine(image.affine))} vs "
            f"{tuple(round(s, 4) for s in spacing_from_affine(ct.affine))} mm); "
            "predictions must be on the CT's original grid")


def score_prediction(case: CaseFiles, prediction_path: Path, tolerance_mm: float,
                     dataset: DatasetDefinition = KITS19) -> dict[str, Any]:
    """Check one prediction against its case's CT header and score it against the ground truth.

    Args:
        case: the case's files (``segmentation`` must exist); ``imaging`` gives the grid,
            the segmentation's header when there is no CT.
        prediction_path: the predicted label map.
        tolerance_mm: surface-Dice tolerance in mm (for regions without an official one).
        dataset: whose labels and regions.

    Returns:
        ``{"case_id": ..., **score_case(prediction, truth, spacing, tolerance_mm=..., dataset=...)}``.

    Raises:
        ValueError: shape or affine differ from the CT's, labels outside 0/1/2, unreadable file;
            the message names the case.
    """
    if case.segmentation is None:
        raise ValueError(f"{case.case_id}: no ground-truth segmentation in {case.folder}")
    reference = case.imaging if case.imaging is not None else case.segmentation
    _check_same_grid(prediction_path, reference, f"{case.case_id}: prediction")
    if reference != case.segmentation:
        _check_same_grid(case.segmentation, reference, f"{case.case_id}: ground truth")
    spacing = spacing_from_affine(load_nifti(reference).affine)
    prediction = read_label_map(prediction_path, f"{case.case_id}: prediction", dataset)
    truth = read_label_map(case.segmentation, f"{case.case_id}: ground truth", dataset)
    return {"case_id": case.case_id,
            **score_case(prediction, truth, spacing, tolerance_mm=tolerance_mm, dataset=dataset)}


def _match_cases(gt_dir: Path, pred_dir: Path, case_ids: Sequence[str] | None = None, *,
                 only_predicted: bool = False, dataset: DatasetDefinition = KITS19
                 ) -> tuple[list[tuple[CaseFiles, Path]], dict[str, str], list[str], list[str]]:
    """Pair ground-truth cases (only ``case_ids`` when given) with predictions.

    Returns:
        ``(pairs, refused, warnings, missing)``: the ``(case, prediction)`` pairs to score, the
        reason per refused case id, the warnings, and the ground-truth cases without a prediction
        (neither paired nor refused), sorted.
    """
    truth = {case.case_id: case for case in discover_cases(gt_dir, dataset).cases if case.segmentation is not None
             and (case_ids is None or case.case_id in case_ids)}
    predictions, refused, warnings = find_predictions(pred_dir)
    without_truth = sorted(set(predictions) - set(truth))
    without_prediction = sorted(set(truth) - set(predictions) - set(refused))
    if without_truth:
        warnings.append(f"{len(without_truth)} predictions without ground truth in {gt_dir}, not scored: "
                        f"{', '.join(without_truth)}")
    if without_prediction:
        outcome = ("left out (only predicted cases are scored)" if only_predicted
                   else "scored as failures (Dice 0, HD95 missing)")
        warnings.append(f"{len(without_prediction)} ground-truth cases without a prediction in {pred_dir}, "
                        f"{outcome}: {', '.join(without_prediction)}")
    pairs = [(truth[case_id], predictions[case_id]) for case_id in sorted(set(truth) & set(predictions))]
    return pairs, refused, warnings, without_prediction


def evaluate_predictions(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                         tolerance_mm: float = DEFAULT_TOLERANCE_MM, show_progress: bool = False,
                         case_ids: Sequence[str] | None = None, only_predicted: bool = False,
                         allow_inside_input: bool = False,
                         dataset: DatasetDefinition | str = KITS19) -> EvaluationResult:
    """Score every prediction in ``pred_dir`` against ``gt_dir`` and write ``metrics.json`` and ``metrics.csv``.

    Args:
        gt_dir: KiTS-layout data folder (``case_XXXXX/segmentation.nii.gz``, ``imaging.nii.gz``).
        pred_dir: folder of ``case_XXXXX.nii.gz`` or ``prediction_XXXXX.nii.gz`` label maps.
        out_dir: output folder (created if needed), outside both input folders.
        tolerance_mm: surface-Dice tolerance in mm, finite and >= 0, for the regions without an
            official one (all of KiTS19's; KiTS23's HECs use the challenge's).
        show_progress: progress per case on stderr (a bar on a terminal, lines otherwise).
        case_ids: score only these ground-truth cases (e.g. a run's validation cases); ``None``: all.
        only_predicted: leave ground-truth cases without a prediction out of the scores; by
            default each scores :data:`MISSING_PREDICTION_SCORES` (a failure, as in KiTS19).
        allow_inside_input: allow ``out_dir`` inside an input folder (never onto an input file).
        dataset: whose labels and scored regions (a definition or its name; default KiTS19).

    Returns:
        The scored cases, summary, refusals, warnings (also logged) and cases without a
        prediction; a refused case does not stop the others.

    Raises:
        FileNotFoundError: ``gt_dir`` or ``pred_dir`` is not a folder.
        ValueError: ``tolerance_mm`` is invalid; ``OutputGuardError`` (a ``ValueError``):
            ``out_dir`` lies inside an input folder, or holds metrics files an evaluation did not write.
    """
    dataset = get_dataset(dataset)
    gt, pred = Path(gt_dir), Path(pred_dir)
    for role, folder in (("gt_dir (ground truth)", gt), ("pred_dir (predictions)", pred)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{role} {folder} does not exist or is not a folder")
    if not (np.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0 mm, got {tolerance_mm}")
    out = check_output_dir(out_dir, gt, pred, allow_inside_input=allow_inside_input)
    check_metrics_files(out)
    pairs, refused, warnings, missing = _match_cases(gt, pred, None if case_ids is None else set(case_ids),
                                                     only_predicted=only_predicted, dataset=dataset)
    for message in warnings:
        logger.warning("%s", message)
    cases = []
    for case, prediction_path in progress(pairs, desc="evaluate", unit="case", disable=not show_progress):
        try:
            cases.append(score_prediction(case, prediction_path, tolerance_mm, dataset))
        except (ValueError, FileNotFoundError) as error:  # NiftiReadError is a ValueError
            reason = str(error)
            refused[case.case_id] = reason if reason.startswith(case.case_id) else f"{case.case_id}: {reason}"
    for _case_id, reason in sorted(refused.items()):
        logger.error("refused %s", reason)
    if not only_predicted:
        cases = sorted(cases + [missing_prediction_case(case_id, dataset) for case_id in missing],
                       key=lambda case: case["case_id"])
    summary = summarise_scores(cases, metrics=metric_names(dataset), dataset=dataset)
    settings = {"tolerance_mm": float(tolerance_mm), "hd_percentile": HAUSDORFF_PERCENTILE,
                "gt": str(gt.resolve()), "pred": str(pred.resolve()), "empty_mask_rules": EMPTY_MASK_RULES,
                "missing_predictions": "left out" if only_predicted else "scored as failures",
                **dataset_settings(dataset, tolerance_mm)}
    refusals = tuple({"case_id": case_id, "reason": reason} for case_id, reason in sorted(refused.items()))
    json_path, csv_path = save_metrics(out, cases, summary, settings, refusals, warnings, missing, dataset)
    return EvaluationResult(tuple(cases), summary, refusals, tuple(warnings), json_path, csv_path, tuple(missing),
                            only_predicted)


def dataset_settings(dataset: DatasetDefinition, tolerance_mm: float) -> dict[str, Any]:
    """What a ``metrics.json`` records of the dataset: nothing for KiTS19 (its reports are as they always
    were), else its name, regions with their labels and surface-Dice tolerances, and how they are built."""
    if dataset is KITS19:
        return {}
    return {"dataset": dataset.name, "region_rule": dataset.region_rule,
            "regions": {region.name: {"labels": sorted(region.labels),
                                      "tolerance_mm": region.tolerance_mm if region.tolerance_mm is not None
                                      else float(tolerance_mm)} for region in dataset.regions}}


def dataset_of_settings(settings: dict[str, Any]) -> DatasetDefinition:
    """The dataset a ``metrics.json`` was scored on (KiTS19 when it does not say)."""
    return get_dataset(settings.get("dataset", KITS19.name))


#: How reports name each kind of score of a region (for datasets other than KiTS19).
SCORE_KIND_NAMES = {"dice": "Dice", "surface_dice": "surface Dice", "hd95": "HD95 (mm)"}


def describe_metric(metric: str, dataset: DatasetDefinition = KITS19) -> str:
    """How a report's table names a score key.

    KiTS19: the key itself (``kidney_dice``), as its reports always did. Another dataset: the
    region in words and the score (KiTS23 ``kidney_and_masses_surface_dice`` -> ``"kidney and
    masses surface Dice"``, ``tumour_hd95`` -> ``"tumour HD95 (mm)"``); a key that is no score of
    the dataset is returned as it is.
    """
    if dataset is KITS19:
        return metric
    for region in dataset.regions:
        for kind, name in SCORE_KIND_NAMES.items():
            if metric == f"{region.name}_{kind}":
                return f"{region.name.replace('_', ' ')} {name}"
    return metric


def describe_regions(dataset: DatasetDefinition, tolerance_mm: float | None = None) -> str:
    """One sentence for a report on how the dataset's regions are built and their surface-Dice tolerances.

    Args:
        dataset: whose regions (``region_rule``, each region's ``tolerance_mm``).
        tolerance_mm: the evaluation's tolerance, for regions without one of their own (``None``:
            not stated).

    Returns:
        e.g. ``"Scored regions (KiTS23): hierarchical evaluation regions of the KiTS23 challenge: ...;
        surface-Dice tolerance: kidney and masses 1.033 mm, masses 1.133 mm, tumour 1.150 mm."``
    """
    tolerances = []
    for region in dataset.regions:
        value = region.tolerance_mm if region.tolerance_mm is not None else tolerance_mm
        if value is not None:
            tolerances.append(f"{region.name.replace('_', ' ')} {float(value):.3f} mm")
    stated = f"; surface-Dice tolerance: {', '.join(tolerances)}" if tolerances else ""
    return f"Scored regions ({dataset.title}): {dataset.region_rule}{stated}."


def save_metrics(out_dir: Path, cases: list[dict[str, Any]], summary: dict, settings: dict,
                 refused: tuple[dict[str, str], ...] = (),
                 warnings: list[str] | tuple[str, ...] = (),
                 missing: list[str] | tuple[str, ...] = (),
                 dataset: DatasetDefinition = KITS19) -> tuple[Path, Path]:
    """Write ``metrics.json`` (cases, summary, settings, refused, warnings, missing_predictions) and
    ``metrics.csv`` atomically.

    Missing values are ``null`` in JSON and empty cells in CSV. Returns both paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"cases": cases, "summary": summary, "settings": settings, "refused": list(refused),
              "warnings": list(warnings), "missing_predictions": list(missing)}
    json_path = save_json_atomic(out_dir / METRICS_JSON_NAME, report)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    names = metric_names(dataset)
    writer.writerow(["case_id", *names])
    for case in cases:
        writer.writerow([case["case_id"], *("" if case[m] is None else repr(float(case[m])) for m in names)])
    csv_path = out_dir / METRICS_CSV_NAME
    write_bytes_atomic(csv_path, table.getvalue().encode("utf-8"))
    return json_path, csv_path
