"""Figures of one evaluation: per-case KiTS19 scores of a trained run on the original grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from utils.data.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL
from utils.figures.drawing import LABEL_COLOURS


def plot_case_scores(cases: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Per-case kidney and tumour Dice (bars) and HD95 in mm, missing HD95 marked, as one figure.

    Args:
        cases: records of ``metrics.json`` (``case_id``, ``kidney_dice``, ``tumour_dice``,
            ``kidney_hd95``, ``tumour_hd95``; HD95 ``None`` when exactly one mask is empty).
        title: the figure's title (e.g. the run name).

    Returns:
        The figure (not shown, not saved).
    """
    figure = Figure(figsize=(max(6.0, 0.7 * len(cases) + 3), 6.5), layout="constrained")
    dice_ax, hd_ax = figure.subplots(2, 1, sharex=True)
    ids = [str(case["case_id"]) for case in cases]
    x = np.arange(len(cases))
    colours = {"kidney": LABEL_COLOURS[KIDNEY_LABEL], "tumour": LABEL_COLOURS[TUMOUR_LABEL]}
    for offset, (name, colour) in zip((-0.2, 0.2), colours.items(), strict=False):
        dice_ax.bar(x + offset, [case[f"{name}_dice"] for case in cases], width=0.4, color=colour,
                    label=f"{name} (label {'> 0' if name == 'kidney' else '2'})")
        distances = [case[f"{name}_hd95"] for case in cases]
        present = [i for i, d in enumerate(distances) if d is not None]
        hd_ax.bar(x[present] + offset, [distances[i] for i in present], width=0.4, color=colour)
        missing = [i for i, d in enumerate(distances) if d is None]
        hd_ax.scatter(x[missing] + offset, np.zeros(len(missing)), marker="x", color=colour, s=60, zorder=3,
                      label=f"{name}: HD95 missing (one mask empty)" if missing else None)
    dice_ax.set(ylabel="Dice", ylim=(0, 1.05), title=title or None)
    dice_ax.legend(loc="lower right", fontsize="small")
    hd_ax.set(ylabel="HD95 (mm)", xticks=x)
    hd_ax.set_xticklabels(ids, rotation=45, ha="right")
    if hd_ax.get_legend_handles_labels()[0]:
        hd_ax.legend(loc="upper right", fontsize="small")
    return figure
