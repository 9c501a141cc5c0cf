"""One output guard for every command that writes: input data is never written to or over.

Two checks, both run before any work starts:

- :func:`check_output_location` refuses an output file or folder that is, or lies inside, an
  input data folder or the folder holding an input file (for ``case_XXXXX/imaging.nii.gz``, its
  case folder). ``allow_inside_input=True`` (the commands' ``--allow-inside-input``) lifts
  this rule for users who really mean it; the input *files themselves* stay protected always.
- :func:`check_overwrite` refuses to replace an existing file that is not one of the command's
  own outputs (a report, prediction or table an earlier run of the project wrote).

Both raise :class:`OutputGuardError`, a ``ValueError`` whose message names both paths and the
flag or choice that resolves it; commands turn it into exit status 2 (usage error).
Paths are compared after resolving symbolic links, so a link to the data folder is caught too.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import nibabel as nib

ALLOW_FLAG = "--allow-inside-input"
OWN_NIFTI_DESCRIPTION = b"kits19-segmentation prediction"  # written into the header of every prediction


class OutputGuardError(ValueError):
    """An output would be written into, or over, input data; ``output`` and ``protected`` name both paths."""

    def __init__(self, output: Path, protected: Path, reason: str) -> None:
        self.output = output
        self.protected = protected
        self.reason = reason
        super().__init__(reason)


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def protected_folder(input_path: str | os.PathLike) -> Path:
    """The folder an input protects: the folder itself, or the folder holding an input (NIfTI) file."""
    path = _resolve(input_path)
    if path.is_dir() or (not path.exists() and not path.name.endswith((".nii", ".nii.gz"))):
        return path  # a folder, or a data folder that does not exist (yet)
    return path.parent


def _is_same_or_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                          what: str = "output", allow_inside_input: bool = False) -> Path:
    """Return ``output`` resolved, refusing it when it is or lies inside input data.

    Args:
        output: the file or folder the command will write (need not exist yet).
        inputs: input data folders and files (``None`` entries are ignored). For a file, the
            folder that holds it (a case folder, or a flat folder of CTs) is protected.
        what: how the command calls this output in messages, e.g. ``"--json"``.
        allow_inside_input: allow an output inside an input folder (never onto an input file).

    Raises:
        OutputGuardError: ``output`` is an input file, or is/lies inside a protected folder
            and ``allow_inside_input`` is false.
    """
    out = _resolve(output)
    for given in inputs:
        if given is None:
            continue
        source = _resolve(given)
        if out == source:
            raise OutputGuardError(out, source, f"{what} {out} would overwrite the input {source}; "
                                               "choose an output outside the input data")
        folder = protected_folder(source)
        if _is_same_or_inside(out, folder) and not allow_inside_input:
            raise OutputGuardError(out, folder, f"{what} {out} is inside the input data folder {folder}, "
                                                "which is never written to; choose an output outside it "
                                                f"(or pass {ALLOW_FLAG} if you really mean to write there)")
    return out


def check_overwrite(path: str | os.PathLike, is_own: Callable[[Path], bool], *, what: str = "output") -> None:
    """Refuse to replace an existing file that ``is_own`` does not recognise as this command's output.

    Args:
        path: the file about to be written.
        is_own: returns ``True`` for a file an earlier run of the command wrote (safe to replace).
        what: how the command calls this output in messages.

    Raises:
        OutputGuardError: ``path`` exists and is a folder, or a file that is not the command's own.
    """
    target = _resolve(path)
    if not target.exists():
        return
    if target.is_dir():
        raise OutputGuardError(target, target, f"{what} {target} is an existing folder; give a file name")
    if not is_own(target):
        raise OutputGuardError(target, target, f"{what} {target} exists and was not written by this command; "
                                               "it is never overwritten: choose another name or move it away")


def is_own_json(keys: Iterable[str]) -> Callable[[Path], bool]:
    """A recogniser for JSON reports: the file parses as a JSON object holding every key in ``keys``."""
    required = tuple(keys)

    def recognise(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(data, dict) and all(key in data for key in required)

    return recognise


def is_own_text(first_line_prefix: str) -> Callable[[Path], bool]:
    """A recogniser for text tables (CSV, Markdown): the first line starts with ``first_line_prefix``."""

    def recognise(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.readline().startswith(first_line_prefix)
        except (OSError, UnicodeDecodeError):
            return False

    return recognise


def is_own_prediction(path: Path) -> bool:
    """A NIfTI label map this project wrote: its header description is :data:`OWN_NIFTI_DESCRIPTION`."""
    try:
        header = nib.load(str(path)).header
    except Exception:  # noqa: BLE001 - any unreadable file is not ours
        return False
    description = bytes(header.get("descrip", b"")).rstrip(b"\x00")
    return description == OWN_NIFTI_DESCRIPTION


def add_guard_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--allow-inside-input`` to a command's parser."""
    parser.add_argument(ALLOW_FLAG, action="store_true",
                        help="allow outputs inside an input data folder (input files themselves are never "
                             "overwritten); by default such outputs are refused before any work starts")
