"""Checking KiTS19 cases before use: a report per case, a guard for loaders, and a safe loader.

Two depths of checking:

* fast (default): headers only, plus a cheap truncation test (see :mod:`utils.data.nifti_checks`).
  Catches missing, truncated, non-NIfTI and non-3D files, bad spacing (from any header field),
  image/label shape or affine disagreements, and the CT's header-level input anomalies of
  :func:`~utils.data.nifti_checks.find_ct_anomalies` (a volume of a few voxels; warnings for an
  oblique affine or a uint8 CT).
* full (``full=True``): also reads every voxel, verified (the whole gzip stream is read, so its
  CRC-32 is checked: nibabel alone does not, and would return wrong voxels), which catches a
  corrupt deflate stream, NaN/inf in the CT, a CT whose values do not look like HU (warning)
  and label values outside ``{0, 1, 2}``.

:func:`load_case` (used by the preprocessing) runs the same CT checks on the voxels it reads,
raises on errors and logs the warnings on the ``utils.data.input_anomalies`` logger.

Input files are only ever opened for reading. Problems are collected, never raised, by the
validators, so that a user sees everything wrong at once; :func:`select_cases` and
:func:`load_case` turn them into one clear exception. The problem codes and :class:`Problem`
live in :mod:`utils.data.nifti_checks`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.data.case_discovery import CaseFiles, DatasetListing, discover_cases
from utils.data.dataset_definitions import KITS19, DatasetDefinition
from utils.data.kits_layout import IMAGING_NAME, SEGMENTATION_NAME
from utils.data.nifti_checks import (
    MISSING_IMAGING,
    MISSING_SEGMENTATION,
    FileCheck,
    Problem,
    Spacing,
    check_image_label_agreement,
    check_kits_spacing,
    check_label_voxels,
    find_ct_anomalies,
    inspect_file,
    read_image,
    read_labels,
)
from utils.data.parallel import map_with_progress

logger = logging.getLogger(__name__)
#: Logger of the input anomalies :func:`load_case` finds that are only warnings (oblique affine, not HU, ...).
anomaly_logger = logging.getLogger("utils.data.input_anomalies")

STATUS_OK = "ok"
STATUS_INFERENCE_ONLY = "inference_only"
STATUS_UNUSABLE = "unusable"
STATUSES = (STATUS_OK, STATUS_INFERENCE_ONLY, STATUS_UNUSABLE)
ON_BAD_CHOICES = ("error", "skip")


@dataclass(frozen=True)
class CaseReport:
    """What :func:`validate_case` found out about one case.

    Attributes:
        case_id: e.g. ``"case_00007"``.
        status: ``"ok"``, ``"inference_only"`` (no segmentation, nothing else wrong) or
            ``"unusable"``.
        problems: every problem found, errors and warnings.
        shape: ``(Z, Y, X)`` of the image (of the segmentation when the image is unreadable).
        spacing: ``(z, y, x)`` voxel size in mm from that file's affine.
        files: the case's files.
        label_counts: full mode only: voxels per label ``{0: n, 1: n, 2: n}``.
        hu_min, hu_max: full mode only: range of the finite CT values in HU.
    """

    case_id: str
    status: str
    problems: tuple[Problem, ...]
    shape: tuple[int, ...] | None
    spacing: Spacing | None
    files: CaseFiles
    label_counts: Mapping[int, int] | None = None
    hu_min: float | None = None
    hu_max: float | None = None

    @property
    def errors(self) -> tuple[Problem, ...]:
        """The problems that are errors (not warnings)."""
        return tuple(p for p in self.problems if p.is_error)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of the report."""
        return {
            "case_id": self.case_id,
            "status": self.status,
            "imaging": _str_or_none(self.files.imaging),
            "segmentation": _str_or_none(self.files.segmentation),
            "shape": list(self.shape) if self.shape is not None else None,
            "spacing_mm": list(self.spacing) if self.spacing is not None else None,
            "problems": [
                {
                    "code": p.code,
                    "severity": "error" if p.is_error else "warning",
                    "message": p.message,
                    "path": _str_or_none(p.path),
                }
                for p in self.problems
            ],
            "label_counts": {str(k): v for k, v in self.label_counts.items()} if self.label_counts else None,
            "hu_min": self.hu_min,
            "hu_max": self.hu_max,
        }


@dataclass(frozen=True)
class DatasetReport:
    """The listing of a data folder and one :class:`CaseReport` per case (same order)."""

    listing: DatasetListing
    reports: tuple[CaseReport, ...]
    full: bool

    @property
    def counts(self) -> dict[str, int]:
        """Number of cases per status, every status present (``{"ok": n, ...}``)."""
        return {status: sum(r.status == status for r in self.reports) for status in STATUSES}

    @property
    def unusable(self) -> tuple[CaseReport, ...]:
        """Reports of the unusable cases."""
        return tuple(r for r in self.reports if r.status == STATUS_UNUSABLE)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of the whole report."""
        ids = self.listing.kits_json_ids
        return {
            "data_dir": str(self.listing.data_dir),
            "dataset": self.listing.dataset.name,
            "full": self.full,
            "warnings": list(self.listing.warnings),
            "kits_json_case_count": len(ids) if ids is not None else None,
            "counts": self.counts,
            "cases": [r.to_dict() for r in self.reports],
        }


class UnusableCaseError(ValueError):
    """Some cases cannot be used; ``case_ids`` lists them and the message says why."""

    def __init__(self, message: str, case_ids: tuple[str, ...]) -> None:
        self.case_ids = case_ids
        super().__init__(message)


class CaseError(ValueError):
    """One case could not be loaded; ``case_id``, ``path``, ``code`` and ``reason`` say why."""

    def __init__(self, case_id: str, path: Path | None, code: str, reason: str, more: int = 0) -> None:
        self.case_id = case_id
        self.path = path
        self.code = code
        self.reason = reason
        extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(
            f"{case_id}: {path}: {code}: {reason}{extra}; "
            "run scripts/check_data.py --full on the data folder for a report of every case"
        )


@dataclass(frozen=True, eq=False)
class LoadedCase:
    """The voxels of one case.

    Attributes:
        case_id: e.g. ``"case_00007"``.
        image: ``(Z, Y, X)`` float32 CT in HU.
        segmentation: ``(Z, Y, X)`` uint8 labels (0 background, 1 kidney, 2 tumour), ``None``
            when the case has none.
        affine: ``(4, 4)`` float64 voxel-to-world matrix of the image (KiTS19 convention).
        spacing: ``(z, y, x)`` voxel size in mm.
    """

    case_id: str
    image: np.ndarray
    segmentation: np.ndarray | None
    affine: np.ndarray
    spacing: Spacing


def validate_case(case: CaseFiles, *, full: bool = False, kits_spacing: Spacing | None = None,
                  dataset: DatasetDefinition = KITS19) -> CaseReport:
    """Check both files of a case and report every problem found.

    Args:
        case: the case's files, from :func:`~utils.data.case_discovery.discover_cases`.
        full: ``False`` (default) reads headers only; ``True`` also reads every voxel.
        kits_spacing: the ``(z, y, x)`` spacing in mm that ``kits.json`` gives for this case;
            a disagreement with the affine is a warning. ``None`` skips that check.
        dataset: whose labels are valid (default KiTS19: 0, 1, 2; KiTS23 adds 3).

    Returns:
        The case report; nothing is raised for bad files.
    """
    image_check, label_check, problems = _inspect_case(case)
    main = image_check if image_check is not None and image_check.image is not None else label_check
    label_counts = hu_min = hu_max = None
    if image_check is not None and image_check.image is not None:
        image = None
        if full and image_check.readable:
            image, read_problem = read_image(image_check.path)
            if image is None:
                problems.append(read_problem)
        anomalies = find_ct_anomalies(image_check.path, image, check=image_check)
        problems.extend(anomalies.problems)
        hu_min, hu_max = anomalies.hu_min, anomalies.hu_max
        del image
    if full and label_check is not None and label_check.readable:
        labels, read_problem = read_labels(label_check.path)
        if labels is None:
            problems.append(read_problem)
        else:
            label_problems, label_counts = check_label_voxels(label_check.path, labels, dataset)
            problems.extend(label_problems)
    if kits_spacing is not None and main is not None and main.spacing is not None:
        problems.extend(check_kits_spacing(main.path, main.spacing, kits_spacing))
    return CaseReport(
        case_id=case.case_id,
        status=_status(problems),
        problems=tuple(sorted(problems, key=_imaging_first)),
        shape=tuple(int(n) for n in main.image.shape) if main is not None and main.image is not None else None,
        spacing=main.spacing if main is not None else None,
        files=case,
        label_counts=label_counts,
        hu_min=hu_min,
        hu_max=hu_max,
    )


def validate_dataset(data_dir: str | os.PathLike, *, full: bool = False, show_progress: bool = True,
                     workers: int = 1, dataset: DatasetDefinition | str = KITS19) -> DatasetReport:
    """Discover the cases of a data folder and validate each (see :func:`validate_case`).

    Args:
        data_dir: the folder holding the ``case_XXXXX`` folders.
        full: read every voxel (slow on real data) instead of headers only.
        show_progress: show a tqdm progress bar on stderr.
        workers: processes checking cases in parallel (>= 1); worth it with ``full``.
        dataset: the dataset the folder holds (a definition or its name; default KiTS19).

    Raises:
        FileNotFoundError: ``data_dir`` does not exist.
        DatasetLayoutError: the folder holds another dataset's metadata file.
    """
    listing = discover_cases(data_dir, dataset)
    jobs = [(case, full, listing.kits_spacing.get(case.case_id), listing.dataset) for case in listing.cases]
    reports = tuple(map_with_progress(_validate_job, jobs, workers=workers, description="checking cases",
                                      show_progress=show_progress))
    report = DatasetReport(listing=listing, reports=reports, full=full)
    logger.info("%s: %s", listing.data_dir, report.counts)
    return report


def _validate_job(job: tuple[CaseFiles, bool, Spacing | None, DatasetDefinition]) -> CaseReport:
    case, full, kits_spacing, dataset = job
    return validate_case(case, full=full, kits_spacing=kits_spacing, dataset=dataset)


def select_cases(report: DatasetReport, *, need_segmentation: bool = True, on_bad: str = "error") -> list[CaseFiles]:
    """Return the cases a loader may use, refusing (or skipping) the bad ones.

    Args:
        report: from :func:`validate_dataset`.
        need_segmentation: ``True`` (training, evaluation) makes inference-only cases bad too.
        on_bad: ``"error"`` raises for any bad case; ``"skip"`` logs a warning per bad case
            and leaves it out.

    Raises:
        ValueError: ``on_bad`` is not one of ``"error"``, ``"skip"``.
        UnusableCaseError: ``on_bad="error"`` and some cases are bad; the message names every
            bad case with its file and reason.
    """
    if on_bad not in ON_BAD_CHOICES:
        raise ValueError(f"on_bad must be one of {', '.join(map(repr, ON_BAD_CHOICES))}, got {on_bad!r}")
    bad = [r for r in report.reports if r.status == STATUS_UNUSABLE or (need_segmentation and r.status != STATUS_OK)]
    if bad and on_bad == "error":
        lines = [f"  {r.case_id}: {p.describe()}" for r in bad for p in r.errors]
        raise UnusableCaseError(
            f"{len(bad)} of {len(report.reports)} cases in {report.listing.data_dir} cannot be used"
            f"{' (a segmentation is needed)' if need_segmentation else ''}:\n"
            + "\n".join(lines)
            + '\nFix or remove these files, or pass on_bad="skip" to leave these cases out'
            + (" (or need_segmentation=False for inference)." if need_segmentation else "."),
            tuple(r.case_id for r in bad),
        )
    for r in bad:
        logger.warning("skipping %s: %s", r.case_id, "; ".join(p.describe() for p in r.errors))
    bad_ids = {r.case_id for r in bad}
    return [r.files for r in report.reports if r.case_id not in bad_ids]


def load_case(case: CaseFiles, *, need_segmentation: bool = True,
              dataset: DatasetDefinition = KITS19) -> LoadedCase:
    """Read a case's voxels once, checking them as :func:`validate_case` with ``full=True`` does.

    Args:
        case: the case's files.
        need_segmentation: ``True`` makes a missing segmentation an error; with ``False`` the
            segmentation is still read when present, and ``None`` otherwise.
        dataset: whose labels are valid (default KiTS19).

    Returns:
        The image (``(Z, Y, X)`` float32 HU), segmentation (uint8 or ``None``), affine and spacing.

    Raises:
        CaseError: a file is missing, unreadable or fails a check (an input anomaly of
            :func:`~utils.data.nifti_checks.find_ct_anomalies` included); the message names the
            file and the reason. Warnings are logged on the ``utils.data.input_anomalies`` logger.
    """
    image_check, label_check, problems = _inspect_case(case)
    if not need_segmentation:
        problems = [p for p in problems if p.code != MISSING_SEGMENTATION]
    _raise_on_errors(case, problems)
    image, read_problem = read_image(image_check.path)
    if image is None:
        _raise_on_errors(case, [read_problem])
    anomalies = find_ct_anomalies(image_check.path, image, check=image_check)
    _raise_on_errors(case, anomalies.problems)
    for warning in [p for p in problems if not p.is_error] + anomalies.warnings:
        anomaly_logger.warning("%s: %s", case.case_id, warning.describe())
    segmentation = None
    if label_check is not None:
        labels, read_problem = read_labels(label_check.path)
        problems = [read_problem] if labels is None else check_label_voxels(label_check.path, labels, dataset)[0]
        _raise_on_errors(case, problems)
        segmentation = labels.astype(np.uint8, copy=False)
    return LoadedCase(
        case_id=case.case_id,
        image=image,
        segmentation=segmentation,
        affine=np.asarray(image_check.image.affine, dtype=np.float64),
        spacing=image_check.spacing,
    )


def _inspect_case(case: CaseFiles) -> tuple[FileCheck | None, FileCheck | None, list[Problem]]:
    """Check the headers of both files and their agreement; return both checks and all problems."""
    problems: list[Problem] = []
    checks: list[FileCheck | None] = []
    for path, name, code in (
        (case.imaging, IMAGING_NAME, MISSING_IMAGING),
        (case.segmentation, SEGMENTATION_NAME, MISSING_SEGMENTATION),
    ):
        if path is None:
            problems.append(Problem(code, f"no {name} in the case folder", case.folder / name))
            checks.append(None)
        else:
            check = inspect_file(path)
            problems.extend(check.problems)
            checks.append(check)
    image_check, label_check = checks
    if image_check is not None and label_check is not None and image_check.is_3d and label_check.is_3d:
        problems.extend(check_image_label_agreement(image_check, label_check))
    return image_check, label_check, problems


def _imaging_first(problem: Problem) -> int:
    """Sort key listing the image's problems before the segmentation's (stable otherwise)."""
    return 0 if problem.path is not None and problem.path.name.startswith("imaging") else 1


def _status(problems: list[Problem]) -> str:
    codes = {p.code for p in problems if p.is_error}
    if codes - {MISSING_SEGMENTATION}:
        return STATUS_UNUSABLE
    return STATUS_INFERENCE_ONLY if codes else STATUS_OK


def _raise_on_errors(case: CaseFiles, problems: list[Problem | None]) -> None:
    errors = [p for p in problems if p is not None and p.is_error]
    if errors:
        first = errors[0]
        raise CaseError(case.case_id, first.path, first.code, first.message, more=len(errors) - 1)


def _str_or_none(path: Path | None) -> str | None:
    return str(path) if path is not None else None
