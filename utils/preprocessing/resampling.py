"""Voxel-grid geometry: reorient to one canonical orientation, resample, crop, and map back exactly.

Every preprocessed case carries a :class:`GridMapping` that records each step, so a prediction
made on the preprocessed grid can be put back onto the original CT: same shape, same affine,
same orientation. The steps, in order, and their inverses:

1. reorient (a transpose and flips, no interpolation) to :data:`CANONICAL_AXCODES`, the KiTS19
   convention (slice axis first), so KiTS19 data are not moved at all;
2. resample to the target spacing: image trilinear (with an optional Gaussian anti-aliasing
   pre-filter along downsampled axes), labels nearest. Both use the half-voxel ("voxel centres
   map to voxel centres of the same physical extent") convention, so resampling to the source
   spacing is the identity and the output size is ``round(n * source / target)``; the spacing
   actually achieved (``n * source / size``) is recorded;
3. crop to a box; undone by padding with background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from utils.data.kits_layout import KITS_AXCODES, spacing_from_affine

#: The orientation of every preprocessed array: KiTS19's (slice axis inferior, rows posterior,
#: columns to the patient's left).
CANONICAL_AXCODES: tuple[str, str, str] = tuple(KITS_AXCODES)

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class GridMapping:
    """Everything needed to map an array between a CT's original grid and the preprocessed one.

    Attributes:
        original_shape: array shape as stored in the NIfTI file.
        original_affine: the file's ``(4, 4)`` voxel-to-world matrix, as nested tuples.
        original_axcodes: nibabel axis codes of the file, e.g. ``("I", "P", "L")``.
        orientation: nibabel orientation transform (one ``(axis, flip)`` row per original axis)
            from the original to the canonical orientation.
        canonical_spacing: ``(z, y, x)`` voxel size in mm after reorientation.
        resampled_shape: shape after resampling (before the crop).
        resampled_spacing: voxel size in mm actually achieved by resampling.
        crop_box: ``((z0, z1), (y0, y1), (x0, x1))`` half-open box in the resampled grid.
    """

    original_shape: tuple[int, int, int]
    original_affine: tuple[tuple[float, ...], ...]
    original_axcodes: tuple[str, str, str]
    orientation: tuple[tuple[float, float], ...]
    canonical_spacing: tuple[float, float, float]
    resampled_shape: tuple[int, int, int]
    resampled_spacing: tuple[float, float, float]
    crop_box: Box

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """The original shape after reorientation (before resampling)."""
        shape = [0, 0, 0]
        for axis, (target, _) in enumerate(self.orientation):
            shape[int(target)] = self.original_shape[axis]
        return tuple(shape)

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        """Shape of the preprocessed arrays."""
        return tuple(stop - start for start, stop in self.crop_box)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists instead of tuples)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GridMapping":
        """Rebuild from :meth:`to_dict`'s output (e.g. read back from JSON)."""
        def tuples(value: Any) -> Any:
            return tuple(tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
        return cls(**{key: tuples(value) for key, value in data.items()})


def reorient_to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transpose and flip ``array`` into :data:`CANONICAL_AXCODES` (a view, no copy).

    Args:
        array: ``(I, J, K)`` voxels in the file's axis order.
        affine: the file's ``(4, 4)`` voxel-to-world matrix.

    Returns:
        The reoriented array and the ``(3, 2)`` nibabel orientation transform that made it.
    """
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt(CANONICAL_AXCODES))
    return nib.orientations.apply_orientation(array, transform), transform


def restore_orientation(array: np.ndarray, orientation: Sequence[Sequence[float]]) -> np.ndarray:
    """Undo :func:`reorient_to_canonical`: canonical array back to the file's axis order (a view)."""
    orientation = np.asarray(orientation, dtype=float)
    inverse = np.zeros_like(orientation)
    for axis, (target, flip) in enumerate(orientation):
        inverse[int(target)] = (axis, flip)
    return nib.orientations.apply_orientation(array, inverse)


def canonical_spacing(affine: np.ndarray, orientation: np.ndarray) -> tuple[float, float, float]:
    """Voxel size ``(z, y, x)`` in mm of the reoriented array."""
    spacing = [0.0, 0.0, 0.0]
    for axis, size in enumerate(spacing_from_affine(affine)):
        spacing[int(orientation[axis][0])] = float(size)
    return tuple(spacing)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Shape covering the same extent at the target spacing: ``max(1, round(n * s / t))`` per axis."""
    if len(shape) != len(spacing) or len(shape) != len(target):
        raise ValueError(f"shape, spacing and target must have the same length, got {shape}, {spacing}, {target}")
    if min(target) <= 0 or min(spacing) <= 0:
        raise ValueError(f"spacings must be > 0, got spacing {tuple(spacing)} and target {tuple(target)}")
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=False))


def resample_image(image: np.ndarray, shape: Sequence[int], *, antialias: bool = True,
                   overwrite_input: bool = False, device: torch.device | str | None = None) -> np.ndarray:
    """Resample a 3D image to ``shape`` with trilinear interpolation (half-voxel convention).

    Args:
        image: ``(Z, Y, X)`` float32 (other dtypes are converted).
        shape: output shape; an unchanged axis is left exactly as it is.
        antialias: before downsampling an axis by a factor ``f``, smooth it with a Gaussian of
            sigma ``(f - 1) / 2`` voxels, so the output averages the input rather than sampling it.
        overwrite_input: allow smoothing ``image`` in place (saves one copy of a large volume).
        device: ``None`` (default) filters with SciPy and interpolates with torch on the CPU, as
            the cache does; a torch device (a GPU at inference) does both there, with the same
            Gaussian kernel (truncated at 4 sigma, edges extended), equal to float32 rounding.

    Returns:
        ``shape`` float32 array.
    """
    shape = tuple(int(n) for n in shape)
    if image.ndim != 3 or len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"need a 3D image and a 3D shape of sizes >= 1, got {image.shape} -> {shape}")
    if tuple(image.shape) == shape:
        return np.asarray(image, dtype=np.float32) if overwrite_input else np.array(image, dtype=np.float32)
    factors = [n_in / n_out for n_in, n_out in zip(image.shape, shape, strict=False)]
    if device is not None:
        return _resample_on_device(image, shape, factors if antialias else [1.0, 1.0, 1.0], torch.device(device))
    work = image
    if antialias and any(f > 1 for f in factors):
        if not (overwrite_input and image.dtype == np.float32 and image.flags.writeable):
            work = np.array(image, dtype=np.float32)
        for axis, factor in enumerate(factors):
            if factor > 1:
                ndimage.gaussian_filter1d(work, sigma=(factor - 1) / 2, axis=axis, output=work, mode="nearest")
    tensor = torch.from_numpy(np.ascontiguousarray(work, dtype=np.float32))[None, None]
    with torch.no_grad():
        out = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def _resample_on_device(image: np.ndarray, shape: tuple[int, ...], factors: Sequence[float],
                        device: torch.device) -> np.ndarray:
    """:func:`resample_image` computed on ``device``: separable Gaussian, then trilinear interpolation."""
    with torch.no_grad():
        work = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(device)[None, None]
        for axis, factor in enumerate(factors):
            if factor > 1:
                work = _gaussian_along(work, (factor - 1) / 2, axis)
        out = F.interpolate(work, size=shape, mode="trilinear", align_corners=False)
        return out[0, 0].cpu().numpy()


def _gaussian_along(volume: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """SciPy's ``gaussian_filter1d(mode="nearest", truncate=4)`` along spatial ``axis`` of ``(1, 1, Z, Y, X)``."""
    radius = int(4.0 * sigma + 0.5)
    if radius == 0:
        return volume
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=volume.device, dtype=volume.dtype)
    moved = volume.movedim(2 + axis, -1)
    padded = F.pad(moved.reshape(1, -1, moved.shape[-1]), (radius, radius), mode="replicate")
    filtered = F.conv1d(padded.reshape(-1, 1, padded.shape[-1]), kernel.view(1, 1, -1))
    return filtered.reshape(moved.shape).movedim(-1, 2 + axis)


def resample_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample a 3D label map to ``shape`` by nearest neighbour (half-voxel convention).

    Args:
        labels: ``(Z, Y, X)`` integer labels (values 0..255).

    Returns:
        ``shape`` uint8 array; identical to ``labels`` when the shape is unchanged.
    """
    shape = tuple(int(n) for n in shape)
    if labels.ndim != 3 or len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"need a 3D label map and a 3D shape of sizes >= 1, got {labels.shape} -> {shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8))
    if tuple(labels.shape) == shape:
        return tensor.numpy().copy()
    out = F.interpolate(tensor[None, None], size=shape, mode="nearest-exact")
    return out[0, 0].numpy()


def find_body_box(image_hu: np.ndarray, threshold_hu: float, labels: np.ndarray | None = None) -> Box:
    """Bounding box of the body: the largest connected region above ``threshold_hu``.

    Args:
        image_hu: ``(Z, Y, X)`` CT in HU.
        threshold_hu: voxels above it count as body (air is about -1000 HU, fat -100).
        labels: when given, the box is grown to contain every voxel with a label > 0.

    Returns:
        Half-open ``((z0, z1), (y0, y1), (x0, x1))``; the whole array when nothing is above
        the threshold.
    """
    components, count = ndimage.label(image_hu > threshold_hu)
    if count == 0:
        mask = np.ones(image_hu.shape, dtype=bool)
    else:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = components == int(np.argmax(sizes))
    if labels is not None:
        mask |= labels > 0
    return bounding_box(mask)


def bounding_box(mask: np.ndarray) -> Box:
    """Half-open bounding box of the ``True`` voxels of a 3D mask (the whole array when empty)."""
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((int(present[0]), int(present[-1]) + 1) if present.size else (0, mask.shape[axis]))
    return tuple(box)


def crop_to_box(array: np.ndarray, box: Box) -> np.ndarray:
    """The part of ``array`` inside ``box`` (a view)."""
    return array[tuple(slice(start, stop) for start, stop in box)]


def pad_from_box(array: np.ndarray, box: Box, shape: Sequence[int], fill: float = 0) -> np.ndarray:
    """Undo :func:`crop_to_box`: place ``array`` at ``box`` in a new ``shape`` array filled with ``fill``."""
    expected = tuple(stop - start for start, stop in box)
    if tuple(array.shape) != expected:
        raise ValueError(f"array shape {array.shape} does not match the crop box {box} (expected {expected})")
    out = np.full(tuple(shape), fill, dtype=array.dtype)
    out[tuple(slice(start, stop) for start, stop in box)] = array
    return out


def restore_labels(labels: np.ndarray, mapping: GridMapping) -> np.ndarray:
    """Map a label map on the preprocessed grid back onto the original CT's grid.

    Args:
        labels: ``mapping.cropped_shape`` integer labels (e.g. a prediction).
        mapping: the case's grid mapping.

    Returns:
        uint8 labels of exactly ``mapping.original_shape``, in the file's axis order, to be
        saved with ``mapping.original_affine``.
    """
    padded = pad_from_box(np.asarray(labels, dtype=np.uint8), mapping.crop_box, mapping.resampled_shape)
    canonical = resample_labels(padded, mapping.canonical_shape)
    return np.ascontiguousarray(restore_orientation(canonical, mapping.orientation))


#: Bytes of float32 working memory :func:`restore_probabilities` aims for per block of output slices.
RESTORE_BLOCK_BYTES = 256 * 2**20


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the two source indices and the weight of the upper one, as ``F.interpolate``'s
    linear modes with ``align_corners=False`` (negative positions clamped to 0, the last index repeated)."""
    positions = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lower = np.minimum(np.floor(positions).astype(np.int64), n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (positions - lower).astype(np.float32)


def _blend(array: torch.Tensor, axis: int, lower: np.ndarray, upper: np.ndarray, weight: np.ndarray) -> torch.Tensor:
    """Linear interpolation of ``array`` along ``axis`` at the given (already offset) indices and weights."""
    shape = [1] * array.ndim
    shape[axis] = len(weight)
    w = torch.from_numpy(weight).view(shape)
    low = array.index_select(axis, torch.from_numpy(lower))
    return low.mul_(1 - w).add_(array.index_select(axis, torch.from_numpy(upper)).mul_(w))


def _argmax_over_classes(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(dim=0)`` as uint8 (the first class on a tie), by running comparisons: several
    times faster on the CPU than a reduction over the outermost axis."""
    best = values[0].clone()
    labels = torch.zeros(values.shape[1:], dtype=torch.uint8)
    for index in range(1, values.shape[0]):
        better = values[index] > best
        labels.masked_fill_(better, index)
        torch.maximum(best, values[index], out=best)
    return labels


def restore_probabilities(probabilities: np.ndarray, mapping: GridMapping) -> np.ndarray:
    """Labels on the original CT's grid from class probabilities on the preprocessed grid.

    Each class's probability is resampled trilinearly (half-voxel convention, as
    :func:`torch.nn.functional.interpolate`'s ``trilinear`` with ``align_corners=False``) onto
    the original grid and the argmax taken there, so boundaries fall between the coarse voxels
    where the classes cross instead of on the steps of a nearest-neighbour copy of the coarse
    labels (:func:`restore_labels`). Outside the crop box the probabilities are background's
    (class 0, probability 1).

    Only the original-grid voxels next to a coarse voxel whose argmax is not background are
    computed: where background wins at all eight neighbours it wins in every blend of them (a
    convex combination keeps each inequality). The interpolation is separable (slices, rows, then
    columns) and goes in blocks of output slices of about :data:`RESTORE_BLOCK_BYTES`, so time
    and memory follow the foreground, not the CT's length.

    Args:
        probabilities: ``(C, *mapping.cropped_shape)`` class probabilities (or any scores whose
            argmax is the label; one-hot labels give a smoothed copy of them), class 0 background.
        mapping: the case's grid mapping.

    Returns:
        uint8 labels of exactly ``mapping.original_shape``, in the file's axis order, to be saved
        with ``mapping.original_affine``.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 4 or tuple(probabilities.shape[1:]) != mapping.cropped_shape:
        raise ValueError(f"probabilities of shape {probabilities.shape} do not match the crop box "
                         f"{mapping.crop_box} (expected (C, *{mapping.cropped_shape}))")
    target = mapping.canonical_shape
    canonical = np.zeros(target, dtype=np.uint8)
    foreground = probabilities.argmax(axis=0) != 0
    if foreground.any():
        classes = probabilities.shape[0]
        box = bounding_box(foreground)
        weights, outputs, sources = [], [], []
        for axis in range(3):
            lower, upper, weight = _linear_weights(mapping.resampled_shape[axis], target[axis])
            offset = mapping.crop_box[axis][0]
            first, last = box[axis][0] + offset, box[axis][1] - 1 + offset  # foreground, resampled grid
            out_start = int(np.searchsorted(upper, first, side="left"))
            out_stop = int(np.searchsorted(lower, last, side="right"))
            if out_start >= out_stop:  # downsampling skips every foreground index of this axis
                return np.ascontiguousarray(restore_orientation(canonical, mapping.orientation))
            source = (int(lower[out_start]), int(upper[out_stop - 1]) + 1)
            weights.append((lower[out_start:out_stop] - source[0], upper[out_start:out_stop] - source[0],
                            weight[out_start:out_stop]))
            outputs.append((out_start, out_stop))
            sources.append(source)
        # the source sub-box, background one-hot outside the crop box
        sub = np.zeros((classes, *(stop - start for start, stop in sources)), dtype=np.float32)
        sub[0] = 1.0
        inside = [(max(s0, c0), min(s1, c1)) for (s0, s1), (c0, c1) in zip(sources, mapping.crop_box, strict=True)]
        if all(start < stop for start, stop in inside):
            sub[(slice(None), *(slice(a - s0, b - s0) for (a, b), (s0, _) in zip(inside, sources, strict=True)))] = \
                probabilities[(slice(None), *(slice(a - c0, b - c0)
                                              for (a, b), (c0, _) in zip(inside, mapping.crop_box, strict=True)))]
        tensor = torch.from_numpy(sub)
        rows, columns = (outputs[1][1] - outputs[1][0]), (outputs[2][1] - outputs[2][0])
        block = max(1, int(RESTORE_BLOCK_BYTES / (12 * classes * rows * columns)))
        z_lower, z_upper, z_weight = weights[0]
        with torch.no_grad():
            for start in range(0, len(z_weight), block):
                part = slice(start, start + block)
                values = _blend(tensor, 1, z_lower[part], z_upper[part], z_weight[part])
                values = _blend(values, 2, *weights[1])
                values = _blend(values, 3, *weights[2])
                z0 = outputs[0][0] + start
                canonical[z0:z0 + values.shape[1], outputs[1][0]:outputs[1][1], outputs[2][0]:outputs[2][1]] = \
                    _argmax_over_classes(values).numpy()
    return np.ascontiguousarray(restore_orientation(canonical, mapping.orientation))


def restore_probability_maps(probabilities: np.ndarray, mapping: GridMapping, *, mode: str = "linear") -> np.ndarray:
    """Class probabilities on the original CT's grid, every class kept (not only the argmax).

    For combining the probabilities of models preprocessed on different grids (the two stages of
    :mod:`utils.inference.cascade`) on the grid they share, the CT's. Memory grows with the whole
    output, ``C`` float32 values per original voxel: meant for sub-volumes, not whole long CTs
    (:func:`restore_probabilities` computes labels only where the foreground is).

    Args:
        probabilities: ``(C, *mapping.cropped_shape)`` class probabilities, class 0 background.
        mapping: the case's grid mapping.
        mode: ``"linear"`` resamples trilinearly (half-voxel convention, as
            :func:`restore_probabilities`, whose labels are this output's argmax); ``"nearest"``
            copies the nearest preprocessed voxel (as :func:`restore_labels`).

    Returns:
        ``(C, *mapping.original_shape)`` float32, in the file's axis order; outside the crop box
        the probabilities are background's (class 0, probability 1).
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 4 or tuple(probabilities.shape[1:]) != mapping.cropped_shape:
        raise ValueError(f"probabilities of shape {probabilities.shape} do not match the crop box "
                         f"{mapping.crop_box} (expected (C, *{mapping.cropped_shape}))")
    padded = np.zeros((probabilities.shape[0], *mapping.resampled_shape), dtype=np.float32)
    padded[0] = 1.0
    padded[(slice(None), *(slice(start, stop) for start, stop in mapping.crop_box))] = probabilities
    with torch.no_grad():
        tensor = torch.from_numpy(padded)[None]
        if mode == "linear":
            canonical = F.interpolate(tensor, size=mapping.canonical_shape, mode="trilinear", align_corners=False)
        else:
            canonical = F.interpolate(tensor, size=mapping.canonical_shape, mode="nearest-exact")
    return np.stack([np.ascontiguousarray(restore_orientation(channel, mapping.orientation))
                     for channel in canonical[0].numpy()])
