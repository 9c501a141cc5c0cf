"""Settings from YAML, validated into typed, frozen dataclasses.

A config file is read with ``yaml.safe_load`` and turned into the dataclass tree below; an
unknown key, a missing required key or a value of the wrong type is an error that names the
file, the key and what is allowed. Command-line overrides use ``--set section.key=value``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class SyntheticDataConfig:
    """The built-in synthetic dataset (see :mod:`utils.synthetic_dataset`).

    Attributes:
        out_dir: folder the cases are written to (KiTS19 layout).
        cases: number of procedural cases.
        seed: master seed of the generator.
        matrix: in-plane size in voxels (512 as in KiTS19).
        spacing: fixed ``[z, y, x]`` voxel size in mm, or null to draw KiTS19-like spacings.
        workers: parallel processes.
    """

    out_dir: str = "data/synthetic"
    cases: int = 6
    seed: int = 0
    matrix: int = 512
    spacing: tuple[float, float, float] | None = None
    workers: int = 1


@dataclass(frozen=True)
class PreprocessingConfig:
    """How raw cases become the preprocessing cache (see :mod:`utils.preprocessing`).

    Attributes:
        cache_dir: root folder of caches; each set of parameters gets its own sub-folder.
        target_spacing: ``[z, y, x]`` voxel size in mm after resampling (nnU-Net's KiTS19 plan).
        image_dtype: ``"float16"`` (half the disk and memory) or ``"float32"``.
        antialias: Gaussian pre-filter along every axis that is downsampled, so thin slices are
            averaged rather than skipped by the linear interpolation.
        crop_to_body: crop to the body (largest connected region above ``body_threshold_hu``),
            always keeping every labelled voxel.
        body_threshold_hu: HU above which a voxel counts as body for the crop.
        clip_percentiles: foreground HU percentiles the image is clipped to before z-scoring.
    """

    cache_dir: str = "data/cache"
    target_spacing: tuple[float, float, float] = (3.22, 1.62, 1.62)
    image_dtype: str = "float16"
    antialias: bool = True
    crop_to_body: bool = True
    body_threshold_hu: float = -500.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        check_positive("target_spacing", self.target_spacing)
        check_choice("image_dtype", self.image_dtype, ("float16", "float32"))
        low, high = self.clip_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}")


@dataclass(frozen=True)
class SplitConfig:
    """The case-level split shared by every model (see :mod:`utils.data_splits`).

    Attributes:
        scheme: ``"holdout"`` (one train/validation split) or ``"kfold"``.
        validation_fraction: share of cases in validation for ``"holdout"``.
        folds: number of folds for ``"kfold"``.
        seed: the split's own seed, independent of any training seed.
    """

    scheme: str = "holdout"
    validation_fraction: float = 0.2
    folds: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("scheme", self.scheme, ("holdout", "kfold"))
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be > 0 and < 1, got {self.validation_fraction}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")


@dataclass(frozen=True)
class AugmentationConfig:
    """Random augmentation drawn fresh for every training sample (see :mod:`utils.augmentation`).

    Spatial transforms act on the patch (or slice) with a margin read around it, so rotating
    never brings in padding; rotation, scaling, elastic deformation and flips are combined into
    one resampling per sample. Probabilities are per
    sample; ranges are symmetric (``x`` means ``[-x, x]``) unless given as two values.

    Attributes:
        flip_axes: spatial axes that may be mirrored, each with ``flip_prob`` (3D: 0 = slice
            axis, 1 = rows, 2 = columns; 2D slices use the in-plane axes only).
        affine_prob: chance of a rotation and scaling.
        rotate_degrees: ``[about slice axis (in-plane), about rows, about columns]``; 2D uses the first.
        scale_range: ``[min, max]`` zoom factor (> 1 enlarges).
        elastic_prob: chance of a smooth random (elastic) deformation.
        elastic_spacing_mm: range of the distance between the deformation's random control
            points (larger is smoother).
        elastic_magnitude_mm: range of the standard deviation of the control points' displacement.
        noise_prob, noise_std: Gaussian noise, std in normalised units.
        intensity_scale_prob, intensity_scale: multiply by ``1 + U(-s, s)``.
        intensity_shift_prob, intensity_shift: add ``U(-s, s)``.
        gamma_prob, gamma_range: contrast (gamma) adjustment.
    """

    flip_axes: tuple[int, ...] = (0, 1, 2)
    flip_prob: float = 0.5
    affine_prob: float = 0.3
    rotate_degrees: tuple[float, float, float] = (15.0, 0.0, 0.0)
    scale_range: tuple[float, float] = (0.85, 1.25)
    elastic_prob: float = 0.1
    elastic_spacing_mm: tuple[float, float] = (40.0, 80.0)
    elastic_magnitude_mm: tuple[float, float] = (2.0, 6.0)
    noise_prob: float = 0.1
    noise_std: float = 0.1
    intensity_scale_prob: float = 0.15
    intensity_scale: float = 0.25
    intensity_shift_prob: float = 0.15
    intensity_shift: float = 0.1
    gamma_prob: float = 0.15
    gamma_range: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self) -> None:
        for name in ("flip_prob", "affine_prob", "elastic_prob", "noise_prob", "intensity_scale_prob",
                     "intensity_shift_prob", "gamma_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if any(axis not in (0, 1, 2) for axis in self.flip_axes):
            raise ValueError(f"flip_axes must hold axes 0, 1 or 2, got {self.flip_axes}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be [min, max] with 0 < min <= max, got {self.scale_range}")
        if not 0 < self.elastic_spacing_mm[0] <= self.elastic_spacing_mm[1]:
            raise ValueError(f"elastic_spacing_mm must be [min, max] with 0 < min <= max, got {self.elastic_spacing_mm}")
        if not 0 <= self.elastic_magnitude_mm[0] <= self.elastic_magnitude_mm[1]:
            raise ValueError(f"elastic_magnitude_mm must be [min, max] with 0 <= min <= max, "
                             f"got {self.elastic_magnitude_mm}")
        if not all(0 <= d < 90 for d in self.rotate_degrees):
            raise ValueError(f"rotate_degrees must be >= 0 and < 90, got {self.rotate_degrees}")


def _check_shares(shares: dict[str, float]) -> None:
    if any(v < 0 for v in shares.values()) or abs(sum(shares.values()) - 1) > 1e-6:
        raise ValueError(f"{', '.join(shares)} must be >= 0 and add up to 1, got {tuple(shares.values())}")


@dataclass(frozen=True)
class PatchDatasetConfig:
    """3D training patches drawn from the cache (see :mod:`utils.patch_dataset`).

    Attributes:
        patch_size: ``[Z, Y, X]`` voxels, slice axis first.
        tumour_share, kidney_share, anywhere_share: shares of patches centred on a tumour voxel,
            on a kidney voxel, and anywhere; they add up to 1. A case without the drawn class
            falls back to the other class, then to anywhere.
        samples_per_epoch: patches per epoch (an epoch is a number of samples, not a pass over cases).
    """

    patch_size: tuple[int, int, int] = (80, 160, 160)
    tumour_share: float = 0.33
    kidney_share: float = 0.33
    anywhere_share: float = 0.34
    samples_per_epoch: int = 500

    def __post_init__(self) -> None:
        check_positive("patch_size", self.patch_size)
        check_positive("samples_per_epoch", self.samples_per_epoch)
        _check_shares({"tumour_share": self.tumour_share, "kidney_share": self.kidney_share,
                       "anywhere_share": self.anywhere_share})


@dataclass(frozen=True)
class SliceDatasetConfig:
    """2D axial slices for the UNETR, drawn from the same cache (see :mod:`utils.slice_dataset`).

    Attributes:
        image_size: output slices are ``image_size`` x ``image_size``.
        fit: ``"resize"`` scales each slice so its longer side is ``image_size`` (aspect ratio
            kept) and pads the shorter; ``"pad"`` keeps the cache's pixel size and pads (or
            centre-crops a larger slice).
        tumour_share, kidney_share, background_share: shares of sampled slices containing
            tumour, kidney without tumour, and neither; they add up to 1.
        samples_per_epoch: slices per epoch.
    """

    image_size: int = 512
    fit: str = "resize"
    tumour_share: float = 0.4
    kidney_share: float = 0.4
    background_share: float = 0.2
    samples_per_epoch: int = 2000

    def __post_init__(self) -> None:
        check_positive("image_size", self.image_size)
        check_positive("samples_per_epoch", self.samples_per_epoch)
        check_choice("fit", self.fit, ("resize", "pad"))
        _check_shares({"tumour_share": self.tumour_share, "kidney_share": self.kidney_share,
                       "background_share": self.background_share})


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the end-to-end demo (``make demo``).

    Attributes:
        train_configs: experiment files of the models the demo trains on its synthetic cases,
            one after the other (empty: no training); ``train_overrides``: ``section.key=value``
            changes applied to each.
        bootstrap_resamples: resamples of the comparison report's confidence intervals.
        readme: a README whose demo results block (see :mod:`utils.demo_results`) the demo
            rewrites with its own figures (``None``: leave every README alone).
    """

    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    patches: PatchDatasetConfig = field(default_factory=PatchDatasetConfig)
    slices: SliceDatasetConfig = field(default_factory=SliceDatasetConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    seed: int = 0
    reports_dir: str = "reports/demo"
    train_configs: tuple[str, ...] = ("configs/resunet3d_quick.yaml", "configs/unetr2d_quick.yaml")
    train_overrides: tuple[str, ...] = ()
    bootstrap_resamples: int = 10000
    readme: str | None = None


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert one YAML value against a type annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        return _convert(value, inner[0], where)
    if dataclasses.is_dataclass(annotation):
        return build_config(annotation, value, where)
    if origin is tuple and typing.get_args(annotation)[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(annotation)[0]
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and not (isinstance(value, annotation) and not
                                               (annotation is int and isinstance(value, bool))):
        raise ValueError(f"{where} must be of type {annotation.__name__}, got {value!r}")
    return value


def build_config(cls: type, mapping: Any, where: str = "config") -> Any:
    """Build the frozen dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(mapping[name], hints[name], f"{where}.{name}") for name in mapping}
    try:
        return cls(**values)
    except ValueError as error:  # a __post_init__ rule
        raise ValueError(f"{where}: {error}") from None


def check_choice(name: str, value: Any, choices: typing.Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the setting, the allowed values and the value received."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive(name: str, values: Any) -> None:
    """Raise ``ValueError`` unless every value (a number or a sequence of numbers) is > 0."""
    seq = values if isinstance(values, (tuple, list)) else (values,)
    if not all(v > 0 for v in seq):
        raise ValueError(f"{name} must be > 0, got {values!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into a key path and a value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override must look like section.key=value, got {text!r}")
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | os.PathLike, cls: type = DemoConfig, overrides: typing.Sequence[str] = ()) -> Any:
    """Read a YAML config file into the dataclass ``cls``, after applying ``--set`` overrides.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid YAML, unknown keys or wrong types (the message names the file).
    """
    mapping = _read_with_overrides(Path(path), overrides)
    try:
        return build_config(cls, mapping, where=str(path))
    except ValueError as error:
        raise ValueError(str(error)) from None


def load_config_sections(path: str | os.PathLike, sections: Mapping[str, type],
                         overrides: typing.Sequence[str] = ()) -> dict[str, Any]:
    """Read only some top-level sections of a config file, each into its dataclass.

    Lets a tool that needs, say, ``preprocessing`` and ``split`` read them from any config file
    (the demo's or a model's); an absent section takes its defaults, other sections are ignored.
    """
    mapping = _read_with_overrides(Path(path), overrides)
    return {name: build_config(cls, mapping.get(name), where=f"{path}: {name}") for name, cls in sections.items()}


def _read_with_overrides(path: Path, overrides: typing.Sequence[str]) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        mapping = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    for override in overrides:
        keys, value = parse_override(override)
        target = mapping
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {override!r}: {key} is not a section")
        target[keys[-1]] = value
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(mapping).__name__}")
    return mapping


def config_as_dict(config: Any) -> dict:
    """The resolved config as plain Python data (for saving beside outputs and for wandb)."""
    return dataclasses.asdict(config)
