"""Checks on the NIfTI files of a KiTS19 case; each returns :class:`Problem` objects, never raises.

* header level (fast): :func:`inspect_file` checks that a file opens as a NIfTI-1/2 image, is
  3D, has a finite voxel size > 0 and is long enough for its voxels (for ``.nii.gz`` the gzip
  trailer's ISIZE, the uncompressed size mod 2**32, must equal the header's data offset plus
  the voxel bytes; for ``.nii`` the file must be at least that long);
  :func:`check_image_label_agreement` and :func:`check_kits_spacing` compare headers.
* voxel level (full): :func:`read_image` and :func:`read_labels` read through
  :func:`~utils.data.nifti_io.load_nifti_verified` (gzip CRC-32 checked), then
  :func:`check_image_voxels` and :func:`check_label_voxels` find NaN/inf and bad label values.
* input anomalies of a CT: :func:`find_ct_anomalies` is the one place that names what is odd
  about a CT before it is used, for every command that reads one (``check_data`` through
  :mod:`utils.data.case_validation`, ``preprocess`` through the same, and ``segment``):
  a volume of a few voxels (error), an oblique affine (warning: the rotation is ignored), a
  stored type or value range that does not look like Hounsfield units (warning), and, given
  the voxels, NaN/inf (error); given a model's window, a volume smaller than one window
  (warning: it is padded). Zero, negative or NaN voxel sizes in any header field (``pixdim``,
  qform, sform, the affine) are found by :func:`inspect_file` for every file.

Input files are only ever opened for reading; :mod:`utils.data.case_validation` builds reports from these.
"""

from __future__ import annotations

import errno
import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from utils.data.dataset_definitions import KITS19, DatasetDefinition, foreign_labels_hint
from utils.data.kits_layout import AFFINE_ATOL_MM, AFFINE_RTOL, spacing_from_affine
from utils.data.nifti_io import NiftiReadError, load_nifti, load_nifti_verified, read_raw_header, read_voxels

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
TOO_SMALL = "too_small"
OBLIQUE_AFFINE = "oblique_affine"
NOT_HU = "not_hounsfield_units"
SMALLER_THAN_WINDOW = "smaller_than_window"
#: Problem codes that are only warnings: the case stays usable.
WARNING_CODES = frozenset({SPACING_DIFFERS_FROM_KITS_JSON, OBLIQUE_AFFINE, NOT_HU, SMALLER_THAN_WINDOW})
#: Fewest voxels a CT may have along any axis; a smaller volume holds no usable anatomy.
MIN_CT_AXIS_VOXELS = 4
#: An affine axis further than this from every scanner axis (degrees) makes the affine oblique.
OBLIQUE_TOLERANCE_DEGREES = 0.5
#: A CT in Hounsfield units has air at about -1000 HU: a volume with no voxel below this is suspect.
AIR_HU_BELOW = -500.0
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
        check.problems.append(Problem(UNREADABLE, not_a_file_reason(path), path))
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


def not_a_file_reason(path: Path) -> str:
    """Why ``path`` is not a readable regular file: a symbolic link loop, a broken link, a folder, or absent."""
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13
            return f"is a symbolic link loop (-> {target!r} leads back to itself); fix or replace the link"
        except OSError as error:
            if error.errno == errno.ELOOP:
                return f"is a symbolic link loop (-> {target!r} leads back to itself); fix or replace the link"
            return f"is a broken symbolic link (-> {target!r}, which does not exist)"
    if path.is_dir():
        return "is a folder, not a file"
    if not path.exists():
        return "does not exist"
    return "is not a regular file"


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
    """Return the affine's spacing (``None`` if invalid) and a ``bad_spacing`` problem if any.

    Every header field that gives a voxel size is checked as stored: ``pixdim`` (nibabel's
    loader silently turns a zero into 1 mm and a negative value into its absolute value, so the
    stored header is read again, see :func:`~utils.data.nifti_io.read_raw_header`), the qform
    and the sform when their codes say they are used, and the column norms of the affine.
    """
    spacing = spacing_from_affine(image.affine)
    n_axes = min(len(image.shape), 3)
    try:
        raw = read_raw_header(path)
    except (NiftiReadError, OSError):
        raw = image.header
    sources = {"pixdim": [float(p) for p in raw["pixdim"][1 : 1 + n_axes]]}
    if int(raw["qform_code"]) > 0:
        sources["qform"] = _column_norms(raw.get_qform, n_axes)
    if int(raw["sform_code"]) > 0:
        sources["sform"] = _column_norms(raw.get_sform, n_axes)
    sources["affine"] = list(spacing[:n_axes])
    bad = [name for name, values in sources.items() if not all(np.isfinite(v) and v > 0 for v in values)]
    affine_ok = "affine" not in bad
    if not bad:
        return spacing, None
    given = ", ".join(f"{name} {_fmt(values)}" for name, values in sources.items())
    return (spacing if affine_ok else None), Problem(
        BAD_SPACING,
        f"voxel size must be finite and > 0 mm in every header field, but {' and '.join(bad)} "
        f"{'is' if len(bad) == 1 else 'are'} not ({given}); nibabel would read a zero pixdim as 1 mm. "
        "Fix the header (pixdim, qform, sform) with the scanner's true voxel size",
        path,
    )


def _column_norms(get_matrix: Any, n_axes: int) -> list[float]:
    """Lengths of the first ``n_axes`` columns of the 4 x 4 matrix ``get_matrix()`` (NaN when it has none)."""
    try:
        with np.errstate(all="ignore"):
            matrix = get_matrix()
    except Exception:  # noqa: BLE001 - nibabel refuses e.g. negative pixdims: no valid matrix
        matrix = None
    if matrix is None:
        return [float("nan")] * n_axes
    norms = np.linalg.norm(np.asarray(matrix, dtype=np.float64)[:3, :3], axis=0)
    return [float(v) for v in norms[:n_axes]]


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


@dataclass
class CtAnomalies:
    """What :func:`find_ct_anomalies` found about one CT.

    Attributes:
        check: the header check of the file. problems: the anomalies found, errors and warnings.
        hu_min, hu_max: range of the finite voxel values (``None`` without voxels or none finite).
    """

    check: FileCheck
    problems: list[Problem]
    hu_min: float | None = None
    hu_max: float | None = None

    @property
    def errors(self) -> list[Problem]:
        """The problems that stop the CT being used."""
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        """The problems that are only warnings."""
        return [p for p in self.problems if not p.is_error]


def find_ct_anomalies(path: Path, voxels: np.ndarray | None = None, *, check: FileCheck | None = None,
                      window: tuple[tuple[int, ...], Spacing] | None = None) -> CtAnomalies:
    """Name every input anomaly of one CT file, in one place for every command that reads a CT.

    Header level: the checks of :func:`inspect_file` (including zero, negative or NaN voxel sizes
    in any header field), then a volume of fewer than :data:`MIN_CT_AXIS_VOXELS` voxels along an
    axis (``too_small``, error), an oblique affine (``oblique_affine``, warning) and an unsigned
    8-bit stored type (``not_hounsfield_units``, warning). With ``voxels``: NaN/inf (error) and a
    value range that does not look like HU (warning), see :func:`check_image_voxels`. With
    ``window``: a CT smaller than one model window (``smaller_than_window``, warning: padded).

    Args:
        path: the CT file (``.nii`` / ``.nii.gz``).
        voxels: its ``(I, J, K)`` voxels in HU when already read (``None``: header checks only).
        check: its :func:`inspect_file` result when already made (it is not repeated; its
            problems are not returned again).
        window: ``(size, spacing)``: a model's window in voxels and the voxel size in mm it is
            applied at (e.g. ``sliding_window.roi_size`` and ``preprocessing.target_spacing``).

    Returns:
        The header check, the problems found (those of ``check`` only when it was made here) and
        the range of the voxel values.
    """
    problems: list[Problem] = []
    if check is None:
        check = inspect_file(Path(path))
        problems.extend(check.problems)
    if check.image is None or not check.is_3d:
        return CtAnomalies(check, problems)
    shape = tuple(int(n) for n in check.image.shape)
    if min(shape) < MIN_CT_AXIS_VOXELS:
        problems.append(Problem(
            TOO_SMALL,
            f"shape {shape} has fewer than {MIN_CT_AXIS_VOXELS} voxels along an axis; a CT must be at least "
            f"{MIN_CT_AXIS_VOXELS} x {MIN_CT_AXIS_VOXELS} x {MIN_CT_AXIS_VOXELS} voxels (a real abdominal CT has "
            "hundreds); check that the file holds the whole scan",
            path,
        ))
    oblique = _oblique_degrees(check.image.affine)
    if oblique is not None and oblique > OBLIQUE_TOLERANCE_DEGREES:
        problems.append(Problem(
            OBLIQUE_AFFINE,
            f"the affine is oblique (an axis is {oblique:.3g} degrees from the nearest scanner axis); the "
            "rotation is ignored: voxels are used in their stored order, reoriented to the nearest axes "
            "(no resampling of the rotation), and the labels are written back on the CT's own grid with "
            "its affine",
            path,
        ))
    dtype = check.image.get_data_dtype()
    scaled = getattr(check.image.dataobj, "slope", 1.0) != 1.0 or getattr(check.image.dataobj, "inter", 0.0) != 0.0
    if dtype == np.uint8 and not scaled:
        problems.append(Problem(
            NOT_HU,
            "stored as uint8 without a rescale slope/intercept: values 0 .. 255 cannot hold Hounsfield units "
            "(air is about -1000 HU); this looks like an 8-bit export (e.g. from a viewer) and is used as if "
            "it were HU, so predictions will be poor. Use the original CT",
            path,
        ))
    hu_min = hu_max = None
    if voxels is not None:
        voxel_problems, hu_min, hu_max = check_image_voxels(path, voxels)
        if dtype == np.uint8 and not scaled:  # already named by the stored type
            voxel_problems = [p for p in voxel_problems if p.code != NOT_HU]
        problems.extend(voxel_problems)
    if window is not None and check.spacing is not None and not any(p.code == TOO_SMALL for p in problems):
        problems.extend(_check_window(path, shape, check.spacing, check.image.affine, *window))
    return CtAnomalies(check, problems, hu_min, hu_max)


def _oblique_degrees(affine: np.ndarray) -> float | None:
    """Largest angle (degrees) between an affine column and its nearest scanner axis; ``None`` if undefined."""
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if not (np.all(np.isfinite(norms)) and np.all(norms > 0)):
        return None
    cosines = np.clip(np.abs(matrix / norms).max(axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cosines.min())))


def _check_window(path: Path, shape: tuple[int, ...], spacing: Spacing, affine: np.ndarray, size: tuple[int, ...],
                  window_spacing: Spacing) -> list[Problem]:
    """A ``smaller_than_window`` warning when the CT's extent is below one window along an axis.

    The window is given in the canonical ``(I, P, L)`` axis order the preprocessing reorients to,
    so the CT's extent is put in that order first.
    """
    world_axis = nib.orientations.io_orientation(affine)[:, 0]
    order = sorted(range(len(shape)), key=lambda axis: -world_axis[axis])  # S/I axis first, then A/P, then R/L
    extent = [shape[axis] * spacing[axis] for axis in order]
    window_mm = [n * s for n, s in zip(size, window_spacing, strict=True)]
    short = [axis for axis, (e, w) in enumerate(zip(extent, window_mm, strict=True)) if e < w]
    if not short:
        return []
    return [Problem(
        SMALLER_THAN_WINDOW,
        f"the CT covers {_fmt(extent)} mm, less than one model window of {tuple(size)} voxels at "
        f"{_fmt(window_spacing)} mm = {_fmt(window_mm)} mm along axis/axes {short}; it is padded with air "
        "to the window size, so the model sees mostly padding there",
        path,
    )]


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
    """Count NaN/inf voxels of a CT volume and check that its values look like Hounsfield units.

    Returns:
        A ``non_finite`` problem if any such voxel, a ``not_hounsfield_units`` warning when no
        voxel is below :data:`AIR_HU_BELOW` (a CT in HU has air at about -1000 HU; a range
        like 0..255 or 0..4095 means raw stored values, e.g. a missing rescale intercept), and
        the finite range in HU (``None, None`` when no voxel is finite).
    """
    finite = np.isfinite(image)
    n_bad = int(image.size - np.count_nonzero(finite))
    problems = []
    if n_bad:
        problems.append(Problem(
            NON_FINITE,
            f"{n_bad} of {image.size} voxels ({100 * n_bad / image.size:.2g} %) are NaN or infinite; "
            "the model cannot use them (whole windows around them would be predicted as background): "
            "re-export the CT, or replace them by air (-1024 HU) yourself",
            path,
        ))
    values = image[finite] if n_bad else image
    if values.size == 0:
        return problems, None, None
    low, high = float(values.min()), float(values.max())
    if low >= AIR_HU_BELOW:
        problems.append(Problem(
            NOT_HU,
            f"values range {low:g} .. {high:g}, with no voxel below {AIR_HU_BELOW:g}: a CT in Hounsfield "
            "units has air at about -1000 HU, so this looks like raw stored values (e.g. 0 .. 255 or "
            "0 .. 4095) or an intensity-normalised image; it is used as if it were HU, so predictions "
            "will be poor. Check the rescale slope and intercept (scl_slope, scl_inter) of the file",
            path,
        ))
    return problems, low, high


#: Largest label value counted value by value (one vectorised comparison each) rather than by bincount.
_FEW_LABEL_VALUES = 16


def label_value_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values present in a label map and their voxel counts, in increasing order of value.

    Label maps hold a handful of small values: for those, one comparison per value over the voxels in
    their memory order (no copy of a Fortran-ordered or transposed array) is several times faster than
    ``np.bincount``, which first widens every voxel to a 64-bit index. Other integer maps go through
    ``np.bincount`` and anything else (negative or non-integer values) through ``np.unique``.
    """
    flat = labels.ravel(order="K")
    if flat.size and np.issubdtype(flat.dtype, np.integer):
        low, high = int(flat.min()), int(flat.max())
        if low >= 0 and high < _FEW_LABEL_VALUES:
            counts = np.array([np.count_nonzero(flat == value) for value in range(high + 1)], dtype=np.int64)
        elif low >= 0 and high < 1 << 16:
            counts = np.bincount(flat, minlength=high + 1)
        else:
            return np.unique(flat, return_counts=True)
        present = np.flatnonzero(counts)
        return present, counts[present]
    return np.unique(flat, return_counts=True)


def check_label_voxels(path: Path, labels: np.ndarray,
                       dataset: DatasetDefinition = KITS19) -> tuple[list[Problem], dict[int, int]]:
    """Count voxels per label; values outside the dataset's labels (KiTS19: ``{0, 1, 2}``) give a
    ``bad_labels`` problem, which names the dataset that has them where one does (label 3: KiTS23's cyst).

    Returns:
        The problems, and voxels per valid label, e.g. ``{0: n, 1: n, 2: n}`` (every label present).
    """
    valid = dataset.valid_labels
    values, counts = label_value_counts(labels)
    found = dict(zip(values.tolist(), counts.tolist(), strict=True))
    label_counts = {label: int(found.get(label, 0)) for label in sorted(valid)}
    bad = [(value, count) for value, count in found.items() if value not in valid]
    if not bad:
        return [], label_counts
    shown = ", ".join(
        f"{value:g} ({count} voxel{'s' if count != 1 else ''})" for value, count in bad[:_MAX_VALUES_SHOWN]
    )
    more = f" and {len(bad) - _MAX_VALUES_SHOWN} more values" if len(bad) > _MAX_VALUES_SHOWN else ""
    allowed = ", ".join(f"{k} {v}" for k, v in dataset.labels.items())
    message = (f"label values outside {{{', '.join(map(str, sorted(valid)))}}}: {shown}{more}; "
               f"allowed are {allowed}")
    hint = foreign_labels_hint([value for value, _ in bad], dataset)
    return [Problem(BAD_LABELS, message + hint, path)], label_counts




def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")" if values is not None else "unknown"
