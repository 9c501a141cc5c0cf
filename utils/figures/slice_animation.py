"""Animations sweeping through the slices of one plane, CT with kidney and tumour (and KiTS23 cyst) overlay.

Frames come from :func:`utils.figures.slice_viewer.compose_plane_frame` (same window, colours and
physical aspect as the interactive viewer; KiTS23's cyst, label 3, in
:data:`utils.figures.drawing.CYST_COLOUR`). GIF is written with Pillow; ``.mp4`` needs an
``ffmpeg`` executable on ``PATH``. Files are written atomically.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from utils.data.nifti_io import write_bytes_atomic
from utils.figures.slice_viewer import PLANES, compose_plane_frame, select_slices, validate_volumes

logger = logging.getLogger(__name__)

#: Pixels of black between the ground-truth and prediction panels.
PANEL_GAP = 4
ANIMATION_SUFFIXES = (".gif", ".mp4")


def find_ffmpeg() -> str | None:
    """Path of the ``ffmpeg`` executable, or None when none is on ``PATH``."""
    return shutil.which("ffmpeg")


def compose_animation_frames(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], *,
                             plane: str = "sagittal", prediction: np.ndarray | None = None,
                             max_frames: int = 120, max_size: int = 256) -> list[np.ndarray]:
    """RGB frames of a sweep: ground truth, and prediction to its right when given.

    Returns:
        A list of ``(H, W, 3)`` uint8 frames (``W`` doubles plus ``PANEL_GAP`` with a prediction),
        one per evenly spaced slice, at most ``max_frames``; pixels are square in mm.
    """
    spacing = validate_volumes(image, labels, spacing, prediction, plane)
    frames = []
    for index in select_slices(image.shape[PLANES[plane][0]], max_frames):
        panels = [compose_plane_frame(image, volume, spacing, plane, int(index), max_size)[0]
                  for volume in ([labels] if prediction is None else [labels, prediction])]
        if len(panels) == 2:
            panels.insert(1, np.zeros((panels[0].shape[0], PANEL_GAP, 3), dtype=np.uint8))
        frames.append(np.concatenate(panels, axis=1))
    return frames


def save_slice_animation(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float],
                         path: str | os.PathLike, *, plane: str = "sagittal", prediction: np.ndarray | None = None,
                         fps: float = 10.0, max_frames: int = 120, max_size: int = 256) -> Path:
    """Write a GIF (or ``.mp4``) sweeping through the slices of ``plane`` with the label overlay.

    Args:
        image: ``(Z, Y, X)`` float32 CT in HU. labels: ``(Z, Y, X)`` uint8 {0, 1, 2} (KiTS23: also 3,
            the cyst).
        spacing: ``(z, y, x)`` mm; frames are resampled to square pixels, so 5 mm slices
            are not squashed in coronal or sagittal sweeps.
        path: ``.gif`` (Pillow) or ``.mp4`` (needs ``ffmpeg`` on ``PATH``).
        plane: ``"sagittal"`` (default), ``"coronal"`` or ``"axial"``.
        prediction: optional ``(Z, Y, X)`` labels shown to the right of the ground truth.
        fps: frames per second, > 0. max_frames: at most this many evenly spaced slices.
        max_size: longest side of one panel in pixels.

    Returns:
        The path written. Pillow merges identical consecutive GIF frames into one longer frame.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ANIMATION_SUFFIXES:
        raise ValueError(f"animation path must end in one of {ANIMATION_SUFFIXES}, got {str(path)!r}")
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be > 0, got {fps}")
    ffmpeg = find_ffmpeg() if suffix == ".mp4" else None
    if suffix == ".mp4" and ffmpeg is None:
        raise ValueError(f"cannot write {str(path)!r}: no ffmpeg executable on PATH; install ffmpeg "
                         "or save a .gif instead (GIF needs only Pillow)")
    frames = compose_animation_frames(image, labels, spacing, plane=plane, prediction=prediction,
                                      max_frames=max_frames, max_size=max_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _encode_gif(frames, fps) if suffix == ".gif" else _encode_mp4(frames, fps, ffmpeg)
    write_bytes_atomic(path, payload)
    logger.info("wrote %d %s frames to %s", len(frames), plane, path)
    return path


def _encode_gif(frames: list[np.ndarray], fps: float) -> bytes:
    images = [Image.fromarray(frame, mode="RGB") for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, round(1000.0 / fps)), loop=0)
    return buffer.getvalue()


def _encode_mp4(frames: list[np.ndarray], fps: float, ffmpeg: str) -> bytes:
    """H.264 in yuv420p (plays everywhere); frames are padded to even sizes as the codec needs."""
    height, width = frames[0].shape[:2]
    even = [np.pad(f, ((0, height % 2), (0, width % 2), (0, 0))) for f in frames]
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "animation.mp4"
        command = [ffmpeg, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                   "-s", f"{width + width % 2}x{height + height % 2}", "-r", f"{fps}", "-i", "-",
                   "-c:v", "libx264", "-pix_fmt", "yuv420p", str(target)]
        result = subprocess.run(command, input=b"".join(f.tobytes() for f in even), capture_output=True,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"ffmpeg failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
        return target.read_bytes()
