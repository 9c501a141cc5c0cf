"""The networks, built from :class:`~utils.config.experiment.ModelConfig` by name.

Model keys are spelled as in configs and run names:

* ``resunet3d``: MONAI ``UNet`` in 3D with residual units; input ``(B, in_channels, Z, Y, X)``
  float, output ``(B, out_channels, Z, Y, X)`` logits (no softmax). Every spatial size of an
  input must be divisible by the product of ``strides`` (see :func:`check_input_size`).
* ``unetr2d``: MONAI ``UNETR`` in 2D on axial slices (a ViT encoder of 12 layers on 16 x 16
  patches, skip features taken after layers 3, 6 and 9, a convolutional decoder); input
  ``(B, in_channels, S, S)``, output ``(B, out_channels, S, S)`` logits. It is built for one
  input size ``S`` (the position embeddings are learnt per patch), ``slices.image_size``,
  a multiple of 16.

Each key has one :class:`Architecture` entry in ``ARCHITECTURES``; adding a model is adding an entry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.networks.nets import UNETR, UNet

from utils.config.experiment import MODEL_NAMES, ExperimentConfig, ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """How one model key is built and what input it accepts.

    Attributes:
        spatial_dims: 3 for volumes ``(Z, Y, X)``, 2 for axial slices ``(Y, X)``.
        build: makes the untrained module from the config and the input size (used by models
            built for one size).
        input_divisor: the number every spatial input size must be a multiple of.
        fixed_input_size: the model accepts only the input size it was built for.
    """

    spatial_dims: int
    build: Callable[[ModelConfig, tuple[int, ...]], torch.nn.Module]
    input_divisor: Callable[[ModelConfig], int]
    fixed_input_size: bool = False


def _build_resunet3d(config: ModelConfig, input_size: tuple[int, ...]) -> torch.nn.Module:
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


def _build_unetr2d(config: ModelConfig, input_size: tuple[int, ...]) -> torch.nn.Module:
    """MONAI ``UNETR`` with ``spatial_dims=2`` for slices of ``input_size`` ``(S, S)``.

    MONAI's transformer blocks hold a cross-attention norm even without cross-attention; it
    never takes part in the forward pass, so it is frozen (distributed data parallel refuses
    parameters that get no gradient).
    """
    model = UNETR(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        img_size=input_size,
        feature_size=config.feature_size,
        hidden_size=config.hidden_size,
        mlp_dim=config.mlp_dim,
        num_heads=config.num_heads,
        proj_type="conv",
        norm_name=config.norm,
        res_block=True,
        dropout_rate=config.dropout,
        spatial_dims=2,
    )
    for name, parameter in model.named_parameters():
        if ".norm_cross_attn." in name:
            parameter.requires_grad_(False)
    return model


def _stride_product(config: ModelConfig) -> int:
    """Total downsampling of a ``UNet``: the product of its strides."""
    return math.prod(config.strides)


def _vit_patch(config: ModelConfig) -> int:
    """Side of MONAI ``UNETR``'s ViT patches (fixed at 16 in MONAI)."""
    return UNETR_PATCH_SIZE


#: MONAI's ``UNETR`` always cuts its input into 16 x 16 (x 16) patches.
UNETR_PATCH_SIZE = 16

ARCHITECTURES: dict[str, Architecture] = {
    "resunet3d": Architecture(spatial_dims=3, build=_build_resunet3d, input_divisor=_stride_product),
    "unetr2d": Architecture(spatial_dims=2, build=_build_unetr2d, input_divisor=_vit_patch, fixed_input_size=True),
}


def _architecture(config: ModelConfig) -> Architecture:
    """The entry of ``config.name``; ``ValueError`` listing the known keys otherwise."""
    if config.name not in ARCHITECTURES:
        raise ValueError(f"model name must be one of {list(MODEL_NAMES)}, got {config.name!r}")
    return ARCHITECTURES[config.name]


def build_model(config: ModelConfig, input_size: Sequence[int] | None = None) -> torch.nn.Module:
    """Build the untrained network named by ``config.name``, on the CPU, in float32.

    Args:
        config: the model section; ``name`` picks the entry of ``ARCHITECTURES``.
        input_size: spatial input size, required by models built for one size (``unetr2d``:
            ``(S, S)``, ``S = slices.image_size``); checked with :func:`check_input_size` when given.

    Returns:
        The module; its forward maps ``(B, in_channels, *spatial)`` float to
        ``(B, out_channels, *spatial)`` logits (``spatial`` of length :func:`spatial_dims`).

    Raises:
        ValueError: unknown name, a missing or unaccepted ``input_size``.
    """
    architecture = _architecture(config)
    if input_size is None and architecture.fixed_input_size:
        raise ValueError(f"model {config.name!r} is built for one input size: pass input_size "
                         f"({architecture.spatial_dims} values, multiples of {architecture.input_divisor(config)})")
    if input_size is not None:
        check_input_size(config, input_size)
    model = architecture.build(config, tuple(int(s) for s in input_size) if input_size is not None else ())
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
            divisor and the settings to change (for ``unetr2d`` 16, its ViT patch size).
    """
    architecture = _architecture(config)
    size = tuple(int(s) for s in size)
    if len(size) != architecture.spatial_dims:
        raise ValueError(f"size must have {architecture.spatial_dims} values for model {config.name!r}, got {size}")
    divisor = architecture.input_divisor(config)
    bad_axes = [axis for axis, s in enumerate(size) if s <= 0 or s % divisor]
    if bad_axes and architecture.fixed_input_size:
        raise ValueError(f"input size {size} is not accepted by model {config.name!r}: every axis must be a positive "
                         f"multiple of its {divisor}-pixel patches; "
                         f"change slices.image_size to a multiple of {divisor}")
    if bad_axes:
        raise ValueError(
            f"input size {size} is not accepted by model {config.name!r}: axis/axes {bad_axes} are not "
            f"positive multiples of {divisor} (the product of model.strides {config.strides}); change "
            f"patches.patch_size / sliding_window.roi_size to multiples of {divisor}, or use fewer or smaller strides")


def model_input_size(config: ExperimentConfig) -> tuple[int, ...]:
    """The spatial size of one training input: ``patches.patch_size`` ``(Z, Y, X)`` for a 3D model,
    ``(S, S)`` with ``S = slices.image_size`` for a 2D one."""
    if spatial_dims(config.model) == 2:
        return config.slices.image_size, config.slices.image_size
    return tuple(config.patches.patch_size)
