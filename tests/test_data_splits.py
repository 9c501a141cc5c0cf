"""Tests of utils.data.splits: seeded, case-level holdout and k-fold splits saved as JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from utils.config.data import SplitConfig
from utils.data.splits import SPLITS_NAME, load_split, make_splits, save_splits

CASES = [f"case_{i:05d}" for i in range(10)]


def test_splits_are_deterministic_and_ignore_input_order() -> None:
    config = SplitConfig(seed=3)
    assert make_splits(CASES, config) == make_splits(list(reversed(CASES)), config)


def test_the_seed_changes_the_split() -> None:
    validation_sets = {tuple(make_splits(CASES, SplitConfig(seed=seed))[0]["val"]) for seed in range(5)}
    assert len(validation_sets) > 1


def test_holdout_sizes_and_disjoint_sets() -> None:
    [split] = make_splits(CASES, SplitConfig(scheme="holdout", validation_fraction=0.2))
    assert len(split["val"]) == 2 and len(split["train"]) == 8
    assert set(split["train"]).isdisjoint(split["val"])
    assert set(split["train"]) | set(split["val"]) == set(CASES)
    assert split["train"] == sorted(split["train"]) and split["val"] == sorted(split["val"])
    assert [len(s["val"]) for s in make_splits(CASES[:2], SplitConfig(validation_fraction=0.1))] == [1]  # at least 1
    assert [len(s["train"]) for s in make_splits(CASES[:3], SplitConfig(validation_fraction=0.9))] == [1]  # at least 1


def test_kfold_puts_every_case_in_exactly_one_validation_set() -> None:
    splits = make_splits(CASES, SplitConfig(scheme="kfold", folds=3))
    assert len(splits) == 3
    validation = [case for split in splits for case in split["val"]]
    assert sorted(validation) == CASES
    assert sorted(len(s["val"]) for s in splits) == [3, 3, 4]
    for split in splits:
        assert set(split["train"]).isdisjoint(split["val"]) and len(split["train"]) + len(split["val"]) == 10
        assert all(isinstance(case, str) for case in split["val"])


def test_split_errors() -> None:
    with pytest.raises(ValueError, match="duplicates"):
        make_splits(["case_00000", "case_00000", "case_00001"], SplitConfig())
    with pytest.raises(ValueError, match="holdout split needs at least 2 cases, got 1"):
        make_splits(["case_00000"], SplitConfig())
    with pytest.raises(ValueError, match="kfold split needs at least 5 cases, got 4"):
        make_splits(CASES[:4], SplitConfig(scheme="kfold", folds=5))


def test_save_splits_rewrites_with_a_warning_only_when_something_changed(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    config = SplitConfig()
    path = save_splits(tmp_path, CASES, config)
    stored = json.loads(path.read_text())
    assert path.name == SPLITS_NAME
    assert stored["case_ids"] == CASES and stored["settings"]["seed"] == 0
    assert stored["splits"] == make_splits(CASES, config)
    before = path.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="utils.data.splits"):
        save_splits(tmp_path, list(reversed(CASES)), config)
    assert caplog.records == [] and path.stat().st_mtime_ns == before
    with caplog.at_level(logging.WARNING, logger="utils.data.splits"):
        save_splits(tmp_path, CASES, SplitConfig(seed=1))
    assert len(caplog.records) == 1 and "not comparable" in caplog.records[0].getMessage()
    assert json.loads(path.read_text())["settings"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [SPLITS_NAME]


def test_load_split(tmp_path: Path) -> None:
    save_splits(tmp_path, CASES, SplitConfig(scheme="kfold", folds=2))
    splits = make_splits(CASES, SplitConfig(scheme="kfold", folds=2))
    assert load_split(tmp_path, 1) == (splits[1]["train"], splits[1]["val"])
    with pytest.raises(ValueError, match="fold must be between 0 and 1 .* got 2"):
        load_split(tmp_path, 2)
    with pytest.raises(ValueError, match="got -1"):
        load_split(tmp_path, -1)


def test_load_split_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run scripts/preprocess.py"):
        load_split(tmp_path)
    (tmp_path / SPLITS_NAME).write_text('{"splits": []}')
    with pytest.raises(ValueError, match="not a valid splits file"):
        load_split(tmp_path)
