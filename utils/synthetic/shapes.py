"""Geometric primitives for the synthetic CT generator: boxes, ellipsoids, capsules, smooth noise.

All positions and sizes are in mm in the volume's array frame: ``(z, y, x)`` with
``z = slice index * spacing_z`` (towards inferior in the KiTS19 orientation), ``y = row * spacing_y``
(towards posterior) and ``x = column * spacing_x`` (towards the patient's left). Shapes are
evaluated only inside their bounding box, so painting a small organ into a large volume is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Vector = tuple[float, float, float]
Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` ``(Z, Y, X)`` voxels and ``spacing`` ``(sz, sy, sx)`` in mm."""

    shape: tuple[int, int, int]
    spacing: Vector

    @property
    def extent_mm(self) -> Vector:
        """Size of the volume in mm along each axis."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing, strict=False))  # type: ignore[return-value]


def box_around(grid: Grid, center: Vector, half_extent: Vector) -> Box | None:
    """Voxel box covering ``center ± half_extent`` (mm), clipped to the grid; None when outside."""
    slices = []
    for c, h, n, s in zip(center, half_extent, grid.shape, grid.spacing, strict=False):
        start = max(int(np.floor((c - h) / s)), 0)
        stop = min(int(np.ceil((c + h) / s)) + 1, n)
        if stop <= start:
            return None
        slices.append(slice(start, stop))
    return (slices[0], slices[1], slices[2])


def box_coordinates(grid: Grid, box: Box, origin: Vector = (0.0, 0.0, 0.0)) -> tuple[np.ndarray, ...]:
    """Open (broadcastable) mm coordinates of the voxels of ``box`` relative to ``origin``.

    Returns:
        ``(z, y, x)`` float32 arrays of shapes ``(nz, 1, 1)``, ``(1, ny, 1)``, ``(1, 1, nx)``.
    """
    axes = []
    for axis, (sl, s, o) in enumerate(zip(box, grid.spacing, origin, strict=False)):
        values = np.arange(sl.start, sl.stop, dtype=np.float32) * np.float32(s) - np.float32(o)
        shape = [1, 1, 1]
        shape[axis] = values.size
        axes.append(values.reshape(shape))
    return tuple(axes)


def rotation_matrix(angles_deg: Vector) -> np.ndarray:
    """Rotation about the z, y and x axes (degrees, applied in that order); ``(3, 3)`` float64."""
    a, b, c = np.deg2rad(angles_deg)
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def local_coordinates(grid: Grid, box: Box, center: Vector, rotation: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Coordinates (mm) of the box's voxels in a frame centred at ``center`` and rotated by ``rotation``.

    Column ``i`` of ``rotation`` is the direction of local axis ``i`` in the array frame.
    """
    z, y, x = box_coordinates(grid, box, center)
    if rotation is None:
        return z, y, x
    r = rotation.astype(np.float32)
    return tuple(r[0, i] * z + r[1, i] * y + r[2, i] * x for i in range(3))


def ellipsoid_level(grid: Grid, center: Vector, semi_axes: Vector, rotation: np.ndarray | None = None,
                    margin: float = 1.0) -> tuple[Box, np.ndarray] | None:
    """Normalised ellipsoid level ``sum((u_i / a_i)^2)`` (< 1 inside) over the shape's box.

    Args:
        margin: box half-size as a multiple of the largest semi-axis (> 1 leaves room for
            perturbed boundaries).

    Returns:
        ``(box, level)`` with ``level`` float32 of the box's shape, or None when off the grid.
    """
    reach = float(max(semi_axes)) * margin
    box = box_around(grid, center, (reach, reach, reach))
    if box is None:
        return None
    u, v, w = local_coordinates(grid, box, center, rotation)
    level = (u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2 + (w / semi_axes[2]) ** 2
    return box, np.broadcast_to(level, tuple(s.stop - s.start for s in box)).astype(np.float32)


def capsule_mask(grid: Grid, start: Vector, end: Vector, radius: float) -> tuple[Box, np.ndarray] | None:
    """Voxels within ``radius`` mm of the segment ``start``–``end``: ``(box, bool mask)`` or None."""
    p0, p1 = np.asarray(start, np.float32), np.asarray(end, np.float32)
    lo, hi = np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius
    box = box_around(grid, tuple((lo + hi) / 2), tuple((hi - lo) / 2))
    if box is None:
        return None
    z, y, x = box_coordinates(grid, box, tuple(p0))
    d = p1 - p0
    length2 = max(float(d @ d), 1e-6)
    t = np.clip((z * d[0] + y * d[1] + x * d[2]) / length2, 0.0, 1.0)
    dist2 = (z - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (x - t * d[2]) ** 2
    return box, dist2 <= radius**2


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing: Vector, scale_mm: float,
                 order: int = 1) -> np.ndarray:
    """Random smooth field of zero mean and unit standard deviation, correlated over ``scale_mm``.

    Drawn on a coarse grid of node distance ``scale_mm`` and interpolated (``order`` 1 linear,
    3 cubic) to ``shape``; cheap even for whole CT volumes.

    Returns:
        float32 array of ``shape``.
    """
    coarse_shape = tuple(int(np.ceil(n * s / scale_mm)) + 2 for n, s in zip(shape, spacing, strict=False))
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    factors = [n / c for n, c in zip(shape, coarse_shape, strict=False)]
    field = ndimage.zoom(coarse, factors, order=order, mode="nearest", grid_mode=True)
    field = field[tuple(slice(0, n) for n in shape)]
    if field.shape != tuple(shape):  # zoom rounds sizes; pad the rare one-voxel shortfall
        field = np.pad(field, [(0, n - f) for n, f in zip(shape, field.shape, strict=False)], mode="edge")
    field -= field.mean(dtype=np.float64)
    field /= max(float(field.std(dtype=np.float64)), 1e-6)
    return field.astype(np.float32, copy=False)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Indices ``(N, 3)`` of mask voxels with at least one 6-neighbour outside the mask."""
    eroded = ndimage.binary_erosion(mask)
    return np.argwhere(mask & ~eroded)


def bounding_box(mask: np.ndarray) -> Box | None:
    """The smallest box holding every ``True`` voxel of a boolean ``mask``; None when it has none."""
    found = ndimage.find_objects(np.asarray(mask, dtype=bool).view(np.uint8))
    return found[0] if found else None


def labelled_components(mask: np.ndarray) -> tuple[Box | None, np.ndarray, int]:
    """``ndimage.label`` of a boolean ``mask``, computed only inside its bounding box.

    Components never reach outside that box, and labelling numbers them in the order a raster scan
    meets them, which the box keeps: label ``k`` here is label ``k`` of the whole volume. A mask
    covering a few percent of a CT is labelled many times faster.

    Returns:
        ``(box, components, count)``: the box (None for an empty mask), the int32 labels of the
        voxels inside it, and the number of components.
    """
    box = bounding_box(mask)
    if box is None:
        return None, np.zeros((0,) * np.ndim(mask), dtype=np.int32), 0
    components, count = ndimage.label(mask[box])
    return box, components, int(count)


def component_boxes(mask: np.ndarray) -> list[Box]:
    """The bounding box of every 6-connected component of a boolean ``mask``, in whole-volume voxels.

    The same boxes, in the same order, as ``ndimage.find_objects(ndimage.label(mask)[0])``.
    """
    box, components, _ = labelled_components(mask)
    if box is None:
        return []
    return [tuple(slice(outer.start + inner.start, outer.start + inner.stop)  # type: ignore[misc]
                  for outer, inner in zip(box, region, strict=True))
            for region in ndimage.find_objects(components)]


def centre_of_mass(mask: np.ndarray, offset: tuple[int, ...] | np.ndarray = (0, 0, 0)) -> np.ndarray:
    """Mean voxel index of a boolean ``mask`` along each axis, plus ``offset`` (where the mask lies).

    Counted in integers, so the result is bit for bit ``ndimage.center_of_mass`` of the mask placed at
    ``offset`` in a larger volume (whose sums of integer-valued doubles are exact as well).
    """
    count = np.count_nonzero(mask)
    centre = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        per_index = np.count_nonzero(mask, axis=others).astype(np.int64)
        total = int(per_index @ np.arange(mask.shape[axis], dtype=np.int64)) + int(offset[axis]) * int(count)
        centre.append(np.float64(total) / count)
    return np.asarray(centre, dtype=np.float64)
