"""Preprocessing: raw KiTS cases (KiTS19 or KiTS23) into the memory-mapped cache both models train from.

Per case (:func:`preprocess_volume`, also used at inference on a new CT): reorient to the
canonical orientation, resample (image trilinear with anti-aliasing, labels nearest) to the
target spacing, crop to the body, clip to the fingerprint's foreground percentiles and z-score
with its mean and standard deviation. For the whole dataset (:func:`preprocess_dataset`):
validate, compute the fingerprint, write every case atomically, save the split.

Re-running does no work for cases whose source files and parameters are unchanged. Parameters
name the plan folder (``spacing_<z>x<y>x<x>_<hash>``), so changed parameters give a new folder.
A finished plan folder is never rebuilt in place for other data (training runs depend on it):
when the data's identity (case ids, and the plan hash that its fingerprint fixes) differs from
the folder's, that data gets its own folder ``spacing_..._<hash>_data-<identity>`` beside it
(:func:`choose_plan_folder`). A case made with other parameters is refused when read, never
mixed in silently.

The dataset (:mod:`utils.data.dataset_definitions`; KiTS19 by default) decides how the folder is
validated (its layout and labels: a KiTS19 folder read as KiTS23, or the reverse, is refused with
:class:`~utils.data.dataset_definitions.DatasetLayoutError`) and which label locations each case
stores (:func:`utils.preprocessing.cache.location_classes`). ``plan.json`` names it; it enters the
plan hash and the plan folder's name only for datasets other than KiTS19, so that KiTS19 caches
made before KiTS23 was supported keep their hashes and folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from utils.analysis.slice_statistics import classify_slices
from utils.config.data import PreprocessingConfig, SplitConfig
from utils.config.experiment import ExperimentConfig
from utils.config.loading import config_as_dict
from utils.data.case_discovery import CaseFiles, resolve_data_dir
from utils.data.case_validation import (
    STATUS_INFERENCE_ONLY,
    CaseError,
    DatasetReport,
    load_case,
    select_cases,
    validate_dataset,
)
from utils.data.dataset_definitions import KITS19, DatasetDefinition, get_dataset
from utils.data.nifti_io import save_json_atomic
from utils.data.parallel import map_with_progress
from utils.data.splits import save_splits
from utils.preprocessing.cache import (
    CASE_STATISTICS_DIR,
    CASES_DIR,
    FINGERPRINT_NAME,
    IMAGE_FILE,
    LABEL_FILE,
    PLAN_NAME,
    location_classes,
    read_case_meta,
    remove_unfinished_writes,
    write_case_folder,
)
from utils.preprocessing.fingerprint import (
    CaseFingerprint,
    DatasetFingerprint,
    build_fingerprint,
    compute_case_fingerprint,
    load_case_fingerprint,
    save_case_fingerprint,
)
from utils.preprocessing.resampling import (
    CANONICAL_AXCODES,
    GridMapping,
    canonical_spacing,
    crop_to_box,
    find_body_box,
    reorient_to_canonical,
    resample_image,
    resample_labels,
    resampled_shape,
)

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
#: The reason given in :attr:`PreprocessingResult.excluded` for a case that is fine but has no
#: segmentation (a test case, usable for inference only), as opposed to an unusable case.
NO_SEGMENTATION = "no segmentation (inference only)"


@dataclass(frozen=True)
class Normalisation:
    """CT intensity normalisation: clip to ``[clip_low_hu, clip_high_hu]``, then ``(x - mean) / std``."""

    clip_low_hu: float
    clip_high_hu: float
    mean_hu: float
    std_hu: float

    @classmethod
    def from_fingerprint(cls, fingerprint: DatasetFingerprint) -> "Normalisation":
        """The normalisation nnU-Net uses for CT: foreground percentiles, mean and std."""
        return cls(*fingerprint.clip_hu, fingerprint.foreground_mean_hu, max(fingerprint.foreground_std_hu, 1e-3))

    @property
    def background_value(self) -> float:
        """The normalised value of air: the lower clip bound after z-scoring (used for padding)."""
        return float((self.clip_low_hu - self.mean_hu) / self.std_hu)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Clip and z-score a float32 image in HU, in place; returns it."""
        np.clip(image, self.clip_low_hu, self.clip_high_hu, out=image)
        image -= np.float32(self.mean_hu)
        image /= np.float32(self.std_hu)
        return image


def plan_name(config: PreprocessingConfig, dataset: DatasetDefinition | str = KITS19) -> str:
    """Folder name of a set of preprocessing parameters, e.g. ``spacing_3.22x1.62x1.62_1a2b3c4d``.

    Args:
        config: the parameters. dataset: the dataset cached (a definition or its name; default
            KiTS19, whose names do not depend on it; any other dataset changes the hash).
    """
    spacing = "x".join(f"{s:g}" for s in config.target_spacing)
    return f"spacing_{spacing}_{_digest(_parameters(config, dataset))[:8]}"


def plan_folder(config: PreprocessingConfig, cache_dir: str | os.PathLike | None = None,
                dataset: DatasetDefinition | str = KITS19) -> Path:
    """Where the cache of these parameters and this dataset lives: ``<cache_dir>/<plan_name>``."""
    return Path(cache_dir if cache_dir is not None else config.cache_dir) / plan_name(config, dataset)


def preprocess_volume(image_hu: np.ndarray, labels: np.ndarray | None, affine: np.ndarray,
                      config: PreprocessingConfig, normalisation: Normalisation,
                      *, overwrite_input: bool = False,
                      device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray | None, GridMapping]:
    """Preprocess one CT (and its labels) exactly as the cache does.

    Args:
        image_hu: ``(I, J, K)`` float32 CT in HU, in the file's axis order.
        labels: same shape uint8 labels, or ``None`` (a CT to segment).
        affine: the file's ``(4, 4)`` affine. config: the parameters. normalisation: from the fingerprint.
        overwrite_input: allow ``image_hu`` to be used as scratch space (saves memory on long CTs).
        device: where the image is resampled (``None``: the CPU, as the cache; a GPU at
            inference, equal to float32 rounding; see :func:`utils.preprocessing.resampling.resample_image`).

    Returns:
        The image (``config.image_dtype``, ``(Z, Y, X)`` canonical, cropped), the labels (uint8,
        same grid) or ``None``, and the :class:`GridMapping` back to the original grid.
    """
    if image_hu.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {image_hu.shape}")
    if labels is not None and labels.shape != image_hu.shape:
        raise ValueError(f"labels shape {labels.shape} differs from image shape {image_hu.shape}")
    image, orientation = reorient_to_canonical(image_hu, affine)
    spacing, canonical_shape = canonical_spacing(affine, orientation), image.shape
    shape = resampled_shape(image.shape, spacing, config.target_spacing)
    image = resample_image(image, shape, antialias=config.antialias, overwrite_input=overwrite_input, device=device)
    if labels is not None:
        labels = resample_labels(reorient_to_canonical(labels, affine)[0], shape)
    box = (find_body_box(image, config.body_threshold_hu, labels) if config.crop_to_body
           else tuple((0, n) for n in shape))
    image = normalisation.apply(np.array(crop_to_box(image, box), dtype=np.float32))
    mapping = GridMapping(
        original_shape=tuple(int(n) for n in image_hu.shape),
        original_affine=tuple(tuple(float(v) for v in row) for row in np.asarray(affine)),
        original_axcodes=tuple(str(c) for c in nib.aff2axcodes(affine)),
        orientation=tuple((float(a), float(f)) for a, f in orientation),
        canonical_spacing=spacing,
        resampled_shape=shape,
        resampled_spacing=tuple(float(n_in * s / n_out)
                                for n_in, s, n_out in zip(canonical_shape, spacing, shape, strict=True)),
        crop_box=box,
    )
    cropped_labels = None if labels is None else np.ascontiguousarray(crop_to_box(labels, box))
    return image.astype(config.image_dtype), cropped_labels, mapping


@dataclass(frozen=True)
class PreprocessingResult:
    """What :func:`preprocess_dataset` did.

    Attributes:
        folder: the plan folder. fingerprint: the dataset fingerprint.
        case_ids: cases in the cache. written / skipped: cases preprocessed now / already up to date.
        failed: case id to the reason it could not be preprocessed (the run reports, not raises).
        excluded: cases validation found unusable, with the reason, or without a segmentation
            (reason :data:`NO_SEGMENTATION`).
        seconds: wall time.
        split_problem: why no ``splits.json`` was written (too few cases), ``None`` when it was.
    """

    folder: Path
    fingerprint: DatasetFingerprint
    case_ids: list[str]
    written: list[str]
    skipped: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    split_problem: str | None = None


def _select_trainable_cases(report: DatasetReport) -> tuple[list[CaseFiles], dict[str, str]]:
    """The cases of ``report`` that can enter the cache, and the reason each other case cannot (logged)."""
    cases = select_cases(report, need_segmentation=True, on_bad="skip")
    selected = {c.case_id for c in cases}
    excluded = {r.case_id: NO_SEGMENTATION if r.status == STATUS_INFERENCE_ONLY
                else "; ".join(f"{p.code}: {p.message}" for p in r.errors)
                for r in report.reports if r.case_id not in selected}
    for case_id, reason in excluded.items():
        logger.warning("%s excluded from the cache: %s", case_id, reason)
    return cases, excluded


def _save_split_and_plan(folder: Path, case_ids: list[str], split: SplitConfig, plan: dict[str, Any]) -> str | None:
    """Write the split (when there are enough cases), then the plan; returns why no split was written, if so."""
    problem = None
    try:
        save_splits(folder, case_ids, split)
    except ValueError as error:  # too few cases to split: the cache still serves inference and statistics
        problem = f"no split written: {error}"
        logger.warning("%s: %s", folder, problem)
    save_json_atomic(folder / PLAN_NAME, plan)
    return problem


def preprocess_dataset(data_dir: str | os.PathLike, config: PreprocessingConfig, split: SplitConfig, *,
                       cache_dir: str | os.PathLike | None = None, workers: int = 1,
                       show_progress: bool = True, dataset: DatasetDefinition | str = KITS19) -> PreprocessingResult:
    """Validate a KiTS-layout folder, fingerprint it and write (or update) its preprocessing cache.

    Args:
        data_dir: the raw data (only read). config: the parameters. split: the split settings.
        cache_dir: cache root (default ``config.cache_dir``); the plan folder is made inside it.
        workers: processes for reading and preprocessing cases.
        dataset: the dataset the folder holds (a definition or its name, e.g. the experiment
            config's ``dataset``; default KiTS19): its layout and labels are checked, its label
            locations stored, and its name recorded in ``plan.json``.

    Raises:
        DatasetLayoutError: (a ``ValueError``) the folder holds another dataset's metadata file
            (``kits.json`` read as KiTS23, ``kits23.json`` read as KiTS19).
        ValueError: an unknown dataset name, no usable case with a segmentation, or too few for the split.
    """
    started = time.perf_counter()
    dataset = get_dataset(dataset)
    cases, excluded = _select_trainable_cases(validate_dataset(data_dir, show_progress=show_progress,
                                                               workers=workers, dataset=dataset))
    root = Path(cache_dir if cache_dir is not None else config.cache_dir)
    statistics, failed = _gather_statistics(cases, root / CASE_STATISTICS_DIR, workers, show_progress, dataset)
    usable = [c for c in cases if c.case_id not in failed]
    if not usable:
        raise ValueError(f"{data_dir}: no usable case with a segmentation to preprocess")
    fingerprint = build_fingerprint(statistics, config.clip_percentiles)
    normalisation = Normalisation.from_fingerprint(fingerprint)
    plan_hash = _digest({**_parameters(config, dataset), "normalisation": asdict(normalisation)})
    identity = data_identity(plan_hash, [c.case_id for c in usable])
    folder = choose_plan_folder(root, config, identity, dataset)
    cases_dir = folder / CASES_DIR
    cases_dir.mkdir(parents=True, exist_ok=True)
    remove_unfinished_writes(cases_dir)
    save_json_atomic(folder / FINGERPRINT_NAME, fingerprint.to_dict())
    up_to_date = {c.case_id for c in usable if _is_up_to_date(cases_dir / c.case_id, plan_hash, source_signature(c))}
    jobs = [(case, config, normalisation, plan_hash, cases_dir, workers, dataset) for case in usable
            if case.case_id not in up_to_date]
    outcomes = [(case_id, "skipped", "") for case_id in sorted(up_to_date)]
    outcomes += map_with_progress(_preprocess_job, jobs, workers=workers, description="preprocess",
                                  show_progress=show_progress)
    outcomes.sort()
    failed.update({case_id: error for case_id, status, error in outcomes if status == "failed"})
    done = [case_id for case_id, status, _ in outcomes if status != "failed"]
    split_problem = _save_split_and_plan(folder, done, split, {
        "version": PLAN_VERSION, "plan_name": folder.name, "plan_hash": plan_hash, "dataset": dataset.name,
        "preprocessing": config_as_dict(config), "normalisation": asdict(normalisation),
        "canonical_axcodes": list(CANONICAL_AXCODES), "source_data": str(Path(data_dir).resolve()),
        "case_ids": done, "data_identity": identity,
    })
    for case_id, error in failed.items():
        logger.error("%s could not be preprocessed: %s", case_id, error)
    return PreprocessingResult(folder, fingerprint, done, [c for c, s, _ in outcomes if s == "written"],
                               [c for c, s, _ in outcomes if s == "skipped"], failed, excluded,
                               time.perf_counter() - started, split_problem)


def data_identity(plan_hash: str, case_ids: list[str]) -> str:
    """What a plan folder's content depends on: the plan hash (parameters and normalisation) and the case ids."""
    return _digest({"plan_hash": plan_hash, "case_ids": sorted(case_ids)})


def recorded_data_identity(folder: str | os.PathLike) -> str | None:
    """The data identity of a finished plan folder (from its ``plan.json``), ``None`` when it has none yet."""
    try:
        plan = json.loads((Path(folder) / PLAN_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(plan, dict) or "plan_hash" not in plan or "case_ids" not in plan:
        return None
    return plan.get("data_identity") or data_identity(plan["plan_hash"], list(plan["case_ids"]))


def choose_plan_folder(cache_dir: str | os.PathLike, config: PreprocessingConfig, identity: str,
                       dataset: DatasetDefinition | str = KITS19) -> Path:
    """The plan folder for these parameters and this data; a finished folder of other data is never rebuilt.

    ``<cache_dir>/<plan_name>`` (the name depends on ``dataset`` for datasets other than KiTS19)
    when it is new, unfinished (no ``plan.json``: an interrupted first build) or already holds
    this data; when it holds other data (other case ids, or cases whose content gave another
    normalisation), runs trained on it may depend on it, so this data gets its own folder
    ``<plan_name>_data-<identity[:8]>`` next to it.
    """
    base = plan_folder(config, cache_dir, dataset)
    recorded = recorded_data_identity(base)
    if recorded is None or recorded == identity:
        return base
    other = base.with_name(f"{base.name}_data-{identity[:8]}")
    logger.info("%s holds other data (runs may depend on it); this data is cached in %s", base, other)
    return other


def source_signature(case: CaseFiles) -> dict[str, Any]:
    """Identity of a case's files: name, size and modification time (a changed file is redone)."""
    signature = {}
    for role, path in (("imaging", case.imaging), ("segmentation", case.segmentation)):
        stat = path.stat()
        signature[role] = {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return signature


def _gather_statistics(cases: list[CaseFiles], folder: Path, workers: int, show_progress: bool,
                       dataset: DatasetDefinition = KITS19) -> tuple[list[CaseFingerprint], dict[str, str]]:
    """Per-case fingerprint statistics, read from ``folder`` when up to date, else computed and saved.

    The statistics are of the foreground (label > 0) whatever the dataset, so one record serves
    every plan; ``dataset`` decides only which labels a case read for them may hold.
    """
    folder.mkdir(parents=True, exist_ok=True)
    known: dict[str, CaseFingerprint] = {}
    todo = []
    for case in cases:
        stored = load_case_fingerprint(folder / f"{case.case_id}.json")
        if stored is not None and stored.source == source_signature(case):
            known[case.case_id] = stored
        else:
            todo.append((case, folder, dataset))
    failed = {}
    for case_id, result in map_with_progress(_statistics_job, todo, workers=workers, description="fingerprint",
                                             show_progress=show_progress):
        if isinstance(result, str):
            failed[case_id] = result
        else:
            known[case_id] = result
    return [known[c.case_id] for c in cases if c.case_id in known], failed


def _statistics_job(job: tuple[CaseFiles, Path, DatasetDefinition]) -> tuple[str, CaseFingerprint | str]:
    case, folder, dataset = job
    try:
        loaded = load_case(case, dataset=dataset)
    except CaseError as error:
        return case.case_id, str(error)
    statistics = compute_case_fingerprint(case.case_id, loaded.image, loaded.segmentation, loaded.spacing,
                                         source_signature(case))
    save_case_fingerprint(folder / f"{case.case_id}.json", statistics)
    return case.case_id, statistics


def _preprocess_job(job: tuple[CaseFiles, PreprocessingConfig, Normalisation, str, Path, int, DatasetDefinition]
                    ) -> tuple[str, str, str]:
    """Preprocess and write one case unless it is up to date; returns (case id, status, error)."""
    case, config, normalisation, plan_hash, cases_dir, workers, dataset = job
    source = source_signature(case)
    _limit_threads(workers)
    try:
        loaded = load_case(case, dataset=dataset)
    except CaseError as error:
        return case.case_id, "failed", str(error)
    image, labels, mapping = preprocess_volume(loaded.image, loaded.segmentation, loaded.affine, config,
                                               normalisation, overwrite_input=True)
    del loaded
    locations = {name: np.argwhere(labels == value).astype(np.int32)
                 for name, value in location_classes(dataset).items()}
    counts = np.bincount(labels.ravel(), minlength=dataset.num_classes)
    meta = {
        "case_id": case.case_id, "plan_hash": plan_hash, "source": source, "shape": list(image.shape),
        "image_dtype": str(image.dtype), "mapping": mapping.to_dict(),
        "label_voxels": {str(v): int(n) for v, n in enumerate(counts)},
        "slice_classes": classify_slices(labels, dataset=dataset).tolist(),
    }
    write_case_folder(cases_dir, case.case_id, {IMAGE_FILE: image, LABEL_FILE: labels}, locations, meta)
    return case.case_id, "written", ""


def _is_up_to_date(folder: Path, plan_hash: str, source: dict[str, Any]) -> bool:
    meta = read_case_meta(folder)
    return meta is not None and meta.get("plan_hash") == plan_hash and meta.get("source") == source


def _limit_threads(workers: int) -> None:
    """Share the machine's cores between worker processes (torch would take all of them in each)."""
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _parameters(config: PreprocessingConfig, dataset: DatasetDefinition | str = KITS19) -> dict[str, Any]:
    """The parameters that change the cache's content (not where it is stored).

    The dataset is one of them except for KiTS19, whose plans predate it: their hashes stay as they were.
    """
    parameters = config_as_dict(config)
    parameters.pop("cache_dir")
    name = get_dataset(dataset).name
    return {"plan_version": PLAN_VERSION, **parameters, **({} if name == KITS19.name else {"dataset": name})}


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()


def prepare_training_cache(config: ExperimentConfig, data_dir: str | os.PathLike | None = None, *,
                           show_progress: bool = True) -> Path:
    """Build (or check up to date) the cache an experiment trains from; refuse or skip unusable cases.

    The one preparation of training data: :func:`utils.training.engine.train` calls it (through
    :func:`utils.training.setup.prepare_cache`, which runs it on the main process only and
    shares the result with the others) before setting a run up. Cases without a segmentation
    (inference only) are left out silently; cases that fail validation or preprocessing are an
    error with ``training.on_bad_case: error``, and a logged warning with ``skip``.

    Args:
        config: the experiment: ``dataset``, ``preprocessing``, ``split``, ``training.on_bad_case``,
            ``training.num_workers`` (preprocessing processes, at most the CPU count) and ``data_dir``.
        data_dir: raw KiTS-layout folder of ``config.dataset`` (default ``config.data_dir``, then
            ``KITS19_DATA``).
        show_progress: progress bars.

    Returns:
        The plan folder (open it with :func:`utils.preprocessing.cache.open_cache`).

    Raises:
        ValueError: no data folder given, or unusable cases with ``on_bad_case: error`` (each named
            with its reason); :class:`~utils.data.dataset_definitions.DatasetLayoutError` when the
            folder holds another dataset than ``config.dataset``.
        FileNotFoundError: the data folder does not exist.
    """
    source = resolve_data_dir(data_dir if data_dir is not None else config.data_dir)
    workers = max(1, min(config.training.num_workers, os.cpu_count() or 1))
    result = preprocess_dataset(source, config.preprocessing, config.split, workers=workers,
                                show_progress=show_progress, dataset=config.dataset)
    bad = {**result.failed, **{c: r for c, r in result.excluded.items() if r != NO_SEGMENTATION}}
    if bad:
        listing = "; ".join(f"{case}: {reason}" for case, reason in sorted(bad.items()))
        if config.training.on_bad_case == "error":
            raise ValueError(f"{source}: {len(bad)} case(s) cannot be used: {listing}. Fix or remove them, "
                             "or set training.on_bad_case=skip to train without them")
        logger.warning("training without %d unusable case(s): %s", len(bad), listing)
    return result.folder
