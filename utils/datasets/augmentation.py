"""Training augmentation of one patch (3D) or slice (2D), drawn fresh for every sample.

Everything random is drawn from the ``numpy.random.Generator`` the caller passes (the datasets
derive one per sample from ``(seed, epoch, index)``), so a sample is a pure function of those
numbers: reproducible, independent of the number of loader workers, and never cached.

Speed comes from order, not from skipping augmentation:

* the spatial draw comes first and says how large a region around the patch centre must be
  read (:attr:`SpatialDraw.region_size`: the patch itself when no spatial transform fires);
* rotation, isotropic scaling, a smooth random (elastic) deformation and mirroring are combined
  into one sampling grid, built in physical units (so rotations respect anisotropic voxels),
  and applied once with ``torch.nn.functional.grid_sample`` (image linear, labels nearest).
  The elastic field is drawn on a coarse grid of control points and interpolated, which costs
  little, unlike smoothing a full-resolution noise field;
* without a spatial transform, mirroring is a flip of the patch;
* intensity: Gaussian noise (torch), then MONAI's ``RandScaleIntensity``,
  ``RandShiftIntensity`` and ``RandAdjustContrast`` (gamma), each seeded from the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import RandAdjustContrast, RandScaleIntensity, RandShiftIntensity

from utils.config.data import AugmentationConfig


@dataclass(frozen=True)
class SpatialDraw:
    """The spatial part of one sample's augmentation.

    Attributes:
        patch_size: output size. region_size: size of the region to read, centred like the patch.
        matrix: ``(D, D)`` map from output voxel offsets (from the patch centre) to input voxel
            offsets, ``None`` when only flips fire (then ``region_size == patch_size``).
        displacement: ``(D, *control_points)`` float32 input-voxel offsets of the elastic field at
            its coarse control points (interpolated to ``patch_size`` when applied, on the
            image's device; see :meth:`displacement_field`), or ``None``.
        flips: spatial axes mirrored.
        shift: ``(D,)`` input-voxel translation that makes a mirrored even-sized axis map
            ``i -> size - 1 - i``, exactly like a flip of the patch.
    """

    patch_size: tuple[int, ...]
    region_size: tuple[int, ...]
    matrix: np.ndarray | None
    displacement: torch.Tensor | None
    flips: tuple[int, ...]
    shift: np.ndarray | None = None

    def displacement_field(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The elastic field ``(D, *patch_size)`` in input voxels on ``device`` (``None`` without one)."""
        if self.displacement is None:
            return None
        mode = "trilinear" if len(self.patch_size) == 3 else "bilinear"
        return F.interpolate(self.displacement.to(device)[None], size=self.patch_size, mode=mode,
                             align_corners=True)[0]


class SampleAugmenter:
    """Applies an :class:`AugmentationConfig` to 3D patches or 2D slices.

    Args:
        config: the augmentation settings.
        spatial_dims: 3 for ``(C, Z, Y, X)`` patches, 2 for ``(C, Y, X)`` slices (in-plane
            settings only: the first rotation angle, flip axes 1 and 2).
    """

    def __init__(self, config: AugmentationConfig, spatial_dims: int):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.config = config
        self.spatial_dims = spatial_dims
        self._flip_axes = config.flip_axes if spatial_dims == 3 else tuple(a - 1 for a in config.flip_axes if a > 0)
        self._scale = RandScaleIntensity(factors=config.intensity_scale, prob=1.0)
        self._shift = RandShiftIntensity(offsets=config.intensity_shift, prob=1.0)
        self._gamma = RandAdjustContrast(prob=1.0, gamma=config.gamma_range)

    def draw_spatial(self, rng: np.random.Generator, patch_size: tuple[int, ...],
                     spacing: tuple[float, ...]) -> SpatialDraw:
        """Decide this sample's spatial transforms and the region they read.

        Args:
            patch_size: output size per spatial axis. spacing: voxel size in mm per axis.
        """
        config, dims = self.config, self.spatial_dims
        matrix = None
        if rng.random() < config.affine_prob:
            degrees = config.rotate_degrees if dims == 3 else config.rotate_degrees[:1]
            radians = [math.radians(rng.uniform(-d, d)) for d in degrees]
            zoom = float(np.exp(rng.uniform(np.log(config.scale_range[0]), np.log(config.scale_range[1]))))
            scale = np.asarray(spacing, dtype=float)
            matrix = np.diag(1 / scale) @ (_rotation(radians) / zoom) @ np.diag(scale)
        displacement = None
        if rng.random() < config.elastic_prob:
            displacement = _elastic_field(rng, patch_size, spacing, config)
        flips = tuple(axis for axis in self._flip_axes if rng.random() < config.flip_prob)
        if matrix is None and displacement is None:
            return SpatialDraw(tuple(patch_size), tuple(patch_size), None, None, flips)
        matrix = np.eye(dims) if matrix is None else matrix
        shift = np.zeros(dims)
        for axis in flips:  # offset o -> -o - 1 on even sizes (mirror about the patch's middle)
            shift -= matrix[:, axis] * (1 - patch_size[axis] % 2)
            matrix[:, axis] *= -1
        half = np.abs(matrix) @ (np.asarray(patch_size, dtype=float) / 2) + np.abs(shift)
        if displacement is not None:  # the interpolated field never exceeds its control points
            half += displacement.abs().amax(dim=tuple(range(1, dims + 1))).numpy()
        region = tuple(int(2 * math.ceil(h) + 4) for h in half)
        return SpatialDraw(tuple(patch_size), region, matrix, displacement, flips, shift)

    def apply(self, image: torch.Tensor, label: torch.Tensor, draw: SpatialDraw,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one sample.

        Args:
            image: ``(1, *draw.region_size)`` float32, read centred on the patch centre as
                :func:`utils.datasets.patches.read_region` does (centre at index ``size // 2``).
            label: same shape (any numeric dtype).
            draw: from :meth:`draw_spatial`. rng: the sample's generator (intensity draws).

        ``image`` and ``label`` may be on any device (the loader workers' CPU, or the GPU with
        ``performance.augment_on_device``); the work and the result stay there. The same draws
        give the same sample on either, up to floating-point rounding.

        Returns:
            ``(1, *draw.patch_size)`` float32 image and uint8 label.
        """
        if draw.matrix is None:
            dims = tuple(axis + 1 for axis in draw.flips)
            image = torch.flip(image, dims) if dims else image
            label = torch.flip(label, dims) if dims else label
        elif _is_slice_separable(draw):
            image, label = _resample_slice_wise(image, label, draw)
        else:
            grid = sampling_grid(draw, image.device)
            image = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="border",
                                  align_corners=False)[0]
            label = F.grid_sample(label[None].float(), grid, mode="nearest", padding_mode="border",
                                  align_corners=False)[0].round()
        return self._intensity(image.float(), rng).contiguous(), label.to(torch.uint8).contiguous()

    def _intensity(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        config = self.config
        if rng.random() < config.noise_prob:
            generator = torch.Generator(image.device).manual_seed(int(rng.integers(2 ** 63)))
            image = image + config.noise_std * torch.randn(image.shape, generator=generator, device=image.device)
        for transform, prob in ((self._scale, config.intensity_scale_prob), (self._shift, config.intensity_shift_prob),
                                (self._gamma, config.gamma_prob)):
            if rng.random() < prob:
                transform.set_random_state(seed=int(rng.integers(2 ** 31)))
                image = transform(image)
        # plain tensor, not MONAI's MetaTensor
        return torch.as_tensor(image, dtype=torch.float32).as_subclass(torch.Tensor)


def sampling_grid(draw: SpatialDraw, device: torch.device | str = "cpu") -> torch.Tensor:
    """``grid_sample`` grid ``(1, *patch_size, D)`` mapping each output voxel into the region.

    Output voxel ``i`` has offset ``i - patch // 2`` from the patch centre; it samples the input
    at ``region // 2 + shift + matrix @ offset + displacement`` (voxels), converted to ``grid_sample``'s
    normalised coordinates (``align_corners=False``), last dimension in ``(x, y[, z])`` order.
    The affine part is summed from 1D terms, so building the grid costs a few passes over it.
    """
    dims = len(draw.patch_size)
    grid = torch.empty((1, *draw.patch_size, dims), dtype=torch.float32, device=device)
    field = draw.displacement_field(device)
    for k in range(dims):
        size = draw.region_size[k]
        # normalised = (2 * voxel + 1) / size - 1, folded into the linear coefficients
        shift = 0.0 if draw.shift is None else float(draw.shift[k])
        total = torch.tensor((2 * (size // 2 + shift) + 1) / size - 1, dtype=torch.float32, device=device)
        for j, n in enumerate(draw.patch_size):
            offsets = torch.arange(n, dtype=torch.float32, device=device) - n // 2
            term = (2 * float(draw.matrix[k, j]) / size) * offsets
            total = total + term.view([-1 if a == j else 1 for a in range(dims)])
        if field is not None:
            total = total + field[k] * (2 / size)
        grid[..., dims - 1 - k] = total
    return grid


def _is_slice_separable(draw: SpatialDraw) -> bool:
    """Whether a 3D transform keeps axial slices axial (in-plane rotation, no elastic field)."""
    m = draw.matrix
    return (len(draw.patch_size) == 3 and draw.displacement is None
            and m[0, 1] == 0 and m[0, 2] == 0 and m[1, 0] == 0 and m[2, 0] == 0)


def _resample_slice_wise(image: torch.Tensor, label: torch.Tensor,
                         draw: SpatialDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as the 3D ``grid_sample`` for a slice-separable transform, at a fraction of the cost.

    Trilinear interpolation is separable: interpolate linearly between slices first (each output
    slice has one source position), then apply one in-plane grid to all slices at once, with the
    slices as channels of a 2D ``grid_sample``. Labels take the nearest slice, then the nearest pixel.
    """
    depth, region_depth = draw.patch_size[0], draw.region_size[0]
    shift = 0.0 if draw.shift is None else float(draw.shift[0])
    offsets = torch.arange(depth, device=image.device) - depth // 2
    source = region_depth // 2 + shift + float(draw.matrix[0, 0]) * offsets.float()
    source = source.clamp(0, region_depth - 1)  # as grid_sample's border padding
    lower = source.floor().long()
    upper = (lower + 1).clamp(max=region_depth - 1)
    weight = (source - lower.float()).view(-1, 1, 1)
    between = image[0, lower].float() * (1 - weight) + image[0, upper].float() * weight
    nearest = label[0, source.round().long()].float()
    plane = SpatialDraw(draw.patch_size[1:], draw.region_size[1:], draw.matrix[1:, 1:], None, (),
                        None if draw.shift is None else draw.shift[1:])
    grid = sampling_grid(plane, image.device)
    image = F.grid_sample(between[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    label = F.grid_sample(nearest[None], grid, mode="nearest", padding_mode="border", align_corners=False)
    return image, label.round()


def _rotation(radians: list[float]) -> np.ndarray:
    """Rotation matrix: 2D by one angle; 3D about axis 0 (in-plane), then axis 1, then axis 2."""
    if len(radians) == 1:
        c, s = math.cos(radians[0]), math.sin(radians[0])
        return np.array([[c, -s], [s, c]])
    a, b, c = radians
    about_0 = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    about_1 = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    about_2 = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return about_0 @ about_1 @ about_2


def _elastic_field(rng: np.random.Generator, patch_size: tuple[int, ...], spacing: tuple[float, ...],
                   config: AugmentationConfig) -> torch.Tensor:
    """A smooth random displacement at coarse control points ``(D, *control_points)``, in input voxels."""
    control_mm = rng.uniform(*config.elastic_spacing_mm)
    magnitude_mm = rng.uniform(*config.elastic_magnitude_mm)
    coarse = [max(2, int(math.ceil(n * s / control_mm)) + 1) for n, s in zip(patch_size, spacing, strict=False)]
    noise = rng.standard_normal((len(patch_size), *coarse)).astype(np.float32)
    noise *= (magnitude_mm / np.asarray(spacing, dtype=np.float32)).reshape(-1, *[1] * len(patch_size))
    return torch.from_numpy(noise)
