"""Choose a run's smallest tumour component on its validation cases, never on test cases.

A model trained on few cases scatters small false tumour components through healthy kidney
(often the other kidney): each costs little tumour Dice but can move the tumour HD95 by a
hundred millimetres. :func:`utils.inference.postprocessing.relabel_small_tumours` calls tumour
components under ``min_tumour_ml`` kidney, all but the largest; a real second tumour can be as
small, so the threshold is a
property of a model, chosen where its answer is known and it was not trained: its validation
cases. The steps:

1. ``eval_unet.py --run RUN/last.pt --cases validation --postprocess`` (or ``eval_unetr.py``):
   the run's validation cases, segmented from their raw CTs and post-processed, scored in the
   original grid (a report folder).
2. :func:`choose_min_tumour_ml` re-scores that report's predictions with each candidate threshold
   (the relabelling applied on the saved predictions, on their own grid; the kidney region
   label > 0 does not change) and keeps the one with the highest mean ``mean_dice`` over the
   validation cases (for KiTS19 the mean of kidney and tumour Dice, so in effect the tumour Dice);
   a tie keeps the smaller threshold, so 0 (no relabelling) stays unless a threshold does better.
3. :func:`write_choice` stores it as ``postprocessing.json`` beside the checkpoint, with the
   checkpoint's name and SHA-256 and the whole table; from then on ``--postprocess`` with that
   checkpoint applies it (:func:`utils.inference.postprocessing.read_min_tumour_ml`), and
   ``inference.json`` of every later evaluation records the ``min_tumour_ml`` used. The report
   folder gets ``postprocessing_choice.md`` and ``postprocessing_choice.png``.

A cross-validated experiment chooses for its fold ensemble on its out-of-fold report
(``eval_unet.py --run EXPERIMENT --postprocess``: every case segmented by the fold that never
trained on it, :mod:`utils.evaluation.cross_validation`); the choice goes into the experiment
folder with the SHA-256 of its fold checkpoints together
(:func:`utils.inference.postprocessing.ensemble_sha256`), and the ensemble loaded from that
folder applies it. The out-of-fold predictions are each fold's alone, while the ensemble averages
its folds' softmax: an approximation (nnU-Net chooses an ensemble's post-processing on its
cross-validation predictions in the same way).

Refused before any work, naming the file: a report that is not of the run's validation cases
or an experiment's out-of-fold cases (test or training cases must not choose), not
post-processed, already made with a tumour-size rule, the fold ensemble's own report (its cases
were trained on), or older than the checkpoint's (or any fold checkpoint's) current contents.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.data.case_discovery import discover_cases
from utils.data.dataset_definitions import DatasetDefinition, get_dataset
from utils.data.kits_layout import spacing_from_affine
from utils.data.nifti_io import load_nifti, save_json_atomic, write_bytes_atomic
from utils.data.output_guard import check_output_location, check_overwrite, is_own_json
from utils.data.progress import progress
from utils.evaluation.cross_validation import OUT_OF_FOLD
from utils.evaluation.predictions import METRICS_JSON_NAME, missing_prediction_case, read_label_map
from utils.evaluation.run import INFERENCE_JSON, PREDICTIONS
from utils.figures.drawing import save_figure
from utils.figures.evaluation import plot_threshold_sweep
from utils.inference.postprocessing import (
    CHOICE_FILE,
    choice_file,
    ensemble_sha256,
    file_sha256,
    relabel_small_tumours,
)
from utils.inference.segment import find_fold_checkpoints
from utils.metrics.scoring import score_case, summarise_scores
from utils.metrics.surface import DEFAULT_TOLERANCE_MM, find_bounding_box

logger = logging.getLogger(__name__)

#: Thresholds tried by default, in ml (0: no relabelling). KiTS19's smallest tumours are a few ml.
DEFAULT_CANDIDATES_ML: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0)
#: The report files written beside the validation report's ``metrics.json``.
CHOICE_TABLE = "postprocessing_choice.md"
CHOICE_FIGURE = "postprocessing_choice.png"
_TIE = 1e-9


@dataclass(frozen=True)
class ThresholdScore:
    """The validation scores with one threshold.

    Attributes:
        min_tumour_ml: the threshold (0: none).
        summary: :func:`utils.metrics.scoring.summarise_scores` of the cases (``mean_dice`` and per score).
        changed_cases: the cases whose prediction the threshold changes.
        relabelled_ml: tumour volume called kidney, summed over the cases, in ml.
    """

    min_tumour_ml: float
    summary: dict[str, Any]
    changed_cases: tuple[str, ...]
    relabelled_ml: float

    def as_dict(self) -> dict[str, Any]:
        return {"min_tumour_ml": self.min_tumour_ml, "summary": self.summary, "changed_cases": list(self.changed_cases),
                "relabelled_ml": self.relabelled_ml}


@dataclass(frozen=True)
class PostprocessingChoice:
    """The chosen threshold, and what it was chosen on.

    Attributes:
        min_tumour_ml: the chosen threshold (0: relabel nothing).
        checkpoint: the checkpoint file it holds for (or the cross-validated experiment folder, for its
            fold ensemble).
        checkpoint_sha256: that file's SHA-256 when the choice was made (an experiment's: its fold
            checkpoints', :func:`utils.inference.postprocessing.ensemble_sha256`).
        report: the validation (or out-of-fold) report it was chosen on.
        data_dir: the data folder of the report's ground truth.
        case_ids: the validation (or out-of-fold) cases.
        dataset: whose labels and regions.
        scores: one :class:`ThresholdScore` per candidate, in the order tried.
    """

    min_tumour_ml: float
    checkpoint: Path
    checkpoint_sha256: str
    report: Path
    data_dir: Path
    case_ids: tuple[str, ...]
    dataset: DatasetDefinition
    scores: tuple[ThresholdScore, ...]

    @property
    def out_of_fold(self) -> bool:
        """Whether it was chosen on a cross-validated experiment's out-of-fold cases (for its fold ensemble)."""
        return self.checkpoint.is_dir()

    @property
    def cases_name(self) -> str:
        """``"validation"`` or ``"out-of-fold"``: the cases it was chosen on."""
        return OUT_OF_FOLD if self.out_of_fold else "validation"

    @property
    def baseline(self) -> ThresholdScore:
        """The scores without relabelling (threshold 0)."""
        return next(score for score in self.scores if score.min_tumour_ml == 0)

    @property
    def chosen(self) -> ThresholdScore:
        return next(score for score in self.scores if score.min_tumour_ml == self.min_tumour_ml)

    def as_dict(self) -> dict[str, Any]:
        """The content of ``postprocessing.json``."""
        return {"min_tumour_ml": self.min_tumour_ml, "checkpoint": self.checkpoint.name,
                "checkpoint_sha256": self.checkpoint_sha256,
                "rule": "tumour components (label 2, 26-connected) smaller than min_tumour_ml, but the largest, "
                        "become kidney (label 1), after the largest kidneys are kept and detached tumour is dropped",
                "criterion": f"highest mean over the {self.cases_name} cases of mean_dice (the mean of the dataset's "
                             "region Dice); a tie keeps the smaller threshold",
                **({"fold_checkpoints": {f"{path.parent.name}/{path.name}": file_sha256(path)
                                         for path in find_fold_checkpoints(self.checkpoint).values()}}
                   if self.out_of_fold else {}),
                "chosen_on": {"report": str(self.report.resolve()), "data_dir": str(self.data_dir.resolve()),
                              "cases_selected": self.cases_name, "cases": list(self.case_ids),
                              "dataset": self.dataset.name},
                "candidates": [score.as_dict() for score in self.scores]}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: evaluate the run's validation cases first "
                                "(eval_unet.py / eval_unetr.py --run RUN --cases validation --postprocess)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def current_sha256(checkpoint: str | os.PathLike) -> str:
    """The SHA-256 a choice records: a checkpoint file's, or for a cross-validated experiment folder that of
    the fold checkpoints its ensemble loads (:func:`utils.inference.segment.find_fold_checkpoints`)."""
    checkpoint = Path(checkpoint)
    return ensemble_sha256(find_fold_checkpoints(checkpoint).values()) if checkpoint.is_dir() else \
        file_sha256(checkpoint)


def check_validation_report(report: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """Read a report's ``inference.json`` and ``metrics.json``, and refuse one that may not choose.

    Returns:
        ``(inference, metrics, checkpoint)``; ``checkpoint`` is the experiment folder for an
        out-of-fold report.

    Raises:
        FileNotFoundError: a file is missing (the report's, or the checkpoint it names).
        ValueError: not the run's validation cases nor an experiment's out-of-fold cases, not
            post-processed, made with a tumour-size rule already, or older than the checkpoint's
            (a fold checkpoint's) current contents; the message names the file and what to do.
    """
    report = Path(report)
    inference_path = report / INFERENCE_JSON
    inference, metrics = _read_json(inference_path), _read_json(report / METRICS_JSON_NAME)
    selected = inference.get("cases_selected")
    if selected not in ("validation", OUT_OF_FOLD):
        ensemble = " (a fold ensemble was trained on every case of its experiment)" if selected == "all" and \
            Path(str(inference.get("checkpoint", ""))).is_dir() else ""
        raise ValueError(f"{inference_path}: the report's cases are {selected!r}{ensemble}, not the run's validation "
                         "cases nor an experiment's out-of-fold cases: a post-processing rule is chosen on cases the "
                         "model was not trained on and that are not its test cases; evaluate a run with --cases "
                         "validation, or an experiment folder (out of fold)")
    if not inference.get("postprocess"):
        raise ValueError(f"{inference_path}: the predictions were not post-processed; the rule applies after the "
                         "post-processing, so evaluate the validation cases with --postprocess")
    if float(inference.get("min_tumour_ml") or 0) > 0:
        raise ValueError(f"{inference_path}: the predictions already apply min_tumour_ml "
                         f"{inference['min_tumour_ml']:g} ml; move the run's {CHOICE_FILE} aside and evaluate the "
                         "validation cases again to choose anew")
    checkpoint = Path(str(inference.get("checkpoint", "")))
    if selected == OUT_OF_FOLD:
        if not checkpoint.is_dir() or not find_fold_checkpoints(checkpoint):
            raise FileNotFoundError(f"{inference_path}: the experiment folder it names, {checkpoint}, is missing or "
                                    "holds no fold checkpoint")
        if "fold_checkpoints" not in inference or "checkpoint_sha256" not in inference:
            raise ValueError(f"{inference_path}: an out-of-fold report without the SHA-256 of its fold checkpoints "
                             "(made by an older version); evaluate the experiment folder again")
        if inference["checkpoint_sha256"] != current_sha256(checkpoint):
            raise ValueError(f"{inference_path}: the fold checkpoints of {checkpoint} have changed since these "
                             "predictions were made (or the folder's ensemble loads other files than the "
                             "out-of-fold evaluation did); evaluate the experiment folder again")
        return inference, metrics, checkpoint
    if not checkpoint.is_file():
        what = "a folder" if checkpoint.is_dir() else "missing"
        raise FileNotFoundError(f"{inference_path}: the checkpoint it names, {checkpoint}, is {what}; a validation "
                                "report's rule is chosen for the checkpoint file its cases were segmented with")
    recorded = inference.get("checkpoint_sha256")
    if recorded is not None and recorded != file_sha256(checkpoint):
        raise ValueError(f"{inference_path}: {checkpoint} has changed since these predictions were made (its "
                         "SHA-256 differs); evaluate the validation cases again")
    if recorded is None and checkpoint.stat().st_mtime > inference_path.stat().st_mtime:
        raise ValueError(f"{inference_path}: {checkpoint} is newer than this report; evaluate the validation cases "
                         "again")
    return inference, metrics, checkpoint


def _check_candidates(candidates: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(c) for c in candidates)
    if not values or any(not (math.isfinite(c) and c >= 0) for c in values):
        raise ValueError(f"candidates must be volumes >= 0 ml, got {list(candidates)}")
    return tuple(sorted(set(values) | {0.0}))


def choose_min_tumour_ml(report: str | os.PathLike, *, candidates: Sequence[float] = DEFAULT_CANDIDATES_ML,
                         tolerance_mm: float | None = None, show_progress: bool = True) -> PostprocessingChoice:
    """Score a validation report's predictions with every candidate threshold and choose one.

    Args:
        report: a report folder of :func:`utils.evaluation.run.evaluate_run` with ``cases="validation"``
            and ``postprocess=True`` (``inference.json``, ``metrics.json``, ``predictions/``), or the
            post-processed out-of-fold report of a cross-validated experiment
            (:func:`utils.evaluation.cross_validation.evaluate_cross_validation`).
        candidates: thresholds in ml (0 is always added).
        tolerance_mm: surface-Dice tolerance (default: the report's own).
        show_progress: a progress bar over cases.

    Returns:
        The choice, not yet written (:func:`write_choice`).

    Raises:
        FileNotFoundError, ValueError: see :func:`check_validation_report`; bad candidates.
    """
    report = Path(report)
    inference, metrics, checkpoint = check_validation_report(report)
    values = _check_candidates(candidates)
    dataset = get_dataset(inference.get("dataset", "kits19"))
    settings = metrics.get("settings") or {}
    tolerance = float(tolerance_mm if tolerance_mm is not None else settings.get("tolerance_mm", DEFAULT_TOLERANCE_MM))
    data_dir = Path(str(inference.get("data_dir", "")))
    case_ids = tuple(str(case["case_id"]) for case in metrics.get("cases", []))
    if not case_ids:
        raise ValueError(f"{report / METRICS_JSON_NAME}: no scored case to choose on")
    by_id = {case.case_id: case for case in discover_cases(data_dir, dataset).cases}
    absent = [case_id for case_id in case_ids if case_id not in by_id or by_id[case_id].segmentation is None]
    if absent:
        raise ValueError(f"{data_dir}: no ground truth for {', '.join(absent)} of {report / METRICS_JSON_NAME}")
    records: dict[float, list[dict[str, Any]]] = {value: [] for value in values}
    changed: dict[float, list[str]] = {value: [] for value in values}
    relabelled: dict[float, float] = dict.fromkeys(values, 0.0)
    for case_id in progress(list(case_ids), desc="thresholds", unit="case", disable=not show_progress):
        case = by_id[case_id]
        prediction_path = report / PREDICTIONS / f"{case_id}.nii.gz"
        reference = case.imaging if case.imaging is not None else case.segmentation
        spacing = spacing_from_affine(load_nifti(reference).affine)
        truth = read_label_map(case.segmentation, f"{case_id}: ground truth", dataset)
        if not prediction_path.is_file():  # a missing prediction is a failure whatever the threshold
            for value in values:
                records[value].append(missing_prediction_case(case_id, dataset))
            continue
        prediction = read_label_map(prediction_path, f"{case_id}: prediction", dataset)
        if prediction.shape != truth.shape:
            raise ValueError(f"{case_id}: prediction {prediction_path} has shape {prediction.shape}, its ground "
                             f"truth {case.segmentation} {truth.shape}; predictions must be on the CT's original grid")
        box = find_bounding_box([prediction, truth])  # every score and component lies inside: crop once
        if box is not None:
            prediction, truth = prediction[box], truth[box]
        voxel_ml = float(np.prod(spacing)) / 1000.0
        baseline = {"case_id": case_id, **score_case(prediction, truth, spacing, tolerance_mm=tolerance,
                                                     dataset=dataset)}
        previous, previous_moved = baseline, 0
        for value in values:  # ascending: a larger threshold relabels at least what a smaller one did
            relabelled_labels = relabel_small_tumours(prediction, spacing, value, dataset) if value else prediction
            moved = int(np.count_nonzero(relabelled_labels != prediction))
            if moved and moved != previous_moved:  # only the regions the relabelling moves are scored again
                moving = [region.name for region in dataset.regions
                          if not np.array_equal(region.mask(relabelled_labels), region.mask(prediction))]
                previous = {**baseline, **score_case(relabelled_labels, truth, spacing, tolerance_mm=tolerance,
                                                     dataset=dataset, regions=moving)}
            elif not moved:
                previous = baseline
            previous_moved = moved
            records[value].append(previous)
            if moved:
                changed[value].append(case_id)
                relabelled[value] += moved * voxel_ml
    scores = tuple(ThresholdScore(value, summarise_scores(records[value], dataset=dataset), tuple(changed[value]),
                                  relabelled[value]) for value in values)
    best = scores[0]
    for score in scores[1:]:  # ascending thresholds: a tie keeps the smaller
        if score.summary["mean_dice"] > best.summary["mean_dice"] + _TIE:
            best = score
    logger.info("min_tumour_ml %g ml chosen on %d %s case(s) of %s (mean Dice %.4f, %.4f without)",
                best.min_tumour_ml, len(case_ids), inference["cases_selected"], report, best.summary["mean_dice"],
                scores[0].summary["mean_dice"])
    return PostprocessingChoice(best.min_tumour_ml, checkpoint, current_sha256(checkpoint), report, data_dir,
                                case_ids, dataset, scores)


def check_choice_outputs(choice_or_checkpoint: PostprocessingChoice | Path, data_dir: str | os.PathLike | None, *,
                         allow_inside_input: bool = False) -> None:
    """Refuse to write the choice into the input data, or over a file this command did not write."""
    checkpoint = (choice_or_checkpoint.checkpoint if isinstance(choice_or_checkpoint, PostprocessingChoice)
                  else Path(choice_or_checkpoint))
    target = choice_file(checkpoint)
    check_output_location(target, [data_dir], what="post-processing choice", allow_inside_input=allow_inside_input)
    check_overwrite(target, is_own_json(("min_tumour_ml", "checkpoint", "checkpoint_sha256")),
                    what="post-processing choice")


def _cell(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_choice_table(choice: PostprocessingChoice) -> str:
    """Markdown: one row per threshold (mean Dice, the dataset's last region's Dice, surface Dice and HD95)."""
    region = choice.dataset.regions[-1].name  # KiTS19: tumour; KiTS23: tumour
    header = (f"| min tumour ml | mean Dice | {region} Dice | {region} surface Dice | {region} HD95 mm (missing) "
              "| cases changed | ml relabelled |")
    lines = [header, "|" + "---|" * 7]
    for score in choice.scores:
        summary = score.summary
        hd95 = summary[f"{region}_hd95"]
        mark = " **(chosen)**" if score.min_tumour_ml == choice.min_tumour_ml else ""
        lines.append(f"| {score.min_tumour_ml:g}{mark} | {_cell(summary['mean_dice'], 4)} | "
                     f"{_cell(summary[f'{region}_dice']['mean'])} | {_cell(summary[f'{region}_surface_dice']['mean'])}"
                     f" | {_cell(hd95['mean'], 1)} ({hd95['missing']}) | {len(score.changed_cases)} | "
                     f"{score.relabelled_ml:.2f} |")
    return "\n".join(lines)


def write_choice(choice: PostprocessingChoice, *, allow_inside_input: bool = False) -> Path:
    """Write ``postprocessing.json`` beside the checkpoint, and the table and figure into the report folder.

    Refused (before anything is written) inside the data folder or over a file this command did not
    write; each file is written atomically.

    Returns:
        The path of ``postprocessing.json``.
    """
    check_choice_outputs(choice, choice.data_dir, allow_inside_input=allow_inside_input)
    for name in (CHOICE_TABLE, CHOICE_FIGURE):
        check_output_location(choice.report / name, [choice.data_dir], what="report",
                              allow_inside_input=allow_inside_input)
    if current_sha256(choice.checkpoint) != choice.checkpoint_sha256:
        raise ValueError(f"{choice.checkpoint} changed while the choice was made; evaluate and choose again")
    model = (f"{choice.checkpoint.name} (fold ensemble)" if choice.out_of_fold
             else f"{choice.checkpoint.parent.name}/{choice.checkpoint.name}")
    title = f"{model}: smallest tumour component, chosen on {len(choice.case_ids)} {choice.cases_name} case(s)"
    text = (f"# {title}\n\nReport: `{choice.report}`; rule: tumour components smaller than the threshold, but the "
            f"largest, become kidney. Chosen: **{choice.min_tumour_ml:g} ml** (highest mean Dice; a tie keeps the "
            f"smaller threshold).\n\n{format_choice_table(choice)}\n")
    write_bytes_atomic(choice.report / CHOICE_TABLE, text.encode())
    save_figure(plot_threshold_sweep([s.min_tumour_ml for s in choice.scores],
                                     [s.summary for s in choice.scores], choice.min_tumour_ml,
                                     region=choice.dataset.regions[-1].name, title=title),
                choice.report / CHOICE_FIGURE)
    path = save_json_atomic(choice_file(choice.checkpoint), choice.as_dict())
    logger.info("wrote %s (min_tumour_ml %g ml)", path, choice.min_tumour_ml)
    return path
