"""Training checkpoints that survive ``kill -9`` and full disks, and the random state needed to resume.

:func:`save_checkpoint` writes through a temporary file in the target folder, flushes it to disk
and renames it into place, so the file at ``path`` is always either the previous checkpoint or
the new one, never half of either. :func:`load_checkpoint` reads with
``torch.load(weights_only=True)``: no arbitrary code runs when a checkpoint is opened, which is
why :func:`capture_rng_state` stores every generator's state in plain types only (tensors,
tuples, lists, str, int, float, None), and why :func:`save_checkpoint` refuses, before writing,
a state holding anything else (a numpy scalar in a metrics dict would otherwise only fail days
later, when the run is resumed).
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Read once at import: changing the umask later, from a thread, would race with other file creations.
_FILE_MODE = 0o666 & ~_read_umask()


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; ``path`` is the file, the message says why."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = Path(path)
        super().__init__(message)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Save ``state`` with ``torch.save`` atomically: the file at ``path`` is the old or the new one, never half.

    The state is written to a hidden temporary file in ``path``'s folder, flushed and fsynced,
    then renamed onto ``path`` (``os.replace``); the folder is fsynced too where the file system
    allows it. The folder is not created: a missing folder is an error.

    Args:
        path: destination file, e.g. ``<run folder>/last.pt``.
        state: a dict of tensors, plain Python data and nested dicts/lists (what
            ``torch.load(weights_only=True)`` can read back).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: ``state`` is not a dict.
        CheckpointError: ``state`` holds a value ``weights_only`` loading refuses (numpy scalars
            and arrays, custom classes; the message gives its key and nothing is written), or
            writing failed (folder removed, no permission, ...; the temporary file is removed). A
            full disk is named as such, with the folder and its free bytes, also when
            ``torch.save`` hides it behind a ``RuntimeError`` ("unexpected pos ..."). Either way
            the previous file at ``path`` is untouched.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = Path(path)
    problem = _find_unloadable(state, "state")
    if problem is not None:
        raise CheckpointError(path, f"{path}: checkpoint not saved: {problem}, which torch.load(weights_only=True) "
                                    f"cannot read back; convert it (float(), int(), .tolist(), torch.as_tensor()). "
                                    f"Nothing was written; the previous checkpoint at this path, if any, is intact")
    temp_name: str | None = None
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp_name, _FILE_MODE)
        os.replace(temp_name, path)
    except BaseException as error:
        if temp_name is not None:
            Path(temp_name).unlink(missing_ok=True)
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: clean up, then let them through
            raise
        full = _disk_full_message(path, state, error)
        if full is not None:
            raise CheckpointError(path, full) from error
        raise CheckpointError(path, f"{path}: checkpoint not saved ({type(error).__name__}: {error}); "
                                    f"the previous checkpoint at this path, if any, is intact") from error
    _fsync_folder(path.parent)
    return path


def _state_bytes(value: Any) -> int:
    """The bytes of every tensor in ``value`` (a lower bound of the checkpoint's size)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_state_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_state_bytes(item) for item in value)
    return 0


def _is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it wraps) says the disk is full (``ENOSPC`` or ``EDQUOT``)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or "Disk quota exceeded" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _disk_full_message(path: Path, state: dict, error: BaseException) -> str | None:
    """The message for a write that failed because the disk is full, or ``None`` when it is not that.

    ``torch.save`` reports a short write as a ``RuntimeError`` ("unexpected pos ...", "file write
    failed") that hides the ``ENOSPC`` behind it; such an error counts as a full disk when the
    folder has less free space than the checkpoint's tensors need.
    """
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    needed = _state_bytes(state)
    hidden = isinstance(error, RuntimeError) and free is not None and free < needed
    if not (_is_disk_full(error) or hidden):
        return None
    space = f"{free} bytes free" if free is not None else "free space unknown"
    return (f"{path}: checkpoint not saved: the disk holding {path.parent} is full ({space}; the checkpoint "
            f"needs at least {needed} bytes). Free space there (or move the run folder) and resume; "
            f"the previous checkpoint at this path, if any, is intact")


_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.layout)
_CONTAINER_TYPES = (dict, OrderedDict, Counter, list, tuple, set, torch.Size)


def _find_unloadable(value: Any, where: str) -> str | None:
    """Where ``value`` holds an object that ``weights_only`` loading refuses (e.g. a numpy scalar), or ``None``."""
    kind = type(value)
    if kind in _PLAIN_TYPES or isinstance(value, torch.Tensor):
        return None
    if kind in _CONTAINER_TYPES:
        items = value.items() if isinstance(value, dict) else ((None, item) for item in value)
        for index, (key, item) in enumerate(items):
            label = f"{where}[{key!r}]" if isinstance(value, dict) else f"{where}[{index}]"
            problem = (_find_unloadable(key, f"a key of {where}") if key is not None else None) \
                or _find_unloadable(item, label)
            if problem is not None:
                return problem
        return None
    if any(isinstance(value, allowed) for allowed in _registered_safe_types()):
        return None
    return f"{where} is a {kind.__module__}.{kind.__qualname__}"


def _registered_safe_types() -> list[type]:
    """Types added with ``torch.serialization.add_safe_globals``."""
    found = (g[0] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals())
    return [g for g in found if isinstance(g, type)]


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; some file systems refuse, which is harmless here."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError as error:
        logger.debug("cannot open %s to fsync it: %s", folder, error)
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        logger.debug("cannot fsync folder %s: %s", folder, error)
    finally:
        os.close(descriptor)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``torch.load(weights_only=True)``.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (default ``"cpu"``; the engine moves them afterwards).

    Returns:
        The saved dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated, corrupt or not a checkpoint; or it holds objects
            that safe (``weights_only``) loading refuses (the message names them and says that only
            checkpoints written by this project are loadable; it is not called corrupt); or it is
            not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if _SAFE_LOAD_REFUSAL not in str(error):
            raise CheckpointError(path, f"{path}: cannot be read as a checkpoint ({type(error).__name__}: {error}); "
                                        "it may be truncated or corrupt, or not written by save_checkpoint") from error
        # not chained: PyTorch's message advises loading unsafely, which is never the way here
        raise CheckpointError(path, f"{path}: the file holds objects that safe loading refuses "
                                    f"({_refused_objects(str(error))}); only checkpoints written by this project "
                                    "(save_checkpoint) are loadable") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(path, f"{path}: cannot be read as a checkpoint ({type(error).__name__}: {error}); "
                                    f"it may be truncated or corrupt, or not written by save_checkpoint") from error
    if not isinstance(state, dict):
        raise CheckpointError(path, f"{path}: a checkpoint must hold a dict, found {type(state).__name__}")
    return state


#: The start of the message of ``torch.load(weights_only=True)`` when it refuses an object.
_SAFE_LOAD_REFUSAL = "Weights only load failed"


def _refused_objects(message: str) -> str:
    """What safe loading refused, from its message, without PyTorch's advice to load unsafely."""
    found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if found:
        return "it holds " + ", ".join(dict.fromkeys(found))
    reason = re.search(r"WeightsUnpickler error: ([^\n]*)", message)
    if reason is not None:
        return reason.group(1).split(". Please use", 1)[0].strip().rstrip(".")
    return "an object outside the allowed types"


def capture_rng_state() -> dict[str, Any]:
    """The state of every global random generator, in types ``torch.load(weights_only=True)`` accepts.

    Returns:
        ``{"python": (version, tuple of 625 ints, gauss_next float or None),
        "numpy": ("MT19937", int64 tensor of 624 keys, pos, has_gauss, cached_gaussian),
        "torch": uint8 tensor (CPU generator), "cuda": list of uint8 tensors, one per CUDA
        device ([] without CUDA)}``. Tensors are copies on the CPU.
    """
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda = [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "python": (int(version), tuple(int(v) for v in internal), gauss_next),
        "numpy": (str(bit_generator), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached_gaussian)),
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every global random generator back to a state from :func:`capture_rng_state`.

    CUDA states are restored for as many devices as both the state and this machine have; a
    difference (e.g. resuming a GPU run on the CPU) is logged as a warning, since the run then
    continues but is no longer bit-for-bit reproducible.

    Args:
        state: the dict returned by :func:`capture_rng_state` (possibly after a save and load).

    Raises:
        ValueError: ``state`` lacks one of the keys ``python``, ``numpy``, ``torch``, ``cuda``.
    """
    if not isinstance(state, dict) or not {"python", "numpy", "torch", "cuda"} <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state must be a dict from capture_rng_state with keys cuda, numpy, python, torch; "
                         f"got {found}")
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    bit_generator, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    keys = np.asarray(keys.cpu().numpy() if isinstance(keys, torch.Tensor) else keys).astype(np.uint32)
    np.random.set_state((bit_generator, keys, int(pos), int(has_gauss), float(cached_gaussian)))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    _restore_cuda_rng(list(state["cuda"]))


def _restore_cuda_rng(saved: list[torch.Tensor]) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(saved) != available:
        logger.warning("random state was saved with %d CUDA device(s), this process has %d; restoring %d, "
                       "so the resumed run is not bit-for-bit reproducible", len(saved), available,
                       min(len(saved), available))
    for device in range(min(len(saved), available)):
        torch.cuda.set_rng_state(saved[device].cpu().to(torch.uint8), device)
