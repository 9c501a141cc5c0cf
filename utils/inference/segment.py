"""Segment a new CT with a trained model: raw HU volume in, labels on the CT's own grid out.

:func:`load_segmentation_model` rebuilds the network from a checkpoint alone (its experiment
config, preprocessing parameters and normalisation travel inside it). :func:`segment_ct` then
runs the training preprocessing (:func:`utils.preprocessing.preprocess.preprocess_volume`), predicts on
the preprocessed grid (sliding windows for 3D models, every axial slice for 2D ones, see
:func:`utils.inference.predict.predict_volume_logits`), takes the argmax and maps it back with
:func:`utils.preprocessing.resampling.restore_labels`: uint8 labels of the input's exact shape, for the
input's affine. :func:`segment_file` does the same from one NIfTI file to another.

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

import itertools
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from utils.config.data import PreprocessingConfig
from utils.config.experiment import ExperimentConfig
from utils.config.loading import build_config
from utils.data.nifti_checks import find_ct_anomalies, not_a_file_reason
from utils.data.nifti_io import load_nifti_verified, read_voxels, save_nifti
from utils.data.output_guard import OWN_NIFTI_DESCRIPTION
from utils.inference.postprocessing import DEFAULT_MIN_COMPONENT_ML, postprocess_labels
from utils.inference.predict import predict_volume_logits
from utils.networks.checkpoints import load_checkpoint
from utils.networks.models import build_model, model_input_size, spatial_dims
from utils.preprocessing.preprocess import Normalisation, preprocess_volume
from utils.preprocessing.resampling import restore_labels

logger = logging.getLogger(__name__)

#: Files looked for, in order, when a run folder is given instead of a checkpoint file.
CHECKPOINT_NAMES = ("best.pt", "last.pt")
_REQUIRED_KEYS = ("model", "config", "preprocessing_plan")
#: Stitch on the GPU only while the logit buffers take at most this share of free GPU memory.
_GPU_STITCH_SHARE = 0.5


@dataclass(frozen=True)
class SegmentationModel:
    """A trained model ready to segment, with everything its checkpoint says about its input.

    Attributes:
        model: the network, in ``eval()`` mode, gradients off, on ``device``.
        config: the experiment it was trained with (model, sliding window, slices).
        preprocessing: the preprocessing parameters of its training cache.
        normalisation: the HU clip window and z-score of its training cache.
        run_name: the run folder's name (or the checkpoint file's stem).
        checkpoint: the checkpoint file read.
        device: where the model runs.
        training_case_ids: the cases of its training cache (train and validation), from which
            ``config.split`` makes its split.
    """

    model: torch.nn.Module
    config: ExperimentConfig
    preprocessing: PreprocessingConfig
    normalisation: Normalisation
    run_name: str
    checkpoint: Path
    device: torch.device
    training_case_ids: tuple[str, ...] = ()

    @property
    def background_value(self) -> float:
        """Normalised value of air (the lower clip bound after z-scoring), used for padding."""
        return self.normalisation.background_value


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


def load_segmentation_model(checkpoint: str | os.PathLike,
                            device: str | torch.device | None = "cpu") -> SegmentationModel:
    """Rebuild a trained model from its checkpoint alone, frozen and in ``eval()`` mode.

    Args:
        checkpoint: a run folder (``best.pt`` is used, else ``last.pt``) or a ``.pt`` file
            written by the training engine.
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), or ``None`` for CUDA when available.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: CUDA asked for but absent, or the file is not a training checkpoint (keys,
            config or weights do not match; the message names the file).
        utils.networks.checkpoints.CheckpointError: the file is truncated or corrupt.
    """
    device = select_device(device)
    path = find_checkpoint(checkpoint)
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
    logger.info("loaded %s (%s, run %s) on %s", path, config.model.name, run_name, device)
    return SegmentationModel(model, config, preprocessing, normalisation, run_name, path, device,
                             tuple(str(case) for case in plan.get("case_ids", ())))


def flip_axes_for_tta(dims: int) -> list[tuple[int, ...]]:
    """Axes of a ``(B, C, Z, Y, X)`` tensor flipped by each mirroring pass, the identity ``()`` first.

    Args:
        dims: 3 (all 8 combinations of Z, Y, X) or 2 (the 4 in-plane combinations of Y, X: a 2D
            model sees one axial slice, so flipping Z would change nothing).
    """
    axes = (2, 3, 4) if dims == 3 else (3, 4)
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


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


def predict_preprocessed_labels(segmenter: SegmentationModel, image: np.ndarray, *, tta: bool = False) -> np.ndarray:
    """Labels of a preprocessed volume: argmax of the logits, or of the mean softmax over mirrorings.

    On CUDA the model runs under bfloat16 autocast (float16 where bfloat16 is unsupported).

    Args:
        segmenter: from :func:`load_segmentation_model`.
        image: ``(Z, Y, X)`` float16/float32, canonical, normalised (from ``preprocess_volume``).
        tta: average the softmax over the mirrorings of :func:`flip_axes_for_tta` (8 passes for
            3D models, 4 for 2D ones), each prediction flipped back before averaging.

    Returns:
        ``(Z, Y, X)`` uint8 labels (0 background, 1 kidney, 2 tumour) on the CPU.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or not np.issubdtype(image.dtype, np.floating):
        description = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a (Z, Y, X) float numpy array, got {description}")
    device, config = segmenter.device, segmenter.config
    autocast = None
    if device.type == "cuda":
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    flips = flip_axes_for_tta(spatial_dims(config.model)) if tta else [()]
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device=device, dtype=torch.float32)[None, None]
    stitch = _stitch_device(device, image.size, config.model.out_channels, len(flips))
    total: torch.Tensor | None = None
    try:
        for axes in flips:
            logits = predict_volume_logits(segmenter.model, tensor.flip(axes) if axes else tensor, config,
                                           autocast_dtype=autocast, pad_value=segmenter.background_value,
                                           stitch_device=stitch)
            if axes:
                logits = logits.flip(axes)
            if len(flips) == 1:
                total = logits
                break
            total = _softmax_(logits) if total is None else total.add_(_softmax_(logits))
            del logits
        assert total is not None
        return total[0].argmax(dim=0).to(device="cpu", dtype=torch.uint8).numpy()
    finally:
        del tensor, total
        if device.type == "cuda":
            torch.cuda.empty_cache()


def segment_ct(image_hu: np.ndarray, affine: np.ndarray, segmenter: SegmentationModel, *, tta: bool = False,
               postprocess: bool = False, min_component_ml: float = DEFAULT_MIN_COMPONENT_ML,
               overwrite_input: bool = False, timings: dict[str, float] | None = None) -> np.ndarray:
    """Segment one CT: training preprocessing, prediction, labels back on the CT's own grid.

    Args:
        image_hu: ``(I, J, K)`` CT in Hounsfield units, in the file's axis order (any real dtype;
            converted to float32, never float64).
        affine: the file's ``(4, 4)`` voxel-to-world matrix (any orientation; mm).
        segmenter: from :func:`load_segmentation_model`.
        tta: mirroring test-time augmentation (see :func:`predict_preprocessed_labels`).
        postprocess: apply :func:`utils.inference.postprocessing.postprocess_labels` on the preprocessed
            grid (its spacing converts ``min_component_ml`` to voxels).
        min_component_ml: smallest kidney component kept by the post-processing, in ml.
        overwrite_input: let the preprocessing use ``image_hu`` as scratch space when it is
            float32 (saves a copy of a long CT; ``image_hu`` is then garbage).
        timings: when given, receives the seconds of each stage (``preprocess``, ``predict``,
            ``restore``; post-processing counts in ``restore``).

    Returns:
        ``(I, J, K)`` uint8 labels (0 background, 1 kidney, 2 tumour), to be saved with ``affine``.

    Raises:
        ValueError: ``image_hu`` is not 3D or ``affine`` is not a finite, invertible 4 x 4 matrix.
    """
    if not isinstance(image_hu, np.ndarray) or image_hu.ndim != 3 or min(image_hu.shape) < 1:
        description = image_hu.shape if isinstance(image_hu, np.ndarray) else type(image_hu).__name__
        raise ValueError(f"image_hu must be a non-empty 3D array (I, J, K), got {description}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"affine must be a finite, invertible 4 x 4 matrix, got {affine.tolist()}")
    clock = _StageClock(timings)
    image = np.asarray(image_hu, dtype=np.float32)
    scratch = overwrite_input or image is not image_hu
    on_gpu = segmenter.device if segmenter.device.type == "cuda" else None  # resampling too, on a GPU
    preprocessed, _, mapping = preprocess_volume(image, None, affine, segmenter.preprocessing,
                                                 segmenter.normalisation, overwrite_input=scratch, device=on_gpu)
    del image
    clock.lap("preprocess")
    labels = predict_preprocessed_labels(segmenter, preprocessed, tta=tta)
    del preprocessed
    clock.lap("predict")
    if postprocess:
        labels = postprocess_labels(labels, mapping.resampled_spacing, min_component_ml=min_component_ml)
    restored = restore_labels(labels, mapping)
    clock.lap("restore")
    return restored


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
                 min_component_ml: float = DEFAULT_MIN_COMPONENT_ML, timings: dict[str, float] | None = None) -> Path:
    """Segment one NIfTI CT into a uint8 label NIfTI of the same shape and affine, written atomically.

    Args:
        input_path: ``.nii`` / ``.nii.gz`` CT in HU (only read; its gzip CRC and length are checked).
        output_path: ``.nii`` / ``.nii.gz`` destination, not the input; its folder is created.
        segmenter, tta, postprocess, min_component_ml: as in :func:`segment_ct`.
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
                        min_component_ml=min_component_ml, overwrite_input=True, timings=timings)
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
