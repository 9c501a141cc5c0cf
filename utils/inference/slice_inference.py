"""Whole-volume prediction with a 2D model, one batch of axial slices at a time.

Each axial slice ``(Y, X)`` of a preprocessed volume is fitted into the model's
``image_size x image_size`` square exactly as the training slices were
(:func:`utils.datasets.slices.fit_slices`), predicted, and its logits mapped back onto the
slice's own grid (:func:`utils.datasets.slices.restore_slices`, bilinear on logits). The result
is a ``(B, C, Z, Y, X)`` logit volume on the same grid as the 3D model's sliding-window output,
so both models are scored by the same function. Slices are fitted, predicted and restored in
chunks of ``batch_size``: no copy of the whole volume at the square's size is held.
"""

from __future__ import annotations

import torch

from utils.config.data import SliceDatasetConfig
from utils.config.experiment import SliceInferenceConfig
from utils.datasets.slices import SliceGeometry, fit_slices, restore_slices


def predict_slice_logits(model: torch.nn.Module, image: torch.Tensor, slices: SliceDatasetConfig,
                         config: SliceInferenceConfig, *, autocast_dtype: torch.dtype | None = None,
                         pad_value: float = 0.0, stitch_device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of a whole volume from a 2D model applied to every axial slice, without gradients.

    The model's mode is left as it is: put it in ``eval()`` mode first.

    Args:
        model: maps ``(N, C_in, S, S)`` float to ``(N, C, S, S)`` logits, ``S = slices.image_size``.
        image: ``(B, C_in, Z, Y, X)`` float (computed in float32) on the model's device; axis 2
            is the axial (slice) axis.
        slices: ``image_size`` and ``fit``, as used to train the model.
        config: ``batch_size`` slices per forward pass.
        autocast_dtype: run the model under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` or ``torch.float16``); ``None``: no autocast.
        pad_value: value of the square outside the fitted slice (the normalised background).
        stitch_device: where the whole-volume logits are kept (``None``: the image's device;
            ``"cpu"`` keeps GPU memory to one batch of slices).

    Returns:
        ``(B, C, Z, Y, X)`` float32 logits on ``stitch_device`` (default the image's device).
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 5 or not torch.is_floating_point(image):
        description = f"{tuple(image.shape)} {image.dtype}" if isinstance(image, torch.Tensor) else type(image)
        raise ValueError(f"image must be a (B, C, Z, Y, X) float tensor, got {description}")
    if min(image.shape) < 1:
        raise ValueError(f"image must not be empty, got shape {tuple(image.shape)}")
    if autocast_dtype is not None and autocast_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype}")
    geometry = SliceGeometry.fit(image.shape[-2:], slices.image_size, slices.fit)
    depth = image.shape[2]
    logits: torch.Tensor | None = None
    with torch.no_grad():
        for b in range(image.shape[0]):
            for start in range(0, depth, config.batch_size):
                stop = min(depth, start + config.batch_size)
                squares = fit_slices(image[b, :, start:stop].float().transpose(0, 1), geometry, pad_value=pad_value)
                with torch.autocast(device_type=image.device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    output = model(squares).float()
                restored = restore_slices(output, geometry)  # (n, C, Y, X)
                if logits is None:
                    logits = torch.empty((image.shape[0], restored.shape[1], *image.shape[2:]), dtype=torch.float32,
                                         device=stitch_device if stitch_device is not None else image.device)
                logits[b, :, start:stop] = restored.transpose(0, 1).to(logits.device)
    assert logits is not None  # the image is not empty
    return logits
