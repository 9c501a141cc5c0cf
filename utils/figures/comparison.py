"""Figures comparing two runs case by case: box plots per metric and A-versus-B scatter plots.

Inputs are two lists of per-case metric records over the *same* cases in the same order (as in
:func:`utils.evaluation.comparison.compare_reports`'s ``per_case``); a value of ``None`` or NaN is missing
and left out of the plot (the count is given in the axis title). The default metrics are those of
the records' dataset (:func:`utils.figures.evaluation.dataset_of_records`): KiTS19's kidney and
tumour scores, or KiTS23's per hierarchical evaluation region. Every function builds a new
:class:`~matplotlib.figure.Figure` without pyplot, so nothing is shown, registered or changed
globally; points are spread sideways by fixed offsets, not random jitter. Given ``path``, a
function also saves the figure atomically (:func:`utils.figures.drawing.save_figure`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from utils.data.dataset_definitions import KITS19, DatasetDefinition
from utils.figures.drawing import save_figure
from utils.figures.evaluation import dataset_of_records
from utils.metrics.scoring import METRIC_NAMES, dice_names, metric_names

Records = Sequence[Mapping[str, float | None]]
#: Colours of run A and run B.
RUN_COLOURS = ("tab:blue", "tab:orange")
#: Half-width of the sideways spread of case points around a box.
SPREAD = 0.12


def _present(records: Records, metric: str) -> list[float]:
    return [float(r[metric]) for r in records if r[metric] is not None and not math.isnan(r[metric])]


def _check_inputs(records_a: Records, records_b: Records, labels: Sequence[str], metrics: Sequence[str]) -> None:
    if len(records_a) != len(records_b) or not records_a:
        raise ValueError(f"records_a and records_b must hold the same non-empty list of cases, "
                         f"got {len(records_a)} and {len(records_b)} records")
    if len(labels) != 2:
        raise ValueError(f"labels must name the two runs, got {list(labels)}")
    unknown = [m for m in metrics if any(m not in r for r in (*records_a, *records_b))]
    if not metrics or unknown:
        raise ValueError(f"metrics must be keys of every record, e.g. {list(METRIC_NAMES)}; got {list(metrics)}")


def _records_dataset(records_a: Records, records_b: Records) -> DatasetDefinition:
    """The dataset of both runs' records, KiTS19 when they fit none (:func:`_check_inputs` then says what is wrong)."""
    try:
        return dataset_of_records([*records_a, *records_b])
    except ValueError:
        return KITS19


def _spread(count: int) -> np.ndarray:
    """Fixed sideways offsets in [-SPREAD, SPREAD] for ``count`` points."""
    return np.linspace(-SPREAD, SPREAD, count) if count > 1 else np.zeros(count)


def plot_metric_boxplots(records_a: Records, records_b: Records, labels: Sequence[str],
                         metrics: Sequence[str] | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Box plots of each metric for runs A and B, with every case drawn as a point.

    Args:
        records_a, records_b: per-case metrics of the same cases in the same order (Dice in [0, 1],
            HD95 in mm); missing values are skipped.
        labels: the names of runs A and B.
        metrics: one axis per metric, three axes a row; ``None`` (default): every metric of the
            records' dataset (KiTS19 :data:`utils.metrics.scoring.METRIC_NAMES`).
        path: where to save the figure (PNG, PDF or SVG by suffix); ``None`` saves nothing.
    """
    if metrics is None:
        metrics = metric_names(_records_dataset(records_a, records_b))
    _check_inputs(records_a, records_b, labels, metrics)
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        values = [_present(records_a, metric), _present(records_b, metric)]
        drawn = [(i, v) for i, v in enumerate(values) if v]
        if drawn:
            ax.boxplot([v for _, v in drawn], positions=[i for i, _ in drawn], widths=0.5, showfliers=False)
        for index, run_values in enumerate(values):
            ax.scatter(index + _spread(len(run_values)), run_values, s=14, alpha=0.7, color=RUN_COLOURS[index],
                       zorder=3)
        missing = [len(records_a) - len(values[0]), len(records_b) - len(values[1])]
        ax.set_xticks([0, 1], list(labels))
        ax.set_xlim(-0.6, 1.6)
        unit = " (mm)" if metric.endswith("hd95") else ""
        ax.set(title=f"{metric}{unit}, missing A {missing[0]} / B {missing[1]}", ylabel=f"{metric}{unit}")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if path is not None:
        save_figure(figure, path)
    return figure


def plot_paired_scatter(records_a: Records, records_b: Records, labels: Sequence[str],
                        metrics: Sequence[str] | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Per-case scatter of run A (x) against run B (y) for each metric, with the identity line.

    Points above the line are cases where B scores higher. Cases with a missing value on either
    side are left out (counted in the title). Axes span [0, 1] for metrics in [0, 1], else the data.

    Args:
        records_a, records_b: per-case metrics of the same cases in the same order.
        labels: the names of runs A and B.
        metrics: one axis per metric; ``None`` (default): the Dice score of every region of the
            records' dataset (KiTS19: kidney and tumour Dice).
        path: where to save the figure; ``None`` saves nothing.
    """
    if metrics is None:
        metrics = dice_names(_records_dataset(records_a, records_b))
    _check_inputs(records_a, records_b, labels, metrics)
    figure = Figure(figsize=(4.0 * len(metrics), 4.0), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=False):
        pairs = [(float(a[metric]), float(b[metric])) for a, b in zip(records_a, records_b, strict=False)
                 if a[metric] is not None and b[metric] is not None
                 and not math.isnan(a[metric]) and not math.isnan(b[metric])]
        x, y = (np.array([p[i] for p in pairs]) for i in (0, 1))
        high = 1.0 if not pairs or max(x.max(), y.max()) <= 1.0 else float(max(x.max(), y.max())) * 1.05
        ax.plot([0, high], [0, high], color="0.5", linestyle="--", linewidth=1, label="A = B")
        ax.scatter(x, y, s=18, color=RUN_COLOURS[1], alpha=0.8, zorder=3)
        limits = (-0.02 * high, 1.02 * high)
        ax.set(xlim=limits, ylim=limits, aspect="equal", xlabel=f"{labels[0]} (A)", ylabel=f"{labels[1]} (B)",
               title=f"{metric}: {len(pairs)} cases, {len(records_a) - len(pairs)} incomplete")
        ax.legend(loc="lower right")
    if path is not None:
        save_figure(figure, path)
    return figure
