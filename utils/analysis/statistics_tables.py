"""Tables of dataset statistics: rows, CSV files (written atomically) and fixed-width text tables.

Two tables: one row per case of :class:`~utils.analysis.dataset_statistics.CaseStatistics` (labels, HU),
and one row per case of slice-class counts (from
:func:`~utils.analysis.slice_statistics.count_slice_classes_per_case`). Cyst columns exist only for
cases read as a dataset with a cyst label (KiTS23); KiTS19 tables have none.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from utils.analysis.dataset_statistics import CLASS_NAMES, CaseStatistics
from utils.data.nifti_io import write_bytes_atomic

Row = dict[str, str | int | float | None]

#: Columns of :func:`format_statistics_table` by default.
TABLE_COLUMNS = ("case_id", "slices", "spacing_z_mm", "spacing_y_mm", "kidney_ml", "tumour_ml", "tumours",
                 "kidney_components", "kidney_slice_share", "tumour_slice_share")
#: Columns of :func:`build_statistics_rows` that exist only for a dataset with a cyst label (KiTS23), besides
#: the per-class ``voxels_cyst``, ``proportion_cyst`` and ``hu_cyst_*``.
CYST_COLUMNS = ("cyst_ml", "kidney_and_masses_ml", "cysts", "cyst_slice_share")
# Label columns of build_statistics_rows, in order: each is the CaseStatistics attribute of the same name.
_LABEL_COLUMNS = ("kidney_ml", "tumour_ml", "cyst_ml", "kidney_tumour_ml", "kidney_and_masses_ml", "tumours", "cysts",
                  "kidney_components", "kidney_slice_share", "tumour_slice_share", "cyst_slice_share")
#: Columns of :func:`format_statistics_table` by default for a dataset with a cyst label (KiTS23).
TABLE_COLUMNS_WITH_CYST = ("case_id", "slices", "spacing_z_mm", "spacing_y_mm", "kidney_ml", "tumour_ml", "cyst_ml",
                           "tumours", "cysts", "kidney_components", "kidney_slice_share", "tumour_slice_share",
                           "cyst_slice_share")
#: Columns of :func:`build_slice_class_rows`: slices per class 0 background only, 1 kidney without tumour,
#: 2 contains tumour.
SLICE_CLASS_COLUMNS = ("case_id", "slices", *(f"{name}_slices" for name in CLASS_NAMES))


def build_statistics_rows(statistics: Iterable[CaseStatistics]) -> list[Row]:
    """Flatten case statistics into table rows (one dict per case, the same keys in the same order).

    Keys: ``case_id``, shape (``slices``, ``rows``, ``columns``), spacing (``spacing_z_mm`` ...),
    ``voxels_<class>``, ``proportion_<class>``, ``kidney_ml`` (label 1), ``tumour_ml`` (label 2),
    ``kidney_tumour_ml`` (labels 1 and 2, label > 0 in KiTS19), ``tumours``, ``kidney_components``,
    ``kidney_slice_share``, ``tumour_slice_share`` and ``hu_<class>_{mean,std,p0_5,p99_5}``
    (``None`` without imaging or for a class without voxels). Classes are those of the cases'
    dataset; with a cyst label (KiTS23) the rows add ``voxels_cyst``, ``proportion_cyst``,
    ``cyst_ml`` (label 3), ``kidney_and_masses_ml`` (label > 0), ``cysts``, ``cyst_slice_share``
    and ``hu_cyst_*``.

    Raises:
        ValueError: the cases were read as different datasets (their rows would differ in keys).
    """
    cases = list(statistics)
    datasets = sorted({case.dataset for case in cases})
    if len(datasets) > 1:
        raise ValueError(f"statistics must all be of one dataset to share table columns, got cases of "
                         f"{', '.join(datasets)}")
    rows = []
    for case in cases:
        names, cyst = case.class_names, case.has_cyst_label
        row: Row = {"case_id": case.case_id}
        row.update(zip(("slices", "rows", "columns"), case.shape, strict=False))
        row.update(zip(("spacing_z_mm", "spacing_y_mm", "spacing_x_mm"), case.spacing, strict=False))
        row.update({f"voxels_{name}": n for name, n in zip(names, case.voxel_counts, strict=True)})
        row.update({f"proportion_{name}": p for name, p in zip(names, case.class_proportions, strict=True)})
        row.update((key, getattr(case, key)) for key in _LABEL_COLUMNS if cyst or key not in CYST_COLUMNS)
        for index, name in enumerate(names):
            summary = case.hu[index] if case.hu is not None else None
            for key in ("mean", "std", "p0_5", "p99_5"):
                row[f"hu_{name}_{key}"] = getattr(summary, key) if summary is not None else None
        rows.append(row)
    return rows


def write_statistics_csv(statistics: Sequence[CaseStatistics], path: str | os.PathLike) -> Path:
    """Write :func:`build_statistics_rows` as CSV, atomically; missing values are empty cells.

    Args:
        statistics: at least one case.
        path: destination ``.csv``; its folder is created when missing.

    Returns:
        The written path.
    """
    return _write_rows_csv(build_statistics_rows(statistics), path)


def load_statistics_csv(path: str | os.PathLike) -> list[Row]:
    """Read a CSV written by :func:`write_statistics_csv` back into rows with their types.

    Returns:
        Rows equal to :func:`build_statistics_rows` (``case_id`` str, counts int, others float,
        empty cells ``None``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such statistics file")
    with path.open(newline="", encoding="utf-8") as stream:
        return [{key: _parse_cell(key, value) for key, value in row.items()} for row in csv.DictReader(stream)]


def format_statistics_table(statistics: Iterable[CaseStatistics], columns: Sequence[str] | None = None) -> str:
    """Return a fixed-width text table of some columns of :func:`build_statistics_rows`, one line per case.

    Args:
        statistics: the cases, one line each after the header.
        columns: keys of :func:`build_statistics_rows`; floats below 10 get 3 significant digits,
            others one decimal; missing values show as ``-``. Default ``TABLE_COLUMNS``, or
            ``TABLE_COLUMNS_WITH_CYST`` for cases of a dataset with a cyst label (KiTS23).
    """
    statistics = list(statistics)
    rows = build_statistics_rows(statistics)
    if columns is None:
        with_cyst = bool(statistics) and statistics[0].has_cyst_label
        columns = TABLE_COLUMNS_WITH_CYST if with_cyst else TABLE_COLUMNS
    unknown = [c for c in columns if rows and c not in rows[0]]
    if unknown:
        raise ValueError(f"columns must be keys of build_statistics_rows ({', '.join(rows[0])}), got {unknown}")
    return _format_rows(rows, columns)


def build_slice_class_rows(counts: Mapping[str, Sequence[int] | np.ndarray]) -> list[Row]:
    """One row per case of slice-class counts, keys ``SLICE_CLASS_COLUMNS``.

    Args:
        counts: ``case_id`` -> ``(3,)`` slices (background only, kidney without tumour, contains
            tumour), counts >= 0, as from :func:`~utils.analysis.slice_statistics.count_slice_classes_per_case`.

    Returns:
        Rows with ``case_id``, ``slices`` (all slices of the case) and ``background_slices``,
        ``kidney_slices`` (kidney without tumour), ``tumour_slices`` (ints).
    """
    rows = []
    for case_id, values in counts.items():
        values = np.asarray(values)
        if values.shape != (len(CLASS_NAMES),) or not np.issubdtype(values.dtype, np.integer) or (values < 0).any():
            raise ValueError(f"{case_id}: counts must be {len(CLASS_NAMES)} integer slice counts >= 0, "
                             f"got {values.tolist()}")
        rows.append(dict(zip(SLICE_CLASS_COLUMNS, (case_id, int(values.sum()), *(int(v) for v in values)),
                             strict=False)))
    return rows


def write_slice_class_csv(counts: Mapping[str, Sequence[int] | np.ndarray], path: str | os.PathLike) -> Path:
    """Write :func:`build_slice_class_rows` as CSV, atomically (folder created when missing); returns the path."""
    return _write_rows_csv(build_slice_class_rows(counts), path, "counts")


def format_slice_class_table(counts: Mapping[str, Sequence[int] | np.ndarray]) -> str:
    """Fixed-width text table of :func:`build_slice_class_rows`, one line per case and a ``total`` line."""
    rows = build_slice_class_rows(counts)
    if not rows:
        raise ValueError("counts must hold at least one case, got none")
    total: Row = {"case_id": "total"}
    for column in SLICE_CLASS_COLUMNS[1:]:
        total[column] = sum(int(row[column]) for row in rows)  # type: ignore[arg-type]
    return _format_rows([*rows, total], SLICE_CLASS_COLUMNS)


def _write_rows_csv(rows: list[Row], path: str | os.PathLike, name: str = "statistics") -> Path:
    """Write rows (same keys, in order) as CSV atomically; ``None`` becomes an empty cell."""
    if not rows:
        raise ValueError(f"{name} must hold at least one case, got none")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))
    return path


def _parse_cell(key: str, value: str) -> str | int | float | None:
    if key == "case_id":
        return value
    if value == "":
        return None
    is_count = key in {"slices", "rows", "columns", "tumours", "cysts", "kidney_components"}
    is_count = is_count or key.startswith("voxels_")
    return int(value) if is_count else float(value)


def _format_rows(rows: list[Row], columns: Sequence[str]) -> str:
    """Right-aligned columns separated by two spaces, a header line first."""
    cells = [list(columns)] + [[_format_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=False)) for line in cells)


def _format_cell(value: str | int | float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
