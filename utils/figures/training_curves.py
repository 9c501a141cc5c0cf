"""Figures of a training run, from the records of its ``training_progress.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from utils.data.dataset_definitions import CYST_LABEL, DATASETS, EvaluationRegion
from utils.data.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL
from utils.figures.drawing import LABEL_COLOURS

#: Line colour of each label's curves (a region takes one label's colour, see :func:`_region_style`);
#: the drawing colours of kidney and tumour, and a cyst colour for KiTS23.
_CURVE_COLOURS = {KIDNEY_LABEL: LABEL_COLOURS[KIDNEY_LABEL], TUMOUR_LABEL: LABEL_COLOURS[TUMOUR_LABEL],
                  CYST_LABEL: LABEL_COLOURS.get(CYST_LABEL, "#1f77b4")}


def load_training_progress(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the per-epoch records of a run folder (or of its ``training_progress.json``).

    Raises:
        FileNotFoundError: no progress file. ValueError: not a list of epoch records.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "training_progress.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training progress file (has the run finished an epoch?)")
    records = json.loads(path.read_text())
    if not isinstance(records, list) or not all(isinstance(r, dict) and "epoch" in r for r in records):
        raise ValueError(f"{path}: expected a list of per-epoch records with an 'epoch' key")
    return records


def plot_training_progress(records: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Losses, validation Dice (on the cache grid), learning rate and epoch time against epoch, one run.

    Args:
        records: per-epoch dicts with ``epoch``, ``train_loss``, ``learning_rate``,
            ``epoch_seconds`` and, on validated epochs, ``val_loss`` and the region Dice keys
            (KiTS19 ``kidney_dice``, ``tumour_dice``; KiTS23 ``kidney_and_masses_dice``,
            ``masses_dice``, ``tumour_dice``): one Dice curve per region key present.
        title: figure title (e.g. the run name).
    """
    return plot_training_runs({"": records}, title=title)


#: Line styles of overlaid runs, in order (colours stay those of the metric).
RUN_LINE_STYLES = ("-", "--", ":", "-.")


def plot_training_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str = "") -> Figure:
    """The panels of :func:`plot_training_progress` with several runs overlaid (one line style per run).

    Args:
        runs: run name -> per-epoch records (at most 4 runs; e.g. a resunet3d and a unetr2d run).
        title: figure title.

    Raises:
        ValueError: no run, a run without records, or more runs than line styles.
    """
    if not runs or any(not records for records in runs.values()):
        raise ValueError("runs must map each run name to at least one epoch record")
    if len(runs) > len(RUN_LINE_STYLES):
        raise ValueError(f"at most {len(RUN_LINE_STYLES)} runs can be overlaid, got {len(runs)}")
    figure = Figure(figsize=(16, 3.8), layout="constrained")
    loss_ax, dice_ax, lr_ax, time_ax = figure.subplots(1, 4)
    for (name, records), style in zip(runs.items(), RUN_LINE_STYLES, strict=False):
        _plot_run(records, f"{name}: " if name else "", style, (loss_ax, dice_ax, lr_ax, time_ax))
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    dice_ax.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice per case (cache grid)")
    lr_ax.set(xlabel="epoch", ylabel="learning rate", yscale="log", title="learning rate (end of epoch)")
    time_ax.set(xlabel="epoch", ylabel="seconds", title="epoch time (training)")
    for ax in (loss_ax, dice_ax, lr_ax, time_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize="small")
    if title:
        figure.suptitle(title)
    return figure


def _region_dice_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The region Dice keys (``<region>_dice``, ``mean_dice`` left out) that some record holds a number for."""
    keys = dict.fromkeys(key for record in records for key, value in record.items()
                         if key.endswith("_dice") and key != "mean_dice" and isinstance(value, (int, float)))
    return list(keys)


def _find_region(name: str) -> tuple[EvaluationRegion, tuple[int, ...]] | None:
    """The first known dataset's evaluation region called ``name``, with that dataset's foreground labels."""
    for dataset in DATASETS.values():
        for region in dataset.regions:
            if region.name == name:
                return region, dataset.foreground_labels
    return None


def _region_style(key: str) -> tuple[str, str]:
    """Legend text and colour of a region Dice key: ``("kidney (label > 0)", kidney green)``.

    The text names the region's labels (``label > 0`` when it is every foreground label); the
    colour is its label's for one label, the kidney's for a region holding the kidney, else
    that of its highest label (KiTS23 masses: the cyst's); an unknown key gets its name and grey.
    """
    name = key.removesuffix("_dice")
    found = _find_region(name)
    if found is None:
        return name.replace("_", " "), "0.5"
    region, foreground = found
    labels = sorted(region.labels)
    if labels == sorted(foreground):
        which = "label > 0"
    else:
        which = f"label{'s' if len(labels) > 1 else ''} {', '.join(str(label) for label in labels)}"
    colour_label = labels[0] if len(labels) == 1 or KIDNEY_LABEL in labels else labels[-1]
    return f"{name.replace('_', ' ')} ({which})", _CURVE_COLOURS.get(colour_label, "0.5")


def _plot_run(records: Sequence[Mapping[str, Any]], prefix: str, style: str, axes: Sequence[Any]) -> None:
    """Draw one run's lines into the four panels."""
    loss_ax, dice_ax, lr_ax, time_ax = axes
    epochs = [r["epoch"] for r in records]
    loss_ax.plot(epochs, [r.get("train_loss") for r in records], style, label=f"{prefix}train loss", color="0.3")
    keys = _region_dice_keys(records)
    validated = [r for r in records if any(r.get(key) is not None for key in keys)]
    if validated:
        val_epochs = [r["epoch"] for r in validated]
        loss_ax.plot(val_epochs, [r.get("val_loss") for r in validated], style, marker="o",
                     label=f"{prefix}validation loss", color="0.6")
        for key in keys:
            text, colour = _region_style(key)
            dice_ax.plot(val_epochs, [r.get(key) for r in validated], style, marker="o", label=f"{prefix}{text}",
                         color=colour)
    lr_ax.plot(epochs, [r.get("learning_rate") for r in records], style, color="0.3", label=prefix.rstrip(": "))
    time_ax.plot(epochs, [r.get("epoch_seconds") for r in records], style, color="0.3", label=prefix.rstrip(": "))
