"""Whole-volume prediction of a preprocessed volume: 3D sliding windows or 2D axial slices.

:func:`predict_volume_logits` is the one call validation, evaluation and segmentation make;
the experiment's ``model.name`` picks the way:

* **3D** (:func:`predict_sliding_window_logits`, MONAI ``sliding_window_inference``): windows of
  ``roi_size`` ``(Z, Y, X)`` voxels overlap by ``overlap`` along each axis; their logits are
  blended with ``"gaussian"`` (less weight near window edges) or ``"constant"`` weights and
  accumulated in float32. A volume smaller than the window along an axis is padded
  symmetrically with ``pad_value`` to the window size and the result cropped back.
* **2D** (:func:`predict_slice_logits`): each axial slice ``(Y, X)`` is fitted into the model's
  ``image_size x image_size`` square exactly as the training slices were
  (:func:`utils.datasets.slices.fit_slices`), predicted, and its logits mapped back onto the
  slice's own grid (:func:`utils.datasets.slices.restore_slices`, bilinear on logits), in chunks
  of ``batch_size`` slices: no copy of the whole volume at the square's size is held.

Both return ``(B, C, Z, Y, X)`` float32 logits on the volume's own grid, so the two models are
scored by the same function.
"""

from __future__ import annotations

import logging

import torch
from monai.inferers import sliding_window_inference

from utils.config.data import SliceDatasetConfig
from utils.config.experiment import ExperimentConfig, SliceInferenceConfig, SlidingWindowConfig
from utils.datasets.slices import SliceGeometry, fit_slices, restore_slices
from utils.networks.models import spatial_dims

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def _check_inputs(model: torch.nn.Module, image: torch.Tensor, autocast_dtype: torch.dtype | None) -> None:
    """``ValueError`` unless ``image`` is a non-empty ``(B, C, Z, Y, X)`` float tensor on the model's
    device and ``autocast_dtype`` is bf16, fp16 or ``None``; a warning for a model in training mode."""
    if not isinstance(image, torch.Tensor) or image.ndim != 5 or not torch.is_floating_point(image):
        description = f"{tuple(image.shape)} {image.dtype}" if isinstance(image, torch.Tensor) else type(image)
        raise ValueError(f"image must be a (B, C, Z, Y, X) float tensor, got {description}")
    if min(image.shape) < 1:
        raise ValueError(f"image must not be empty, got shape {tuple(image.shape)}")
    if autocast_dtype is not None and autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype}")
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device != image.device:
        raise ValueError(f"image must be on the model's device {parameter.device}, got {image.device}")
    if model.training:
        logger.warning("predicting with a model in training mode; call model.eval() first for inference")


def _forward(model: torch.nn.Module, batch: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """``model(batch)`` under autocast when asked, logits returned as float32."""
    with torch.autocast(device_type=batch.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        return model(batch).float()


def predict_sliding_window_logits(model: torch.nn.Module, image: torch.Tensor, config: SlidingWindowConfig, *,
                                  autocast_dtype: torch.dtype | None = None, pad_value: float = 0.0,
                                  stitch_device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of a whole volume from a 3D model, stitched from overlapping windows, without gradients.

    The model's mode is left as it is: put it in ``eval()`` mode first (a warning is logged
    otherwise).

    Args:
        model: maps ``(N, C_in, *roi_size)`` float to ``(N, C, *roi_size)`` logits.
        image: ``(B, C_in, Z, Y, X)`` float (any float dtype; computed in float32), on the model's
            device; any spatial size, smaller than the window included.
        config: ``roi_size`` ``(Z, Y, X)`` voxels, ``overlap`` in ``[0, 1)``, ``blend``
            (``"gaussian"`` or ``"constant"``), ``sw_batch_size`` windows per forward pass.
        autocast_dtype: run the model under ``torch.autocast`` on the image's device type with
            this dtype (``torch.bfloat16`` or ``torch.float16``); ``None``: no autocast.
        pad_value: value of the voxels added when the volume is smaller than the window (the
            normalised background value keeps padding looking like air; 0 is MONAI's default).
        stitch_device: where the whole-volume logits are accumulated (MONAI's ``device``);
            ``None``: the image's device. ``"cpu"`` with the model on a GPU keeps GPU memory to
            the windows, whatever the volume's size (windows are computed on the image's device).

    Returns:
        ``(B, C, Z, Y, X)`` float32 logits on ``stitch_device`` (default the image's device).
    """
    _check_inputs(model, image, autocast_dtype)
    with torch.no_grad():
        logits = sliding_window_inference(
            image.float(), roi_size=tuple(config.roi_size), sw_batch_size=config.sw_batch_size,
            predictor=lambda window: _forward(model, window, autocast_dtype), overlap=config.overlap,
            mode=config.blend, cval=pad_value, sw_device=image.device,
            device=stitch_device if stitch_device is not None else image.device)
    return torch.as_tensor(logits, dtype=torch.float32)


def predict_slice_logits(model: torch.nn.Module, image: torch.Tensor, slices: SliceDatasetConfig,
                         config: SliceInferenceConfig, *, autocast_dtype: torch.dtype | None = None,
                         pad_value: float = 0.0, stitch_device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of a whole volume from a 2D model applied to every axial slice, without gradients.

    The model's mode is left as it is: put it in ``eval()`` mode first (a warning is logged
    otherwise).

    Args:
        model: maps ``(N, C_in, S, S)`` float to ``(N, C, S, S)`` logits, ``S = slices.image_size``.
        image: ``(B, C_in, Z, Y, X)`` float (computed in float32) on the model's device; axis 2
            is the axial (slice) axis.
        slices: ``image_size`` and ``fit``, as used to train the model.
        config: ``batch_size`` slices per forward pass.
        autocast_dtype: ``torch.bfloat16``, ``torch.float16`` or ``None`` (no autocast).
        pad_value: value of the square outside the fitted slice (the normalised background).
        stitch_device: where the whole-volume logits are kept (``None``: the image's device;
            ``"cpu"`` keeps GPU memory to one batch of slices).

    Returns:
        ``(B, C, Z, Y, X)`` float32 logits on ``stitch_device`` (default the image's device).
    """
    _check_inputs(model, image, autocast_dtype)
    geometry = SliceGeometry.fit(image.shape[-2:], slices.image_size, slices.fit)
    depth = image.shape[2]
    logits: torch.Tensor | None = None
    with torch.no_grad():
        for b in range(image.shape[0]):
            for start in range(0, depth, config.batch_size):
                stop = min(depth, start + config.batch_size)
                squares = fit_slices(image[b, :, start:stop].float().transpose(0, 1), geometry, pad_value=pad_value)
                restored = restore_slices(_forward(model, squares, autocast_dtype), geometry)  # (n, C, Y, X)
                if logits is None:
                    logits = torch.empty((image.shape[0], restored.shape[1], *image.shape[2:]), dtype=torch.float32,
                                         device=stitch_device if stitch_device is not None else image.device)
                logits[b, :, start:stop] = restored.transpose(0, 1).to(logits.device)
    assert logits is not None  # the image is not empty
    return logits


def predict_volume_logits(model: torch.nn.Module, image: torch.Tensor, config: ExperimentConfig, *,
                          autocast_dtype: torch.dtype | None = None, pad_value: float = 0.0,
                          stitch_device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of a whole preprocessed volume with either model, without gradients.

    Args:
        model: the trained network, in ``eval()`` mode, on the image's device.
        image: ``(B, 1, Z, Y, X)`` float, z-scored, on the cache's grid.
        config: the experiment the model was trained with: ``model.name`` picks sliding windows
            (``sliding_window``) or slice-wise prediction (``slices``, ``slice_inference``).
        autocast_dtype: ``torch.bfloat16``, ``torch.float16`` or ``None`` (no autocast).
        pad_value: normalised background value for any padding.
        stitch_device: where the whole-volume logits are accumulated (``None``: the image's
            device; ``"cpu"`` bounds GPU memory for long volumes).

    Returns:
        ``(B, C, Z, Y, X)`` float32 logits on ``stitch_device`` (default the image's device).
    """
    if spatial_dims(config.model) == 2:
        return predict_slice_logits(model, image, config.slices, config.slice_inference,
                                    autocast_dtype=autocast_dtype, pad_value=pad_value, stitch_device=stitch_device)
    return predict_sliding_window_logits(model, image, config.sliding_window, autocast_dtype=autocast_dtype,
                                         pad_value=pad_value, stitch_device=stitch_device)
