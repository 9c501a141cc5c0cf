"""Comparing two evaluated runs: loading their reports, paired statistics per metric, inference cost.

An evaluated run leaves a report folder holding ``metrics.json`` (:func:`utils.evaluation.predictions.save_metrics`:
the metrics of its dataset, :func:`utils.metrics.scoring.metric_names` of the dataset its
``settings`` name (:func:`utils.evaluation.predictions.dataset_of_settings`; KiTS19's
:data:`utils.metrics.scoring.METRIC_NAMES` when they name none), Dice in [0, 1], HD95 in mm,
``null`` when missing) and ``inference.json`` (run name, model key, parameter count, checkpoint, inference
seconds per case). Statistics use only the cases both runs were scored on. Per metric, the
paired differences ``B - A`` over the cases where both values are present give the mean
difference, a percentile bootstrap confidence interval of that mean (a fresh
``numpy.random.default_rng(seed)`` per metric, so every interval is reproducible on its own) and
the two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon`` with its defaults: zero
differences dropped). :func:`utils.evaluation.report.save_comparison_report` writes the report.

A cross-validated experiment is compared through its out-of-fold report
(:mod:`utils.evaluation.cross_validation`): every case scored with the prediction of the fold that
held it out, so two experiments on the same cases are paired on every case; the comparison
records each side's ``predictions`` (``"out-of-fold, k = K"`` or ``"one model"``) and each case's fold.

Two reports are compared only when they were scored on the same dataset: a KiTS19 report (kidney
and tumour) and a KiTS23 report (hierarchical evaluation regions) have no metric in common, and
:func:`compare_reports` refuses them, naming both folders and datasets.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from utils.config.experiment import MODEL_NAMES
from utils.data.dataset_definitions import KITS19, DatasetDefinition, get_dataset
from utils.evaluation.predictions import METRICS_JSON_NAME, dataset_of_settings
from utils.evaluation.run import EVALUATION_SCRIPTS, INFERENCE_JSON
from utils.metrics.scoring import EMPTY_MASK_RULES, metric_names, summarise_scores
from utils.training.cross_validation import MANIFEST
from utils.training.run_folder import CONFIG_FILE

logger = logging.getLogger(__name__)

#: Fewest non-zero paired differences for which a Wilcoxon p-value is reported.
MIN_WILCOXON_PAIRS = 6
#: Confidence level of the bootstrap interval of the mean difference.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class EvaluationReport:
    """One run's evaluation, as read from its report folder.

    Attributes:
        folder: the report folder.
        run_name: ``inference.json``'s ``run_name``, else the folder's name.
        model, checkpoint, device: from ``inference.json`` (``None`` when it is absent).
        parameters: number of trainable parameters (``None`` when unknown).
        cases: ``{case_id: {metric: value or None}}`` over the metrics of :attr:`dataset` (Dice in
            [0, 1], HD95 in mm).
        settings: ``metrics.json``'s ``settings`` (surface-Dice tolerance in mm, empty-mask rules,
            and for a dataset other than KiTS19 its name, regions and their tolerances).
        seconds: ``{case_id: inference wall time in s}`` (empty when ``inference.json`` is absent).
        experiment: ``metrics.json``'s ``experiment`` for the out-of-fold evaluation of a
            cross-validated experiment (``predictions: "out-of-fold"``, ``k``, model, split seed,
            plan hash; see :mod:`utils.evaluation.cross_validation`), ``None`` for a single run.
        folds: ``{case_id: fold}`` of an out-of-fold evaluation (empty for a single run).
    """

    folder: Path
    run_name: str
    model: str | None
    checkpoint: str | None
    device: str | None
    parameters: int | None
    cases: dict[str, dict[str, float | None]]
    settings: dict[str, Any]
    seconds: dict[str, float]
    experiment: dict[str, Any] | None = None
    folds: dict[str, int] = field(default_factory=dict)

    @property
    def dataset(self) -> DatasetDefinition:
        """The dataset the run was scored on (its ``settings``' ``dataset``; KiTS19 when they name none)."""
        return dataset_of_settings(self.settings)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error


def _read_run_model(run_folder: Path) -> str | None:
    config_path = run_folder / CONFIG_FILE
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    model = config.get("model") if isinstance(config, dict) else None
    return model.get("name") if isinstance(model, dict) else None


def _read_experiment_model(experiment: Path) -> str | None:
    try:
        manifest = json.loads((experiment / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest.get("model_name") if isinstance(manifest, dict) else None


def resolve_report_folder(run_or_report: str | os.PathLike, reports_dir: str | os.PathLike) -> Path:
    """Return the report folder of a report folder, a training run folder or a cross-validated experiment.

    Args:
        run_or_report: a folder holding ``metrics.json``; a run folder ``checkpoints/<run>/``
            (holding ``config.yaml``), whose report folder is ``reports_dir/<run>/``; or a
            cross-validated experiment folder (holding ``cross_validation.json``), whose
            out-of-fold report folder is ``reports_dir/<experiment>/``.
        reports_dir: the folder holding the report folders of runs and experiments.

    Raises:
        FileNotFoundError: the folder does not exist, or the run's (experiment's) report does
            not; the message names the evaluation script to run (:data:`EVALUATION_SCRIPTS`, by
            the config's ``model: name:`` or the experiment's model).
    """
    folder = Path(run_or_report)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a report folder holding {METRICS_JSON_NAME}, "
                                f"a training run folder holding {CONFIG_FILE} or a cross-validated experiment "
                                f"folder holding {MANIFEST}")
    if (folder / METRICS_JSON_NAME).is_file():
        return folder
    if (folder / MANIFEST).is_file():
        report = Path(reports_dir) / folder.resolve().name
        if (report / METRICS_JSON_NAME).is_file():
            return report
        model = _read_experiment_model(folder)
        script = EVALUATION_SCRIPTS.get(model or "", " or ".join(EVALUATION_SCRIPTS.values()))
        raise FileNotFoundError(f"no out-of-fold evaluation report {report / METRICS_JSON_NAME} for the "
                                f"cross-validated experiment {folder} (model {model!r}); evaluate it first with "
                                f"{script} --run {folder}")
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds neither {METRICS_JSON_NAME} (a report folder), {CONFIG_FILE} "
                                f"(a training run folder) nor {MANIFEST} (a cross-validated experiment)")
    report = Path(reports_dir) / folder.name
    if (report / METRICS_JSON_NAME).is_file():
        return report
    model = _read_run_model(folder)
    script = EVALUATION_SCRIPTS.get(model or "", " or ".join(EVALUATION_SCRIPTS.values()))
    raise FileNotFoundError(f"no evaluation report {report / METRICS_JSON_NAME} for run {folder} (model {model!r}); "
                            f"evaluate the run first with {script}")


def _read_dataset(path: Path, data: Any) -> DatasetDefinition:
    """The dataset ``metrics.json`` was scored on; ``ValueError`` naming the file for an unknown one."""
    settings = data.get("settings") if isinstance(data, dict) else None
    try:
        return dataset_of_settings(settings if isinstance(settings, dict) else {})
    except ValueError as error:
        raise ValueError(f"{path}: settings.dataset: {error}") from None


def _read_cases(path: Path, data: Any) -> dict[str, dict[str, float | None]]:
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise ValueError(f"{path} must hold a 'cases' list (as written by utils.evaluation.predictions.save_metrics)")
    names = metric_names(_read_dataset(path, data))
    cases: dict[str, dict[str, float | None]] = {}
    for record in data["cases"]:
        absent = [key for key in ("case_id", *names) if not isinstance(record, dict) or key not in record]
        if absent:
            raise ValueError(f"every case in {path} must hold case_id and {list(names)}; "
                             f"a case lacks {absent}: {record!r}")
        if record["case_id"] in cases:
            raise ValueError(f"{path} lists case {record['case_id']!r} twice")
        values = {m: None if record[m] is None else float(record[m]) for m in names}
        cases[record["case_id"]] = {m: v if v is None or math.isfinite(v) else None for m, v in values.items()}
    return cases


def load_evaluation_report(folder: str | os.PathLike) -> EvaluationReport:
    """Read ``metrics.json`` and (if present, else a logged warning) ``inference.json`` of a report folder.

    Raises:
        FileNotFoundError: ``metrics.json`` is absent.
        ValueError: a file is not valid JSON or lacks a case field, a case is listed twice, or
            ``inference.json`` names a model other than :data:`utils.config.experiment.MODEL_NAMES`.
    """
    folder = Path(folder)
    metrics_path = folder / METRICS_JSON_NAME
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} does not exist; evaluate the run first")
    metrics = _read_json(metrics_path)
    cases = _read_cases(metrics_path, metrics)
    inference_path = folder / INFERENCE_JSON
    inference: dict[str, Any] = {}
    if inference_path.is_file():
        inference = _read_json(inference_path)
        if inference.get("model") not in MODEL_NAMES:
            raise ValueError(f"{inference_path}: model must be one of {list(MODEL_NAMES)}, "
                             f"got {inference.get('model')!r}")
    else:
        logger.warning("%s does not exist: no parameter count or inference time for %s", inference_path, folder)
    seconds = {str(c["case_id"]): float(c["seconds"]) for c in inference.get("cases", [])}
    parameters = inference.get("parameters")
    experiment = metrics.get("experiment")
    folds = {str(r["case_id"]): int(r["fold"]) for r in metrics["cases"] if r.get("fold") is not None}
    return EvaluationReport(folder, str(inference.get("run_name") or folder.name), inference.get("model"),
                            inference.get("checkpoint"), inference.get("device"),
                            None if parameters is None else int(parameters), cases,
                            dict(metrics.get("settings") or {}), seconds,
                            dict(experiment) if isinstance(experiment, dict) else None, folds)


def _is_present(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def bootstrap_mean_interval(differences: Sequence[float], n_resamples: int, seed: int,
                            confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences``.

    Args:
        differences: at least one finite value.
        n_resamples: number of resamples with replacement (>= 1).
        seed: seed of a fresh ``numpy.random.default_rng``; the same seed gives the same interval.
        confidence: in (0, 1); the interval runs between the ``(1 - c) / 2`` and ``(1 + c) / 2``
            quantiles of the resampled means.
    """
    values = np.asarray(differences, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"differences must be a non-empty sequence of finite values, got {values.tolist()}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def compute_wilcoxon_p_value(differences: Sequence[float]) -> tuple[float | None, str | None]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences, or ``None`` and the reason.

    The p-value is ``scipy.stats.wilcoxon(differences).pvalue`` (zero differences dropped); it is
    not computed with fewer than :data:`MIN_WILCOXON_PAIRS` non-zero differences.
    """
    values = np.asarray(differences, dtype=np.float64)
    non_zero = int(np.count_nonzero(values))
    if values.size and non_zero == 0:
        return None, f"all {values.size} differences are zero"
    if non_zero < MIN_WILCOXON_PAIRS:
        return None, f"{non_zero} non-zero differences, fewer than {MIN_WILCOXON_PAIRS}"
    return float(stats.wilcoxon(values).pvalue), None


def compare_metric(values_a: Sequence[float | None], values_b: Sequence[float | None], n_resamples: int,
                   seed: int) -> dict[str, Any]:
    """Paired statistics of one metric over the same cases, in the same order, of runs A and B.

    Returns:
        ``{"n_pairs", "excluded", "mean_difference", "ci_low", "ci_high", "p_value", "p_value_reason"}``:
        differences are ``B - A``; ``excluded`` counts cases with a missing value (``None`` or NaN)
        on either side; the statistics are ``None`` without pairs (``p_value_reason`` says why).
    """
    if len(values_a) != len(values_b):
        raise ValueError(f"values_a and values_b must hold the same cases, got {len(values_a)} and {len(values_b)}")
    pairs = [(a, b) for a, b in zip(values_a, values_b, strict=False) if _is_present(a) and _is_present(b)]
    differences = [b - a for a, b in pairs]
    result: dict[str, Any] = {"n_pairs": len(pairs), "excluded": len(values_a) - len(pairs), "mean_difference": None,
                              "ci_low": None, "ci_high": None, "p_value": None, "p_value_reason": "no complete pairs"}
    if differences:
        result["mean_difference"] = float(np.mean(differences))
        result["ci_low"], result["ci_high"] = bootstrap_mean_interval(differences, n_resamples, seed)
        result["p_value"], result["p_value_reason"] = compute_wilcoxon_p_value(differences)
    return result


def summarise_seconds(seconds: Mapping[str, float], case_ids: Sequence[str]) -> dict[str, float | int | None]:
    """Inference wall time (s) over ``case_ids``: ``{"n", "missing", "mean", "median", "total"}``."""
    values = [seconds[case_id] for case_id in case_ids if case_id in seconds]
    return {"n": len(values), "missing": len(case_ids) - len(values),
            "mean": float(np.mean(values)) if values else None,
            "median": float(np.median(values)) if values else None,
            "total": float(np.sum(values)) if values else None}


def describe_predictions(report: EvaluationReport) -> str:
    """How the predictions were made: ``"out-of-fold, k = K"`` (a cross-validated experiment) or ``"one model"``."""
    if report.experiment and report.experiment.get("predictions") == "out-of-fold":
        return f"out-of-fold, k = {report.experiment.get('k')}"
    return "one model"


def describe_run(report: EvaluationReport) -> dict[str, Any]:
    """What identifies a run in the comparison: name, folder, model, checkpoint, device, parameters, settings,
    how its predictions were made and, for a cross-validated experiment, the experiment and each case's fold."""
    return {"run_name": report.run_name, "report_folder": str(report.folder), "model": report.model,
            "checkpoint": report.checkpoint, "device": report.device, "parameters": report.parameters,
            "cases_evaluated": len(report.cases), "settings": report.settings,
            "predictions": describe_predictions(report), "experiment": report.experiment,
            "folds": dict(report.folds)}


def dataset_of_comparison(comparison: Mapping[str, Any]) -> DatasetDefinition:
    """The dataset of a :func:`compare_reports` result (its ``dataset``; KiTS19 when it names none)."""
    return get_dataset(comparison.get("dataset") or KITS19.name)


def check_same_dataset(report_a: EvaluationReport, report_b: EvaluationReport) -> DatasetDefinition:
    """The dataset both reports were scored on.

    Raises:
        ValueError: the reports were scored on different datasets (say KiTS19's kidney and tumour
            and KiTS23's hierarchical evaluation regions: no metric in common); the message names
            both folders and datasets.
    """
    dataset_a, dataset_b = report_a.dataset, report_b.dataset
    if dataset_a is not dataset_b:
        raise ValueError(f"cannot compare {report_a.folder} ({dataset_a.title}, scored on "
                         f"{', '.join(dataset_a.region_names)}) with {report_b.folder} ({dataset_b.title}, scored on "
                         f"{', '.join(dataset_b.region_names)}): the two runs were scored on different datasets; "
                         f"compare runs of the same dataset")
    return dataset_a


def compare_reports(report_a: EvaluationReport, report_b: EvaluationReport, n_resamples: int = 10000,
                    seed: int = 0) -> dict[str, Any]:
    """Compare two runs on the cases both were evaluated on; the result is what ``comparison.json`` holds.

    The metrics are those of the reports' dataset (:attr:`EvaluationReport.dataset`; KiTS19: kidney
    and tumour; KiTS23: its hierarchical evaluation regions), which both must share.

    Returns:
        ``{"runs": {"a", "b"}, "shared_cases", "only_a", "only_b", "warnings", "summary": {"a", "b"}
        (:func:`utils.metrics.scoring.summarise_scores` on the shared cases), "paired": {metric:
        :func:`compare_metric`}, "inference": {"a", "b"} (:func:`summarise_seconds`), "per_case":
        {case_id: {"a", "b"}}, "bootstrap": {"n_resamples", "seed", "confidence"}, "empty_mask_rules"}``,
        and ``"dataset"`` (its name) when the reports' dataset is not KiTS19 (KiTS19 comparisons are as
        they always were).

    Raises:
        ValueError: the runs share no case, were scored on different datasets
            (:func:`check_same_dataset`), or ``n_resamples`` < 1.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    dataset = check_same_dataset(report_a, report_b)
    names = metric_names(dataset)
    shared = sorted(set(report_a.cases) & set(report_b.cases))
    if not shared:
        raise ValueError(f"{report_a.folder} and {report_b.folder} share no evaluated case; nothing to compare")
    only_a, only_b = sorted(set(report_a.cases) - set(shared)), sorted(set(report_b.cases) - set(shared))
    warnings = [f"cases only in {side} ({name}), left out: {len(ids)}: {', '.join(ids)}"
                for side, name, ids in (("A", report_a.run_name, only_a), ("B", report_b.run_name, only_b)) if ids]
    for report, side in ((report_a, "A"), (report_b, "B")):
        if not report.seconds:
            warnings.append(f"no {INFERENCE_JSON} in {report.folder} ({side}): "
                            "no inference time or parameter count")
    kinds = [describe_predictions(r) for r in (report_a, report_b)]
    if "one model" in kinds and any(kind.startswith("out-of-fold") for kind in kinds):
        warnings.append(f"A's predictions are {kinds[0]}, B's {kinds[1]}: the paired cases were segmented "
                        "by different kinds of model (a fold model never trained on its case, or a single run)")
    tolerances = {r.settings.get("tolerance_mm") for r in (report_a, report_b)}
    own_tolerances = all(region.tolerance_mm is not None for region in dataset.regions)  # KiTS23: the challenge's
    if len(tolerances) > 1 and not own_tolerances:
        warnings.append(f"surface-Dice tolerances differ: A {report_a.settings.get('tolerance_mm')} mm, "
                        f"B {report_b.settings.get('tolerance_mm')} mm; surface Dice is not comparable")
    for warning in warnings:
        logger.warning(warning)
    records = {side: [r.cases[c] for c in shared] for side, r in (("a", report_a), ("b", report_b))}
    paired = {m: compare_metric([x[m] for x in records["a"]], [x[m] for x in records["b"]], n_resamples, seed)
              for m in names}
    return {"runs": {"a": describe_run(report_a), "b": describe_run(report_b)}, "shared_cases": shared,
            "only_a": only_a, "only_b": only_b, "warnings": warnings,
            "summary": {side: summarise_scores(records[side], metrics=names, dataset=dataset) for side in ("a", "b")},
            "paired": paired,
            "inference": {"a": summarise_seconds(report_a.seconds, shared),
                          "b": summarise_seconds(report_b.seconds, shared)},
            "per_case": {c: {"a": report_a.cases[c], "b": report_b.cases[c]} for c in shared},
            "bootstrap": {"n_resamples": n_resamples, "seed": seed, "confidence": CONFIDENCE},
            "empty_mask_rules": report_a.settings.get("empty_mask_rules", EMPTY_MASK_RULES),
            **({} if dataset is KITS19 else {"dataset": dataset.name})}
