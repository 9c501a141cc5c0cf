"""Figures of one evaluation: per-case scores of a trained run on the original grid, per scored region
of its dataset (KiTS19: kidney and tumour; KiTS23: kidney and masses, masses, tumour)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from utils.data.dataset_definitions import DATASETS, KITS19, DatasetDefinition, get_dataset
from utils.figures.drawing import region_colours
from utils.metrics.scoring import dice_names

#: Width of the group of bars of one case (its regions side by side).
_GROUP_WIDTH = 0.8


def dataset_of_records(records: Sequence[Mapping[str, Any]]) -> DatasetDefinition:
    """The dataset whose Dice keys every record holds: KiTS19 (``kidney_dice``, ``tumour_dice``), else the
    first other dataset that fits (KiTS23: ``kidney_and_masses_dice``, ...); KiTS19 for no records.

    Raises:
        ValueError: no dataset's Dice keys are in every record; the message names the keys of each.
    """
    if not records:
        return KITS19
    for dataset in DATASETS.values():
        if all(all(name in record for name in dice_names(dataset)) for record in records):
            return dataset
    known = "; ".join(f"{d.title}: {', '.join(dice_names(d))}" for d in DATASETS.values())
    raise ValueError(f"records must hold the Dice keys of one dataset ({known}), got keys {sorted(records[0])}")


def _region_label(dataset: DatasetDefinition, name: str) -> str:
    """``"kidney (label > 0)"``, ``"tumour (label 2)"``; KiTS23 ``"kidney and masses (labels 1, 2, 3)"``."""
    if dataset is KITS19:
        return f"{name} (label {'> 0' if name == 'kidney' else '2'})"
    labels = sorted(dataset.region(name).labels)
    which = f"label {labels[0]}" if len(labels) == 1 else f"labels {', '.join(map(str, labels))}"
    return f"{name.replace('_', ' ')} ({which})"


def plot_case_scores(cases: Sequence[Mapping[str, Any]], title: str = "", *,
                     dataset: DatasetDefinition | str | None = None) -> Figure:
    """Per-case Dice (bars) and HD95 in mm of every scored region, missing HD95 marked, as one figure.

    Args:
        cases: records of ``metrics.json`` (``case_id`` and, per region, ``<region>_dice`` and
            ``<region>_hd95``; HD95 ``None`` when exactly one mask is empty). KiTS19: ``kidney_dice``,
            ``tumour_dice``, ``kidney_hd95``, ``tumour_hd95``.
        title: the figure's title (e.g. the run name).
        dataset: whose regions to draw, in their colours (:func:`utils.figures.drawing.region_colours`);
            ``None`` (default): the dataset whose Dice keys the records hold (:func:`dataset_of_records`).

    Returns:
        The figure (not shown, not saved).
    """
    dataset = dataset_of_records(cases) if dataset is None else get_dataset(dataset)
    figure = Figure(figsize=(max(6.0, 0.7 * len(cases) + 3), 6.5), layout="constrained")
    dice_ax, hd_ax = figure.subplots(2, 1, sharex=True)
    ids = [str(case["case_id"]) for case in cases]
    x = np.arange(len(cases))
    colours = region_colours(dataset)
    width = _GROUP_WIDTH / len(colours)
    offsets = (np.arange(len(colours)) - (len(colours) - 1) / 2) * width
    for offset, (name, colour) in zip(offsets, colours.items(), strict=True):
        dice_ax.bar(x + offset, [case[f"{name}_dice"] for case in cases], width=width, color=colour,
                    label=_region_label(dataset, name))
        distances = [case[f"{name}_hd95"] for case in cases]
        present = [i for i, d in enumerate(distances) if d is not None]
        hd_ax.bar(x[present] + offset, [distances[i] for i in present], width=width, color=colour)
        missing = [i for i, d in enumerate(distances) if d is None]
        shown = name if dataset is KITS19 else name.replace("_", " ")
        hd_ax.scatter(x[missing] + offset, np.zeros(len(missing)), marker="x", color=colour, s=60, zorder=3,
                      label=f"{shown}: HD95 missing (one mask empty)" if missing else None)
    dice_ax.set(ylabel="Dice", ylim=(0, 1.05), title=title or None)
    dice_ax.legend(loc="lower right", fontsize="small")
    hd_ax.set(ylabel="HD95 (mm)", xticks=x)
    hd_ax.set_xticklabels(ids, rotation=45, ha="right")
    if hd_ax.get_legend_handles_labels()[0]:
        hd_ax.legend(loc="upper right", fontsize="small")
    return figure


def plot_threshold_sweep(thresholds_ml: Sequence[float], summaries: Sequence[Mapping[str, Any]], chosen_ml: float, *,
                         region: str = "tumour", title: str = "") -> Figure:
    """Validation scores against a post-processing threshold: mean Dice and ``region`` Dice on the left,
    ``region`` HD95 on the right, the chosen threshold marked.

    Args:
        thresholds_ml: the thresholds tried, in ml, ascending.
        summaries: :func:`utils.metrics.scoring.summarise_scores` of each threshold.
        chosen_ml: the threshold chosen.
        region: the region whose scores the threshold moves (KiTS19 and KiTS23: the tumour).
        title: the figure's title.
    """
    figure = Figure(figsize=(9.0, 3.6))
    dice_axes, hd_axes = figure.subplots(1, 2)
    x = np.arange(len(thresholds_ml))
    colour = region_colours(KITS19).get(region, "C1")
    dice_axes.plot(x, [s["mean_dice"] for s in summaries], "o-", color="0.3", label="mean Dice")
    dice_axes.plot(x, [s[f"{region}_dice"]["mean"] for s in summaries], "s-", color=colour, label=f"{region} Dice")
    hd95 = [s[f"{region}_hd95"]["mean"] for s in summaries]
    hd_axes.plot(x, [np.nan if v is None else v for v in hd95], "s-", color=colour)
    for axes, ylabel in ((dice_axes, "mean over validation cases"), (hd_axes, f"{region} HD95 (mm), mean")):
        axes.axvline(list(thresholds_ml).index(chosen_ml), color="k", linestyle=":", linewidth=1)
        axes.set_xticks(x, [f"{t:g}" for t in thresholds_ml])
        axes.set_xlabel("tumour components under this (but the largest) become kidney (ml)")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
    dice_axes.legend(loc="best", fontsize=8)
    figure.suptitle(title or f"chosen: {chosen_ml:g} ml", fontsize=10)
    figure.tight_layout()
    return figure
