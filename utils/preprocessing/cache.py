"""The preprocessing cache on disk: its layout, atomic writes of a case, and fast memory-mapped reads.

Layout of a cache root (``preprocessing.cache_dir``)::

    CACHE/
      case_statistics/case_00000.json     # fingerprint ingredients, shared by every plan
      spacing_3.22x1.62x1.62_1a2b3c4d/    # one folder per set of preprocessing parameters
        plan.json                         # parameters, normalisation, case list, plan hash
        fingerprint.json                  # the dataset fingerprint (see utils.preprocessing.fingerprint)
        splits.json                       # the case-level split (see utils.data.splits)
        cases/case_00000/
          image.npy                       # (Z, Y, X) float16/float32, clipped and z-scored
          label.npy                       # (Z, Y, X) uint8 labels 0/1/2 (KiTS23: 0/1/2/3)
          locations.npz                   # voxel coordinates (K, 3) of "kidney" (1) and "tumour" (2)
                                          # (KiTS23 also "cyst" (3))
          meta.json                       # grid mapping back to the original CT, source, plan hash

A case folder appears only complete: it is written under a temporary name and renamed. The
dataset the cache holds (``plan.json``'s ``dataset``; a plan without one is KiTS19's, as every
cache was before KiTS23) decides which location classes its cases store (:func:`location_classes`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from utils.data.dataset_definitions import KITS19, DatasetDefinition, get_dataset
from utils.data.nifti_io import write_folder_atomic
from utils.data.splits import load_split
from utils.preprocessing.fingerprint import DatasetFingerprint, load_fingerprint
from utils.preprocessing.resampling import GridMapping

logger = logging.getLogger(__name__)

PLAN_NAME = "plan.json"
FINGERPRINT_NAME = "fingerprint.json"
CASES_DIR = "cases"
CASE_STATISTICS_DIR = "case_statistics"
IMAGE_FILE = "image.npy"
LABEL_FILE = "label.npy"
LOCATIONS_FILE = "locations.npz"
META_FILE = "meta.json"


def location_classes(dataset: DatasetDefinition | str = KITS19) -> dict[str, int]:
    """Classes whose voxel coordinates a dataset's cache stores, for class-balanced centring.

    Args:
        dataset: a definition or its name (default KiTS19).

    Returns:
        Label name -> label id of every foreground label, in label order: ``{"kidney": 1,
        "tumour": 2}`` for KiTS19, with ``"cyst": 3`` added for KiTS23.
    """
    dataset = get_dataset(dataset)
    return {dataset.labels[label]: label for label in dataset.foreground_labels}


#: KiTS19's location classes (``{"kidney": 1, "tumour": 2}``); other datasets': :func:`location_classes`.
LOCATION_CLASSES = location_classes(KITS19)


class CachedCase:
    """One preprocessed case; arrays are memory-mapped on first use (nothing is read up front).

    Attributes:
        case_id: e.g. ``"case_00007"``. folder: its cache folder. meta: its ``meta.json``.
        dataset: the dataset of its cache (default KiTS19): which location classes it stores.
    """

    def __init__(self, folder: Path, meta: dict[str, Any], dataset: DatasetDefinition | str = KITS19):
        self.folder = folder
        self.meta = meta
        self.case_id: str = meta["case_id"]
        self.dataset = get_dataset(dataset)

    def __getstate__(self) -> dict[str, Any]:  # memory maps are reopened, not pickled, in worker processes
        return {"folder": self.folder, "meta": self.meta, "case_id": self.case_id, "dataset": self.dataset}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("dataset", KITS19)
        self.__dict__.update(state)

    @cached_property
    def image(self) -> np.ndarray:
        """``(Z, Y, X)`` preprocessed image (read-only memory map)."""
        return np.load(self.folder / IMAGE_FILE, mmap_mode="r")

    @cached_property
    def label(self) -> np.ndarray:
        """``(Z, Y, X)`` uint8 labels (read-only memory map)."""
        return np.load(self.folder / LABEL_FILE, mmap_mode="r")

    @cached_property
    def mapping(self) -> GridMapping:
        """How to map this grid back onto the original CT."""
        return GridMapping.from_dict(self.meta["mapping"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)`` of the preprocessed arrays."""
        return tuple(self.meta["shape"])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """``(z, y, x)`` voxel size in mm of the preprocessed arrays."""
        return tuple(self.meta["mapping"]["resampled_spacing"])

    @cached_property
    def slice_classes(self) -> np.ndarray:
        """``(Z,)`` int8 class of every axial slice (see :func:`utils.analysis.slice_statistics.classify_slices`)."""
        return np.asarray(self.meta["slice_classes"], dtype=np.int8)

    @property
    def location_names(self) -> tuple[str, ...]:
        """The classes whose locations the case stores (``("kidney", "tumour")``; KiTS23 adds ``"cyst"``)."""
        return tuple(location_classes(self.dataset))

    def locations(self, name: str) -> np.ndarray:
        """``(K, 3)`` int voxel coordinates ``(z, y, x)`` of every voxel of class ``name``.

        Raises:
            ValueError: ``name`` is not one of :attr:`location_names` (e.g. ``"cyst"`` in a KiTS19 cache).
        """
        if name not in self.location_names:
            raise ValueError(f"name must be one of {sorted(self.location_names)} (the {self.dataset.title} "
                             f"location classes of {self.case_id}), got {name!r}")
        return self._locations[name]

    @cached_property
    def _locations(self) -> dict[str, np.ndarray]:
        with np.load(self.folder / LOCATIONS_FILE) as stored:
            missing = [name for name in self.location_names if name not in stored.files]
            if missing:
                raise ValueError(f"{self.folder / LOCATIONS_FILE} lacks the locations of {missing} that a "
                                 f"{self.dataset.title} cache stores; re-run scripts/preprocess.py")
            return {name: stored[name] for name in self.location_names}


class PreprocessedCache:
    """A plan folder of the cache: its plan, fingerprint, split and cases.

    Raises (on construction):
        FileNotFoundError: no ``plan.json`` (the folder was never completely preprocessed).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        plan_path = self.folder / PLAN_NAME
        if not plan_path.is_file():
            raise FileNotFoundError(f"{plan_path}: not a preprocessing cache (no {PLAN_NAME}); "
                                    "run scripts/preprocess.py --data DIR --out CACHE --config CFG")
        self.plan: dict[str, Any] = json.loads(plan_path.read_text())
        self.case_ids: list[str] = list(self.plan["case_ids"])

    @cached_property
    def dataset(self) -> DatasetDefinition:
        """The dataset the cache holds: ``plan.json``'s ``dataset`` (KiTS19 when the plan names none)."""
        return get_dataset(self.plan.get("dataset", KITS19.name))

    @cached_property
    def fingerprint(self) -> DatasetFingerprint:
        """The dataset fingerprint the cache was normalised with."""
        return load_fingerprint(self.folder / FINGERPRINT_NAME)

    def split(self, fold: int = 0) -> tuple[list[str], list[str]]:
        """Train and validation case ids of ``fold`` (from ``splits.json``)."""
        return load_split(self.folder, fold)

    def case(self, case_id: str) -> CachedCase:
        """Open one case, checking it was made with this plan.

        Raises:
            KeyError: the case is not in the plan. ValueError: its files are missing or were
                made with other parameters (re-run ``scripts/preprocess.py``).
        """
        if case_id not in self.case_ids:
            raise KeyError(f"{case_id} is not in the cache {self.folder} (it holds {len(self.case_ids)} cases)")
        folder = self.folder / CASES_DIR / case_id
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{folder}: missing or unreadable {META_FILE} ({error}); "
                             "re-run scripts/preprocess.py") from error
        if meta.get("plan_hash") != self.plan["plan_hash"]:
            raise ValueError(f"{folder} was preprocessed with other parameters than {self.folder / PLAN_NAME}; "
                             "re-run scripts/preprocess.py to finish updating the cache")
        return CachedCase(folder, meta, self.dataset)

    def cases(self, case_ids: list[str] | None = None) -> list[CachedCase]:
        """Open several cases (all cases of the plan by default)."""
        return [self.case(case_id) for case_id in (self.case_ids if case_ids is None else case_ids)]


def open_cache(folder: str | os.PathLike) -> PreprocessedCache:
    """Open a plan folder written by ``scripts/preprocess.py`` (see :class:`PreprocessedCache`)."""
    return PreprocessedCache(folder)


def read_case_meta(folder: Path) -> dict[str, Any] | None:
    """A case folder's ``meta.json``, or ``None`` when absent or unreadable."""
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_case_folder(cases_dir: Path, case_id: str, arrays: dict[str, np.ndarray],
                      locations: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write a case folder atomically: into a temporary folder, then renamed into place.

    Args:
        cases_dir: the plan's ``cases`` folder (created when missing).
        arrays: file name (``image.npy``, ``label.npy``) to array.
        locations: class name to ``(K, 3)`` coordinates. meta: written last, as ``meta.json``.

    Returns:
        The case folder. An interrupted write leaves at most a hidden ``.case_*.tmp-*`` folder,
        which the next run removes; an older version of the case is replaced only once the new
        one is complete.
    """
    def write(folder: Path) -> None:
        for name, array in arrays.items():
            np.save(folder / name, np.ascontiguousarray(array))
        np.savez(folder / LOCATIONS_FILE, **locations)
        (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    return write_folder_atomic(cases_dir, case_id, write)


def remove_unfinished_writes(cases_dir: Path) -> int:
    """Delete temporary folders left by interrupted writes; returns how many were removed."""
    leftovers = [p for p in cases_dir.glob(".case_*") if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return len(leftovers)

