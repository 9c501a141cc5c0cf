"""Figures of a training run, from the records of its ``training_progress.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from utils.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL
from utils.visualisation import LABEL_COLOURS


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
    """Losses, validation Dice (on the cache grid) and learning rate against epoch.

    Args:
        records: per-epoch dicts with ``epoch``, ``train_loss``, ``learning_rate`` and, on
            validated epochs, ``val_loss``, ``kidney_dice``, ``tumour_dice``.
        title: figure title (e.g. the run name).
    """
    if not records:
        raise ValueError("records must hold at least one epoch")
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    loss_ax, dice_ax, lr_ax = figure.subplots(1, 3)
    epochs = [r["epoch"] for r in records]
    loss_ax.plot(epochs, [r.get("train_loss") for r in records], label="train loss", color="0.3")
    validated = [r for r in records if r.get("kidney_dice") is not None]
    if validated:
        val_epochs = [r["epoch"] for r in validated]
        loss_ax.plot(val_epochs, [r.get("val_loss") for r in validated], "o-", label="validation loss", color="0.6")
        dice_ax.plot(val_epochs, [r["kidney_dice"] for r in validated], "o-", label="kidney (label > 0)",
                     color=LABEL_COLOURS[KIDNEY_LABEL])
        dice_ax.plot(val_epochs, [r["tumour_dice"] for r in validated], "o-", label="tumour (label 2)",
                     color=LABEL_COLOURS[TUMOUR_LABEL])
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_ax.legend(frameon=False)
    dice_ax.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice per case (cache grid)")
    dice_ax.legend(frameon=False, loc="lower right")
    lr_ax.plot(epochs, [r.get("learning_rate") for r in records], color="0.3")
    lr_ax.set(xlabel="epoch", ylabel="learning rate", yscale="log", title="learning rate (end of epoch)")
    if title:
        figure.suptitle(title)
    return figure
