"""Settings of a training experiment: model, loss, optimiser, sliding-window validation, run, wandb.

One YAML file (e.g. ``configs/resunet3d.yaml``) holds every section of :class:`ExperimentConfig`;
it is read with :func:`load_experiment_config`, saved resolved in every run folder and sent to
wandb. The data sections (``preprocessing``, ``split``, ``patches``, ``slices``, ``augmentation``)
are the dataclasses of :mod:`utils.config`. The 3D model trains on ``patches`` and is validated
with ``sliding_window``; the 2D model trains on ``slices`` and is validated with
``slice_inference``; a section the model does not use is saved but has no effect.

Geometry the model cannot take is refused when the config is built, before any work starts:
zero or negative sizes and strides, a 3D patch or sliding window that is not a multiple of the
network's total stride, a 2D slice size that is not a multiple of the UNETR's patch size.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass, field

from utils.config.data import (
    AugmentationConfig,
    PatchDatasetConfig,
    PreprocessingConfig,
    SliceDatasetConfig,
    SplitConfig,
)
from utils.config.loading import check_choice, check_positive, load_config

MODEL_NAMES = ("resunet3d", "unetr2d")
LOSS_NAMES = ("dice_focal", "dice_ce")
MIXED_PRECISION = ("no", "fp16", "bf16", "auto")
NONFINITE_LOSS_POLICIES = ("stop", "skip")
ON_BAD_CASE = ("error", "skip")
WANDB_MODES = ("auto", "online", "offline")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Side in pixels of the square patches MONAI's UNETR cuts a slice into (``unetr2d``).
UNETR_PATCH_SIZE = 16


@dataclass(frozen=True)
class ModelConfig:
    """The network (see :mod:`utils.networks.models`).

    Attributes:
        name: ``"resunet3d"`` (MONAI ``UNet``, 3D, residual units) or ``"unetr2d"``.
        in_channels, out_channels: 1 CT channel; one output channel per label of the dataset,
            background included (KiTS19: 3, background, kidney, tumour; KiTS23: 4, adding cyst).
        channels, strides, num_res_units, act: ``resunet3d`` architecture (MONAI ``UNet``
            arguments; ``act`` is a MONAI layer name).
        norm, dropout: both models (MONAI normalisation name; dropout probability).
        feature_size, hidden_size, mlp_dim, num_heads: ``unetr2d`` architecture (MONAI ``UNETR``
            arguments): decoder width, transformer token width, its MLP width and attention
            heads (``hidden_size`` divisible by ``num_heads``). The transformer has MONAI's
            fixed 12 layers and 16 x 16 patches; the input size is ``slices.image_size``.
    """

    name: str = "resunet3d"
    in_channels: int = 1
    out_channels: int = 3
    channels: tuple[int, ...] = (30, 60, 120, 240, 320)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 3
    norm: str = "instance"
    act: str = "PRELU"
    dropout: float = 0.0
    feature_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12

    def __post_init__(self) -> None:
        check_choice("name", self.name, MODEL_NAMES)
        check_positive("in_channels", self.in_channels)
        check_positive("out_channels", self.out_channels)
        check_positive("channels", self.channels)
        check_positive("strides", self.strides)
        if len(self.channels) < 2:
            raise ValueError(f"channels must have at least 2 values (one per resolution level), got {self.channels}")
        if self.num_res_units < 0:
            raise ValueError(f"num_res_units must be >= 0, got {self.num_res_units}")
        for name in ("feature_size", "hidden_size", "mlp_dim", "num_heads"):
            check_positive(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size must be divisible by num_heads ({self.num_heads}), got {self.hidden_size}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"strides must have one value fewer than channels ({len(self.channels) - 1}), "
                             f"got {len(self.strides)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be >= 0 and < 1, got {self.dropout}")


@dataclass(frozen=True)
class LossConfig:
    """The loss (see :mod:`utils.networks.losses`).

    Attributes:
        name: ``"dice_focal"`` or ``"dice_ce"``.
        class_weights: per class (background, kidney, tumour; KiTS23 adds cyst), for both terms:
            one per label of the dataset.
        dice_weight, other_weight: weights of the Dice term and of the focal / cross-entropy term.
        focal_gamma: focusing parameter of the focal term.
        batch_dice: compute the Dice term over the whole batch (one Dice per class, as nnU-Net
            does for 3D) instead of per sample; a sample without tumour then no longer costs a
            full tumour Dice of its own.
        region_dice: compute the Dice term on the dataset's evaluation regions (KiTS19: kidney =
            labels 1 and 2, tumour = label 2) from the summed softmax probabilities, the regions
            the metrics score, instead of on each class; ``class_weights`` then act on the
            cross-entropy term only. ``dice_ce`` only.
    """

    name: str = "dice_focal"
    class_weights: tuple[float, ...] = (0.0, 1.0, 3.0)
    dice_weight: float = 1.0
    other_weight: float = 1.0
    focal_gamma: float = 2.0
    batch_dice: bool = False
    region_dice: bool = False

    def __post_init__(self) -> None:
        check_choice("name", self.name, LOSS_NAMES)
        if self.region_dice and self.name != "dice_ce":
            raise ValueError(f"loss.region_dice needs loss.name 'dice_ce' (the region Dice replaces its Dice "
                             f"term), got {self.name!r}")
        if min(self.class_weights) < 0 or max(self.class_weights) <= 0:
            raise ValueError(f"class_weights must be >= 0 with at least one > 0, got {self.class_weights}")


@dataclass(frozen=True)
class OptimiserConfig:
    """AdamW with a per-iteration linear warm-up then cosine decay (see :mod:`utils.training.optimisation`).

    Attributes:
        learning_rate: peak learning rate. weight_decay: AdamW's decoupled weight decay.
        warmup_epochs: epochs of linear warm-up from ``learning_rate * warmup_start_factor``.
        warmup_start_factor: > 0, so the first step does not train at learning rate 0.
        min_lr_factor: > 0, the cosine decays to ``learning_rate * min_lr_factor``, never to 0.
        grad_clip_norm: clip the gradient's global norm to this (0: no clipping).
    """

    learning_rate: float = 3e-4
    weight_decay: float = 1e-5
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 0.01
    min_lr_factor: float = 0.01
    grad_clip_norm: float = 12.0

    def __post_init__(self) -> None:
        check_positive("learning_rate", self.learning_rate)
        if not 0 < self.warmup_start_factor <= 1 or not 0 < self.min_lr_factor <= 1:
            raise ValueError(f"warmup_start_factor and min_lr_factor must be > 0 and <= 1, "
                             f"got {self.warmup_start_factor} and {self.min_lr_factor}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise ValueError("warmup_epochs, weight_decay and grad_clip_norm must be >= 0")


@dataclass(frozen=True)
class SlidingWindowConfig:
    """Sliding-window inference on whole volumes (validation now, prediction later).

    Attributes:
        roi_size: window ``[Z, Y, X]`` in voxels. overlap: between windows, in ``[0, 1)``.
        blend: ``"gaussian"`` or ``"constant"`` weighting of overlapping windows.
        sw_batch_size: windows per forward pass.
    """

    roi_size: tuple[int, int, int] = (80, 160, 160)
    overlap: float = 0.5
    blend: str = "gaussian"
    sw_batch_size: int = 2

    def __post_init__(self) -> None:
        check_positive("roi_size", self.roi_size)
        check_positive("sw_batch_size", self.sw_batch_size)
        check_choice("blend", self.blend, ("gaussian", "constant"))
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be >= 0 and < 1, got {self.overlap}")


@dataclass(frozen=True)
class SliceInferenceConfig:
    """Slice-by-slice inference of 2D models on whole volumes (validation now, prediction later).

    Each axial slice is fitted into the model's square exactly as in training
    (``slices.image_size``, ``slices.fit``), so one slice is one forward input.

    Attributes:
        batch_size: slices per forward pass.
    """

    batch_size: int = 32

    def __post_init__(self) -> None:
        check_positive("batch_size", self.batch_size)


@dataclass(frozen=True)
class TrainingConfig:
    """How a run is driven (see :mod:`utils.training.engine`).

    Attributes:
        run_name: folder name under ``output_dir``; ``None`` makes ``<model>_<YYYYmmdd-HHMMSS>``.
        output_dir: root of run folders.
        seed: the training seed (model initialisation and sampling); the split has its own.
        fold: which split of ``splits.json`` to train on.
        epochs: epochs to train. batch_size: samples per step and process.
        num_workers: data-loading processes per training process.
        validate_every: validate every this many epochs (and after the last).
        checkpoint_every: save ``last`` every this many epochs (and after the last).
        mixed_precision: ``"no"``, ``"fp16"``, ``"bf16"`` or ``"auto"`` (bf16 on a GPU that
            computes it, else fp16 on a GPU and float32 on a CPU; see
            :func:`utils.training.performance.resolve_precision`).
        nonfinite_loss: ``"stop"`` the run, or ``"skip"`` the step and count it.
        on_bad_case: a case that fails validation stops the run (``"error"``) or is left out (``"skip"``).
        deterministic: use deterministic algorithms (exact resume on CPU; slower on GPU).
        max_validation_cases: validate on at most this many cases (``None``: all).
    """

    run_name: str | None = None
    output_dir: str = "checkpoints"
    seed: int = 0
    fold: int = 0
    epochs: int = 1000
    batch_size: int = 2
    num_workers: int = 4
    validate_every: int = 5
    checkpoint_every: int = 1
    mixed_precision: str = "bf16"
    nonfinite_loss: str = "stop"
    on_bad_case: str = "error"
    deterministic: bool = False
    max_validation_cases: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "validate_every", "checkpoint_every"):
            check_positive(name, getattr(self, name))
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("nonfinite_loss", self.nonfinite_loss, NONFINITE_LOSS_POLICIES)
        check_choice("on_bad_case", self.on_bad_case, ON_BAD_CASE)


@dataclass(frozen=True)
class PerformanceConfig:
    """Speed settings of training (see :mod:`utils.training.performance`); none changes what is learnt.

    The defaults are safe everywhere (CPU, one or several GPUs); the GPU recipes switch the rest on.

    Attributes:
        channels_last: channels-last memory format for the model and its inputs (faster
            convolutions with bf16/fp16 on recent GPUs).
        compile: ``torch.compile`` the training forward pass; when compiling fails the run
            continues uncompiled and says why in the log.
        compile_mode: ``torch.compile`` mode.
        augment_on_device: loader workers only read regions; the augmentation (same draws, same
            samples) runs on the training device, so a GPU never waits for CPU augmentation.
        fused_optimiser: AdamW's fused CUDA kernel when the model is on a GPU.
        pin_memory: page-locked loader batches for asynchronous host-to-GPU copies (GPU only).
        prefetch_factor: batches each loader worker prepares ahead.
        cudnn_benchmark: let cuDNN pick the fastest convolution algorithms for the fixed input size.
        tf32: TensorFloat-32 matrix multiplications and convolutions for float32 work on GPUs.
        allow_emulated_bf16: train with ``training.mixed_precision: bf16`` on a CPU without
            AVX512-BF16 or AMX, where bf16 is emulated in software and several times slower than
            float32; without it such a run is refused before it starts.
    """

    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    augment_on_device: bool = False
    fused_optimiser: bool = True
    pin_memory: bool = True
    prefetch_factor: int = 2
    cudnn_benchmark: bool = True
    tf32: bool = True
    allow_emulated_bf16: bool = False

    def __post_init__(self) -> None:
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        check_positive("prefetch_factor", self.prefetch_factor)


@dataclass(frozen=True)
class WandbConfig:
    """Optional Weights & Biases logging (see :mod:`utils.training.tracking`).

    Attributes:
        enabled: log to wandb (also ``--wandb`` on the command line).
        project, entity, notes, tags: as in ``wandb.init``.
        mode: ``"auto"`` (online when an API key is configured, else offline), ``"online"``, ``"offline"``.
    """

    enabled: bool = False
    project: str = "kits19-segmentation"
    entity: str | None = None
    notes: str = ""
    tags: tuple[str, ...] = ()
    mode: str = "auto"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, WANDB_MODES)


#: How a second stage's box labels are made (:attr:`CascadeConfig.combine`).
CASCADE_COMBINE_MODES: tuple[str, ...] = ("mean", "second")
#: How the post-processing ranks the foreground components it keeps: by whole volume or by kidney voxels
#: (:func:`utils.inference.postprocessing.keep_largest_kidneys`).
COMPONENT_RANKINGS: tuple[str, ...] = ("foreground", "kidney")


@dataclass(frozen=True)
class CascadeConfig:
    """A second stage that segments only the kidney regions a first model (the locator) found.

    The locator (any trained run, usually a coarse 3D model of the whole CT) marks the kidneys;
    this model then segments a box around each of them, grown by ``margin_mm``, on its own finer
    grid (see :mod:`utils.inference.cascade`). It trains on patches centred on kidney and tumour
    (set ``patches.anywhere_share`` to 0) and validates on the true kidney region grown by
    ``margin_mm``, the region it will be shown.

    Attributes:
        locator: the locator's run folder or checkpoint file (``None``: a single-stage model).
            Training copies it into the run folder as ``locator.pt``, so a run folder segments on
            its own.
        margin_mm: how far each located kidney's box is grown on every side, in mm.
        combine: how each box's labels are made: ``"mean"`` (default) takes the argmax of the mean
            of both stages' class probabilities on the CT's grid, ``"second"`` the second stage's
            alone. On held-out cases the mean was better than either stage alone (README
            "Held-out quality").
        rank_components: how ``--postprocess`` ranks the foreground components it keeps (the two
            largest), in the locator's segmentation and in the final one: ``"kidney"`` (default)
            by their kidney voxels, so that a large region the models called tumour with no
            kidney in it (e.g. in a neighbouring organ) cannot push out a kidney and its box;
            ``"foreground"`` by whole volume, as a single-stage model does.
    """

    locator: str | None = None
    margin_mm: float = 30.0
    combine: str = "mean"
    rank_components: str = "kidney"

    def __post_init__(self) -> None:
        if not self.margin_mm >= 0:
            raise ValueError(f"margin_mm must be >= 0, got {self.margin_mm}")
        if self.combine not in CASCADE_COMBINE_MODES:
            raise ValueError(f"combine must be one of {', '.join(CASCADE_COMBINE_MODES)}, got {self.combine!r}")
        if self.rank_components not in COMPONENT_RANKINGS:
            raise ValueError(f"rank_components must be one of {', '.join(COMPONENT_RANKINGS)}, "
                             f"got {self.rank_components!r}")


#: Labels (background included) of each dataset an experiment may name; the definitions themselves
#: (label names, evaluation regions, layout) are in :mod:`utils.data.dataset_definitions`.
DATASET_LABEL_COUNTS = {"kits19": 3, "kits23": 4}
#: The datasets among them that label renal cysts (so ``patches.cyst_share`` and ``slices.cyst_share`` may be > 0).
DATASETS_WITH_CYST = frozenset({"kits23"})


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs, in one file.

    Attributes:
        data_dir: raw KiTS-layout folder (``--data`` or ``KITS19_DATA`` override it); the
            cache is built or updated from it before training.
        dataset: which challenge's labels, evaluation regions and layout
            (:mod:`utils.data.dataset_definitions`): ``kits19`` (default) or ``kits23``.
            ``model.out_channels`` and ``loss.class_weights`` must have one entry per label;
            ``patches.cyst_share`` and ``slices.cyst_share`` may be > 0 only for a dataset with
            a cyst label (:data:`DATASETS_WITH_CYST`).
    """

    data_dir: str | None = None
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    patches: PatchDatasetConfig = field(default_factory=PatchDatasetConfig)
    slices: SliceDatasetConfig = field(default_factory=SliceDatasetConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimiser: OptimiserConfig = field(default_factory=OptimiserConfig)
    sliding_window: SlidingWindowConfig = field(default_factory=SlidingWindowConfig)
    slice_inference: SliceInferenceConfig = field(default_factory=SliceInferenceConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    dataset: str = "kits19"

    def __post_init__(self) -> None:
        """Refuse input sizes the model cannot take, before any data or training work starts."""
        model = self.model
        if self.dataset not in DATASET_LABEL_COUNTS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_LABEL_COUNTS)} "
                             f"(the experiment config's 'dataset:' key)")
        labels = DATASET_LABEL_COUNTS[self.dataset]
        for key, count, what in (("model.out_channels", model.out_channels, f"is {model.out_channels}"),
                                 ("loss.class_weights", len(self.loss.class_weights),
                                  f"has {len(self.loss.class_weights)} entries")):
            if count != labels:
                raise ValueError(
                    f"{key} {what}, but dataset {self.dataset} has {labels} labels, background included: the "
                    f"model needs one output channel and the loss one class weight per label (a list of "
                    f"{labels} values)")
        self._check_cyst_shares()
        if model.name == "resunet3d":
            total = math.prod(model.strides)
            for key, size in (("patches.patch_size", self.patches.patch_size),
                              ("sliding_window.roi_size", self.sliding_window.roi_size)):
                if any(s % total for s in size):
                    raise ValueError(
                        f"{key} {list(size)} must be a multiple of {total} along every axis: the total stride "
                        f"of model.strides {list(model.strides)} (each level halves the size, and the decoder "
                        f"must meet the encoder at the same size); e.g. "
                        f"{[max(total, math.ceil(s / total) * total) for s in size]}")
        elif self.slices.image_size % UNETR_PATCH_SIZE:
            size, patch = self.slices.image_size, UNETR_PATCH_SIZE
            raise ValueError(f"slices.image_size {size} must be a multiple of {patch} for model {model.name} (its "
                             f"transformer cuts a slice into {patch} x {patch} patches); e.g. "
                             f"{max(patch, math.ceil(size / patch) * patch)}")

    def _check_cyst_shares(self) -> None:
        """Refuse cyst-centred sampling on a dataset without a cyst label."""
        if self.dataset in DATASETS_WITH_CYST:
            return
        for key, share in (("patches.cyst_share", self.patches.cyst_share),
                           ("slices.cyst_share", self.slices.cyst_share)):
            if share > 0:
                raise ValueError(
                    f"{key} is {share}, but dataset {self.dataset} has no cyst label (cysts are labelled in "
                    f"{', '.join(sorted(DATASETS_WITH_CYST))}): set {key} to 0 and give its share to the other "
                    f"classes, or set 'dataset:' to a dataset with cysts")


def load_experiment_config(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML (with ``section.key=value`` overrides) into :class:`ExperimentConfig`."""
    return load_config(path, ExperimentConfig, overrides)
