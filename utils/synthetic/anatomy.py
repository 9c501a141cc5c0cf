"""Synthetic abdominal anatomy: where the body, spine and kidneys are, and the kidney/tumour/cyst masks.

Two ways to obtain a :class:`BodyLayout` and a label map ``(Z, Y, X)`` uint8 in the KiTS19
orientation (axis 0 inferior, 1 posterior, 2 patient-left): KiTS19's labels (0 background,
1 kidney, 2 tumour) or KiTS23's (the same plus 3 cyst):

* :func:`build_procedural_case` draws both kidneys (bean-shaped, with a renal sinus at the hilum)
  either side of the spine, 1–3 tumours of 1.2–16 cm (KiTS19's sizes), exophytic or endophytic, and simple renal
  cysts in about half the patients (labelled kidney for KiTS19, which did not label cysts, and
  cyst for KiTS23);
* :func:`layout_from_labels` places the body and spine around the kidneys of a real mask.

The surrounding organs are painted by :mod:`utils.synthetic.tissues`; intensities come from
:mod:`utils.synthetic.ct`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from utils.data.dataset_definitions import CYST_LABEL, KITS19, DatasetDefinition, get_dataset
from utils.data.kits_layout import KIDNEY_LABEL, TUMOUR_LABEL
from utils.synthetic.shapes import (
    Grid,
    Vector,
    centre_of_mass,
    ellipsoid_level,
    labelled_components,
    rotation_matrix,
    smooth_noise,
    surface_voxels,
)

#: Kidney semi-axes ranges in mm: long axis, medio-lateral width, antero-posterior thickness.
KIDNEY_SEMI_AXES_MM = ((54.0, 64.0), (30.0, 36.0), (23.0, 28.0))
#: Tumour diameter in cm: median, log-normal spread, and the range drawn from. KiTS19's radiographic
#: tumour size (``radiographic_size`` in its ``kits.json``, 210 training cases): median 4.0 cm,
#: quartiles 2.5 / 5.6 cm, 1.2–16.2 cm, 15 % above 8 cm; log-normal spread 0.59.
TUMOUR_DIAMETER_CM = (4.0, 0.59, (1.2, 16.0))
#: Labelled simple cysts (KiTS23): median diameter (mm), log-normal spread, and the range drawn from.
#: Measured on KiTS23 cases 400–499: half hold a cyst, most 1–3 (up to 17), of 0.1–75 ml (median ~2 ml).
LABELLED_CYST_DIAMETER_MM = (15.0, 0.7, (5.0, 60.0))
#: Largest number of labelled cysts per patient.
MAX_LABELLED_CYSTS = 8


@dataclass(frozen=True)
class KidneyPlacement:
    """One kidney: ``side`` ("right"/"left"), centre and hilum point (mm), and its sinus (procedural)."""

    side: str
    centre: Vector
    hilum: Vector


@dataclass(frozen=True)
class BodyLayout:
    """Where the body, spine and kidneys lie, in mm of the array frame.

    Attributes:
        midline_x: x of the spine and body centre.
        centre_y: y of the body ellipse centre.
        half_width, half_depth: body semi-axes (left-right, antero-posterior).
        spine_y: y of the vertebral body centre.
        kidneys: one or two kidney placements.
    """

    midline_x: float
    centre_y: float
    half_width: float
    half_depth: float
    spine_y: float
    kidneys: tuple[KidneyPlacement, ...]

    def lateral_sign(self, side: str) -> float:
        """+1 when the patient's ``side`` lies towards higher x (the left), else -1."""
        return 1.0 if side == "left" else -1.0


@dataclass(frozen=True)
class ProceduralAnatomy:
    """A drawn patient: ``labels`` ``(Z, Y, X)`` uint8, renal ``sinus`` fat and simple renal
    ``cysts`` (bool volumes; cysts are labelled kidney for KiTS19, as in KiTS19, and cyst (3) for
    KiTS23, where ``cysts`` is exactly ``labels == 3``), and the body ``layout``."""

    labels: np.ndarray
    sinus: np.ndarray
    cysts: np.ndarray
    layout: BodyLayout


def sample_body(rng: np.random.Generator, grid: Grid, midline_x: float, spine_y: float) -> tuple[float, float, float]:
    """Draw body semi-axes (mm) and the body centre y so that the spine sits well inside the back."""
    half_width = float(rng.uniform(140.0, 185.0))
    half_depth = float(rng.uniform(100.0, 135.0))
    back_to_spine = float(rng.uniform(70.0, 95.0))
    centre_y = spine_y + back_to_spine - half_depth
    return half_width, half_depth, centre_y


def _kidney_frame(rng: np.random.Generator, lateral: float) -> np.ndarray:
    """Kidney axes as columns: long axis (lower pole lateral and anterior), lateral, third axis."""
    lat_tilt, ap_tilt, hilum_turn = (np.deg2rad(rng.uniform(8, 20)), np.deg2rad(rng.uniform(5, 18)),
                                     np.deg2rad(rng.uniform(20, 40)))
    u = np.array([1.0, -np.sin(ap_tilt), lateral * np.sin(lat_tilt)])
    u /= np.linalg.norm(u)
    v = np.array([0.0, np.sin(hilum_turn), lateral * np.cos(hilum_turn)])
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)], axis=1)


def _paint_kidney(labels: np.ndarray, sinus: np.ndarray, grid: Grid, rng: np.random.Generator,
                  centre: Vector, lateral: float) -> tuple[Vector, np.ndarray]:
    """Paint one bean-shaped kidney (label 1) and its renal sinus.

    Returns:
        The hilum point (mm) and a full-volume bool mask of this kidney's parenchyma.
    """
    frame = _kidney_frame(rng, lateral)
    a, b, c = (float(rng.uniform(lo, hi)) for lo, hi in KIDNEY_SEMI_AXES_MM)
    found = ellipsoid_level(grid, centre, (a, b, c), frame, margin=1.05)
    if found is None:
        raise ValueError(f"kidney centre {centre} mm lies outside the volume {grid.extent_mm} mm")
    box, level = found
    notch_centre = tuple(np.asarray(centre) - 0.8 * b * frame[:, 1])
    notch = ellipsoid_level(grid, notch_centre, (0.42 * a, 0.55 * b, 0.6 * c), frame, margin=1.0)
    inside = np.sqrt(level) + 0.03 * smooth_noise(rng, level.shape, grid.spacing, 12.0) <= 1.0  # lobulated
    in_notch = np.zeros_like(inside)
    if notch is not None:
        notch_box, notch_level = notch
        region = tuple(slice(max(n.start, k.start), min(n.stop, k.stop)) for n, k in zip(notch_box, box, strict=False))
        local = tuple(slice(r.start - k.start, r.stop - k.start) for r, k in zip(region, box, strict=False))
        theirs = tuple(slice(r.start - n.start, r.stop - n.start) for r, n in zip(region, notch_box, strict=False))
        in_notch[local] = notch_level[theirs] <= 1.0
    parenchyma = np.zeros(grid.shape, dtype=bool)
    parenchyma[box] = inside & ~in_notch
    labels[parenchyma] = KIDNEY_LABEL
    sinus[box] |= inside & in_notch
    return tuple(np.asarray(centre) - b * frame[:, 1]), parenchyma  # type: ignore[return-value]


def _tumour_centre(rng: np.random.Generator, kidney_mask: np.ndarray, offset: np.ndarray, grid: Grid,
                   kidney_centre: Vector, radius: float) -> Vector:
    """Centre of a tumour: a random kidney surface point pushed out (exophytic) or in (endophytic)."""
    surface = surface_voxels(kidney_mask)
    point = (surface[rng.integers(len(surface))] + offset) * np.asarray(grid.spacing)
    normal = point - np.asarray(kidney_centre)
    normal /= max(np.linalg.norm(normal), 1e-6)
    growth = rng.choice(["exophytic", "mixed", "endophytic"], p=[0.45, 0.3, 0.25])
    shift = {"exophytic": rng.uniform(0.3, 0.7), "mixed": rng.uniform(-0.2, 0.3),
             "endophytic": rng.uniform(-1.0, -0.5)}[growth]
    return tuple(point + normal * shift * radius)  # type: ignore[return-value]


def _lesion_box(rng: np.random.Generator, grid: Grid, kidney: KidneyPlacement, parenchyma: np.ndarray,
                radius: float, growth_scale: float = 1.0) -> tuple | None:
    """Box and inside-mask of a lobulated lesion of ``radius`` mm grown from the kidney's surface."""
    region = ndimage.find_objects(parenchyma.astype(np.int8))[0]
    offset = np.array([s.start for s in region])
    centre = _tumour_centre(rng, parenchyma[region], offset, grid, kidney.centre, radius)
    semi = tuple(radius * rng.uniform(0.8, 1.2, size=3) * growth_scale)
    found = ellipsoid_level(grid, centre, semi, rotation_matrix(tuple(rng.uniform(0, 180, 3))), margin=1.4)
    if found is None:
        return None
    box, level = found
    bumps = smooth_noise(rng, level.shape, grid.spacing, max(radius / 1.5, 3.0), order=3)
    return box, np.sqrt(level) + 0.08 * bumps < 1.0


def _draw_cyst_count(rng: np.random.Generator) -> int:
    """How many simple cysts a patient has: none for about half, else 1–3."""
    return 0 if rng.random() >= 0.5 else int(rng.integers(1, 4))


def _draw_cyst_radius(rng: np.random.Generator) -> float:
    """Radius (mm) of one simple cyst, 1–5 cm in diameter."""
    return 5.0 * float(np.clip(np.exp(rng.normal(np.log(2.0), 0.45)), 1.0, 5.0))


def _paint_cysts(labels: np.ndarray, cysts: np.ndarray, grid: Grid, rng: np.random.Generator,
                 kidneys: tuple[KidneyPlacement, ...], parenchyma: list[np.ndarray]) -> None:
    """Simple renal cysts (about half the patients, 1–3 of 1–5 cm), round and labelled kidney."""
    for _ in range(_draw_cyst_count(rng)):
        which = int(rng.integers(len(kidneys)))
        radius = _draw_cyst_radius(rng)
        found = _lesion_box(rng, grid, kidneys[which], parenchyma[which], radius, growth_scale=0.85)
        if found is not None:
            box, inside = found
            labels[box][inside] = KIDNEY_LABEL
            cysts[box] |= inside


def _draw_labelled_cyst_count(rng: np.random.Generator) -> int:
    """How many labelled simple cysts a patient has: none for about half, else 1–8 (mostly 1–3)."""
    return 0 if rng.random() >= 0.5 else min(int(rng.geometric(0.4)), MAX_LABELLED_CYSTS)


def _draw_labelled_cyst_radius(rng: np.random.Generator) -> float:
    """Radius (mm) of one labelled simple cyst: log-normal diameter, 5–60 mm."""
    median, spread, (low, high) = LABELLED_CYST_DIAMETER_MM
    return 0.5 * float(np.clip(np.exp(rng.normal(np.log(median), spread)), low, high))


def _paint_labelled_cysts(labels: np.ndarray, grid: Grid, rng: np.random.Generator,
                          parenchyma: list[np.ndarray], attempts: int = 8) -> None:
    """Simple renal cysts labelled cyst (KiTS23), painted after the tumours and never touching one.

    Like Bosniak I–II cysts they are round with a smooth wall and grow from the cortex: centred
    on the kidney's surface and pushed out (exophytic, most), straddling the cortex, or a little
    inwards. A cyst that would overlap a tumour or touch it (6-neighbourhood) is drawn again, up
    to ``attempts`` times, then left out.
    """
    for _ in range(_draw_labelled_cyst_count(rng)):
        which = int(rng.integers(len(parenchyma)))
        radius = _draw_labelled_cyst_radius(rng)
        kidney = parenchyma[which] & (labels == KIDNEY_LABEL)
        objects = ndimage.find_objects(kidney.astype(np.int8))
        if not objects:
            continue
        region = objects[0]
        offset = np.array([s.start for s in region])
        surface = surface_voxels(kidney[region]) + offset
        kidney_centre = np.asarray(ndimage.center_of_mass(kidney[region])) + offset
        for _ in range(attempts):
            point = surface[rng.integers(len(surface))]
            normal = (point - kidney_centre) * np.asarray(grid.spacing)
            normal /= max(float(np.linalg.norm(normal)), 1e-6)
            growth = rng.choice(["exophytic", "cortical", "deep"], p=[0.55, 0.3, 0.15])
            shift = {"exophytic": rng.uniform(0.2, 0.7), "cortical": rng.uniform(-0.2, 0.2),
                     "deep": rng.uniform(-0.6, -0.3)}[growth]
            centre = tuple(point * np.asarray(grid.spacing) + normal * shift * radius)
            semi = tuple(radius * rng.uniform(0.88, 1.12, size=3))
            found = ellipsoid_level(grid, centre, semi, rotation_matrix(tuple(rng.uniform(0, 180, 3))), margin=1.2)
            if found is None:
                continue
            box, level = found
            inside = level <= 1.0
            near_tumour = ndimage.binary_dilation(labels[box] == TUMOUR_LABEL)
            if inside.any() and not (inside & near_tumour).any():
                labels[box][inside] = CYST_LABEL
                break


def _paint_tumours(labels: np.ndarray, grid: Grid, rng: np.random.Generator,
                   kidneys: tuple[KidneyPlacement, ...], parenchyma: list[np.ndarray]) -> None:
    """Paint 1–3 lobulated tumours (label 2) on one or both kidneys."""
    count = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
    for _ in range(count):
        which = int(rng.integers(len(kidneys)))
        median, spread, extent = TUMOUR_DIAMETER_CM
        diameter = float(np.clip(np.exp(rng.normal(np.log(median), spread)), *extent))
        found = _lesion_box(rng, grid, kidneys[which], parenchyma[which], 5.0 * diameter)
        if found is not None:
            box, inside = found
            labels[box][inside] = TUMOUR_LABEL


def build_procedural_case(rng: np.random.Generator, grid: Grid,
                          dataset: DatasetDefinition | str = KITS19) -> ProceduralAnatomy:
    """Draw a patient: kidneys either side of the spine, tumours, simple cysts, and the body layout.

    Args:
        rng: the case's random generator (all draws come from it, in a fixed order).
        grid: the volume's shape and spacing; must span at least about 260 mm in-plane.
        dataset: whose labels to draw (a definition or its name). KiTS19 (default): cysts are
            labelled kidney; a dataset with a cyst label (KiTS23): cysts are labelled 3, drawn
            after the tumours so that none overlaps or touches a tumour.

    Returns:
        The :class:`ProceduralAnatomy`: labels in the dataset's ids ({0, 1, 2}, KiTS23 also 3),
        sinus (outside the foreground labels) and cyst masks, and the :class:`BodyLayout`.
    """
    label_cysts = get_dataset(dataset).has_label("cyst")
    extent_z, extent_y, extent_x = grid.extent_mm
    midline_x = extent_x / 2 + float(rng.uniform(-12, 12))
    spine_y = extent_y / 2 + float(rng.uniform(10, 35))
    labels = np.zeros(grid.shape, dtype=np.uint8)
    sinus = np.zeros(grid.shape, dtype=bool)
    left_z = extent_z * float(rng.uniform(0.38, 0.52))
    kidneys, parenchyma = [], []
    for side, lateral in (("right", -1.0), ("left", 1.0)):
        z = left_z + (float(rng.uniform(8, 25)) if side == "right" else 0.0)
        centre = (z, spine_y + float(rng.uniform(0, 12)), midline_x + lateral * float(rng.uniform(62, 75)))
        hilum, mask = _paint_kidney(labels, sinus, grid, rng, centre, lateral)
        kidneys.append(KidneyPlacement(side, centre, hilum))
        parenchyma.append(mask)
    if label_cysts:
        _paint_tumours(labels, grid, rng, tuple(kidneys), parenchyma)
        _paint_labelled_cysts(labels, grid, rng, parenchyma)
        cysts = labels == CYST_LABEL
    else:
        cysts = np.zeros(grid.shape, dtype=bool)
        _paint_cysts(labels, cysts, grid, rng, tuple(kidneys), parenchyma)
        _paint_tumours(labels, grid, rng, tuple(kidneys), parenchyma)
        cysts &= labels == KIDNEY_LABEL
    sinus &= labels == 0
    half_width, half_depth, centre_y = sample_body(rng, grid, midline_x, spine_y)
    layout = BodyLayout(midline_x, centre_y, half_width, half_depth, spine_y, tuple(kidneys))
    return ProceduralAnatomy(labels, sinus, cysts, layout)


def layout_from_labels(rng: np.random.Generator, labels: np.ndarray, grid: Grid) -> BodyLayout:
    """Place body and spine around the kidneys of a real KiTS19 mask (already in KiTS orientation).

    The midline runs between the two largest kidney components (or through the volume's centre
    when one kidney is present); each component's hilum is its medial-most voxel at its
    centre slice.
    """
    # components, their sizes and centres inside the labels' bounding box only (the same numbers as
    # over the whole volume, see labelled_components and centre_of_mass), a few percent of a CT
    box, components, count = labelled_components(labels > 0)
    if count == 0:
        raise ValueError("the mask has no kidney or tumour voxels; cannot place the anatomy around it")
    offset = np.array([s.start for s in box])
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:].astype(np.float64)
    keep = [int(i) + 1 for i in np.argsort(sizes)[::-1][:2]]
    spacing = np.asarray(grid.spacing)
    centres = [centre_of_mass(components == k, offset) * spacing for k in keep]
    extent_z, extent_y, extent_x = grid.extent_mm
    midline_x = float(np.mean([c[2] for c in centres])) if len(centres) == 2 else extent_x / 2
    kidneys = []
    for k, centre in zip(keep, centres, strict=False):
        side = "left" if centre[2] > midline_x else "right"
        z_index = int(np.clip(round(centre[0] / spacing[0]), 0, grid.shape[0] - 1)) - int(offset[0])
        rows, cols = np.nonzero(components[z_index] == k)  # the centre's slice lies within the box
        if cols.size == 0:
            rows, cols = np.nonzero((components == k).any(axis=0))
        rows, cols = rows + offset[1], cols + offset[2]
        medial = int(np.argmin(cols)) if side == "left" else int(np.argmax(cols))
        hilum = (centre[0], rows[medial] * spacing[1], cols[medial] * spacing[2])
        kidneys.append(KidneyPlacement(side, tuple(centre), hilum))
    spine_y = float(np.mean([c[1] for c in centres])) - float(rng.uniform(0, 10))
    half_width, half_depth, centre_y = sample_body(rng, grid, midline_x, spine_y)
    reach = max(abs(c[2] - midline_x) for c in centres) + 60.0
    return BodyLayout(midline_x, centre_y, max(half_width, reach), half_depth, spine_y, tuple(kidneys))


def draw_cysts_within(rng: np.random.Generator, labels: np.ndarray, grid: Grid) -> np.ndarray:
    """Simple cysts inside the kidney label of a given mask (about half the cases, 1–3 of 1–5 cm).

    Used around real KiTS19 masks, whose labels must not change: a cyst is the part of a sphere,
    centred just under the kidney's surface, that lies in the kidney label (KiTS19 labels cysts
    kidney). Not for KiTS23 masks, whose cysts are labelled 3 (a water-density lesion labelled
    kidney would contradict them).

    Returns:
        ``(Z, Y, X)`` bool mask.
    """
    cysts = np.zeros(labels.shape, dtype=bool)
    kidney = labels == KIDNEY_LABEL
    count = _draw_cyst_count(rng)
    if count == 0 or not kidney.any():
        return cysts
    region = ndimage.find_objects(kidney.astype(np.int8))[0]
    surface = surface_voxels(kidney[region]) + np.array([s.start for s in region])
    for _ in range(count):
        radius = _draw_cyst_radius(rng)
        centre = tuple(surface[rng.integers(len(surface))] * np.asarray(grid.spacing))
        found = ellipsoid_level(grid, centre, (radius, radius, radius))
        if found is not None:
            cysts[found[0]] |= found[1] <= 1.0
    return cysts & kidney
