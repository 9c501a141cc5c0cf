"""Reading and writing NIfTI volumes: clear errors on bad files, atomic and reproducible writes.

Two ways to read: :func:`load_nifti` opens a file lazily (header now, voxels on demand), and
:func:`load_nifti_verified` reads the whole file into memory and checks it. Only the second is
safe against silent corruption: nibabel stops reading a ``.nii.gz`` after the last voxel and
never checks the gzip CRC-32, so a corrupted deflate stream can decode into wrong voxels
without any error.

Arrays keep the on-disk axis order (``(Z, Y, X)`` for KiTS19, see :mod:`utils.data.kits_layout`).
Writes go to a temporary file in the target folder and are renamed into place, so an
interrupted run never leaves a half-written volume; ``.nii.gz`` files are gzipped with a fixed
timestamp, so the same array and affine always give the same bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.fileholders import FileHolder


class NiftiReadError(ValueError):
    """A NIfTI file could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file and read its header; voxels stay on disk until asked for.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The lazily loaded image.

    Raises:
        FileNotFoundError: the file does not exist.
        NiftiReadError: the file is not a NIfTI-1/2 image or its gzip stream is unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many exception types on corrupt files
        raise NiftiReadError(path, f"not a readable NIfTI file ({type(error).__name__}: {error})") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NiftiReadError(path, f"not a NIfTI image (nibabel read it as {type(image).__name__})")
    return image


def load_nifti_verified(path: str | os.PathLike) -> nib.Nifti1Image:
    """Read a whole NIfTI file into memory, verify it, and return the in-memory image.

    nibabel stops reading a ``.nii.gz`` after the last voxel and never checks the gzip CRC-32,
    so a corrupted deflate stream can decode silently into wrong voxels. Here the whole stream
    is read with :mod:`gzip`, which checks the trailer's CRC-32 and uncompressed length, and
    the data must hold every voxel the header declares. The uncompressed file (header plus
    voxel bytes) is held in memory once; nothing is cached on disk.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file holding a NIfTI-1 or NIfTI-2 image.

    Returns:
        The image, its voxels read from memory by :func:`read_voxels`; ``get_filename()``
        still gives ``path``, so that errors name the file.

    Raises:
        FileNotFoundError: the file does not exist.
        NiftiReadError: the gzip stream is corrupt or truncated (CRC-32 or length mismatch),
            the file cannot be read, is not a NIfTI-1/2 image, or holds fewer voxel bytes
            than its header declares.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = _read_whole_file(path)
    image_class = next(
        (klass for klass in (nib.Nifti2Image, nib.Nifti1Image) if klass.header_class.may_contain_header(raw)), None
    )
    if image_class is None:
        raise NiftiReadError(path, "not a NIfTI-1/2 image (no NIfTI header at the start of the data)")
    try:
        image = image_class.from_file_map({"image": FileHolder(filename=str(path), fileobj=io.BytesIO(raw))})
    except Exception as error:  # nibabel raises many exception types on corrupt headers
        raise NiftiReadError(path, f"not a readable NIfTI file ({type(error).__name__}: {error})") from error
    offset = int(getattr(image.dataobj, "offset", image.header.get_data_offset()))
    needed = offset + int(np.prod(image.shape, dtype=np.int64)) * image.get_data_dtype().itemsize
    if len(raw) < needed:
        raise NiftiReadError(
            path,
            f"truncated: the data hold {len(raw)} bytes but the header needs {needed} ({offset} + {image.shape} "
            f"voxels of {image.get_data_dtype()}); re-download or re-create the file",
        )
    return image


def _read_whole_file(path: Path) -> bytes:
    """Return the file's uncompressed bytes; for ``.gz`` the gzip CRC-32 and length are checked."""
    if not path.name.endswith(".gz"):
        try:
            return path.read_bytes()
        except OSError as error:
            raise NiftiReadError(path, f"cannot be read ({type(error).__name__}: {error})") from error
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise NiftiReadError(
            path,
            f"compressed data corrupt or truncated ({type(error).__name__}: {error}); "
            "re-download or re-create the file",
        ) from error


def read_voxels(image: nib.Nifti1Image, dtype: type = np.float32) -> np.ndarray:
    """Read all voxels of an opened image, turning truncated or corrupt data into a clear error.

    Only images from :func:`load_nifti_verified` are safe against silent corruption. For an
    image from :func:`load_nifti`, a truncated file raises, but a ``.nii.gz`` whose deflate
    stream is corrupt can decode into wrong voxels without error (nibabel never checks the
    gzip CRC-32); use it where speed matters more than that guarantee.

    Args:
        image: an image from :func:`load_nifti_verified` (verified) or :func:`load_nifti` (lazy).
        dtype: ``np.float32`` (scaled values, e.g. Hounsfield units) or an integer type for
            label maps (values are read unscaled and cast).

    Returns:
        The voxel array in on-disk axis order.

    Raises:
        NiftiReadError: the data are truncated or the gzip stream is corrupt.
    """
    path = image.get_filename() or "<in-memory image>"
    try:
        if np.issubdtype(dtype, np.floating):
            return np.asarray(image.get_fdata(dtype=dtype, caching="unchanged"))
        return np.asarray(image.dataobj).astype(dtype, copy=False)
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError, ValueError) as error:
        raise NiftiReadError(path, f"voxel data unreadable or truncated ({type(error).__name__}: {error})") from error


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    *,
    compresslevel: int = 1,
    description: bytes | None = None,
) -> Path:
    """Write an array as NIfTI-1 atomically (temporary file, then rename).

    Args:
        array: voxels in the axis order the affine describes; the dtype is kept
            (``int16`` for CT in HU, ``uint8`` for labels).
        affine: ``(4, 4)`` voxel-to-world matrix.
        path: destination ending in ``.nii`` or ``.nii.gz``; its folder must exist.
        compresslevel: gzip level 1 (fast, default) to 9 (small); ignored for ``.nii``.
        description: the header's ``descrip`` field (at most 80 bytes), e.g. the mark that
            identifies the project's own predictions (:mod:`utils.data.output_guard`).

    Returns:
        The written path.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"output must end in .nii or .nii.gz, got {path.name!r}")
    if not 1 <= compresslevel <= 9:
        raise ValueError(f"compresslevel must be between 1 and 9, got {compresslevel}")
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm", "sec")
    if description is not None:
        image.header["descrip"] = description
    payload = image.to_bytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=compresslevel, mtime=0)
    write_bytes_atomic(path, payload)
    return path


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def save_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON through a temporary file and a rename.

    A file that already holds exactly this JSON is left untouched, so re-running a step whose
    result has not changed changes no file (nor its modification time).
    """
    path = Path(path)
    payload = (json.dumps(data, indent=1) + "\n").encode()
    if not (path.is_file() and path.read_bytes() == payload):
        write_bytes_atomic(path, payload)
    return path


def write_folder_atomic(parent: str | os.PathLike, name: str, writer: Callable[[Path], None]) -> Path:
    """Write a folder through ``writer(temporary_folder)``, then rename it into place as ``parent/name``.

    The folder appears only complete: it is written under a hidden ``.<name>.tmp-*`` name; an
    existing ``parent/name`` is moved aside (``.<name>.old-*``) and removed only once the new one is
    in place. A failing ``writer`` leaves the old folder intact and no temporary folder; a killed
    process can leave hidden ``.tmp-``/``.old-`` folders, which the next run may delete.

    Returns:
        ``parent/name``.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / name
    temporary = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        writer(temporary)
        os.chmod(temporary, 0o755)
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent))
            os.replace(final, retired / name)
            os.replace(temporary, final)
            shutil.rmtree(retired)
        else:
            os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def read_raw_header(path: str | os.PathLike) -> nib.Nifti1Header:
    """The header exactly as stored, without the repairs nibabel makes when it loads a file.

    nibabel's loader silently rewrites some invalid fields: a zero ``pixdim`` becomes 1 mm and a
    negative one its absolute value, so the loaded image's affine looks valid. Checks on the
    voxel size therefore read the stored header with this function. Only the header bytes are
    read (for ``.nii.gz`` only the start of the stream is decompressed).

    Raises:
        FileNotFoundError: the file does not exist.
        NiftiReadError: the file does not start with a NIfTI-1/2 header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as stream:
            raw = stream.read(nib.Nifti2Header.sizeof_hdr)
    except (OSError, EOFError, zlib.error) as error:
        raise NiftiReadError(path, f"header unreadable ({type(error).__name__}: {error})") from error
    for klass in (nib.Nifti2Header, nib.Nifti1Header):
        if len(raw) >= klass.sizeof_hdr and klass.may_contain_header(raw):
            try:
                return klass.from_fileobj(io.BytesIO(raw), check=False)
            except Exception as error:  # nibabel raises many exception types on corrupt headers
                raise NiftiReadError(path, f"header unreadable ({type(error).__name__}: {error})") from error
    raise NiftiReadError(path, "not a NIfTI-1/2 image (no NIfTI header at the start of the data)")
