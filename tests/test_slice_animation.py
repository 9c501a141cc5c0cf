"""Slice animation: GIF frame count and aspect read back with Pillow, the mp4 path with and without ffmpeg."""

import shutil

import numpy as np
import pytest
from PIL import Image

import utils.figures.slice_animation as slice_animation
from utils.figures.slice_animation import PANEL_GAP, save_slice_animation

SPACING = (5.0, 1.0, 1.0)


def synthetic_case():
    z, y, x = np.meshgrid(np.arange(20), np.arange(40), np.arange(40), indexing="ij")
    image = (-100.0 + 3 * x + 2 * y + 4 * z).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[5:15, 10:30, 5:20] = 1
    labels[8:12, 15:25, 10:15] = 2
    return image, labels


def test_sagittal_gif_has_one_frame_per_slice_and_physical_aspect(tmp_path):
    image, labels = synthetic_case()
    path = save_slice_animation(image, labels, SPACING, tmp_path / "gifs" / "sweep.gif", fps=20)
    assert path.stat().st_size > 0 and [p.name for p in path.parent.iterdir()] == ["sweep.gif"]
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 40  # one per x slice
        assert gif.size == (40, 100)  # width y (40 x 1 mm), height z (20 x 5 mm) at 1 mm pixels
        assert gif.info["duration"] == 50


def test_prediction_sits_to_the_right_and_frames_are_capped(tmp_path):
    image, labels = synthetic_case()
    path = save_slice_animation(image, labels, SPACING, tmp_path / "sweep.gif", plane="coronal",
                                prediction=labels, max_frames=8)
    with Image.open(path) as gif:
        assert gif.n_frames == 8 and gif.size == (2 * 40 + PANEL_GAP, 100)


def test_mp4_without_ffmpeg_raises_a_clear_error(tmp_path, monkeypatch):
    image, labels = synthetic_case()
    monkeypatch.setattr(slice_animation, "find_ffmpeg", lambda: None)
    with pytest.raises(ValueError, match="no ffmpeg.*\\.gif"):
        save_slice_animation(image, labels, SPACING, tmp_path / "sweep.mp4")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="must end in one of"):
        save_slice_animation(image, labels, SPACING, tmp_path / "sweep.avi")
    with pytest.raises(ValueError, match="fps must be > 0"):
        save_slice_animation(image, labels, SPACING, tmp_path / "sweep.gif", fps=0)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_mp4_with_ffmpeg_writes_a_file(tmp_path):
    image, labels = synthetic_case()
    path = save_slice_animation(image, labels, SPACING, tmp_path / "sweep.mp4", max_frames=6)
    assert path.stat().st_size > 0 and b"ftyp" in path.read_bytes()[:16]
