"""Whole-volume prediction by sliding a window over the volume (MONAI ``sliding_window_inference``).

Windows of ``roi_size`` ``(Z, Y, X)`` voxels overlap by ``overlap`` along each axis; their logits
are blended with ``"gaussian"`` (less weight near window edges) or ``"constant"`` weights and
accumulated in float32. A volume smaller than the window along an axis is padded
symmetrically with ``pad_value`` to the window size and the result cropped back, so the
output always has the input's spatial shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from monai.inferers import sliding_window_inference

from utils.config.experiment import SlidingWindowConfig

logger = logging.getLogger(__name__)


def _check_image(model: torch.nn.Module, image: torch.Tensor) -> None:
    """``ValueError`` unless ``image`` is ``(B, C, Z, Y, X)`` float on the model's device."""
    if not isinstance(image, torch.Tensor) or image.ndim != 5 or not torch.is_floating_point(image):
        description = f"{tuple(image.shape)} {image.dtype}" if isinstance(image, torch.Tensor) else type(image)
        raise ValueError(f"image must be a (B, C, Z, Y, X) float tensor, got {description}")
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device != image.device:
        raise ValueError(f"image must be on the model's device {parameter.device}, got {image.device}")
    if model.training:
        logger.warning("predicting with a model in training mode; call model.eval() first for inference")


def _predictor(model: torch.nn.Module, device_type: str,
               autocast_dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The window-level forward: ``model`` (under autocast when asked), logits returned as float32."""
    def predict(window: torch.Tensor) -> torch.Tensor:
        if autocast_dtype is None:
            return model(window).float()
        with torch.autocast(device_type=device_type, dtype=autocast_dtype):
            return model(window).float()
    return predict


def predict_logits(model: torch.nn.Module, image: torch.Tensor, config: SlidingWindowConfig, *,
                   autocast_dtype: torch.dtype | None = None, pad_value: float = 0.0,
                   stitch_device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of a whole volume, stitched from overlapping windows, without gradients.

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
    _check_image(model, image)
    if autocast_dtype is not None and autocast_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype}")
    predictor = _predictor(model, image.device.type, autocast_dtype)
    with torch.no_grad():
        logits = sliding_window_inference(
            image.float(), roi_size=tuple(config.roi_size), sw_batch_size=config.sw_batch_size, predictor=predictor,
            overlap=config.overlap, mode=config.blend, cval=pad_value, sw_device=image.device,
            device=stitch_device if stitch_device is not None else image.device)
    return torch.as_tensor(logits, dtype=torch.float32)


def predict_labels(model: torch.nn.Module, image: torch.Tensor, config: SlidingWindowConfig, *,
                   autocast_dtype: torch.dtype | None = None, pad_value: float = 0.0) -> torch.Tensor:
    """Label map of a whole volume: the argmax over classes of :func:`predict_logits`.

    Args:
        model, image, config, autocast_dtype, pad_value: as in :func:`predict_logits`.

    Returns:
        ``(B, Z, Y, X)`` uint8 class ids (0 background, 1 kidney, 2 tumour) on the image's device.
    """
    logits = predict_logits(model, image, config, autocast_dtype=autocast_dtype, pad_value=pad_value)
    return logits.argmax(dim=1).to(torch.uint8)
