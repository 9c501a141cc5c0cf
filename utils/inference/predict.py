"""Whole-volume prediction with either model: one call, whatever the model's dimensionality.

:func:`predict_volume_logits` sends a preprocessed volume through a 3D model with sliding
windows (:mod:`utils.inference.sliding_window`) or through a 2D model slice by slice
(:mod:`utils.inference.slice_inference`), as the experiment's ``model.name`` says. Both return logits on
the volume's own grid, so validation and evaluation score the two models with one function.
"""

from __future__ import annotations

import torch

from utils.config.experiment import ExperimentConfig
from utils.networks.models import spatial_dims
from utils.inference.slice_inference import predict_slice_logits
from utils.inference.sliding_window import predict_logits


def predict_volume_logits(model: torch.nn.Module, image: torch.Tensor, config: ExperimentConfig, *,
                          autocast_dtype: torch.dtype | None = None, pad_value: float = 0.0,
                          stitch_device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of a whole preprocessed volume, without gradients.

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
    return predict_logits(model, image, config.sliding_window, autocast_dtype=autocast_dtype, pad_value=pad_value,
                          stitch_device=stitch_device)

