"""Paint the tissues around the kidneys: body wall, spine, muscles, liver, spleen, bowel, vessels.

Produces a tissue-id volume ``(Z, Y, X)`` uint8 (one of the ``Tissue`` ids below) that
:mod:`utils.synthetic.ct` turns into Hounsfield units. Kidney and tumour voxels are painted by the
renderer from the label map; here they only receive their perirenal fat, renal vessels and sinus.
Organs are placed relative to the :class:`~utils.synthetic.anatomy.BodyLayout`, in mm.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
from scipy import ndimage

from utils.synthetic.anatomy import BodyLayout
from utils.synthetic.shapes import (
    Grid,
    Vector,
    box_around,
    capsule_mask,
    component_boxes,
    ellipsoid_level,
    rotation_matrix,
)


class Tissue(IntEnum):
    """Tissue classes of the synthetic CT (ids of the tissue volume)."""

    AIR = 0
    SUBCUTANEOUS_FAT = 1
    MUSCLE = 2
    VISCERAL_FAT = 3
    LIVER = 4
    SPLEEN = 5
    PANCREAS = 6
    AORTA = 7
    VENA_CAVA = 8
    RENAL_VEIN = 9
    CORTICAL_BONE = 10
    CANCELLOUS_BONE = 11
    DISC = 12
    CSF = 13
    BOWEL_WALL = 14
    BOWEL_FLUID = 15
    BOWEL_GAS = 16
    BOWEL_CONTRAST = 17
    PERIRENAL_FAT = 18
    URINE = 19


#: Tissues that organs may be painted over (the abdominal cavity), never bone, wall or air.
CAVITY = np.array([Tissue.VISCERAL_FAT, Tissue.LIVER, Tissue.SPLEEN, Tissue.PANCREAS, Tissue.BOWEL_WALL,
                   Tissue.BOWEL_FLUID, Tissue.BOWEL_GAS, Tissue.BOWEL_CONTRAST])


def _paint(tissue: np.ndarray, box, mask: np.ndarray, value: Tissue, cavity_only: bool = True) -> None:
    """Set ``tissue[box][mask] = value``, only over cavity tissues when ``cavity_only``."""
    view = tissue[box]
    if cavity_only:
        mask = mask & np.isin(view, CAVITY)
    view[mask] = value


def _ellipse_2d(grid: Grid, centre_yx: tuple[float, float], semi_yx: tuple[float, float],
                power: float = 2.0) -> np.ndarray:
    """In-plane (Y, X) bool mask of a super-ellipse ``|dy/b|^p + |dx/a|^p <= 1``."""
    y = (np.arange(grid.shape[1], dtype=np.float32) * grid.spacing[1] - centre_yx[0])[:, None]
    x = (np.arange(grid.shape[2], dtype=np.float32) * grid.spacing[2] - centre_yx[1])[None, :]
    return np.abs(y / semi_yx[0]) ** power + np.abs(x / semi_yx[1]) ** power <= 1.0


def paint_body_wall(tissue: np.ndarray, grid: Grid, layout: BodyLayout, rng: np.random.Generator) -> None:
    """Body outline with subcutaneous fat, a muscle wall and the abdominal cavity (visceral fat).

    The outline changes slowly from slice to slice (width ±5 %, belly ±8 %) with the back fixed.
    """
    power = float(rng.uniform(2.0, 2.6))
    fat, wall = float(rng.uniform(8, 35)), float(rng.uniform(8, 14))
    period, phases = float(rng.uniform(250, 500)), rng.uniform(0, 2 * np.pi, size=2)
    back_y = layout.centre_y + layout.half_depth
    z_mm = np.arange(grid.shape[0]) * grid.spacing[0]
    widths = np.rint(layout.half_width * (1 + 0.05 * np.sin(2 * np.pi * z_mm / period + phases[0])))
    depths = np.rint(layout.half_depth * (1 + 0.08 * np.sin(2 * np.pi * z_mm / period + phases[1])))
    planes: dict[tuple[float, float], np.ndarray] = {}
    for index, key in enumerate(zip(widths, depths, strict=False)):
        if key not in planes:
            half_width, half_depth = key
            centre = (back_y - half_depth, layout.midline_x)
            plane = np.full(grid.shape[1:], Tissue.AIR, dtype=np.uint8)
            for inset, value in ((0.0, Tissue.SUBCUTANEOUS_FAT), (fat, Tissue.MUSCLE),
                                 (fat + wall, Tissue.VISCERAL_FAT)):
                plane[_ellipse_2d(grid, centre, (half_depth - inset, half_width - inset), power)] = value
            planes[key] = plane
        tissue[index] = planes[key]


def paint_spine_and_muscles(tissue: np.ndarray, grid: Grid, layout: BodyLayout, rng: np.random.Generator) -> None:
    """Vertebrae (cortical shell, cancellous body, discs, canal, arch), psoas and back muscles."""
    x0, y0 = layout.midline_x, layout.spine_y
    radius = float(rng.uniform(17, 22))
    for side in (-1.0, 1.0):
        tissue[:, _ellipse_2d(grid, (y0 + 48, x0 + side * 28), (22, 20))] = Tissue.MUSCLE
    body = _ellipse_2d(grid, (y0, x0), (radius * 0.85, radius))
    core = _ellipse_2d(grid, (y0, x0), (radius * 0.85 - 2.5, radius - 2.5))
    arch = _ellipse_2d(grid, (y0 + radius + 10, x0), (12, 13)) | _ellipse_2d(grid, (y0 + radius + 30, x0), (16, 4))
    canal = _ellipse_2d(grid, (y0 + radius + 9, x0), (7, 8))
    period, disc = float(rng.uniform(30, 38)), float(rng.uniform(6, 9))
    phase = float(rng.uniform(0, period))
    z_mm = np.arange(grid.shape[0]) * grid.spacing[0]
    is_disc = ((z_mm + phase) % period) < disc
    for index in range(grid.shape[0]):
        plane = tissue[index]
        if is_disc[index]:
            plane[body] = Tissue.DISC
        else:
            plane[body] = Tissue.CORTICAL_BONE
            plane[core] = Tissue.CANCELLOUS_BONE
            plane[arch & ~canal] = Tissue.CORTICAL_BONE
        plane[canal] = Tissue.CSF
    top = min(k.centre[0] for k in layout.kidneys) - 40.0
    for index in range(grid.shape[0]):  # psoas muscles grow from the upper lumbar spine downwards
        growth = float(np.clip((z_mm[index] - top) / 150.0, 0.0, 1.0))
        if growth > 0.1:
            for side in (-1.0, 1.0):
                psoas = _ellipse_2d(grid, (y0 + 2, x0 + side * (radius + 6 + 12 * growth)),
                                    (9 + 10 * growth, 7 + 11 * growth))
                tissue[index][psoas & (tissue[index] == Tissue.VISCERAL_FAT)] = Tissue.MUSCLE


def paint_ribs(tissue: np.ndarray, grid: Grid, layout: BodyLayout, rng: np.random.Generator) -> None:
    """Rib cross-sections in the upper slices, just inside the muscle wall of the back and flanks."""
    lowest = min(k.centre[0] for k in layout.kidneys) + float(rng.uniform(-10, 20))
    spacing_mm, start = float(rng.uniform(22, 30)), float(rng.uniform(0, 25))
    centre, semi = (layout.centre_y, layout.midline_x), (layout.half_depth - 20, layout.half_width - 20)
    ring = _ellipse_2d(grid, centre, semi) & ~_ellipse_2d(grid, centre, (semi[0] - 7, semi[1] - 7))
    y = np.arange(grid.shape[1]) * grid.spacing[1]
    x = np.arange(grid.shape[2]) * grid.spacing[2]
    ring &= (y > layout.centre_y - 0.2 * layout.half_depth)[:, None]  # flanks and back only
    ring &= (np.abs(x - layout.midline_x) > 0.45 * layout.half_width)[None, :]  # oblique ribs: lateral arcs
    z_mm = np.arange(grid.shape[0]) * grid.spacing[0]
    rib_slices = (z_mm < lowest) & (((z_mm - start) % spacing_mm) < 9.0)
    for index in np.flatnonzero(rib_slices):
        tissue[index][ring & (tissue[index] != Tissue.AIR)] = Tissue.CORTICAL_BONE


def paint_solid_organs(tissue: np.ndarray, grid: Grid, layout: BodyLayout, rng: np.random.Generator) -> None:
    """Liver (patient's right, above the right kidney), spleen (left) and pancreas."""
    by_side = {k.side: k.centre for k in layout.kidneys}
    right_z = by_side.get("right", by_side.get("left"))[0]
    left_z = by_side.get("left", by_side.get("right"))[0]
    x0, y0 = layout.midline_x, layout.spine_y
    organs = [
        (Tissue.LIVER, (right_z - rng.uniform(55, 85), layout.centre_y - rng.uniform(0, 25), x0 - rng.uniform(55, 85)),
         (rng.uniform(70, 95), rng.uniform(75, 95), rng.uniform(70, 90))),
        (Tissue.SPLEEN, (left_z - rng.uniform(45, 70), y0 - rng.uniform(0, 20), x0 + rng.uniform(90, 110)),
         (rng.uniform(45, 60), rng.uniform(40, 50), rng.uniform(22, 30))),
        (Tissue.PANCREAS, (left_z - rng.uniform(10, 30), y0 - rng.uniform(45, 60), x0 + rng.uniform(-5, 20)),
         (rng.uniform(12, 18), rng.uniform(10, 15), rng.uniform(60, 80))),
    ]
    for value, centre, semi in organs:
        found = ellipsoid_level(grid, centre, semi, rotation_matrix((0.0, 0.0, rng.uniform(-25, 25))))
        if found is not None:
            _paint(tissue, found[0], found[1] <= 1.0, value)


def _paint_bowel_segment(tissue: np.ndarray, grid: Grid, centre: Vector, radius: float, content: Tissue,
                         gas_fraction: float) -> None:
    """One bowel segment: a wall shell around a lumen of fluid, gas (anterior part) or contrast."""
    found = ellipsoid_level(grid, centre, (radius, radius, radius))
    if found is None:
        return
    box, level = found
    _paint(tissue, box, level <= 1.0, Tissue.BOWEL_WALL)
    lumen = level <= (1.0 - 3.0 / radius) ** 2
    _paint(tissue, box, lumen, content)
    if gas_fraction > 0:
        y = (np.arange(box[1].start, box[1].stop) * grid.spacing[1] - centre[1])[None, :, None]
        _paint(tissue, box, lumen & (y < radius * (2 * gas_fraction - 1)) & np.ones_like(lumen), Tissue.BOWEL_GAS)


def paint_bowel(tissue: np.ndarray, grid: Grid, layout: BodyLayout, rng: np.random.Generator) -> None:
    """Small-bowel loops and colon as chains of segments, with fluid, gas or oral contrast."""
    z_kidneys = [k.centre[0] for k in layout.kidneys]
    contents = [Tissue.BOWEL_FLUID, Tissue.BOWEL_CONTRAST] if rng.random() < 0.35 else [Tissue.BOWEL_FLUID]
    loops = []
    for _ in range(int(rng.integers(6, 11))):  # small bowel: anterior cavity
        start = (float(rng.uniform(min(z_kidneys) - 40, max(z_kidneys) + 120)),
                 layout.centre_y - float(rng.uniform(0.1, 0.6)) * layout.half_depth,
                 layout.midline_x + float(rng.uniform(-0.6, 0.6)) * layout.half_width)
        loops.append((start, float(rng.uniform(9, 15)), int(rng.integers(5, 14))))
    for side in (-1.0, 1.0):  # ascending and descending colon along the flanks
        start = (min(z_kidneys) - 30.0, layout.centre_y - 15.0, layout.midline_x + side * (layout.half_width - 55))
        loops.append((start, float(rng.uniform(17, 24)), 0))
    for start, radius, steps in loops:
        content = contents[int(rng.integers(len(contents)))]
        gas = float(rng.uniform(0.2, 0.6)) if rng.random() < 0.4 else 0.0
        point = np.asarray(start)
        direction = np.array([1.0, 0.0, 0.0]) if steps == 0 else rng.normal(size=3)
        for _ in range(steps or 12):
            _paint_bowel_segment(tissue, grid, tuple(point), radius, content, gas)
            if steps:
                direction = direction / np.linalg.norm(direction) + 0.6 * rng.normal(size=3)
            point = point + radius * 0.9 * direction / np.linalg.norm(direction)


def paint_great_vessels(tissue: np.ndarray, grid: Grid, layout: BodyLayout,
                        rng: np.random.Generator) -> dict[str, Vector]:
    """Aorta (left of the midline) and inferior vena cava (right), anterior to the spine.

    Returns:
        In-plane centres ``{"aorta": (y, x), "vena_cava": (y, x)}`` in mm.
    """
    aorta = (layout.spine_y - float(rng.uniform(28, 36)), layout.midline_x + float(rng.uniform(8, 18)))
    cava = (layout.spine_y - float(rng.uniform(24, 32)), layout.midline_x - float(rng.uniform(20, 28)))
    radius = float(rng.uniform(9, 13))
    everywhere = (slice(None), slice(None), slice(None))
    disk = np.broadcast_to(_ellipse_2d(grid, aorta, (radius, radius)), grid.shape)
    _paint(tissue, everywhere, disk, Tissue.AORTA, cavity_only=False)
    flat = np.broadcast_to(_ellipse_2d(grid, cava, (radius * 0.75, radius * 1.2)), grid.shape)
    _paint(tissue, everywhere, flat, Tissue.VENA_CAVA, cavity_only=False)
    return {"aorta": aorta, "vena_cava": cava}


def paint_kidney_surroundings(tissue: np.ndarray, grid: Grid, layout: BodyLayout, labels: np.ndarray,
                              sinus: np.ndarray | None, vessels: dict[str, Vector], rng: np.random.Generator) -> None:
    """Perirenal fat around kidney and tumour, renal artery and vein to each hilum, and the sinus."""
    fat_mm = float(rng.uniform(3, 10))
    foreground = labels > 0
    for region in component_boxes(foreground):
        centre = tuple((s.start + s.stop) / 2 * sp for s, sp in zip(region, grid.spacing, strict=False))
        half = tuple((s.stop - s.start) / 2 * sp + fat_mm + sp for s, sp in zip(region, grid.spacing, strict=False))
        box = box_around(grid, centre, half)
        distance = ndimage.distance_transform_edt(~foreground[box], sampling=grid.spacing)
        shell = (distance <= fat_mm) & ~foreground[box] & (tissue[box] != Tissue.AIR)
        _paint(tissue, box, shell & ~np.isin(tissue[box], [Tissue.CORTICAL_BONE, Tissue.CANCELLOUS_BONE]),
               Tissue.PERIRENAL_FAT, cavity_only=False)
    for kidney in layout.kidneys:
        z = kidney.hilum[0]
        for source, radius, value in (("aorta", rng.uniform(2.5, 3.5), Tissue.AORTA),
                                      ("vena_cava", rng.uniform(4.0, 6.0), Tissue.RENAL_VEIN)):
            start = (z + float(rng.uniform(-8, 8)),) + tuple(vessels[source])
            found = capsule_mask(grid, start, kidney.hilum, float(radius))
            if found is not None:
                _paint(tissue, found[0], found[1] & ~foreground[found[0]], value, cavity_only=False)
    if sinus is not None and sinus.any():
        for region in component_boxes(sinus):
            tissue[region][sinus[region]] = Tissue.PERIRENAL_FAT
            pelvis = ndimage.binary_erosion(sinus[region], iterations=2)
            tissue[region][pelvis & (ndimage.uniform_filter(sinus[region].astype(np.float32), 5) > 0.9)] = Tissue.URINE


def paint_tissues(grid: Grid, layout: BodyLayout, labels: np.ndarray, sinus: np.ndarray | None,
                  rng: np.random.Generator) -> np.ndarray:
    """All tissues of one synthetic abdomen, painted in anatomical order.

    Returns:
        ``(Z, Y, X)`` uint8 volume of :class:`Tissue` ids.
    """
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    paint_body_wall(tissue, grid, layout, rng)
    paint_spine_and_muscles(tissue, grid, layout, rng)
    paint_ribs(tissue, grid, layout, rng)
    paint_solid_organs(tissue, grid, layout, rng)
    paint_bowel(tissue, grid, layout, rng)
    vessels = paint_great_vessels(tissue, grid, layout, rng)
    paint_kidney_surroundings(tissue, grid, layout, labels, sinus, vessels, rng)
    return tissue
