"""Training curves from progress records: one run, or several overlaid."""

from __future__ import annotations

import json

import pytest

from utils.figures.drawing import save_figure
from utils.figures.training_curves import load_training_progress, plot_training_progress, plot_training_runs


def _records(epochs: int, offset: float = 0.0) -> list[dict]:
    records = []
    for epoch in range(1, epochs + 1):
        record = {"epoch": epoch, "train_loss": 1.0 / epoch + offset, "learning_rate": 1e-3 / epoch,
                  "epoch_seconds": 2.0 + offset}
        if epoch % 2 == 0:
            record.update(val_loss=1.1 / epoch, kidney_dice=0.1 * epoch, tumour_dice=0.05 * epoch)
        records.append(record)
    return records


def test_one_run_has_loss_dice_learning_rate_and_epoch_time(tmp_path):
    figure = plot_training_progress(_records(6), title="run")
    loss_ax, dice_ax, lr_ax, time_ax = figure.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train loss", "validation loss"]
    assert list(dice_ax.get_lines()[0].get_xdata()) == [2, 4, 6]  # validated epochs only
    assert list(dice_ax.get_lines()[1].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    assert lr_ax.get_yscale() == "log" and list(time_ax.get_lines()[0].get_ydata()) == [2.0] * 6
    assert save_figure(figure, tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_two_runs_are_overlaid_with_their_own_line_styles():
    figure = plot_training_runs({"resunet3d": _records(4), "unetr2d": _records(6, offset=1.0)})
    dice_lines = figure.axes[1].get_lines()
    assert [line.get_label() for line in dice_lines] == [
        "resunet3d: kidney (label > 0)", "resunet3d: tumour (label 2)", "unetr2d: kidney (label > 0)",
        "unetr2d: tumour (label 2)"]
    assert dice_lines[0].get_linestyle() != dice_lines[2].get_linestyle()
    assert dice_lines[0].get_color() == dice_lines[2].get_color()  # colour = metric, style = run
    with pytest.raises(ValueError, match="at least one epoch"):
        plot_training_runs({"empty": []})


def test_progress_is_read_from_a_run_folder(tmp_path):
    (tmp_path / "training_progress.json").write_text(json.dumps(_records(2)))
    assert load_training_progress(tmp_path)[1]["kidney_dice"] == pytest.approx(0.2)
    with pytest.raises(FileNotFoundError, match="no training progress"):
        load_training_progress(tmp_path / "missing")
