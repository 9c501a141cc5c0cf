"""What a KiTS challenge dataset is: its labels, its scored regions, its layout and metadata file.

One :class:`DatasetDefinition` per challenge, selected by name (the experiment config's
``dataset:`` key, ``kits19`` or ``kits23``). KiTS19 is one instance, built from the literals of
:mod:`utils.data.kits_layout`; KiTS23 (and KiTS21, which shares its labels) adds the renal cyst
and scores hierarchical evaluation regions (HECs) instead of raw labels:

=========  ======================================  =================================================
dataset    labels                                  scored regions (label set, surface-Dice tolerance)
=========  ======================================  =================================================
kits19     0 background, 1 kidney, 2 tumour        kidney {1, 2}, tumour {2} (tolerance: the
                                                   evaluation's ``--tolerance-mm``, default 2 mm)
kits23     0 background, 1 kidney, 2 tumour,       kidney_and_masses {1, 2, 3} 1.033 mm,
           3 cyst                                  masses {2, 3} 1.133 mm, tumour {2} 1.150 mm
=========  ======================================  =================================================

The KiTS23 tolerances are the challenge's own (its ``HEC_SD_TOLERANCES_MM``, derived from the
disagreement between annotators). Layouts: KiTS19's official repository keeps its cases in
``data/`` with ``kits.json``; KiTS23's in ``dataset/`` with ``kits23.json``. Both use the same
file names and axis convention (:mod:`utils.data.kits_layout`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

import numpy as np

from utils.data.kits_layout import BACKGROUND_LABEL, KIDNEY_LABEL, KITS_JSON_NAME, LABEL_NAMES, TUMOUR_LABEL

#: Label id of the renal cyst in KiTS21 and KiTS23.
CYST_LABEL: Final = 3


@dataclass(frozen=True)
class EvaluationRegion:
    """One scored structure: the union of some labels.

    Attributes:
        name: the region's name, the prefix of its score keys (``<name>_dice``,
            ``<name>_surface_dice``, ``<name>_hd95``).
        labels: the label ids whose union is the region.
        tolerance_mm: surface-Dice tolerance in mm fixed by the challenge, or ``None`` where the
            evaluation's own tolerance applies (KiTS19 has no official one).
    """

    name: str
    labels: frozenset[int]
    tolerance_mm: float | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"a region name must be an identifier (it prefixes score keys), got {self.name!r}")
        if not self.labels or min(self.labels) <= BACKGROUND_LABEL:
            raise ValueError(f"region {self.name!r} must hold foreground labels (> 0), got {sorted(self.labels)}")
        if self.tolerance_mm is not None and not self.tolerance_mm > 0:
            raise ValueError(f"region {self.name!r}: tolerance_mm must be > 0 or None, got {self.tolerance_mm}")

    def mask(self, label_map):
        """The region's voxels of a label map: a bool numpy array or torch tensor of the same shape."""
        if type(label_map).__module__.startswith("torch"):
            import torch  # only when given a tensor: data checks run without importing torch

            return torch.isin(label_map, torch.tensor(sorted(self.labels), dtype=label_map.dtype,
                                                       device=label_map.device))
        return np.isin(np.asarray(label_map), sorted(self.labels))


@dataclass(frozen=True)
class DatasetDefinition:
    """A KiTS challenge dataset: everything the pipeline needs to know that differs between challenges.

    Attributes:
        name: the config value that selects it (``kits19``, ``kits23``).
        title: how reports name it (``KiTS19``).
        labels: label id -> name, background included; ids are ``0 .. len(labels) - 1``.
        regions: the scored regions, in report order; the first is the kidney region.
        data_folder: the folder of the official repository that holds the cases (``data``,
            ``dataset``).
        metadata_name: the clinical-data file next to the case folders.
        region_rule: one sentence for reports on how the regions are built from the labels.
        metadata_has_spacing: whether the metadata file gives each case's voxel spacing
            (``kits.json`` does, ``kits23.json`` does not).
    """

    name: str
    title: str
    labels: Mapping[int, str]
    regions: tuple[EvaluationRegion, ...]
    data_folder: str
    metadata_name: str
    region_rule: str = ""
    metadata_has_spacing: bool = False
    _by_name: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if sorted(self.labels) != list(range(len(self.labels))) or self.labels.get(BACKGROUND_LABEL) != "background":
            raise ValueError(f"{self.name}: labels must be 0 (background), 1, ... without gaps, "
                             f"got {dict(self.labels)}")
        unknown = sorted({label for region in self.regions for label in region.labels} - set(self.labels))
        if unknown:
            raise ValueError(f"{self.name}: regions use labels {unknown} that are not among {sorted(self.labels)}")
        names = [region.name for region in self.regions]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{self.name}: region names must be present and distinct, got {names}")
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "_by_name", MappingProxyType({name: label for label, name in self.labels.items()}))

    @property
    def num_classes(self) -> int:
        """Output channels of a model: one per label, background included."""
        return len(self.labels)

    @property
    def max_label(self) -> int:
        """The highest valid label id."""
        return len(self.labels) - 1

    @property
    def valid_labels(self) -> frozenset[int]:
        return frozenset(self.labels)

    @property
    def foreground_labels(self) -> tuple[int, ...]:
        return tuple(label for label in sorted(self.labels) if label != BACKGROUND_LABEL)

    def label(self, name: str) -> int:
        """The id of a label by name (``"tumour"`` -> 2); ``KeyError`` naming the known ones."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.title} has no label {name!r}; its labels are {dict(self.labels)}") from None

    def has_label(self, name: str) -> bool:
        return name in self._by_name

    def region(self, name: str) -> EvaluationRegion:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(f"{self.title} has no evaluation region {name!r}; its regions are "
                       f"{[r.name for r in self.regions]}")

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(region.name for region in self.regions)

    def __reduce__(self):
        """Pickled by name (worker processes get the same registered definition back)."""
        return get_dataset, (self.name,)

    def describe_labels(self) -> str:
        """``"0 (background), 1 (kidney), 2 (tumour)"``: for error messages."""
        return ", ".join(f"{label} ({name})" for label, name in sorted(self.labels.items()))


KITS19: Final = DatasetDefinition(
    name="kits19", title="KiTS19", labels=LABEL_NAMES,
    regions=(EvaluationRegion("kidney", frozenset({KIDNEY_LABEL, TUMOUR_LABEL})),
             EvaluationRegion("tumour", frozenset({TUMOUR_LABEL}))),
    data_folder="data", metadata_name=KITS_JSON_NAME, metadata_has_spacing=True,
    region_rule="kidney = label > 0 (kidney and tumour together), tumour = label 2, as in the KiTS19 challenge")

#: The KiTS23 challenge's surface-Dice tolerances per HEC, in mm.
KITS23_TOLERANCES_MM: Final = MappingProxyType({
    "kidney_and_masses": 1.0330772532390826, "masses": 1.1328796488598762, "tumour": 1.1498198361434828})

KITS23: Final = DatasetDefinition(
    name="kits23", title="KiTS23", labels={**LABEL_NAMES, CYST_LABEL: "cyst"},
    regions=(EvaluationRegion("kidney_and_masses", frozenset({KIDNEY_LABEL, TUMOUR_LABEL, CYST_LABEL}),
                              KITS23_TOLERANCES_MM["kidney_and_masses"]),
             EvaluationRegion("masses", frozenset({TUMOUR_LABEL, CYST_LABEL}), KITS23_TOLERANCES_MM["masses"]),
             EvaluationRegion("tumour", frozenset({TUMOUR_LABEL}), KITS23_TOLERANCES_MM["tumour"])),
    data_folder="dataset", metadata_name="kits23.json",
    region_rule=("hierarchical evaluation regions of the KiTS23 challenge: kidney and masses = labels 1, 2, 3; "
                 "masses = labels 2, 3 (tumour and cyst); tumour = label 2"))

#: Every known dataset by its config name.
DATASETS: Final = MappingProxyType({definition.name: definition for definition in (KITS19, KITS23)})


#: What a label one dataset has and another lacks is called in the other: KiTS19's annotators
#: labelled renal cysts kidney, so KiTS23's cyst (3) is kidney (1) in KiTS19's labels.
LABEL_FALLBACKS: Final = MappingProxyType({"cyst": "kidney"})


def label_lookup(source: DatasetDefinition | str, target: DatasetDefinition | str) -> np.ndarray:
    """The table that rewrites ``source``'s label ids as ``target``'s: ``table[label_map]``.

    A label is mapped by name; one that ``target`` lacks takes its :data:`LABEL_FALLBACKS` name
    (KiTS23 -> KiTS19: 0, 1, 2, 3 -> 0, 1, 2, 1).

    Raises:
        ValueError: a ``source`` label with no name in ``target`` and no fallback.
    """
    source, target = get_dataset(source), get_dataset(target)
    table = np.zeros(source.num_classes, dtype=np.uint8)
    for label, name in source.labels.items():
        mapped = name if target.has_label(name) else LABEL_FALLBACKS.get(name)
        if mapped is None or not target.has_label(mapped):
            raise ValueError(f"{source.title}'s label {label} ({name}) has no counterpart in {target.title} "
                             f"(labels {target.describe_labels()})")
        table[label] = target.label(mapped)
    return table


class DatasetLayoutError(ValueError):
    """A data folder laid out for another dataset than the one selected."""


def get_dataset(name: str | DatasetDefinition) -> DatasetDefinition:
    """The definition of a dataset by its config name (a definition is returned as it is).

    Raises:
        ValueError: an unknown name, with the known ones.
    """
    if isinstance(name, DatasetDefinition):
        return name
    try:
        return DATASETS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} "
                         f"(the experiment config's 'dataset:' key)") from None


def foreign_labels_hint(values, dataset: DatasetDefinition) -> str:
    """Where label values outside ``dataset`` come from, for an error message.

    Returns:
        e.g. ``"; label 3 is KiTS23's cyst: if this is KiTS23 data, set 'dataset: kits23' in the
        experiment config (or pass --dataset kits23)"`` when a larger known dataset has every one of ``values``
        with the same meaning for the shared labels; ``""`` otherwise.
    """
    found = sorted({int(v) for v in values if float(v) == int(v)})
    if not found or len(found) != len(set(values)):
        return ""
    for other in DATASETS.values():
        same = all(other.labels.get(label) == name for label, name in dataset.labels.items())
        if other.num_classes > dataset.num_classes and same and set(found) <= set(other.valid_labels):
            names = " and ".join(f"label {label} is {other.title}'s {other.labels[label]}" for label in found)
            return (f"; {names}: if this is {other.title} data, set 'dataset: {other.name}' in the experiment "
                    f"config (or pass --dataset {other.name})")
    return ""
