"""Finding the KiTS cases in a data folder: which case folders and files exist, and what
the dataset's metadata file (``kits.json``, ``kits23.json``) says about them.

The expected layout is the official one (KiTS19's ``data/``, KiTS23's ``dataset/``)::

    DIR/kits.json                       (optional; clinical data and, for KiTS19, voxel spacing;
                                         kits23.json for KiTS23)
    DIR/case_00000/imaging.nii.gz       (CT in HU, absent in the shared labels-only copy)
    DIR/case_00000/segmentation.nii.gz  (labels; absent for test cases)

The dataset (:mod:`utils.data.dataset_definitions`, KiTS19 by default) names the metadata file.
A folder whose metadata file is another dataset's (``kits23.json`` read as KiTS19, ``kits.json``
read as KiTS23) is refused with :class:`~utils.data.dataset_definitions.DatasetLayoutError`,
which names the layout found and the setting to change.

Discovery only looks at names and ``kits.json``; it opens no NIfTI file. Whatever is odd about
the folder as a whole (cases missing from ``kits.json`` or the other way round, an unreadable
``kits.json``, folders that are not cases, symbolic link loops) becomes a warning in the returned
listing and is logged, never an exception: a loader carries on with the cases that are there.
A symbolic link loop is named as such: a case folder that is one is listed in the warnings, and
a case file that is one is kept in :class:`CaseFiles` so that its check reports the loop.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from utils.data.dataset_definitions import DATASETS, KITS19, DatasetDefinition, DatasetLayoutError, get_dataset
from utils.data.kits_layout import IMAGING_NAME, SEGMENTATION_NAME, is_case_id

logger = logging.getLogger(__name__)

#: Environment variable naming the data folder when no ``--data`` argument is given.
DATA_DIR_ENV_VAR = "KITS19_DATA"
#: How many case ids a summarising warning lists before writing "... (N more)".
MAX_IDS_IN_WARNING = 5


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case folder.

    Attributes:
        case_id: folder name, e.g. ``"case_00007"``.
        folder: the case folder.
        imaging: the CT volume (``imaging.nii.gz``, or ``imaging.nii`` when only that
            exists), ``None`` when absent.
        segmentation: the label volume, ``None`` when absent (a test case).
    """

    case_id: str
    folder: Path
    imaging: Path | None
    segmentation: Path | None


@dataclass(frozen=True)
class DatasetListing:
    """What :func:`discover_cases` found in a data folder.

    Attributes:
        data_dir: the data folder.
        cases: one entry per case folder, sorted by case id.
        kits_json_ids: case ids listed in the metadata file (``kits.json``, ``kits23.json``; in
            file order), ``None`` when there is no readable one.
        kits_spacing: ``kits.json`` voxel spacing per case id, in mm, in array-axis order
            ``(z, y, x)`` = ``(slice, row, column)``; empty without ``kits.json`` (and for
            KiTS23, whose metadata holds no spacing).
        warnings: dataset-level warnings, one sentence each.
        dataset: the dataset the folder was read as.
    """

    data_dir: Path
    cases: tuple[CaseFiles, ...]
    kits_json_ids: tuple[str, ...] | None
    kits_spacing: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    dataset: DatasetDefinition = KITS19


def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    """Return the data folder: ``data`` when given, else the ``KITS19_DATA`` environment variable.

    Args:
        data: the folder holding the ``case_XXXXX`` folders, or ``None``/``""`` to use
            ``KITS19_DATA``.

    Raises:
        ValueError: neither ``data`` nor ``KITS19_DATA`` is set.
        FileNotFoundError: the folder does not exist or is not a folder.
    """
    if data is None or str(data) == "":
        data = os.environ.get(DATA_DIR_ENV_VAR, "")
        if not data:
            raise ValueError(
                f"no data folder given: pass --data DIR or set the {DATA_DIR_ENV_VAR} environment "
                "variable to the folder that holds the case_XXXXX folders"
            )
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data folder {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} is not a folder")
    return path


def check_layout(data_dir: Path, dataset: DatasetDefinition) -> None:
    """Refuse a folder that holds another dataset's metadata file and not this one's.

    Raises:
        DatasetLayoutError: e.g. ``kits23.json`` (the KiTS23 layout) read as KiTS19; the message
            names the file found and the setting to change.
    """
    if (data_dir / dataset.metadata_name).exists():
        return
    for other in DATASETS.values():
        if other.metadata_name != dataset.metadata_name and (data_dir / other.metadata_name).exists():
            raise DatasetLayoutError(
                f"{data_dir} holds {other.metadata_name}, the {other.title} layout, but it is being read as "
                f"{dataset.title} (labels {dataset.describe_labels()}); set 'dataset: {other.name}' in the "
                f"experiment config (or pass --dataset {other.name}) to read it as {other.title}")


def discover_cases(data_dir: str | os.PathLike, dataset: DatasetDefinition | str = KITS19) -> DatasetListing:
    """List the case folders of a KiTS data folder and cross-check them with its metadata file.

    Args:
        data_dir: the folder holding ``case_XXXXX`` folders and optionally the dataset's metadata
            file (``kits.json``, ``kits23.json``).
        dataset: the dataset the folder holds (a definition or its name; default KiTS19).

    Returns:
        The listing; its ``warnings`` say what is odd about the folder (also logged).

    Raises:
        FileNotFoundError: ``data_dir`` does not exist or is not a folder.
        DatasetLayoutError: the folder holds another dataset's metadata file (see :func:`check_layout`).
    """
    dataset = get_dataset(dataset)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist or is not a folder")
    check_layout(data_dir, dataset)
    warnings: list[str] = []
    cases, ignored = _scan_case_folders(data_dir, warnings)
    if ignored:
        warnings.append(f"ignored {_summarise(ignored, 'folder')} whose names are not case ids (case_XXXXX)")
    if not cases:
        warnings.append(_no_cases_warning(data_dir, dataset))
    metadata = dataset.metadata_name
    kits_ids, kits_spacing = _read_kits_json(data_dir / metadata, warnings, dataset.metadata_has_spacing)
    if kits_ids is not None:
        folder_ids = {case.case_id for case in cases}
        listed = set(kits_ids)
        without_folder = [case_id for case_id in kits_ids if case_id not in folder_ids]
        without_entry = [case.case_id for case in cases if case.case_id not in listed]
        if without_folder:
            warnings.append(f"{metadata} lists {_summarise(without_folder, 'case')} with no case folder")
        if without_entry:
            warnings.append(f"{_summarise(without_entry, 'case folder')} not listed in {metadata}")
    for message in warnings:
        logger.warning("%s: %s", data_dir, message)
    return DatasetListing(
        data_dir=data_dir,
        cases=tuple(cases),
        kits_json_ids=kits_ids,
        kits_spacing=MappingProxyType(kits_spacing),
        warnings=tuple(warnings),
        dataset=dataset,
    )


def is_symlink_loop(path: Path) -> bool:
    """Whether ``path`` is a symbolic link that never resolves (it leads back to itself)."""
    if not path.is_symlink():
        return False
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        return True
    except OSError as error:  # Python >= 3.13 raises ELOOP
        return error.errno == errno.ELOOP
    return False


def _scan_case_folders(data_dir: Path, warnings: list[str] | None = None) -> tuple[list[CaseFiles], list[str]]:
    """Return the case folders (sorted by id) and the names of other, ignored folders.

    Entries that are symbolic link loops are skipped, each with a warning in ``warnings``.
    """
    cases: list[CaseFiles] = []
    ignored: list[str] = []
    for entry in sorted(data_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if is_symlink_loop(entry):
            if warnings is not None:
                warnings.append(f"{entry} is a symbolic link loop (it leads back to itself, target "
                                f"{os.readlink(entry)!r}); skipped: fix or remove the link")
            continue
        if not entry.is_dir():
            continue
        if not is_case_id(entry.name):
            ignored.append(entry.name)
            continue
        cases.append(
            CaseFiles(
                case_id=entry.name,
                folder=entry,
                imaging=_find_volume(entry, IMAGING_NAME),
                segmentation=_find_volume(entry, SEGMENTATION_NAME),
            )
        )
    return cases, ignored


def _find_volume(folder: Path, gz_name: str) -> Path | None:
    """Return ``folder/gz_name``, else its uncompressed ``.nii`` twin, else ``None``.

    A name that is a symbolic link loop is returned too, so that checking it names the loop
    instead of calling the file missing.
    """
    for name in (gz_name, gz_name.removesuffix(".gz")):
        candidate = folder / name
        if candidate.exists() or is_symlink_loop(candidate):
            return candidate
    return None


def _no_cases_warning(data_dir: Path, dataset: DatasetDefinition = KITS19) -> str:
    """Explain that no case folder was found, with a hint when a ``data/`` (KiTS19) or ``dataset/``
    (KiTS23) subfolder has them (the folder named first is the dataset's own)."""
    message = f"no case folders (case_XXXXX) found in {data_dir}"
    folders = dict.fromkeys([dataset.data_folder, *(other.data_folder for other in DATASETS.values())])
    for folder in folders:
        nested = data_dir / folder
        if nested.is_dir() and any(is_case_id(entry.name) for entry in nested.iterdir()):
            message += f"; did you mean {nested}?"
            break
    return message


def _read_kits_json(
    path: Path, warnings: list[str], expect_spacing: bool = True
) -> tuple[tuple[str, ...] | None, dict[str, tuple[float, float, float]]]:
    """Read case ids and ``(z, y, x)`` spacings from the metadata file; problems go to ``warnings``.

    ``expect_spacing=False`` (``kits23.json``, which holds none) reads no spacing and does not warn.
    """
    if not path.exists():
        return None, {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        warnings.append(f"{path} is unreadable, case ids and spacing not cross-checked ({error})")
        return None, {}
    if not isinstance(entries, list):
        warnings.append(
            f"{path} is invalid: expected a list of case entries, got a JSON {type(entries).__name__}; "
            "case ids and spacing not cross-checked"
        )
        return None, {}
    ids: list[str] = []
    spacing: dict[str, tuple[float, float, float]] = {}
    bad_entries = 0
    no_spacing: list[str] = []
    for entry in entries:
        case_id = entry.get("case_id") if isinstance(entry, dict) else None
        if not isinstance(case_id, str) or not is_case_id(case_id):
            bad_entries += 1
            continue
        ids.append(case_id)
        if not expect_spacing:
            continue
        entry_spacing = _entry_spacing(entry.get("voxel_spacing"))
        if entry_spacing is None:
            no_spacing.append(case_id)
        else:
            spacing[case_id] = entry_spacing
    if bad_entries:
        warnings.append(f'{path}: skipped {bad_entries} entries without a valid "case_id" (case_XXXXX)')
    if no_spacing:
        warnings.append(f"{path}: {_summarise(no_spacing, 'entry', 'entries')} without a valid voxel_spacing")
    return tuple(ids), spacing


def _entry_spacing(value: Any) -> tuple[float, float, float] | None:
    """Turn a ``kits.json`` ``voxel_spacing`` object into ``(z, y, x)`` mm, ``None`` if invalid."""
    if not isinstance(value, dict):
        return None
    try:
        zyx = tuple(float(value[key]) for key in ("z_spacing", "y_spacing", "x_spacing"))
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(s) and s > 0 for s in zyx):
        return None
    return zyx  # type: ignore[return-value]


def _summarise(ids: Iterable[str], noun: str, plural: str | None = None) -> str:
    """Return e.g. ``"40 cases (case_00170, ..., case_00174 and 35 more)"``."""
    ids = list(ids)
    word = noun if len(ids) == 1 else (plural or f"{noun}s")
    shown = ", ".join(ids[:MAX_IDS_IN_WARNING])
    more = f" and {len(ids) - MAX_IDS_IN_WARNING} more" if len(ids) > MAX_IDS_IN_WARNING else ""
    return f"{len(ids)} {word} ({shown}{more})"
