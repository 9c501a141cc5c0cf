"""The case-level train/validation split every model uses, saved as JSON beside the cache.

Splits are made over case ids, never slices or patches, so every slice of a case is in exactly
one split. They depend only on the sorted case ids and the split's own seed: changing a training
seed never changes them, and the same cases give the same split on any machine.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.config.data import SplitConfig
from utils.config.loading import config_as_dict
from utils.data.nifti_io import save_json_atomic

logger = logging.getLogger(__name__)

SPLITS_NAME = "splits.json"


def make_splits(case_ids: Sequence[str], config: SplitConfig) -> list[dict[str, list[str]]]:
    """Split case ids into train and validation sets.

    Args:
        case_ids: the cases to split (order does not matter; duplicates are an error).
        config: ``holdout`` gives one split with ``round(validation_fraction * n)`` (at least 1)
            validation cases; ``kfold`` gives ``folds`` splits whose validation sets partition
            the cases.

    Returns:
        One ``{"train": [...], "val": [...]}`` per split (fold), each list sorted.

    Raises:
        ValueError: duplicates, or too few cases for the scheme.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("case_ids contains duplicates")
    needed = config.folds if config.scheme == "kfold" else 2
    if len(ids) < needed:
        raise ValueError(f"a {config.scheme} split needs at least {needed} cases, got {len(ids)}")
    order = np.random.default_rng(config.seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    if config.scheme == "kfold":
        validation_sets = [list(part) for part in np.array_split(np.asarray(shuffled, dtype=object), config.folds)]
    else:
        count = min(len(ids) - 1, max(1, round(config.validation_fraction * len(ids))))
        validation_sets = [shuffled[:count]]
    return [{"train": sorted(set(ids) - set(val)), "val": sorted(val)} for val in validation_sets]


def save_splits(folder: str | os.PathLike, case_ids: Sequence[str], config: SplitConfig) -> Path:
    """Make the splits and write them to ``folder/splits.json`` (atomically), with their settings.

    An existing file made from other cases or settings is replaced, with a warning: models
    trained on the old split are no longer comparable with new ones.
    """
    path = Path(folder) / SPLITS_NAME
    data = {"settings": config_as_dict(config), "case_ids": sorted(case_ids),
            "splits": make_splits(case_ids, config)}
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = None
        if previous == data:
            return path
        logger.warning("%s: the cases or split settings changed; the split is rewritten, so runs trained on "
                       "the previous split are not comparable with new ones", path)
    save_json_atomic(path, data)
    return path


def load_split(folder: str | os.PathLike, fold: int = 0) -> tuple[list[str], list[str]]:
    """Read the train and validation case ids of one fold from ``folder/splits.json``.

    Raises:
        FileNotFoundError: no splits file (run ``scripts/preprocess.py``).
        ValueError: unreadable file, or ``fold`` out of range (the message gives the valid range).
    """
    data = _read_splits(Path(folder) / SPLITS_NAME)
    splits = data["splits"]
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold must be between 0 and {len(splits) - 1} for {Path(folder) / SPLITS_NAME}, got {fold}")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def _read_splits(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no splits file; run scripts/preprocess.py to create the cache and its split")
    try:
        data = json.loads(path.read_text())
        data["splits"][0]["train"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise ValueError(f"{path}: not a valid splits file ({type(error).__name__}: {error})") from error
    return data
