"""The networks, built from :class:`~utils.experiment_config.ModelConfig` by name.

Model keys are spelled as in configs and run names:

* ``resunet3d``: MONAI ``UNet`` in 3D with residual units; input ``(B, in_channels, Z, Y, X)``
  float, output ``(B, out_channels, Z, Y, X)`` logits (no softmax). Every spatial size of an
  input must be divisible by the product of ``strides`` (see :func:`check_input_size`).
* ``unetr2d``: a 2D UNETR on axial slices; not built yet (:func:`build_model` raises
  ``NotImplementedError``).

Each key has one :class:`Architecture` entry in ``ARCHITECTURES``; adding a model is adding an entry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.networks.nets import UNet

from utils.experiment_config import MODEL_NAMES, ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """How one model key is built and what input it accepts.

    Attributes:
        spatial_dims: 3 for volumes ``(Z, Y, X)``, 2 for axial slices ``(Y, X)``.
        build: makes the untrained module from the config; ``None`` while not implemented.
        input_divisor: the number every spatial input size must be a multiple of.
    """

    spatial_dims: int
    build: Callable[[ModelConfig], torch.nn.Module] | None
    input_divisor: Callable[[ModelConfig], int] | None


def _build_resunet3d(config: ModelConfig) -> torch.nn.Module:
    """MONAI ``UNet`` with every architecture argument taken from ``config``."""
    return UNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        norm=config.norm,
        act=config.act,
        dropout=config.dropout,
    )


def _stride_product(config: ModelConfig) -> int:
    """Total downsampling of a ``UNet``: the product of its strides."""
    return math.prod(config.strides)


ARCHITECTURES: dict[str, Architecture] = {
    "resunet3d": Architecture(spatial_dims=3, build=_build_resunet3d, input_divisor=_stride_product),
    "unetr2d": Architecture(spatial_dims=2, build=None, input_divisor=None),
}


def _architecture(config: ModelConfig) -> Architecture:
    """The entry of ``config.name``; ``ValueError`` listing the known keys otherwise."""
    if config.name not in ARCHITECTURES:
        raise ValueError(f"model name must be one of {list(MODEL_NAMES)}, got {config.name!r}")
    return ARCHITECTURES[config.name]


def _not_implemented(config: ModelConfig) -> NotImplementedError:
    return NotImplementedError(f"model {config.name!r} is not implemented yet; available: "
                               f"{[name for name, arch in ARCHITECTURES.items() if arch.build is not None]}")


def build_model(config: ModelConfig) -> torch.nn.Module:
    """Build the untrained network named by ``config.name``, on the CPU, in float32.

    Args:
        config: the model section; ``name`` picks the entry of ``ARCHITECTURES``.

    Returns:
        The module; its forward maps ``(B, in_channels, *spatial)`` float to
        ``(B, out_channels, *spatial)`` logits (``spatial`` of length :func:`spatial_dims`).

    Raises:
        ValueError: unknown name. NotImplementedError: a known name without a builder yet.
    """
    architecture = _architecture(config)
    if architecture.build is None:
        raise _not_implemented(config)
    model = architecture.build(config)
    logger.info("built %s with %d parameters", config.name, count_parameters(model))
    return model


def spatial_dims(config: ModelConfig) -> int:
    """Number of spatial axes the model takes: 3 for ``resunet3d`` ``(Z, Y, X)``, 2 for ``unetr2d`` ``(Y, X)``."""
    return _architecture(config).spatial_dims


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_input_size(config: ModelConfig, size: Sequence[int]) -> None:
    """Raise ``ValueError`` unless the model accepts inputs of spatial ``size``.

    Use it on the training patch size and the sliding-window ROI before training starts.

    Args:
        config: the model section.
        size: spatial size in voxels, ``(Z, Y, X)`` for 3D models, ``(Y, X)`` for 2D ones.

    Raises:
        ValueError: wrong number of axes, or an axis not divisible by the model's divisor
            (for ``resunet3d`` the product of ``strides``); the message names the size, the
            divisor and the settings to change. NotImplementedError: model not built yet.
    """
    architecture = _architecture(config)
    size = tuple(int(s) for s in size)
    if len(size) != architecture.spatial_dims:
        raise ValueError(f"size must have {architecture.spatial_dims} values for model {config.name!r}, got {size}")
    if architecture.input_divisor is None:
        raise _not_implemented(config)
    divisor = architecture.input_divisor(config)
    bad_axes = [axis for axis, s in enumerate(size) if s <= 0 or s % divisor]
    if bad_axes:
        raise ValueError(
            f"input size {size} is not accepted by model {config.name!r}: axis/axes {bad_axes} are not "
            f"positive multiples of {divisor} (the product of model.strides {config.strides}); change "
            f"patches.patch_size / sliding_window.roi_size to multiples of {divisor}, or use fewer or smaller strides")
