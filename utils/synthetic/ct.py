"""Turn synthetic anatomy into a CT volume in Hounsfield units, with scanner effects.

Per case, a contrast phase (corticomedullary to nephrographic) and an enhancement level set the
mean HU of every tissue; renal cortex, medulla and each tumour get their own texture; tumours
are drawn from KiTS19-like subtypes (clear-cell, papillary, oncocytic, fat-containing), some with
a necrotic core. Simple renal cysts (the ``cysts`` mask, and label 3 of a KiTS23 label map) are
water density, 0–20 HU, homogeneous and unenhanced, with a sharp wall: unlike the tumours, which
all enhance (the lowest, papillary, at 35–80 HU) or hold fat. Scanner effects: in-plane blur and a
slice-sensitivity profile, then correlated noise of 8–25 HU. Output is ``(Z, Y, X)`` int16 HU
clipped to [-1024, 3071].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from utils.data.dataset_definitions import CYST_LABEL
from utils.data.kits_layout import HU_RANGE, KIDNEY_LABEL, TUMOUR_LABEL
from utils.synthetic.shapes import Grid, component_boxes, smooth_noise
from utils.synthetic.tissues import Tissue

NOISE_SD_HU = (8.0, 25.0)
#: Range of the mean HU of a case's simple cysts (water density), before blur and noise.
CYST_HU = (0.0, 20.0)
#: Texture (HU, standard deviation, uncorrelated) inside a simple cyst, before blur and noise.
CYST_TEXTURE_HU = 4.0


@dataclass(frozen=True)
class Enhancement:
    """Per-case contrast and scanner parameters.

    Attributes:
        level: contrast enhancement scale, 0.6 (weak) to 1.4 (strong).
        phase: 0 corticomedullary (cortex bright, medulla dark) to 1 nephrographic (homogeneous).
        noise_sd: image noise standard deviation in HU.
        blur_mm: in-plane Gaussian blur sigma in mm.
    """

    level: float
    phase: float
    noise_sd: float
    blur_mm: float

    @property
    def cortex_hu(self) -> float:
        """Mean HU of the renal cortex."""
        return 100.0 + 110.0 * self.level * (1.0 - 0.2 * self.phase)

    @property
    def medulla_hu(self) -> float:
        """Mean HU of the renal medulla."""
        return (1.0 - self.phase) * (40.0 + 45.0 * self.level) + self.phase * (self.cortex_hu - 15.0)


def sample_enhancement(rng: np.random.Generator) -> Enhancement:
    """Draw a case's contrast phase, enhancement level, noise and blur."""
    return Enhancement(level=float(rng.uniform(0.6, 1.4)), phase=float(rng.beta(0.8, 1.5)),
                       noise_sd=float(rng.uniform(*NOISE_SD_HU)), blur_mm=float(rng.uniform(0.4, 1.0)))


def tissue_table(e: Enhancement) -> tuple[np.ndarray, np.ndarray]:
    """Mean HU and texture standard deviation (HU) of every :class:`Tissue`, float32 arrays."""
    p, lv = e.phase, e.level
    table = {
        Tissue.AIR: (-1000, 0), Tissue.SUBCUTANEOUS_FAT: (-105, 10), Tissue.MUSCLE: (50, 8),
        Tissue.VISCERAL_FAT: (-95, 15), Tissue.LIVER: ((1 - p) * (60 + 35 * lv) + p * (85 + 55 * lv), 8),
        Tissue.SPLEEN: ((1 - p) * (90 + 70 * lv) + p * (100 + 45 * lv), 5 + 25 * (1 - p)),
        Tissue.PANCREAS: ((1 - p) * (80 + 70 * lv) + p * (70 + 40 * lv), 12),
        Tissue.AORTA: ((1 - p) * (140 + 150 * lv) + p * (120 + 70 * lv), 5),
        Tissue.VENA_CAVA: ((1 - p) * (90 + 70 * lv) + p * (130 + 70 * lv), 15),
        Tissue.RENAL_VEIN: ((1 - p) * (120 + 100 * lv) + p * (130 + 60 * lv), 8),
        Tissue.CORTICAL_BONE: (700, 100), Tissue.CANCELLOUS_BONE: (230, 40), Tissue.DISC: (85, 10),
        Tissue.CSF: (12, 5), Tissue.BOWEL_WALL: ((1 - p) * (60 + 80 * lv) + p * (50 + 50 * lv), 15),
        Tissue.BOWEL_FLUID: (12, 6),
        Tissue.BOWEL_GAS: (-950, 30), Tissue.BOWEL_CONTRAST: (350, 80), Tissue.PERIRENAL_FAT: (-90, 12),
        Tissue.URINE: (10, 5),
    }
    means = np.zeros(len(Tissue), dtype=np.float32)
    texture = np.zeros(len(Tissue), dtype=np.float32)
    for tissue, (mean, sd) in table.items():
        means[tissue], texture[tissue] = mean, sd
    return means, texture


def _paint_kidney_parenchyma(image: np.ndarray, kidney: np.ndarray, grid: Grid, e: Enhancement,
                             rng: np.random.Generator) -> None:
    """Cortex (outer 4–7 mm) and medullary pyramids inside one kidney's bounding box, in place."""
    depth = ndimage.distance_transform_edt(kidney, sampling=grid.spacing)
    pyramids = smooth_noise(rng, kidney.shape, grid.spacing, 9.0, order=1)
    texture = smooth_noise(rng, kidney.shape, grid.spacing, 4.0, order=1)
    medulla = kidney & (depth > rng.uniform(3.5, 6.0)) & (pyramids > -0.6)
    values = np.where(medulla, e.medulla_hu, e.cortex_hu).astype(np.float32) + 10.0 * texture
    image[kidney] = values[kidney]


def _tumour_values(tumour: np.ndarray, grid: Grid, e: Enhancement, rng: np.random.Generator) -> np.ndarray:
    """HU values for one tumour's box: subtype mean, texture, necrotic core or central scar."""
    depth = ndimage.distance_transform_edt(tumour, sampling=grid.spacing)
    radius = float(depth.max())
    texture = smooth_noise(rng, tumour.shape, grid.spacing, float(rng.uniform(3.0, 8.0)), order=1)
    subtype = rng.choice(["clear_cell", "papillary", "oncocytic", "fat_containing"], p=[0.6, 0.2, 0.15, 0.05])
    if subtype == "clear_cell":
        values = rng.uniform(0.6, 1.1) * e.cortex_hu + rng.uniform(30, 50) * texture
        if radius > 8.0 and rng.random() < 0.6:
            core = depth > rng.uniform(0.35, 0.6) * radius
            values = np.where(core, rng.uniform(5, 30) + 8.0 * texture, values)
    elif subtype == "papillary":
        values = rng.uniform(35, 80) + rng.uniform(8, 15) * texture
    elif subtype == "oncocytic":
        values = rng.uniform(0.5, 0.85) * e.cortex_hu + rng.uniform(15, 25) * texture
        values = np.where(depth > 0.7 * radius, 0.4 * values, values)
    else:
        fat = smooth_noise(rng, tumour.shape, grid.spacing, 6.0, order=1) > 0.3
        values = np.where(fat, -60.0 + 20.0 * texture, rng.uniform(60, 110) + 15.0 * texture)
    return np.asarray(values, dtype=np.float32)


def paint_kidneys_and_tumours(image: np.ndarray, labels: np.ndarray, grid: Grid, e: Enhancement,
                              rng: np.random.Generator) -> None:
    """Write kidney and tumour intensities into ``image`` over the labelled voxels, in place.

    Cyst voxels (label 3) count as kidney here, so that the cortex follows the kidney's outline
    around them as for KiTS19's unlabelled cysts; :func:`render_ct` then paints them water.
    """
    for region in component_boxes(labels > 0):
        kidney = labels[region] == KIDNEY_LABEL
        kidney |= labels[region] == CYST_LABEL
        if kidney.any():
            _paint_kidney_parenchyma(image[region], kidney, grid, e, rng)
        tumours, _ = ndimage.label(labels[region] == TUMOUR_LABEL)
        for inner in ndimage.find_objects(tumours):
            box = tuple(slice(r.start + i.start, r.start + i.stop) for r, i in zip(region, inner, strict=False))
            tumour = labels[box] == TUMOUR_LABEL
            image[box][tumour] = _tumour_values(tumour, grid, e, rng)[tumour]


def apply_scanner_effects(image: np.ndarray, grid: Grid, e: Enhancement, rng: np.random.Generator) -> np.ndarray:
    """Blur (in-plane PSF, slice profile) and add in-plane-correlated noise; returns float32."""
    sigma = (0.35, e.blur_mm / grid.spacing[1], e.blur_mm / grid.spacing[2])
    blurred = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest", truncate=3.0)
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.0, 0.7, 0.7), truncate=3.0)
    noise *= np.float32(e.noise_sd / max(float(noise[: max(1, grid.shape[0] // 8)].std()), 1e-6))
    blurred += noise
    return blurred


def render_ct(grid: Grid, tissue: np.ndarray, labels: np.ndarray, e: Enhancement,
              rng: np.random.Generator, cysts: np.ndarray | None = None) -> np.ndarray:
    """Render a CT volume from a tissue map and KiTS19 or KiTS23 labels.

    Args:
        grid: shape ``(Z, Y, X)`` and spacing in mm.
        tissue: ``(Z, Y, X)`` uint8 :class:`Tissue` ids.
        labels: ``(Z, Y, X)`` uint8 in {0, 1, 2} (KiTS19) or {0, 1, 2, 3} (KiTS23); kidney and
            tumour voxels get their own values, cyst voxels (label 3) are rendered as simple cysts.
        e: the case's enhancement and scanner parameters.
        cysts: optional ``(Z, Y, X)`` bool mask of further simple cysts (KiTS19's, labelled
            kidney). All cysts of a case share one water density drawn from :data:`CYST_HU`.

    Returns:
        ``(Z, Y, X)`` int16 CT in HU.
    """
    means, texture = tissue_table(e)
    image = means[tissue]
    image += texture[tissue] * smooth_noise(rng, grid.shape, grid.spacing, 10.0, order=1)
    paint_kidneys_and_tumours(image, labels, grid, e, rng)
    labelled = labels == CYST_LABEL
    cysts = labelled if cysts is None else cysts | labelled
    if cysts.any():
        image[cysts] = (np.float32(rng.uniform(*CYST_HU))
                        + CYST_TEXTURE_HU * rng.standard_normal(int(cysts.sum()), dtype=np.float32))
    image = apply_scanner_effects(image, grid, e, rng)
    np.rint(image, out=image)
    np.clip(image, *HU_RANGE, out=image)
    return image.astype(np.int16)
