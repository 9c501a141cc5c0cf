"""Segment a new CT with a trained model: raw HU volume in, labels on the CT's own grid out.

:func:`load_segmentation_model` rebuilds the network from a checkpoint alone (its experiment
config, preprocessing parameters and normalisation travel inside it). :func:`segment_ct` then
runs the training preprocessing (:func:`utils.preprocessing.preprocess.preprocess_volume`), predicts on
the preprocessed grid (sliding windows for 3D models, every axial slice for 2D ones, see
:func:`utils.inference.predict.predict_volume_logits`) and maps the class probabilities back by
trilinear resampling with :func:`utils.preprocessing.resampling.restore_probabilities`, the argmax
taken on the CT's own grid (``restore="labels"``: the coarse argmax copied by nearest neighbour,
:func:`utils.preprocessing.resampling.restore_labels`): uint8 labels of the input's exact shape, for the
input's affine, holding the labels of the model's dataset (its experiment config's ``dataset``,
:attr:`SegmentationModel.dataset`: KiTS19 0 background, 1 kidney, 2 tumour; KiTS23 adds 3
cyst). :func:`segment_file` does the same from one NIfTI file to another.

**Fold ensembles.** Given the folder of a k-fold cross-validated experiment (``fold_<k>/``
subfolders, each a run folder with ``best.pt`` or ``last.pt``), :func:`load_segmentation_model`
loads every fold's model into one :class:`SegmentationModel` (``models``, ``checkpoints``). The
folds must share the model, the inference settings and the preprocessing plan (target spacing,
normalisation), so one preprocessing pass serves them all; prediction averages the softmax of
every model (and every mirroring with TTA) and takes the argmax
(:func:`predict_preprocessed_probabilities`). One model without TTA keeps the argmax of its logits.

Before any work, :func:`segment_file` names the CT's input anomalies with
:func:`utils.data.nifti_checks.find_ct_anomalies`, the same checks ``check_data`` and the
preprocessing run: NaN/inf voxels, a zero, negative or NaN voxel size in any header field and a
volume of a few voxels fail the CT (a ``ValueError`` naming the file and the reason); an oblique
affine, values that do not look like HU and a CT smaller than one window are logged as warnings
saying what is done. Every prediction carries
:data:`utils.data.output_guard.OWN_NIFTI_DESCRIPTION` in its header, so later runs recognise it.

Memory stays bounded on long CTs: the CT is read once as float32 (never float64) and reused as
scratch space by the preprocessing; prediction works on the smaller preprocessed grid; on a GPU
the whole-volume logits are accumulated on the CPU when they would not fit comfortably in free
GPU memory (only the windows then live on the GPU), and the GPU cache is emptied after each case.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from utils.config.data import PreprocessingConfig
from utils.config.experiment import ExperimentConfig
from utils.config.loading import build_config, config_as_dict
from utils.data.dataset_definitions import DatasetDefinition, get_dataset
from utils.data.nifti_checks import find_ct_anomalies, not_a_file_reason
from utils.data.nifti_io import load_nifti_verified, read_voxels, save_nifti
from utils.data.output_guard import OWN_NIFTI_DESCRIPTION
from utils.inference.cascade import (
    LOCATOR_NAME,
    box_affine,
    check_locator_state,
    located_boxes,
    near_located,
    voxel_sizes,
)
from utils.inference.postprocessing import (
    DEFAULT_MIN_COMPONENT_ML,
    ensemble_sha256,
    file_sha256,
    postprocess_labels,
    read_min_tumour_ml,
)
from utils.inference.predict import predict_volume_logits
from utils.networks.checkpoints import load_checkpoint
from utils.networks.models import build_model, model_input_size, spatial_dims
from utils.preprocessing.preprocess import Normalisation, preprocess_volume
from utils.preprocessing.resampling import restore_labels, restore_probabilities, restore_probability_maps

logger = logging.getLogger(__name__)

#: How :func:`segment_ct` maps a prediction back onto the CT's grid: class probabilities resampled
#: trilinearly, then the argmax (default), or the coarse labels copied by nearest neighbour.
RESTORE_MODES: tuple[str, ...] = ("probabilities", "labels")

#: Files looked for, in order, when a run folder is given instead of a checkpoint file.
CHECKPOINT_NAMES = ("best.pt", "last.pt")
#: Subfolders of a cross-validated experiment folder, one run folder per fold.
FOLD_FOLDER = re.compile(r"fold_(\d+)")
#: Experiment config sections every fold of an ensemble must share: the network and how it predicts.
ENSEMBLE_CONFIG_SECTIONS = ("model", "slices", "sliding_window", "slice_inference")
_REQUIRED_KEYS = ("model", "config", "preprocessing_plan")
#: Stitch on the GPU only while the logit buffers take at most this share of free GPU memory.
_GPU_STITCH_SHARE = 0.5


@dataclass(frozen=True)
class SegmentationModel:
    """One trained model, or the fold models of an experiment, ready to segment, with everything
    their checkpoints say about their input.

    Attributes:
        model: the (first) network, in ``eval()`` mode, gradients off, on ``device``.
        config: the experiment it was trained with (model, sliding window, slices); for an
            ensemble, the first fold's (every fold shares its model and inference sections).
        preprocessing: the preprocessing parameters of its training cache.
        normalisation: the HU clip window and z-score of its training cache.
        run_name: the run folder's name (or the checkpoint file's stem; an ensemble: the
            experiment folder's name).
        checkpoint: the checkpoint file read (an ensemble: the experiment folder).
        device: where the model runs.
        training_case_ids: the cases of its training cache (train and validation), from which
            ``config.split`` makes its split. Empty for an ensemble: every case was trained on by
            some fold, so the ensemble has no validation cases of its own.
        models: every network whose softmax is averaged, ``model`` first (default ``(model,)``).
        checkpoints: the checkpoint file of each of ``models`` (default ``(checkpoint,)``).
        locator: for a second-stage model (``cascade.locator`` in its config), the first stage
            that finds the kidneys, from the run folder's ``locator.pt``
            (:mod:`utils.inference.cascade`); ``None`` for a single-stage model.
        min_tumour_ml: with ``postprocess``, tumour components smaller than this many ml, all but
            the largest, become kidney (:func:`utils.inference.postprocessing.relabel_small_tumours`);
            0 (default) keeps them. Read from the checkpoint's ``postprocessing.json`` when a run's validation cases
            chose it, for an ensemble from the experiment folder's when its out-of-fold predictions chose it
            (:func:`utils.inference.postprocessing.read_min_tumour_ml`); a fold's own choice is not the ensemble's.
    """

    model: torch.nn.Module
    config: ExperimentConfig
    preprocessing: PreprocessingConfig
    normalisation: Normalisation
    run_name: str
    checkpoint: Path
    device: torch.device
    training_case_ids: tuple[str, ...] = ()
    models: tuple[torch.nn.Module, ...] = ()
    checkpoints: tuple[Path, ...] = ()
    locator: SegmentationModel | None = None
    min_tumour_ml: float = 0.0

    def __post_init__(self) -> None:
        if not self.models:
            object.__setattr__(self, "models", (self.model,))
        if not self.checkpoints:
            object.__setattr__(self, "checkpoints", (self.checkpoint,) * len(self.models))
        if self.models[0] is not self.model:
            raise ValueError("models must start with model")
        if len(self.checkpoints) != len(self.models):
            raise ValueError(f"{len(self.models)} model(s) but {len(self.checkpoints)} checkpoint(s)")

    @property
    def dataset(self) -> DatasetDefinition:
        """The dataset the model was trained on (its config's ``dataset``): the labels it predicts,
        ``dataset.num_classes`` of them (``config.model.out_channels``), and how it is scored."""
        return get_dataset(self.config.dataset)

    @property
    def model_count(self) -> int:
        """How many models are averaged (1 for a single run)."""
        return len(self.models)

    def checkpoint_sha256(self) -> str | None:
        """The SHA-256 of the checkpoint file; for an ensemble, of its fold checkpoints together
        (:func:`utils.inference.postprocessing.ensemble_sha256`); ``None`` when the files are gone (or the
        model was never saved)."""
        if self.checkpoint.is_file():
            return file_sha256(self.checkpoint)
        if self.checkpoint.is_dir() and all(Path(path).is_file() for path in self.checkpoints):
            return ensemble_sha256(self.checkpoints)
        return None

    @property
    def background_value(self) -> float:
        """Normalised value of air (the lower clip bound after z-scoring), used for padding."""
        return self.normalisation.background_value


def add_restore_argument(parser: argparse.ArgumentParser) -> None:
    """``--restore {probabilities,labels}``: how predictions go back onto the CT's grid (see :func:`segment_ct`)."""
    parser.add_argument("--restore", choices=RESTORE_MODES, default=RESTORE_MODES[0],
                        help="back onto the CT's grid: resample the class probabilities trilinearly, then the "
                             "argmax (default), or copy the coarse labels by nearest neighbour")


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file meant by ``path``: the file itself, or a run folder's ``best.pt``, else ``last.pt``.

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a folder holding neither file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: run folder holds no checkpoint (looked for {', '.join(CHECKPOINT_NAMES)})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or run folder")
    return path


def select_device(device: str | torch.device | None) -> torch.device:
    """``torch.device`` of ``device`` (``None``: CUDA when available, else CPU).

    Raises:
        ValueError: CUDA is asked for but not available, or the device is neither CPU nor CUDA.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but CUDA is not available here; use device cpu")
    return device


def find_fold_checkpoints(path: str | os.PathLike) -> dict[str, Path]:
    """The checkpoint of each fold of a cross-validated experiment folder, ``{"fold_0": .../best.pt, ...}``.

    An experiment folder holds ``fold_<k>/`` run folders and no checkpoint of its own; each fold
    gives its ``best.pt``, else its ``last.pt``; a fold folder with neither is left out with a
    warning. Folds are ordered by ``k``.

    Returns:
        An empty dict when ``path`` is not an experiment folder (a file, a run folder holding a
        checkpoint, or a folder without ``fold_<k>`` subfolders).

    Raises:
        FileNotFoundError: ``path`` has ``fold_<k>`` subfolders, but none holds a checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_dir() or any((path / name).is_file() for name in CHECKPOINT_NAMES):
        return {}
    folds = sorted((p for p in path.iterdir() if p.is_dir() and FOLD_FOLDER.fullmatch(p.name)),
                   key=lambda p: int(p.name.split("_")[1]))
    if not folds:
        return {}
    found: dict[str, Path] = {}
    for fold in folds:
        checkpoint = next((fold / name for name in CHECKPOINT_NAMES if (fold / name).is_file()), None)
        if checkpoint is not None:
            found[fold.name] = checkpoint
    if not found:
        raise FileNotFoundError(f"{path}: experiment folder holds no fold checkpoint: none of "
                                f"{', '.join(p.name for p in folds)} has {' or '.join(CHECKPOINT_NAMES)}")
    skipped = [fold.name for fold in folds if fold.name not in found]
    if skipped:
        logger.warning("%s: %s hold(s) no checkpoint (%s) and is left out of the ensemble", path,
                       ", ".join(skipped), " or ".join(CHECKPOINT_NAMES))
    return found


def _load_one(path: Path, device: torch.device) -> SegmentationModel:
    """The model of one checkpoint file (see :func:`load_segmentation_model`)."""
    state = load_checkpoint(path, map_location="cpu")
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint: missing key(s) {missing}; expected "
                         f"{list(_REQUIRED_KEYS)} as written by utils.training.engine")
    config = build_config(ExperimentConfig, state["config"], f"{path}: config")
    plan = state["preprocessing_plan"]
    preprocessing = build_config(PreprocessingConfig, plan.get("preprocessing"), f"{path}: preprocessing_plan")
    numbers = plan.get("normalisation") or {}
    names = [f.name for f in fields(Normalisation)]
    if sorted(numbers) != sorted(names):
        raise ValueError(f"{path}: preprocessing_plan.normalisation must hold {names}, got {sorted(numbers)}")
    normalisation = Normalisation(**{name: float(numbers[name]) for name in names})
    model = build_model(config.model, model_input_size(config))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not fit the {config.model.name} model its config describes: "
                         f"{error}") from error
    model.eval().requires_grad_(False).to(device)
    run_name = path.parent.name if path.name in CHECKPOINT_NAMES else path.stem
    locator = None
    if config.cascade.locator is not None:
        locator_path = path.parent / LOCATOR_NAME
        if not locator_path.is_file():
            raise FileNotFoundError(f"{path}: a second-stage model (cascade.locator is set) needs its locator, "
                                    f"{locator_path}, next to it; training copies it there (keep the run folder "
                                    "together)")
        check_locator_state(load_checkpoint(locator_path, map_location="cpu"), locator_path, config.dataset)
        locator = _load_one(locator_path, device)
    return SegmentationModel(model, config, preprocessing, normalisation, run_name, path, device,
                             tuple(str(case) for case in plan.get("case_ids", ())), locator=locator,
                             min_tumour_ml=0.0 if path.name == LOCATOR_NAME else read_min_tumour_ml(path))


def _ensemble_settings(segmenter: SegmentationModel) -> dict[str, object]:
    """What every fold of an ensemble must share, flattened to ``"section.key": value``."""
    settings: dict[str, object] = {}
    config = config_as_dict(segmenter.config)
    for section in ENSEMBLE_CONFIG_SECTIONS:
        settings.update({f"config.{section}.{key}": value for key, value in config[section].items()})
    settings["config.dataset"] = segmenter.config.dataset
    preprocessing = config_as_dict(segmenter.preprocessing)
    preprocessing.pop("cache_dir", None)  # where the cache lies does not change how a CT is preprocessed
    settings.update({f"preprocessing_plan.preprocessing.{key}": value for key, value in preprocessing.items()})
    settings.update({f"preprocessing_plan.normalisation.{f.name}": getattr(segmenter.normalisation, f.name)
                     for f in fields(Normalisation)})
    return settings


def _check_folds_agree(folds: dict[str, SegmentationModel], experiment: Path) -> None:
    """``ValueError`` naming the folds and the first setting in which a fold differs from the first fold."""
    names = list(folds)
    reference = _ensemble_settings(folds[names[0]])
    for name in names[1:]:
        settings = _ensemble_settings(folds[name])
        for key, value in reference.items():
            if settings.get(key) != value:
                raise ValueError(f"{experiment}: the folds cannot be ensembled: {names[0]} and {name} differ in "
                                 f"{key} ({value!r} vs {settings.get(key)!r}); every fold must share the model, "
                                 "its inference settings and the preprocessing plan")


def load_segmentation_model(checkpoint: str | os.PathLike,
                            device: str | torch.device | None = "cpu") -> SegmentationModel:
    """Rebuild a trained model (or an experiment's fold models) from checkpoints alone, frozen, in ``eval()`` mode.

    Args:
        checkpoint: a run folder (``best.pt`` is used, else ``last.pt``), a ``.pt`` file written
            by the training engine, or a cross-validated experiment folder (its ``fold_<k>/``
            run folders, see :func:`find_fold_checkpoints`): every fold's model is loaded, and
            ``model_count`` says how many.
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), or ``None`` for CUDA when available.

    Raises:
        FileNotFoundError: no checkpoint there (for an experiment folder: in no fold).
        ValueError: CUDA asked for but absent, or the file is not a training checkpoint (keys,
            config or weights do not match; the message names the file); the folds of an
            experiment differ in their model, inference settings or preprocessing plan (the
            message names the two folds and the setting).
        utils.networks.checkpoints.CheckpointError: the file is truncated or corrupt.
    """
    device = select_device(device)
    fold_checkpoints = find_fold_checkpoints(checkpoint)
    if not fold_checkpoints:
        segmenter = _load_one(find_checkpoint(checkpoint), device)
        logger.info("loaded %s (%s, run %s) on %s", segmenter.checkpoint, segmenter.config.model.name,
                    segmenter.run_name, device)
        if segmenter.min_tumour_ml:
            logger.info("post-processing of %s: tumour components under %g ml, but the largest, become kidney "
                        "(chosen on its validation cases)", segmenter.run_name, segmenter.min_tumour_ml)
        return segmenter
    experiment = Path(checkpoint).expanduser()
    folds = {name: _load_one(path, device) for name, path in fold_checkpoints.items()}
    staged = [name for name, fold in folds.items() if fold.locator is not None]
    if staged:
        raise ValueError(f"{experiment}: {', '.join(staged)} are second-stage models (cascade.locator); a fold "
                         "ensemble of two-stage models is not supported: segment with one fold's run folder")
    _check_folds_agree(folds, experiment)
    first = next(iter(folds.values()))
    min_tumour_ml = read_min_tumour_ml(experiment, sha256=ensemble_sha256(fold_checkpoints.values()))
    segmenter = SegmentationModel(first.model, first.config, first.preprocessing, first.normalisation,
                                  experiment.name, experiment, device, (),
                                  tuple(fold.model for fold in folds.values()),
                                  tuple(fold.checkpoint for fold in folds.values()), min_tumour_ml=min_tumour_ml)
    logger.info("loaded an ensemble of %d fold model(s) from %s (%s: %s) on %s", segmenter.model_count, experiment,
                first.config.model.name, ", ".join(folds), device)
    if min_tumour_ml:
        logger.info("post-processing of the ensemble %s: tumour components under %g ml, but the largest, become "
                    "kidney (chosen on its out-of-fold predictions)", experiment.name, min_tumour_ml)
    return segmenter


def flip_axes_for_tta(dims: int, trained_axes: Sequence[int] = (0, 1, 2)) -> list[tuple[int, ...]]:
    """Axes of a ``(B, C, Z, Y, X)`` tensor flipped by each mirroring pass, the identity ``()`` first.

    Args:
        dims: 3 (the combinations of Z, Y, X) or 2 (the in-plane combinations of Y, X: a 2D
            model sees one axial slice, so flipping Z would change nothing).
        trained_axes: the spatial axes (0 slice, 1 row, 2 column) the model was trained to see
            mirrored (its ``augmentation.flip_axes``; empty when ``flip_prob`` is 0). Only those
            are mirrored: a mirroring never seen in training (e.g. head-feet for a model trained
            with left-right flips only) gives the average a prediction of an unfamiliar image.
            All three (default): 8 passes for 3D models, 4 for 2D ones.
    """
    axes = tuple(axis for axis in ((2, 3, 4) if dims == 3 else (3, 4)) if axis - 2 in tuple(trained_axes))
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def trained_flip_axes(config: ExperimentConfig) -> tuple[int, ...]:
    """The spatial axes an experiment's training mirrored (none when ``augmentation.flip_prob`` is 0)."""
    augmentation = config.augmentation
    return tuple(augmentation.flip_axes) if augmentation.flip_prob > 0 else ()


def _stitch_device(device: torch.device, voxels: int, classes: int, passes: int) -> torch.device:
    """The model's device, or the CPU when the logit buffers would crowd the GPU's free memory."""
    if device.type != "cuda":
        return device
    buffers = (3 if passes > 1 else 2) * classes * voxels * 4  # logits, MONAI's count map / softmax, TTA sum
    free, _ = torch.cuda.mem_get_info(device)
    if buffers <= _GPU_STITCH_SHARE * free:
        return device
    logger.info("stitching logits on the CPU: %.1f GiB of buffers, %.1f GiB free on %s", buffers / 2**30,
                free / 2**30, device)
    return torch.device("cpu")


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 1, in place (no second copy of a whole-volume tensor)."""
    logits -= logits.amax(dim=1, keepdim=True)
    logits.exp_()
    logits /= logits.sum(dim=1, keepdim=True)
    return logits


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or not np.issubdtype(image.dtype, np.floating):
        description = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a (Z, Y, X) float numpy array, got {description}")


def _prepared_input(segmenter: SegmentationModel, image: np.ndarray,
                    tta: bool) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """The checked image as a ``(1, 1, Z, Y, X)`` float32 tensor on the model's device, and the mirrorings to run."""
    _check_image(image)
    flips = (flip_axes_for_tta(spatial_dims(segmenter.config.model), trained_flip_axes(segmenter.config)) if tta
             else [()])
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device=segmenter.device, dtype=torch.float32)
    return tensor[None, None], flips


def _predict_sum(segmenter: SegmentationModel, tensor: torch.Tensor, flips: list[tuple[int, ...]],
                 *, softmax: bool) -> torch.Tensor:
    """``(1, C, Z, Y, X)``: the logits of the only pass, or the sum of the softmax of every model and mirroring."""
    device, config = segmenter.device, segmenter.config
    autocast = None
    if device.type == "cuda":
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    passes = len(flips) * segmenter.model_count
    stitch = _stitch_device(device, tensor[0, 0].numel(), config.model.out_channels, passes)
    total: torch.Tensor | None = None
    for axes in flips:
        source = tensor.flip(axes) if axes else tensor
        for model in segmenter.models:
            logits = predict_volume_logits(model, source, config, autocast_dtype=autocast,
                                           pad_value=segmenter.background_value, stitch_device=stitch)
            if axes:
                logits = logits.flip(axes)
            if not softmax:
                return logits
            total = _softmax_(logits) if total is None else total.add_(_softmax_(logits))
            del logits
        del source
    assert total is not None
    return total


def predict_preprocessed_probabilities(segmenter: SegmentationModel, image: np.ndarray, *,
                                       tta: bool = False) -> np.ndarray:
    """Mean softmax of a preprocessed volume over every model of ``segmenter`` (and every mirroring with TTA).

    Args:
        segmenter, image, tta: as in :func:`predict_preprocessed_labels`.

    Returns:
        ``(C, Z, Y, X)`` float32 class probabilities on the CPU (each voxel sums to 1).
    """
    device = segmenter.device
    tensor, flips = _prepared_input(segmenter, image, tta)
    total: torch.Tensor | None = None
    try:
        total = _predict_sum(segmenter, tensor, flips, softmax=True)
        total /= len(flips) * segmenter.model_count
        return total[0].to(device="cpu", dtype=torch.float32).numpy()
    finally:
        del tensor, total
        if device.type == "cuda":
            torch.cuda.empty_cache()


def predict_preprocessed_labels(segmenter: SegmentationModel, image: np.ndarray, *, tta: bool = False) -> np.ndarray:
    """Labels of a preprocessed volume: argmax of the logits (one model, no TTA), else of the mean softmax.

    The softmax is averaged over every model of an ensemble and, with ``tta``, every mirroring.
    On CUDA the models run under bfloat16 autocast (float16 where bfloat16 is unsupported).

    Args:
        segmenter: from :func:`load_segmentation_model`.
        image: ``(Z, Y, X)`` float16/float32, canonical, normalised (from ``preprocess_volume``).
        tta: average the softmax over the mirrorings of :func:`flip_axes_for_tta` along the axes
            the model was trained to see mirrored (:func:`trained_flip_axes`; all three: 8 passes
            for 3D models, 4 for 2D ones, per model), each prediction flipped back before averaging.

    Returns:
        ``(Z, Y, X)`` uint8 labels of the model's dataset (:attr:`SegmentationModel.dataset`:
        KiTS19 0 background, 1 kidney, 2 tumour; KiTS23 also 3 cyst) on the CPU.
    """
    device = segmenter.device
    tensor, flips = _prepared_input(segmenter, image, tta)
    total: torch.Tensor | None = None
    try:
        total = _predict_sum(segmenter, tensor, flips, softmax=len(flips) * segmenter.model_count > 1)
        return total[0].argmax(dim=0).to(device="cpu", dtype=torch.uint8).numpy()
    finally:
        del tensor, total
        if device.type == "cuda":
            torch.cuda.empty_cache()


def segment_ct(image_hu: np.ndarray, affine: np.ndarray, segmenter: SegmentationModel, *, tta: bool = False,
               postprocess: bool = False, min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
               restore: str = "probabilities", overwrite_input: bool = False,
               timings: dict[str, float] | None = None, rank_components: str = "foreground") -> np.ndarray:
    """Segment one CT: training preprocessing, prediction, labels back on the CT's own grid.

    A second-stage model (``segmenter.locator`` set) segments in two stages: its locator on the
    whole CT (post-processed, labels restored by nearest neighbour), then the box around each
    located kidney (:mod:`utils.inference.cascade`): with ``cascade.combine: mean`` (default) both
    models segment each box and its labels are the argmax of the mean of their class probabilities
    on the box's own grid (``restore`` says how each is put back: trilinear or nearest), then
    ``postprocess`` applies on the CT's grid; with ``combine: second`` only ``segmenter`` segments
    each box, with ``tta``, ``postprocess`` and ``restore`` applying to each box. Only labels within
    ``cascade.margin_mm`` of the locator's foreground are kept, and every other voxel is background;
    the post-processing of both stages then ranks components as ``cascade.rank_components`` says.

    Args:
        image_hu: ``(I, J, K)`` CT in Hounsfield units, in the file's axis order (any real dtype;
            converted to float32, never float64).
        affine: the file's ``(4, 4)`` voxel-to-world matrix (any orientation; mm).
        segmenter: from :func:`load_segmentation_model`.
        tta: mirroring test-time augmentation (see :func:`predict_preprocessed_labels`).
        postprocess: apply :func:`utils.inference.postprocessing.postprocess_labels` with the model's
            dataset on the preprocessed grid (its spacing converts ``min_component_ml`` to voxels),
            and the segmenter's ``min_tumour_ml`` (0 unless its validation cases chose one).
            For KiTS23 the cyst counts as kidney foreground and, like the tumour, as a mass that
            must touch kidney.
        min_component_ml: smallest kidney component kept by the post-processing, in ml.
        restore: how the prediction goes back onto the CT's grid (:data:`RESTORE_MODES`):
            ``"probabilities"`` (default) resamples the class probabilities trilinearly and takes
            the argmax on the CT's grid (:func:`utils.preprocessing.resampling.restore_probabilities`;
            voxels the post-processing changed carry their new label's one-hot); ``"labels"``
            copies the coarse argmax by nearest neighbour
            (:func:`utils.preprocessing.resampling.restore_labels`), the stair-stepped boundary.
        overwrite_input: let the preprocessing use ``image_hu`` as scratch space when it is
            float32 (saves a copy of a long CT; ``image_hu`` is then garbage).
        timings: when given, receives the seconds of each stage (``preprocess``, ``predict``,
            ``restore``; post-processing counts in ``restore``).
        rank_components: how the post-processing ranks the foreground components it keeps
            (:func:`utils.inference.postprocessing.keep_largest_kidneys`); a second-stage model
            uses its ``cascade.rank_components`` instead.

    Returns:
        ``(I, J, K)`` uint8 labels of the model's dataset (KiTS19 0 background, 1 kidney,
        2 tumour; KiTS23 also 3 cyst), to be saved with ``affine``.

    Raises:
        ValueError: ``image_hu`` is not 3D or ``affine`` is not a finite, invertible 4 x 4 matrix.
    """
    if not isinstance(image_hu, np.ndarray) or image_hu.ndim != 3 or min(image_hu.shape) < 1:
        description = image_hu.shape if isinstance(image_hu, np.ndarray) else type(image_hu).__name__
        raise ValueError(f"image_hu must be a non-empty 3D array (I, J, K), got {description}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"affine must be a finite, invertible 4 x 4 matrix, got {affine.tolist()}")
    if restore not in RESTORE_MODES:
        raise ValueError(f"restore must be one of {', '.join(RESTORE_MODES)}, got {restore!r}")
    if segmenter.locator is not None:
        return _segment_located_kidneys(image_hu, affine, segmenter, tta=tta, postprocess=postprocess,
                                        min_component_ml=min_component_ml, restore=restore, timings=timings)
    clock = _StageClock(timings)
    image = np.asarray(image_hu, dtype=np.float32)
    scratch = overwrite_input or image is not image_hu
    on_gpu = segmenter.device if segmenter.device.type == "cuda" else None  # resampling too, on a GPU
    preprocessed, _, mapping = preprocess_volume(image, None, affine, segmenter.preprocessing,
                                                 segmenter.normalisation, overwrite_input=scratch, device=on_gpu)
    del image
    clock.lap("preprocess")
    if restore == "labels":
        labels = predict_preprocessed_labels(segmenter, preprocessed, tta=tta)
        del preprocessed
        clock.lap("predict")
        if postprocess:
            labels = postprocess_labels(labels, mapping.resampled_spacing, min_component_ml=min_component_ml,
                                        dataset=segmenter.dataset, rank_by=rank_components,
                                        min_tumour_ml=segmenter.min_tumour_ml)
        restored = restore_labels(labels, mapping)
    else:
        probabilities = predict_preprocessed_probabilities(segmenter, preprocessed, tta=tta)
        del preprocessed
        clock.lap("predict")
        if postprocess:
            labels = probabilities.argmax(axis=0).astype(np.uint8)
            kept = postprocess_labels(labels, mapping.resampled_spacing, min_component_ml=min_component_ml,
                                      dataset=segmenter.dataset, rank_by=rank_components,
                                      min_tumour_ml=segmenter.min_tumour_ml)
            changed = kept != labels
            probabilities[:, changed] = 0.0
            probabilities[(kept[changed], *np.nonzero(changed))] = 1.0
        restored = restore_probabilities(probabilities, mapping)
    clock.lap("restore")
    return restored


def _segment_located_kidneys(image_hu: np.ndarray, affine: np.ndarray, segmenter: SegmentationModel, *, tta: bool,
                             postprocess: bool, min_component_ml: float, restore: str,
                             timings: dict[str, float] | None) -> np.ndarray:
    """A second-stage model's segmentation (:mod:`utils.inference.cascade`): the locator on the whole CT,
    then ``segmenter`` (with ``cascade.combine: mean``, both models) on the box around each located
    kidney; background elsewhere."""
    config = segmenter.config
    ranking = config.cascade.rank_components
    located = segment_ct(image_hu, affine, segmenter.locator, tta=tta, postprocess=True,
                         min_component_ml=min_component_ml, restore="labels", timings=timings, rank_components=ranking)
    window = (0.0, 0.0, 0.0)
    if spatial_dims(config.model) == 3:  # at least one window along every axis, whatever the CT's axis order
        window = (max(r * s for r, s in zip(config.sliding_window.roi_size, segmenter.preprocessing.target_spacing,
                                            strict=True)),) * 3
    spacing = voxel_sizes(affine)
    boxes = located_boxes(located, spacing, config.cascade.margin_mm, window)
    labels = np.zeros(image_hu.shape, dtype=np.uint8)
    if not boxes:
        logger.warning("the locator %s found no kidney in this CT: the segmentation is empty",
                       segmenter.locator.run_name)
    second = replace(segmenter, locator=None)
    mean = config.cascade.combine == "mean"
    for box in boxes:
        if mean:
            found = _mean_of_stages(image_hu[box], box_affine(affine, box), (second, segmenter.locator), tta=tta,
                                    restore=restore, timings=timings)
        else:
            found = segment_ct(np.array(image_hu[box], dtype=np.float32), box_affine(affine, box), second, tta=tta,
                               postprocess=postprocess, min_component_ml=min_component_ml, restore=restore,
                               overwrite_input=True, timings=timings, rank_components=ranking)
        found[~near_located(located[box], spacing, config.cascade.margin_mm)] = 0
        labels[box] = found
    if mean and postprocess and labels.any():  # on the CT's grid, over the boxes' common extent
        clock = _StageClock(timings)
        extent = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(labels))
        labels[extent] = postprocess_labels(labels[extent], spacing, min_component_ml=min_component_ml,
                                            dataset=segmenter.dataset, rank_by=ranking,
                                            min_tumour_ml=segmenter.min_tumour_ml)
        clock.lap("restore")
    return labels


def _mean_of_stages(image_hu: np.ndarray, affine: np.ndarray, stages: Sequence[SegmentationModel], *, tta: bool,
                    restore: str, timings: dict[str, float] | None) -> np.ndarray:
    """Labels of one box: the argmax of the mean of each model's class probabilities, each put back onto
    the box's own grid first (the models may preprocess to different grids); uint8, ``image_hu``'s shape.

    The locator segments the box again although it has seen the whole CT: restoring its whole-CT
    probabilities onto the CT's grid would take ``C`` floats per voxel of a long CT, the box's far less."""
    total: np.ndarray | None = None
    for stage in stages:
        clock = _StageClock(timings)
        preprocessed, _, mapping = preprocess_volume(np.array(image_hu, dtype=np.float32), None, affine,
                                                     stage.preprocessing, stage.normalisation, overwrite_input=True,
                                                     device=stage.device if stage.device.type == "cuda" else None)
        clock.lap("preprocess")
        probabilities = predict_preprocessed_probabilities(stage, preprocessed, tta=tta)
        del preprocessed
        clock.lap("predict")
        restored = restore_probability_maps(probabilities, mapping,
                                            mode="linear" if restore == "probabilities" else "nearest")
        total = restored if total is None else np.add(total, restored, out=total)
        clock.lap("restore")
    assert total is not None
    return total.argmax(axis=0).astype(np.uint8)


class _StageClock:
    """Adds the seconds since the previous lap to ``timings[stage]`` (does nothing without ``timings``)."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now


def segment_file(input_path: str | os.PathLike, output_path: str | os.PathLike, segmenter: SegmentationModel, *,
                 tta: bool = False, postprocess: bool = False,
                 min_component_ml: float = DEFAULT_MIN_COMPONENT_ML, restore: str = "probabilities",
                 timings: dict[str, float] | None = None) -> Path:
    """Segment one NIfTI CT into a uint8 label NIfTI of the same shape and affine, written atomically.

    The labels are the model's dataset's (see :func:`segment_ct`).

    Args:
        input_path: ``.nii`` / ``.nii.gz`` CT in HU (only read; its gzip CRC and length are checked).
        output_path: ``.nii`` / ``.nii.gz`` destination, not the input; its folder is created.
        segmenter, tta, postprocess, min_component_ml, restore: as in :func:`segment_ct`.
        timings: when given, receives the seconds of each stage: ``read``, those of
            :func:`segment_ct`, and ``write``.

    Returns:
        ``output_path``.

    Raises:
        FileNotFoundError: no input file (the message says when it is a symbolic link loop).
        ValueError: output equal to the input or not a NIfTI name; the input is not a readable
            NIfTI (:class:`utils.data.nifti_io.NiftiReadError`, truncated or corrupt) or not 3D;
            the CT has an input anomaly that is an error (see :func:`check_input_ct`).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not output_path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"output must end in .nii or .nii.gz, got {str(output_path)!r}")
    if output_path.resolve() == input_path.resolve():
        raise ValueError(f"{output_path}: the output would overwrite the input CT; choose another output path")
    clock = _StageClock(timings)
    if not input_path.is_file():  # a symbolic link loop or a folder is named as such
        raise FileNotFoundError(f"{input_path}: {not_a_file_reason(input_path)}")
    image = load_nifti_verified(input_path)
    if len(image.shape) != 3:
        raise ValueError(f"{input_path}: not a 3D image: shape {tuple(image.shape)}; a CT volume has 3 axes")
    affine = np.asarray(image.affine, dtype=np.float64)
    image_hu = read_voxels(image, np.float32)
    del image  # drop the file's bytes before preprocessing
    check_input_ct(input_path, image_hu, segmenter)
    clock.lap("read")
    labels = segment_ct(image_hu, affine, segmenter, tta=tta, postprocess=postprocess,
                        min_component_ml=min_component_ml, restore=restore, overwrite_input=True, timings=timings)
    clock.last = time.perf_counter()
    del image_hu
    output_path.parent.mkdir(parents=True, exist_ok=True)
    written = save_nifti(labels, affine, output_path, description=OWN_NIFTI_DESCRIPTION)
    clock.lap("write")
    return written


def check_input_ct(path: str | os.PathLike, image_hu: np.ndarray | None, segmenter: SegmentationModel) -> None:
    """Refuse a CT with an input anomaly that is an error; log the warnings, with what is done.

    The checks are :func:`utils.data.nifti_checks.find_ct_anomalies`, those of ``check_data``
    and the preprocessing; for a 3D model the CT is also compared with one sliding window at the
    preprocessing's voxel size (a smaller CT is padded: a warning).

    Raises:
        ValueError: NaN/inf voxels, a zero, negative or NaN voxel size in any header field, a
            volume of a few voxels, or a file that is not a usable 3D NIfTI; the message names
            the file, each problem's code and the reason.
    """
    path = Path(path)
    window = None
    if spatial_dims(segmenter.config.model) == 3:
        window = (tuple(segmenter.config.sliding_window.roi_size), tuple(segmenter.preprocessing.target_spacing))
    anomalies = find_ct_anomalies(path, image_hu, window=window)
    for warning in anomalies.warnings:
        logger.warning("%s", warning.describe())
    if anomalies.errors:
        reasons = "; ".join(f"{p.code}: {p.message}" for p in anomalies.errors)
        raise ValueError(f"{path}: cannot be segmented: {reasons}")
