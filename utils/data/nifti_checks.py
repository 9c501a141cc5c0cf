"""Checks on the NIfTI files of a KiTS19 case; each returns :class:`Problem` objects, never raises.

* header level (fast): :func:`inspect_file` checks that a file opens as a NIfTI-1/2 image, is
  3D, has a finite voxel size > 0 and is long enough for its voxels (for ``.nii.gz`` the gzip
  trailer's ISIZE, the uncompressed size mod 2**32, must equal the header's data offset plus
  the voxel bytes; for ``.nii`` the file must be at least that long);
  :func:`check_image_label_agreement` and :func:`check_kits_spacing` compare headers.
* voxel level (full): :func:`read_image` and :func:`read_labels` read through
  :func:`~utils.data.nifti_io.load_nifti_verified` (gzip CRC-32 checked), then
  :func:`check_image_voxels` and :func:`check_label_voxels` find NaN/inf and bad label values.

Input files are only ever opened for reading; :mod:`utils.data.case_validation` builds reports from these.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from utils.data.kits_layout import AFFINE_ATOL_MM, AFFINE_RTOL, LABEL_NAMES, VALID_LABELS, spacing_from_affine
from utils.data.nifti_io import NiftiReadError, load_nifti, load_nifti_verified, read_voxels

MISSING_IMAGING = "missing_imaging"
MISSING_SEGMENTATION = "missing_segmentation"
UNREADABLE = "unreadable"
NOT_NIFTI = "not_nifti"
NOT_3D = "not_3d"
SHAPE_MISMATCH = "shape_mismatch"
AFFINE_MISMATCH = "affine_mismatch"
BAD_LABELS = "bad_labels"
NON_FINITE = "non_finite"
BAD_SPACING = "bad_spacing"
SPACING_DIFFERS_FROM_KITS_JSON = "spacing_differs_from_kits_json"
#: Problem codes that are only warnings: the case stays usable.
WARNING_CODES = frozenset({SPACING_DIFFERS_FROM_KITS_JSON})
_MAX_VALUES_SHOWN = 10

#: A ``(z, y, x)`` voxel size in mm.
Spacing = tuple[float, float, float]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a case: a code from this module, a sentence, and the file concerned."""

    code: str
    message: str
    path: Path | None

    @property
    def is_error(self) -> bool:
        """Whether the problem stops the case being used (everything but warning codes)."""
        return self.code not in WARNING_CODES

    def describe(self) -> str:
        """Return ``"<path>: <code>: <message>"``."""
        return f"{self.path}: {self.code}: {self.message}"


@dataclass
class FileCheck:
    """Header-level facts and problems of one file; ``image`` is ``None`` when it did not open.

    Attributes:
        path: the file checked.
        image: the lazily loaded image (header read, voxels on disk), ``None`` if it did not open.
        spacing: ``(z, y, x)`` voxel size in mm from the affine, ``None`` when unknown or invalid.
        problems: the header-level problems found.
    """

    path: Path
    image: nib.Nifti1Image | None = None
    spacing: Spacing | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def readable(self) -> bool:
        """Whether the header opened and no ``unreadable`` problem was found."""
        return self.image is not None and not any(p.code == UNREADABLE for p in self.problems)

    @property
    def is_3d(self) -> bool:
        """Whether the header opened and describes a 3D volume."""
        return self.image is not None and len(self.image.shape) == 3


def inspect_file(path: Path) -> FileCheck:
    """Open a NIfTI header and run the header-level checks on it (voxels are not read).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The check; problems (``unreadable``, ``not_nifti``, ``not_3d``, ``bad_spacing``) are
        collected in it, never raised.
    """
    check = FileCheck(path)
    if not path.is_file():
        check.problems.append(Problem(UNREADABLE, "is not a regular file", path))
        return check
    try:
        check.image = load_nifti(path)
    except NiftiReadError as error:
        check.problems.append(_open_failure(path, error))
        return check
    except OSError as error:
        check.problems.append(Problem(UNREADABLE, f"cannot be opened ({error})", path))
        return check
    shape = check.image.shape
    if len(shape) != 3:
        check.problems.append(
            Problem(NOT_3D, f"has {len(shape)} dimensions {shape}; expected a 3D (Z, Y, X) volume", path)
        )
    size_problem = _check_stored_size(path, check.image)
    if size_problem is not None:
        check.problems.append(size_problem)
    check.spacing, spacing_problem = _check_spacing(path, check.image)
    if spacing_problem is not None:
        check.problems.append(spacing_problem)
    return check


def _open_failure(path: Path, error: NiftiReadError) -> Problem:
    """``unreadable`` when a ``.gz`` file's gzip stream is broken, else ``not_nifti``."""
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as stream:
                stream.read(4096)
        except (OSError, EOFError, zlib.error) as gzip_error:
            return Problem(
                UNREADABLE,
                f"gzip stream unreadable ({type(gzip_error).__name__}: {gzip_error}): the file is corrupt, "
                "truncated or not gzip-compressed; re-download or re-create it",
                path,
            )
    return Problem(NOT_NIFTI, f"is not a NIfTI-1/2 image: {error.reason}", path)


def _check_stored_size(path: Path, image: nib.Nifti1Image) -> Problem | None:
    """Detect truncation cheaply: compare the stored size with header offset + voxel bytes."""
    offset = getattr(image.dataobj, "offset", None)
    if offset is None:
        return None
    needed = int(offset) + int(np.prod(image.shape, dtype=np.int64)) * image.get_data_dtype().itemsize
    if not path.name.endswith(".gz"):
        size = path.stat().st_size
        if size >= needed:
            return None
        return Problem(UNREADABLE, f"truncated: {size} bytes on disk, the header needs {needed}", path)
    with path.open("rb") as stream:
        stream.seek(0, os.SEEK_END)
        if stream.tell() < 18:
            return Problem(UNREADABLE, "truncated: too short to be a gzip file", path)
        stream.seek(-4, os.SEEK_END)
        isize = int.from_bytes(stream.read(4), "little")
    if isize == needed % 2**32:
        return None
    return Problem(
        UNREADABLE,
        f"truncated or corrupt: the gzip trailer records {isize} uncompressed bytes (mod 2**32) but the "
        f"header needs {needed} ({offset} + {image.shape} voxels of {image.get_data_dtype()}); "
        "re-download or re-create the file",
        path,
    )


def _check_spacing(path: Path, image: nib.Nifti1Image) -> tuple[Spacing | None, Problem | None]:
    """Return the affine's spacing (``None`` if invalid) and a ``bad_spacing`` problem if any."""
    spacing = spacing_from_affine(image.affine)
    pixdim = [float(p) for p in image.header["pixdim"][1 : 1 + min(len(image.shape), 3)]]
    affine_ok = all(np.isfinite(s) and s > 0 for s in spacing)
    pixdim_ok = all(np.isfinite(p) and p > 0 for p in pixdim)
    if affine_ok and pixdim_ok:
        return spacing, None
    return (spacing if affine_ok else None), Problem(
        BAD_SPACING,
        f"voxel size must be finite and > 0 mm; the affine gives {_fmt(spacing)}, "
        f"header pixdim {_fmt(pixdim)}",
        path,
    )


def check_image_label_agreement(image_check: FileCheck, label_check: FileCheck) -> list[Problem]:
    """Check that image and segmentation (both 3D) have the same shape and affine.

    Returns:
        ``shape_mismatch`` and ``affine_mismatch`` problems, on the segmentation's path.
    """
    problems = []
    image_shape, label_shape = image_check.image.shape, label_check.image.shape
    if image_shape != label_shape:
        problems.append(
            Problem(SHAPE_MISMATCH, f"shape {label_shape} differs from the image's {image_shape}", label_check.path)
        )
    image_affine, label_affine = image_check.image.affine, label_check.image.affine
    if not np.allclose(image_affine, label_affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM):
        largest = float(np.nanmax(np.abs(image_affine - label_affine)))
        problems.append(
            Problem(
                AFFINE_MISMATCH,
                f"affine differs from the image's by up to {largest:.4g} (allowed rtol={AFFINE_RTOL}, "
                f"atol={AFFINE_ATOL_MM} mm); spacing {_fmt(label_check.spacing)} vs the image's "
                f"{_fmt(image_check.spacing)}",
                label_check.path,
            )
        )
    return problems


def check_kits_spacing(path: Path, spacing: Spacing, kits_spacing: Spacing) -> list[Problem]:
    """Warn when a file's ``(z, y, x)`` spacing in mm (from its affine) disagrees with ``kits.json``'s.

    Returns:
        A ``spacing_differs_from_kits_json`` warning, or nothing.
    """
    if np.allclose(spacing, kits_spacing, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM):
        return []
    return [
        Problem(
            SPACING_DIFFERS_FROM_KITS_JSON,
            f"spacing (z, y, x) {_fmt(spacing)} mm from the affine differs from kits.json's {_fmt(kits_spacing)} mm; "
            "the affine's is used",
            path,
        )
    ]


def read_image(path: Path) -> tuple[np.ndarray | None, Problem | None]:
    """Read a CT volume, verified, as float32 HU.

    Returns:
        ``(Z, Y, X)`` float32 voxels and ``None``, or ``None`` and an ``unreadable`` problem
        when the file is corrupt or truncated.
    """
    image, problem = _load_verified(path)
    if image is None:
        return None, problem
    try:
        return read_voxels(image, np.float32), None
    except NiftiReadError as error:
        return None, Problem(UNREADABLE, error.reason, path)


def read_labels(path: Path) -> tuple[np.ndarray | None, Problem | None]:
    """Read a label map, verified, in its stored type (float64 when scaled), so no value is wrapped by a cast.

    Returns:
        ``(Z, Y, X)`` voxels and ``None``, or ``None`` and an ``unreadable`` problem when the
        file is corrupt or truncated.
    """
    image, problem = _load_verified(path)
    if image is None:
        return None, problem
    dtype = image.get_data_dtype()
    scaled = getattr(image.dataobj, "slope", 1.0) != 1.0 or getattr(image.dataobj, "inter", 0.0) != 0.0
    target = np.float64 if scaled or not np.issubdtype(dtype, np.integer) else dtype.type
    try:
        return read_voxels(image, target), None
    except NiftiReadError as error:
        return None, Problem(UNREADABLE, error.reason, path)


def _load_verified(path: Path) -> tuple[nib.Nifti1Image | None, Problem | None]:
    """:func:`~utils.data.nifti_io.load_nifti_verified`, its failures turned into an ``unreadable`` problem."""
    try:
        return load_nifti_verified(path), None
    except NiftiReadError as error:
        return None, Problem(UNREADABLE, error.reason, path)
    except FileNotFoundError as error:  # removed since its header was read
        return None, Problem(UNREADABLE, f"cannot be read ({error})", path)


def check_image_voxels(path: Path, image: np.ndarray) -> tuple[list[Problem], float | None, float | None]:
    """Count NaN/inf voxels of a CT volume.

    Returns:
        A ``non_finite`` problem if any such voxel, and the finite range in HU (``None, None``
        when no voxel is finite).
    """
    finite = np.isfinite(image)
    n_bad = int(image.size - np.count_nonzero(finite))
    problems = []
    if n_bad:
        problems.append(Problem(NON_FINITE, f"{n_bad} of {image.size} voxels are NaN or infinite", path))
    values = image[finite] if n_bad else image
    if values.size == 0:
        return problems, None, None
    return problems, float(values.min()), float(values.max())


def check_label_voxels(path: Path, labels: np.ndarray) -> tuple[list[Problem], dict[int, int]]:
    """Count voxels per label; values outside ``{0, 1, 2}`` give a ``bad_labels`` problem.

    Returns:
        The problems, and voxels per valid label ``{0: n, 1: n, 2: n}`` (every label present).
    """
    if labels.dtype == np.uint8:
        counts = np.bincount(labels.ravel(), minlength=len(VALID_LABELS))
        values, counts = np.flatnonzero(counts), counts[counts > 0]
    else:
        values, counts = np.unique(labels, return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist(), strict=True))
    label_counts = {label: int(found.get(label, 0)) for label in sorted(VALID_LABELS)}
    bad = [(value, count) for value, count in found.items() if value not in VALID_LABELS]
    if not bad:
        return [], label_counts
    shown = ", ".join(
        f"{value:g} ({count} voxel{'s' if count != 1 else ''})" for value, count in bad[:_MAX_VALUES_SHOWN]
    )
    more = f" and {len(bad) - _MAX_VALUES_SHOWN} more values" if len(bad) > _MAX_VALUES_SHOWN else ""
    allowed = ", ".join(f"{k} {v}" for k, v in LABEL_NAMES.items())
    return [
        Problem(BAD_LABELS, f"label values outside {{0, 1, 2}}: {shown}{more}; allowed are {allowed}", path)
    ], label_counts


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")" if values is not None else "unknown"
