"""The data sections every config shares: synthetic data, preprocessing, split, augmentation, datasets.

Each section is a frozen dataclass validated on construction (see :mod:`utils.config.loading`
for how YAML becomes these objects).
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.config.loading import check_choice, check_positive


@dataclass(frozen=True)
class SyntheticDataConfig:
    """The built-in synthetic dataset (see :mod:`utils.synthetic.dataset`).

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
    """How raw cases become the preprocessing cache (see :mod:`utils.preprocessing.preprocess`).

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
    """The case-level split shared by every model (see :mod:`utils.data.splits`).

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
    """Random augmentation drawn fresh for every training sample (see :mod:`utils.datasets.augmentation`).

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
            raise ValueError(f"elastic_spacing_mm must be [min, max] with 0 < min <= max, "
                             f"got {self.elastic_spacing_mm}")
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
    """3D training patches drawn from the cache (see :mod:`utils.datasets.patches`).

    Attributes:
        patch_size: ``[Z, Y, X]`` voxels, slice axis first.
        tumour_share, kidney_share, anywhere_share: shares of patches centred on a tumour voxel,
            on a kidney voxel, and anywhere. A case without the drawn class falls back to the
            other class (tumour to kidney, kidney to tumour), then to anywhere.
        cyst_share: share of patches centred on a cyst voxel (label 3; KiTS23 only, default 0).
            A case without cyst falls back as a tumour-free case does for ``tumour_share``: to
            kidney, then anywhere. The four shares add up to 1.
        samples_per_epoch: patches per epoch (an epoch is a number of samples, not a pass over cases).
    """

    patch_size: tuple[int, int, int] = (80, 160, 160)
    tumour_share: float = 0.33
    kidney_share: float = 0.33
    anywhere_share: float = 0.34
    samples_per_epoch: int = 500
    cyst_share: float = 0.0

    def __post_init__(self) -> None:
        check_positive("patch_size", self.patch_size)
        check_positive("samples_per_epoch", self.samples_per_epoch)
        _check_shares({"tumour_share": self.tumour_share, "kidney_share": self.kidney_share,
                       "cyst_share": self.cyst_share, "anywhere_share": self.anywhere_share})



@dataclass(frozen=True)
class SliceDatasetConfig:
    """2D axial slices for the UNETR, drawn from the same cache (see :mod:`utils.datasets.slices`).

    Attributes:
        image_size: output slices are ``image_size`` x ``image_size``.
        fit: ``"resize"`` scales each slice so its longer side is ``image_size`` (aspect ratio
            kept) and pads the shorter; ``"pad"`` keeps the cache's pixel size and pads (or
            centre-crops a larger slice).
        tumour_share, kidney_share, background_share: shares of sampled slices containing
            tumour, kidney without tumour, and neither.
        cyst_share: share of sampled slices containing cyst (label 3, whatever else they hold;
            KiTS23 only, default 0). The four shares add up to 1; a class with no slice in the
            training cases is never drawn (its share goes to the others).
        samples_per_epoch: slices per epoch.
    """

    image_size: int = 512
    fit: str = "resize"
    tumour_share: float = 0.4
    kidney_share: float = 0.4
    background_share: float = 0.2
    samples_per_epoch: int = 2000
    cyst_share: float = 0.0

    def __post_init__(self) -> None:
        check_positive("image_size", self.image_size)
        check_positive("samples_per_epoch", self.samples_per_epoch)
        check_choice("fit", self.fit, ("resize", "pad"))
        _check_shares({"tumour_share": self.tumour_share, "kidney_share": self.kidney_share,
                       "cyst_share": self.cyst_share, "background_share": self.background_share})

