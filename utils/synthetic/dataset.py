"""Generate synthetic KiTS19-style datasets on disk, procedurally or around real segmentations.

The output is exactly the KiTS19 layout: ``OUT/case_XXXXX/imaging.nii.gz`` (int16 HU),
``OUT/case_XXXXX/segmentation.nii.gz`` (uint8 0/1/2), both with the KiTS19 affine, and
``OUT/kits.json`` with ``case_id`` and ``voxel_spacing`` per case. Case ``i`` depends only on
``(seed, i)``: the same seed gives the same voxels and headers whatever the number of workers.
Every case folder is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from utils.data.kits_layout import (
    IMAGING_NAME,
    KITS_AXCODES,
    KITS_JSON_NAME,
    SEGMENTATION_NAME,
    TUMOUR_LABEL,
    VALID_LABELS,
    build_kits_affine,
    case_id_for_index,
    is_case_id,
    spacing_from_affine,
)
from utils.data.nifti_io import load_nifti_verified, read_voxels, save_nifti, write_bytes_atomic, write_folder_atomic
from utils.data.parallel import map_with_progress
from utils.synthetic.anatomy import build_procedural_case, draw_cysts_within, layout_from_labels
from utils.synthetic.ct import render_ct, sample_enhancement
from utils.synthetic.shapes import Grid
from utils.synthetic.tissues import paint_tissues

logger = logging.getLogger(__name__)

#: Slice thickness (mm) of the KiTS19 training cases and how many cases have it (kits.json).
KITS_SLICE_THICKNESS_COUNTS = {5.0: 86, 3.0: 38, 0.5: 31, 2.5: 23, 1.0: 18, 1.25: 5, 2.0: 4, 4.0: 2, 1.5: 2, 3.75: 1}
#: In-plane pixel size of KiTS19 (mm) at a 512 matrix: median, spread, and the range drawn from.
KITS_PIXEL_MM = (0.78, 0.12, (0.6, 1.04))


@dataclass(frozen=True)
class SyntheticOptions:
    """How procedural cases are sampled.

    Attributes:
        matrix: in-plane size in voxels (512 as in KiTS19; smaller for quick runs, with the
            field of view kept, so the pixel size grows).
        spacing: fixed ``(z, y, x)`` voxel size in mm, or None to draw it from KiTS19's ranges.
        coverage_mm: range of the scan's cranio-caudal length in mm.
    """

    matrix: int = 512
    spacing: tuple[float, float, float] | None = None
    coverage_mm: tuple[float, float] = (200.0, 420.0)

    def __post_init__(self) -> None:
        if not 64 <= self.matrix <= 1024:
            raise ValueError(f"matrix must be between 64 and 1024 voxels, got {self.matrix}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be three values > 0 mm (z y x), got {self.spacing}")


@dataclass(frozen=True)
class CaseSummary:
    """What was written for one case: id, shape, spacing (mm) and label volumes (ml)."""

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    kidney_ml: float
    tumour_ml: float


def sample_grid(rng: np.random.Generator, options: SyntheticOptions) -> Grid:
    """Draw a scan's voxel grid: KiTS19-like slice thickness, pixel size and coverage."""
    if options.spacing is not None:
        spacing = tuple(float(np.float32(s)) for s in options.spacing)
    else:
        thickness = np.array(list(KITS_SLICE_THICKNESS_COUNTS))
        weights = np.array(list(KITS_SLICE_THICKNESS_COUNTS.values()), dtype=float)
        median, spread, (low, high) = KITS_PIXEL_MM
        pixel = float(np.float32(np.clip(rng.normal(median, spread), low, high) * 512 / options.matrix))
        spacing = (float(rng.choice(thickness, p=weights / weights.sum())), pixel, pixel)
    slices = max(int(round(rng.uniform(*options.coverage_mm) / spacing[0])), 8)
    return Grid((slices, options.matrix, options.matrix), spacing)  # type: ignore[arg-type]


def generate_case(index: int, seed: int, options: SyntheticOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one procedural case.

    Returns:
        ``image`` ``(Z, Y, X)`` int16 HU, ``labels`` ``(Z, Y, X)`` uint8 {0, 1, 2} and the
        KiTS19-convention ``(4, 4)`` affine.
    """
    rng = np.random.default_rng([seed, index])
    grid = sample_grid(rng, options)
    anatomy = build_procedural_case(rng, grid)
    tissue = paint_tissues(grid, anatomy.layout, anatomy.labels, anatomy.sinus, rng)
    image = render_ct(grid, tissue, anatomy.labels, sample_enhancement(rng), rng, cysts=anatomy.cysts)
    return image, anatomy.labels, build_kits_affine(grid.spacing)


def synthesise_image_for_mask(labels: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Synthesise a CT (int16 HU, same shape and orientation) around a real KiTS19 label map."""
    source = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(KITS_AXCODES)
    to_kits = nib.orientations.ornt_transform(source, target)
    canonical = nib.orientations.apply_orientation(labels, to_kits)
    spacing = np.asarray(spacing_from_affine(affine))[np.argsort(to_kits[:, 0])]
    grid = Grid(canonical.shape, tuple(float(s) for s in spacing))  # type: ignore[arg-type]
    canonical = np.ascontiguousarray(canonical)
    layout = layout_from_labels(rng, canonical, grid)
    tissue = paint_tissues(grid, layout, canonical, None, rng)
    cysts = draw_cysts_within(rng, canonical, grid)
    image = render_ct(grid, tissue, canonical, sample_enhancement(rng), rng, cysts=cysts)
    back = nib.orientations.ornt_transform(target, source)
    return np.ascontiguousarray(nib.orientations.apply_orientation(image, back))


def _summarise(case_id: str, labels: np.ndarray, affine: np.ndarray) -> CaseSummary:
    spacing = spacing_from_affine(affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    tumour = int(np.count_nonzero(labels == TUMOUR_LABEL))
    kidney = int(np.count_nonzero(labels)) - tumour
    return CaseSummary(case_id, tuple(labels.shape), spacing, round(kidney * voxel_ml, 2), round(tumour * voxel_ml, 2))


def _write_case_folder(out_dir: Path, case_id: str, writer) -> None:
    """Write a case through ``writer(temp_folder)`` into a temporary folder, then swap it into place."""
    write_folder_atomic(out_dir, case_id, writer)


def _procedural_job(args: tuple[Path, int, int, SyntheticOptions]) -> CaseSummary:
    out_dir, index, seed, options = args
    case_id = case_id_for_index(index)
    image, labels, affine = generate_case(index, seed, options)

    def write(folder: Path) -> None:
        save_nifti(image, affine, folder / IMAGING_NAME)
        save_nifti(labels, affine, folder / SEGMENTATION_NAME)

    _write_case_folder(out_dir, case_id, write)
    return _summarise(case_id, labels, affine)


def _from_mask_job(args: tuple[Path, Path, int]) -> CaseSummary:
    out_dir, mask_path, seed = args
    case_id = mask_path.parent.name
    image_file = load_nifti_verified(mask_path)  # a corrupt mask must not be copied into the output
    labels = read_voxels(image_file, np.uint8)
    if labels.ndim != 3:
        raise ValueError(f"{mask_path}: segmentation must be 3D, got shape {labels.shape}")
    unexpected = sorted(set(np.unique(labels).tolist()) - VALID_LABELS)
    if unexpected:
        raise ValueError(f"{mask_path}: label values must be in {sorted(VALID_LABELS)}, found {unexpected}")
    rng = np.random.default_rng([seed, int(case_id.split("_")[1])])
    image = synthesise_image_for_mask(labels, image_file.affine, rng)
    mask_bytes = mask_path.read_bytes()

    def write(folder: Path) -> None:
        save_nifti(image, image_file.affine, folder / IMAGING_NAME)
        write_bytes_atomic(folder / SEGMENTATION_NAME, mask_bytes)

    _write_case_folder(out_dir, case_id, write)
    return _summarise(case_id, labels, image_file.affine)


def write_kits_json(out_dir: Path, summaries: list[CaseSummary]) -> Path:
    """Write ``kits.json`` (``case_id`` and ``voxel_spacing`` per case, KiTS19 keys) atomically."""
    entries = [{"case_id": s.case_id,
                "voxel_spacing": {"x_spacing": s.spacing[2], "y_spacing": s.spacing[1], "z_spacing": s.spacing[0]}}
               for s in sorted(summaries, key=lambda s: s.case_id)]
    path = out_dir / KITS_JSON_NAME
    write_bytes_atomic(path, (json.dumps(entries, indent=2) + "\n").encode())
    return path


def generate_dataset(out_dir: str | os.PathLike, cases: int, *, seed: int = 0,
                     options: SyntheticOptions = SyntheticOptions(), workers: int = 1,
                     show_progress: bool = True) -> list[CaseSummary]:
    """Write ``cases`` procedural cases (``case_00000`` …) and ``kits.json`` into ``out_dir``.

    Args:
        out_dir: destination folder (created if missing).
        cases: number of cases, >= 1.
        seed: master seed; case ``i`` depends only on ``(seed, i)``.
        options: grid sampling options.
        workers: processes generating cases in parallel (>= 1).
    """
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, index, seed, options) for index in range(cases)]
    summaries = map_with_progress(_procedural_job, jobs, workers=workers, description="synthetic cases",
                                  show_progress=show_progress)
    write_kits_json(out, summaries)
    _warn_about_stale_cases(out, summaries)
    return summaries


def _warn_about_stale_cases(out: Path, summaries: list[CaseSummary]) -> None:
    """Warn when ``out`` holds case folders from an earlier run that kits.json no longer lists."""
    written = {s.case_id for s in summaries}
    stale = sorted(p.name for p in out.iterdir() if is_case_id(p.name) and p.name not in written)
    if stale:
        logger.warning("%s holds %d case folder(s) from an earlier run (%s%s) that kits.json no longer lists; "
                       "delete them or write to an empty folder", out, len(stale), ", ".join(stale[:5]),
                       " …" if len(stale) > 5 else "")


def find_masks(masks_dir: str | os.PathLike) -> list[Path]:
    """Segmentations in a KiTS19-layout folder (``case_XXXXX/segmentation.nii.gz``), sorted by case."""
    folder = Path(masks_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: mask folder not found")
    masks = sorted(p / SEGMENTATION_NAME for p in folder.iterdir()
                   if is_case_id(p.name) and (p / SEGMENTATION_NAME).is_file())
    if not masks:
        raise FileNotFoundError(f"{folder}: no case_XXXXX/{SEGMENTATION_NAME} found (expected the KiTS19 layout)")
    return masks


def select_masks(masks: Sequence[Path], case_ids: Sequence[str], masks_dir: str | os.PathLike) -> list[Path]:
    """The masks of ``case_ids``, in that order, from :func:`find_masks`'s list of ``masks_dir``.

    Raises:
        ValueError: ``case_ids`` empty or repeated, or an id without a mask in ``masks_dir``
            (the message names the folder and every such id).
    """
    ids = list(case_ids)
    if isinstance(case_ids, str) or not ids:
        raise ValueError(f"case_ids must be a non-empty list of case ids such as ['case_00150'], got {case_ids!r}")
    repeated = sorted({case_id for case_id in ids if ids.count(case_id) > 1})
    if repeated:
        raise ValueError(f"case_ids must name each case once, got {repeated} more than once")
    by_id = {mask.parent.name: mask for mask in masks}
    absent = [case_id for case_id in ids if case_id not in by_id]
    if absent:
        raise ValueError(f"{masks_dir}: no case_XXXXX/{SEGMENTATION_NAME} for {len(absent)} requested case id(s): "
                         f"{', '.join(absent)}; the folder holds {len(by_id)} masks "
                         f"({min(by_id)} … {max(by_id)})")
    return [by_id[case_id] for case_id in ids]


def generate_from_masks(masks_dir: str | os.PathLike, out_dir: str | os.PathLike, *, cases: int | None = None,
                        case_ids: Sequence[str] | None = None, seed: int = 0, workers: int = 1,
                        show_progress: bool = True) -> list[CaseSummary]:
    """Synthesise ``imaging.nii.gz`` around real segmentations; the masks are copied unchanged.

    Args:
        masks_dir: KiTS19-layout folder with ``case_XXXXX/segmentation.nii.gz`` (read only).
        out_dir: destination folder; must differ from ``masks_dir``.
        cases: take only the first ``cases`` masks (default: all).
        case_ids: take exactly the masks of these cases, e.g. ``["case_00150", "case_00151"]``
            (default: all); not together with ``cases``.

    Raises:
        FileNotFoundError: no mask folder, or no mask in it.
        ValueError: ``out_dir`` is ``masks_dir``; ``cases`` < 1; ``cases`` and ``case_ids`` both
            given; ``case_ids`` empty, repeated, or naming a case without a mask in ``masks_dir``.
    """
    masks = find_masks(masks_dir)
    out = Path(out_dir)
    if out.resolve() == Path(masks_dir).resolve():
        raise ValueError(f"--out must differ from --from-masks ({out}): the input data are never modified")
    if cases is not None and case_ids is not None:
        raise ValueError(f"give cases (the first N masks) or case_ids (those masks), not both; got cases={cases} "
                         f"and {len(case_ids)} case_ids")
    if cases is not None:
        if cases < 1:
            raise ValueError(f"cases must be >= 1, got {cases}")
        masks = masks[:cases]
    if case_ids is not None:
        masks = select_masks(masks, case_ids, masks_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, mask, seed) for mask in masks]
    summaries = map_with_progress(_from_mask_job, jobs, workers=workers, description="cases from masks",
                                  show_progress=show_progress)
    write_kits_json(out, summaries)
    _warn_about_stale_cases(out, summaries)
    return summaries


def summaries_as_rows(summaries: list[CaseSummary]) -> list[dict]:
    """Plain dicts of the summaries, for tables and JSON."""
    return [asdict(s) for s in summaries]
