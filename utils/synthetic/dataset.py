"""Generate synthetic KiTS19- or KiTS23-style datasets on disk, procedurally or around real segmentations.

The output is exactly the KiTS19 layout: ``OUT/case_XXXXX/imaging.nii.gz`` (int16 HU),
``OUT/case_XXXXX/segmentation.nii.gz`` (uint8 0/1/2), both with the KiTS19 affine, and
``OUT/kits.json`` with ``case_id`` and ``voxel_spacing`` per case. Case ``i`` depends only on
``(seed, i)``: the same seed gives the same voxels and headers whatever the number of workers.
Every case folder is written to a temporary folder and renamed into place.

With ``dataset="kits23"`` the cases are KiTS23's: labels 0/1/2/3, simple renal cysts labelled 3
(water density, never touching a tumour), and ``OUT/kits23.json`` (``case_id`` per case; KiTS23's
metadata holds no spacing) instead of ``kits.json``; the case folders sit directly in ``OUT``, as
for KiTS19. Around real masks (:func:`generate_from_masks`) the masks are copied unchanged:
KiTS23 masks (``dataset="kits23"``) have their label-3 voxels rendered as cysts; KiTS19 masks
read as KiTS23 get no cysts at all (a cyst drawn into their kidney label would be a lesion
labelled kidney, which KiTS23 labels cyst); with KiTS19 (the default) they get unlabelled cysts
inside the kidney label, as KiTS19 itself has them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from utils.data.case_discovery import check_layout
from utils.data.dataset_definitions import (
    DATASETS,
    KITS19,
    DatasetDefinition,
    foreign_labels_hint,
    get_dataset,
    label_lookup,
)
from utils.data.kits_layout import (
    IMAGING_NAME,
    KIDNEY_LABEL,
    KITS_AXCODES,
    KITS_JSON_NAME,
    SEGMENTATION_NAME,
    TUMOUR_LABEL,
    build_kits_affine,
    case_id_for_index,
    is_case_id,
    spacing_from_affine,
)
from utils.data.nifti_io import load_nifti_verified, read_voxels, save_nifti, write_bytes_atomic, write_folder_atomic
from utils.data.output_guard import check_output_location
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
        dataset: whose labels and layout to write: ``"kits19"`` (labels 0/1/2, ``kits.json``) or
            ``"kits23"`` (also 3 for simple renal cysts, ``kits23.json``); a
            :class:`~utils.data.dataset_definitions.DatasetDefinition` is stored by its name.
    """

    matrix: int = 512
    spacing: tuple[float, float, float] | None = None
    coverage_mm: tuple[float, float] = (200.0, 420.0)
    dataset: str = KITS19.name

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset", get_dataset(self.dataset).name)
        if not 64 <= self.matrix <= 1024:
            raise ValueError(f"matrix must be between 64 and 1024 voxels, got {self.matrix}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be three values > 0 mm (z y x), got {self.spacing}")


@dataclass(frozen=True)
class CaseSummary:
    """What was written for one case: id, shape, spacing (mm) and label volumes (ml).

    ``kidney_ml`` is label 1, ``tumour_ml`` label 2 and ``cyst_ml`` label 3 (KiTS23); ``cyst_ml``
    is ``None`` for a dataset without a cyst label (KiTS19, whose cysts are labelled kidney).
    """

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    kidney_ml: float
    tumour_ml: float
    cyst_ml: float | None = None


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
        ``image`` ``(Z, Y, X)`` int16 HU, ``labels`` ``(Z, Y, X)`` uint8 ({0, 1, 2}; KiTS23 also
        3) and the KiTS19-convention ``(4, 4)`` affine.
    """
    rng = np.random.default_rng([seed, index])
    grid = sample_grid(rng, options)
    anatomy = build_procedural_case(rng, grid, options.dataset)
    tissue = paint_tissues(grid, anatomy.layout, anatomy.labels, anatomy.sinus, rng)
    image = render_ct(grid, tissue, anatomy.labels, sample_enhancement(rng), rng, cysts=anatomy.cysts)
    return image, anatomy.labels, build_kits_affine(grid.spacing)


def synthesise_image_for_mask(labels: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
                              dataset: DatasetDefinition | str = KITS19) -> np.ndarray:
    """Synthesise a CT (int16 HU, same shape and orientation) around a real label map.

    Args:
        labels: the mask, in the dataset's labels; label 3 (KiTS23) is rendered as simple cysts.
        affine: the mask's voxel-to-world matrix (any orientation).
        rng: the case's random generator.
        dataset: whose labels ``labels`` holds (a definition or its name). KiTS19 (default): about
            half the cases get unlabelled cysts inside the kidney label; a dataset with a cyst
            label gets no cysts but its own.
    """
    source = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(KITS_AXCODES)
    to_kits = nib.orientations.ornt_transform(source, target)
    canonical = nib.orientations.apply_orientation(labels, to_kits)
    spacing = np.asarray(spacing_from_affine(affine))[np.argsort(to_kits[:, 0])]
    grid = Grid(canonical.shape, tuple(float(s) for s in spacing))  # type: ignore[arg-type]
    canonical = np.ascontiguousarray(canonical)
    layout = layout_from_labels(rng, canonical, grid)
    tissue = paint_tissues(grid, layout, canonical, None, rng)
    cysts = None if get_dataset(dataset).has_label("cyst") else draw_cysts_within(rng, canonical, grid)
    image = render_ct(grid, tissue, canonical, sample_enhancement(rng), rng, cysts=cysts)
    back = nib.orientations.ornt_transform(target, source)
    return np.ascontiguousarray(nib.orientations.apply_orientation(image, back))


def _summarise(case_id: str, labels: np.ndarray, affine: np.ndarray,
               dataset: DatasetDefinition = KITS19) -> CaseSummary:
    spacing = spacing_from_affine(affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    tumour = int(np.count_nonzero(labels == TUMOUR_LABEL))
    if not dataset.has_label("cyst"):
        kidney = int(np.count_nonzero(labels)) - tumour
        return CaseSummary(case_id, tuple(labels.shape), spacing, round(kidney * voxel_ml, 2),
                           round(tumour * voxel_ml, 2))
    kidney = int(np.count_nonzero(labels == KIDNEY_LABEL))
    cyst = int(np.count_nonzero(labels == dataset.label("cyst")))
    return CaseSummary(case_id, tuple(labels.shape), spacing, round(kidney * voxel_ml, 2),
                       round(tumour * voxel_ml, 2), round(cyst * voxel_ml, 2))


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
    return _summarise(case_id, labels, affine, get_dataset(options.dataset))


def _read_mask(mask_path: Path, dataset: DatasetDefinition) -> tuple[np.ndarray, np.ndarray]:
    """Read a mask verified (a corrupt one must not be copied into the output) and check its labels.

    Returns:
        The labels (uint8) and the mask's affine.

    Raises:
        ValueError: not 3D, or label values outside the dataset's; the message names the file,
            and the dataset and setting to choose when another dataset has those labels.
    """
    image_file = load_nifti_verified(mask_path)
    labels = read_voxels(image_file, np.uint8)
    if labels.ndim != 3:
        raise ValueError(f"{mask_path}: segmentation must be 3D, got shape {labels.shape}")
    valid = sorted(dataset.valid_labels)
    unexpected = sorted(set(np.unique(labels).tolist()) - set(valid))
    if unexpected:
        raise ValueError(f"{mask_path}: label values must be in {valid}, found {unexpected}"
                         f"{foreign_labels_hint(unexpected, dataset)}")
    return labels, np.asarray(image_file.affine)


def _check_mask_job(args: tuple[Path, str]) -> str | None:
    """The reason a mask cannot be used (see :func:`_read_mask`), or ``None``; the dataset by name
    (a definition does not pickle into worker processes)."""
    mask_path, dataset = args
    try:
        _read_mask(mask_path, get_dataset(dataset))
    except ValueError as error:
        return str(error)
    return None


def _from_mask_job(args: tuple[Path, Path, int, str, str]) -> CaseSummary:
    out_dir, mask_path, seed, dataset_name, labels_as = args
    dataset, written_as = get_dataset(dataset_name), get_dataset(labels_as)
    case_id = mask_path.parent.name
    labels, affine = _read_mask(mask_path, dataset)
    rng = np.random.default_rng([seed, int(case_id.split("_")[1])])
    image = synthesise_image_for_mask(labels, affine, rng, dataset)
    if written_as == dataset:
        mask_bytes = mask_path.read_bytes()
        written = labels
    else:
        written = label_lookup(dataset, written_as)[labels]

    def write(folder: Path) -> None:
        save_nifti(image, affine, folder / IMAGING_NAME)
        if written_as == dataset:
            write_bytes_atomic(folder / SEGMENTATION_NAME, mask_bytes)
        else:
            save_nifti(written, affine, folder / SEGMENTATION_NAME)

    _write_case_folder(out_dir, case_id, write)
    return _summarise(case_id, written, affine, written_as)


def write_kits_json(out_dir: Path, summaries: list[CaseSummary]) -> Path:
    """Write ``kits.json`` (``case_id`` and ``voxel_spacing`` per case, KiTS19 keys) atomically."""
    entries = [{"case_id": s.case_id,
                "voxel_spacing": {"x_spacing": s.spacing[2], "y_spacing": s.spacing[1], "z_spacing": s.spacing[0]}}
               for s in sorted(summaries, key=lambda s: s.case_id)]
    path = out_dir / KITS_JSON_NAME
    write_bytes_atomic(path, (json.dumps(entries, indent=2) + "\n").encode())
    return path


def write_metadata(out_dir: Path, summaries: list[CaseSummary], dataset: DatasetDefinition | str = KITS19) -> Path:
    """Write the dataset's metadata file atomically: ``kits.json`` (see :func:`write_kits_json`) for
    KiTS19, else the dataset's own (``kits23.json``: a list of ``{"case_id": ...}``, no spacing,
    as KiTS23's holds none)."""
    dataset = get_dataset(dataset)
    if dataset.metadata_has_spacing:
        return write_kits_json(out_dir, summaries)
    entries = [{"case_id": s.case_id} for s in sorted(summaries, key=lambda s: s.case_id)]
    path = out_dir / dataset.metadata_name
    write_bytes_atomic(path, (json.dumps(entries, indent=2) + "\n").encode())
    return path


def _refuse_other_layout(out: Path, dataset: DatasetDefinition) -> None:
    """Refuse to write into a folder that holds another dataset's metadata file (a mixed folder
    would be read as either dataset)."""
    for other in DATASETS.values():
        path = out / other.metadata_name
        if other.metadata_name != dataset.metadata_name and path.exists():
            raise ValueError(f"{path} exists: {out} holds {other.title} cases, and {dataset.title} cases "
                             f"(with {dataset.metadata_name}) must not be mixed with them; write to an empty "
                             f"folder or delete {out} first")


def generate_dataset(out_dir: str | os.PathLike, cases: int, *, seed: int = 0,
                     options: SyntheticOptions = SyntheticOptions(), workers: int = 1,
                     show_progress: bool = True) -> list[CaseSummary]:
    """Write ``cases`` procedural cases (``case_00000`` …) and ``kits.json`` (KiTS23: ``kits23.json``) into ``out_dir``.

    Args:
        out_dir: destination folder (created if missing).
        cases: number of cases, >= 1.
        seed: master seed; case ``i`` depends only on ``(seed, i)``.
        options: grid sampling options and the dataset (KiTS23 writes ``kits23.json`` instead).
        workers: processes generating cases in parallel (>= 1).

    Raises:
        ValueError: ``cases`` < 1, or ``out_dir`` holds another dataset's metadata file.
    """
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    dataset = get_dataset(options.dataset)
    out = Path(out_dir)
    _refuse_other_layout(out, dataset)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, index, seed, options) for index in range(cases)]
    summaries = map_with_progress(_procedural_job, jobs, workers=workers, description="synthetic cases",
                                  show_progress=show_progress)
    write_metadata(out, summaries, dataset)
    _warn_about_stale_cases(out, summaries, dataset)
    return summaries


def _warn_about_stale_cases(out: Path, summaries: list[CaseSummary], dataset: DatasetDefinition = KITS19) -> None:
    """Warn when ``out`` holds case folders from an earlier run that the metadata file no longer lists."""
    written = {s.case_id for s in summaries}
    stale = sorted(p.name for p in out.iterdir() if is_case_id(p.name) and p.name not in written)
    if stale:
        logger.warning("%s holds %d case folder(s) from an earlier run (%s%s) that %s no longer lists; "
                       "delete them or write to an empty folder", out, len(stale), ", ".join(stale[:5]),
                       " …" if len(stale) > 5 else "", dataset.metadata_name)


def find_masks(masks_dir: str | os.PathLike, dataset: DatasetDefinition | str = KITS19) -> list[Path]:
    """Segmentations in a KiTS-layout folder (``case_XXXXX/segmentation.nii.gz``), sorted by case.

    Raises:
        FileNotFoundError: no such folder, or no mask in it (the message points at the dataset's
            ``data/`` or ``dataset/`` subfolder when that holds cases).
    """
    dataset = get_dataset(dataset)
    folder = Path(masks_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: mask folder not found")
    masks = sorted(p / SEGMENTATION_NAME for p in folder.iterdir()
                   if is_case_id(p.name) and (p / SEGMENTATION_NAME).is_file())
    if not masks:
        nested = folder / dataset.data_folder
        hint = (f"; did you mean {nested}?"
                if nested.is_dir() and any((p / SEGMENTATION_NAME).is_file() for p in nested.iterdir()
                                           if is_case_id(p.name)) else "")
        raise FileNotFoundError(f"{folder}: no case_XXXXX/{SEGMENTATION_NAME} found "
                                f"(expected the {dataset.title} layout){hint}")
    return masks


def _check_masks_layout(folder: Path, dataset: DatasetDefinition) -> None:
    """Refuse a mask folder laid out for a dataset with labels this one lacks (``kits23.json`` read as
    KiTS19: :class:`~utils.data.dataset_definitions.DatasetLayoutError`, naming the setting); KiTS19
    masks (``kits.json``) read as KiTS23 are fine, their labels being KiTS23's too."""
    wider = [other for other in DATASETS.values()
             if (folder / other.metadata_name).exists() and not other.valid_labels <= dataset.valid_labels]
    if wider:
        check_layout(folder, dataset)


def check_masks(masks: Sequence[Path], dataset: DatasetDefinition | str = KITS19, *, workers: int = 1,
                show_progress: bool = True) -> None:
    """Read every mask (verified) and check that it is 3D and holds only the dataset's labels.

    Raises:
        ValueError: naming every mask that fails and why; KiTS23 masks (label 3) read as KiTS19
            are told to pass ``--dataset kits23``.
    """
    dataset = get_dataset(dataset)
    reasons = map_with_progress(_check_mask_job, [(mask, dataset.name) for mask in masks], workers=workers,
                                description="checking masks", show_progress=show_progress)
    bad = [reason for reason in reasons if reason is not None]
    if bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"{len(bad)} of {len(masks)} masks cannot be read as {dataset.title} (labels "
                         f"{dataset.describe_labels()}); no case was written:\n  {shown}")


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
                        show_progress: bool = True, dataset: DatasetDefinition | str = KITS19,
                        labels_as: DatasetDefinition | str | None = None) -> list[CaseSummary]:
    """Synthesise ``imaging.nii.gz`` around real segmentations; the masks are copied unchanged
    (or rewritten in another dataset's labels with ``labels_as``).

    Every selected mask is read and its labels checked before any case is written.

    Args:
        masks_dir: KiTS-layout folder with ``case_XXXXX/segmentation.nii.gz`` (read only).
        out_dir: destination folder; must differ from ``masks_dir``.
        cases: take only the first ``cases`` masks (default: all).
        case_ids: take exactly the masks of these cases, e.g. ``["case_00150", "case_00151"]``
            (default: all); not together with ``cases``.
        dataset: whose masks these are and what to write (a definition or its name): KiTS19
            (default; ``kits.json``) or KiTS23 (label 3 rendered as cysts; ``kits23.json``).
            KiTS19 masks may be read as KiTS23: their cases simply have no cyst.
        labels_as: write the cases as this dataset's (labels and metadata file), default
            ``dataset``: KiTS23 masks with ``labels_as="kits19"`` keep their cysts in the CT but
            label them kidney, as KiTS19 does (:func:`utils.data.dataset_definitions.label_lookup`),
            and the folder gets ``kits.json``: KiTS19 training cases.

    Raises:
        FileNotFoundError: no mask folder, or no mask in it.
        ValueError: ``out_dir`` is ``masks_dir``; ``cases`` < 1; ``cases`` and ``case_ids`` both
            given; ``case_ids`` empty, repeated, or naming a case without a mask in ``masks_dir``;
            a mask that is not 3D or holds labels outside the dataset's (KiTS23 masks read as
            KiTS19); ``out_dir`` holds another dataset's metadata file.
        DatasetLayoutError: ``masks_dir`` holds another dataset's metadata file and not this
            one's (``kits23.json`` read as KiTS19); a ``ValueError``.
    """
    dataset = get_dataset(dataset)
    written_as = dataset if labels_as is None else get_dataset(labels_as)
    label_lookup(dataset, written_as)  # every label has a counterpart, before any work
    masks = find_masks(masks_dir, dataset)
    _check_masks_layout(Path(masks_dir), dataset)
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
    _refuse_other_layout(out, written_as)
    check_masks(masks, dataset, workers=workers, show_progress=show_progress)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, mask, seed, dataset.name, written_as.name) for mask in masks]
    summaries = map_with_progress(_from_mask_job, jobs, workers=workers, description="cases from masks",
                                  show_progress=show_progress)
    write_metadata(out, summaries, written_as)
    _warn_about_stale_cases(out, summaries, written_as)
    return summaries


def combine_case_folders(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[str]:
    """One KiTS19-layout folder holding the cases of several: every file of each case folder that
    a source's ``kits.json`` lists is hard-linked (copied where the file system cannot link), and
    ``kits.json`` holds the sources' entries in case order.

    The folder is written whole or not at all (:func:`utils.data.nifti_io.write_folder_atomic`,
    replacing an earlier one); the sources are only read.

    Returns:
        The case ids, sorted.

    Raises:
        ValueError: fewer than two sources; ``out_dir`` is a source or inside one; a source without
            ``kits.json`` (not a KiTS19-layout folder: KiTS23 cases are first written with
            ``labels_as="kits19"``, see :func:`generate_from_masks`), whose ``kits.json`` is not a list
            of cases, or that lacks a listed case folder; a case id in two sources. Each names the file.
    """
    folders = [Path(source) for source in sources]
    out = Path(out_dir)
    if len(folders) < 2:
        raise ValueError(f"combining case folders needs at least two sources, got {len(folders)}")
    check_output_location(out, folders, what="combined folder")
    entries: dict[str, dict] = {}
    origin: dict[str, Path] = {}
    for folder in folders:
        metadata = folder / KITS_JSON_NAME
        if not metadata.is_file():
            raise ValueError(f"{metadata}: not found; only KiTS19-layout folders (kits.json) can be combined, "
                             f"KiTS23 cases must be written with KiTS19 labels first (--labels-as kits19)")
        try:
            listed = json.loads(metadata.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{metadata}: cannot be read as JSON: {error}") from None
        if not isinstance(listed, list) or not all(isinstance(e, dict) and is_case_id(str(e.get("case_id")))
                                                    for e in listed):
            raise ValueError(f"{metadata}: must be a list of cases, each with a 'case_id' such as 'case_00000'")
        for entry in listed:
            case_id = entry["case_id"]
            if case_id in origin:
                raise ValueError(f"{case_id} is in both {origin[case_id]} and {folder}: combined cases must have "
                                 f"distinct ids")
            if not (folder / case_id).is_dir():
                raise ValueError(f"{folder / case_id}: listed in {metadata} but not found")
            entries[case_id], origin[case_id] = entry, folder

    def write(temporary: Path) -> None:
        for case_id in sorted(entries):
            target = temporary / case_id
            target.mkdir()
            for source in sorted((origin[case_id] / case_id).iterdir()):
                if source.is_file():
                    try:
                        os.link(source, target / source.name)
                    except OSError:
                        shutil.copy2(source, target / source.name)
        listing = [entries[case_id] for case_id in sorted(entries)]
        (temporary / KITS_JSON_NAME).write_text(json.dumps(listing, indent=2) + "\n")

    write_folder_atomic(out.parent, out.name, write)
    return sorted(entries)


def summaries_as_rows(summaries: list[CaseSummary]) -> list[dict]:
    """Plain dicts of the summaries, for tables and JSON."""
    return [asdict(s) for s in summaries]
