"""Tests of utils.preprocessing.cache: atomic case writes, memory-mapped reads and plan checks."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from utils.analysis.slice_statistics import SLICE_BACKGROUND, SLICE_KIDNEY, SLICE_TUMOUR
from utils.config.data import SplitConfig
from utils.data.kits_layout import build_kits_affine
from utils.data.nifti_io import save_json_atomic
from utils.data.splits import save_splits
from utils.preprocessing.cache import (
    CASES_DIR,
    FINGERPRINT_NAME,
    IMAGE_FILE,
    LABEL_FILE,
    LOCATIONS_FILE,
    META_FILE,
    PLAN_NAME,
    CachedCase,
    open_cache,
    read_case_meta,
    remove_unfinished_writes,
    write_case_folder,
)
from utils.preprocessing.fingerprint import build_fingerprint, compute_case_fingerprint
from utils.preprocessing.resampling import GridMapping

SHAPE = (4, 32, 32)
PLAN_HASH = "a" * 64


class _FailingArray:
    """Stands in for an array whose saving fails part-way (a full disk, a killed worker)."""

    def __array__(self, dtype=None, copy=None):
        raise OSError("No space left on device")


def _mapping() -> GridMapping:
    return GridMapping(
        original_shape=SHAPE,
        original_affine=tuple(tuple(float(v) for v in row) for row in build_kits_affine((3.0, 1.0, 1.0))),
        original_axcodes=("I", "P", "L"), orientation=((0.0, 1.0), (1.0, 1.0), (2.0, 1.0)),
        canonical_spacing=(3.0, 1.0, 1.0), resampled_shape=SHAPE, resampled_spacing=(3.0, 1.0, 1.0),
        crop_box=((0, 4), (0, 32), (0, 32)),
    )


def _case_content(fill: float = 0.5, plan_hash: str = PLAN_HASH, case_id: str = "case_00000"):
    image = np.full(SHAPE, fill, dtype=np.float32)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1, 2:4, 2:4] = 1
    labels[2, 5, 6] = 2
    locations = {name: np.argwhere(labels == value).astype(np.int32) for name, value in (("kidney", 1), ("tumour", 2))}
    meta = {"case_id": case_id, "plan_hash": plan_hash, "shape": list(SHAPE), "mapping": _mapping().to_dict(),
            "slice_classes": [SLICE_BACKGROUND, SLICE_KIDNEY, SLICE_TUMOUR, SLICE_BACKGROUND]}
    return {IMAGE_FILE: image, LABEL_FILE: labels}, locations, meta


def _leftovers(cases_dir: Path) -> list[str]:
    return sorted(p.name for p in cases_dir.iterdir() if p.name.startswith("."))


def test_write_case_folder_writes_every_file(tmp_path: Path) -> None:
    arrays, locations, meta = _case_content()
    folder = write_case_folder(tmp_path / CASES_DIR, "case_00000", arrays, locations, meta)
    assert folder == tmp_path / CASES_DIR / "case_00000"
    assert sorted(p.name for p in folder.iterdir()) == sorted([IMAGE_FILE, LABEL_FILE, LOCATIONS_FILE, META_FILE])
    np.testing.assert_array_equal(np.load(folder / LABEL_FILE), arrays[LABEL_FILE])
    assert read_case_meta(folder) == json.loads(json.dumps(meta))
    assert _leftovers(tmp_path / CASES_DIR) == []


def test_write_case_folder_replaces_an_existing_case(tmp_path: Path) -> None:
    cases_dir = tmp_path / CASES_DIR
    write_case_folder(cases_dir, "case_00000", *_case_content(fill=1.0))
    (cases_dir / "case_00000" / "stale.npy").write_bytes(b"old")
    write_case_folder(cases_dir, "case_00000", *_case_content(fill=2.0))
    assert np.load(cases_dir / "case_00000" / IMAGE_FILE)[0, 0, 0] == 2.0
    assert not (cases_dir / "case_00000" / "stale.npy").exists()  # the folder is replaced, not merged
    assert sorted(p.name for p in cases_dir.iterdir()) == ["case_00000"]


def test_a_failed_write_leaves_the_old_case_intact(tmp_path: Path) -> None:
    cases_dir = tmp_path / CASES_DIR
    write_case_folder(cases_dir, "case_00000", *_case_content(fill=1.0))
    arrays, locations, meta = _case_content(fill=2.0)
    arrays[LABEL_FILE] = _FailingArray()  # the image is written, then the labels fail
    with pytest.raises(OSError, match="No space left"):
        write_case_folder(cases_dir, "case_00000", arrays, locations, {**meta, "plan_hash": "b" * 64})
    assert np.load(cases_dir / "case_00000" / IMAGE_FILE)[0, 0, 0] == 1.0
    assert read_case_meta(cases_dir / "case_00000")["plan_hash"] == PLAN_HASH
    assert _leftovers(cases_dir) == []


def test_a_failed_first_write_leaves_no_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_savez(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted by the user while writing the locations

    monkeypatch.setattr(np, "savez", failing_savez)
    cases_dir = tmp_path / CASES_DIR
    with pytest.raises(KeyboardInterrupt):
        write_case_folder(cases_dir, "case_00003", *_case_content())
    assert list(cases_dir.iterdir()) == []


def test_remove_unfinished_writes(tmp_path: Path) -> None:
    cases_dir = tmp_path / CASES_DIR
    write_case_folder(cases_dir, "case_00000", *_case_content())
    for name in (".case_00001.tmp-x1y2", ".case_00000.old-abcd", ".hidden", ".case_00002.unrelated"):
        (cases_dir / name).mkdir()
    (cases_dir / ".case_00000.old-abcd" / "case_00000").mkdir()
    assert remove_unfinished_writes(cases_dir) == 2
    assert _leftovers(cases_dir) == [".case_00002.unrelated", ".hidden"]
    assert (cases_dir / "case_00000" / META_FILE).is_file()
    assert remove_unfinished_writes(cases_dir) == 0


def _plan_folder(tmp_path: Path, case_hashes: dict[str, str]) -> Path:
    """A plan folder by hand: plan, fingerprint, split and one case per entry of ``case_hashes``."""
    folder = tmp_path / "spacing_3x1x1_abcdef12"
    for case_id, plan_hash in case_hashes.items():
        write_case_folder(folder / CASES_DIR, case_id, *_case_content(plan_hash=plan_hash, case_id=case_id))
    image, labels = np.array([[[0.0, 10.0, 20.0]]]), np.array([[[0, 1, 2]]])
    statistics = [compute_case_fingerprint(case_id, image, labels, (3.0, 1.0, 1.0), {}) for case_id in case_hashes]
    save_json_atomic(folder / FINGERPRINT_NAME, build_fingerprint(statistics, (0.5, 99.5)).to_dict())
    save_splits(folder, list(case_hashes), SplitConfig())
    save_json_atomic(folder / PLAN_NAME, {"plan_hash": PLAN_HASH, "case_ids": list(case_hashes)})
    return folder


def test_cached_case_reads_memory_maps(tmp_path: Path) -> None:
    cache = open_cache(_plan_folder(tmp_path, {"case_00000": PLAN_HASH, "case_00001": PLAN_HASH}))
    assert cache.case_ids == ["case_00000", "case_00001"]
    assert cache.fingerprint.case_ids == ("case_00000", "case_00001")
    train, val = cache.split(0)
    assert sorted(train + val) == cache.case_ids and len(val) == 1
    case = cache.case("case_00000")
    assert isinstance(case.image, np.memmap) and not case.image.flags.writeable
    assert case.image.dtype == np.float32 and case.image.shape == case.shape == SHAPE
    assert case.label.dtype == np.uint8 and case.label[2, 5, 6] == 2
    np.testing.assert_array_equal(case.locations("kidney"), np.argwhere(case.label == 1))
    np.testing.assert_array_equal(case.locations("tumour"), [[2, 5, 6]])
    with pytest.raises(ValueError, match="name must be one of"):
        case.locations("liver")
    assert case.slice_classes.tolist() == [0, 1, 2, 0] and case.slice_classes.dtype == np.int8
    assert case.mapping == _mapping() and case.spacing == (3.0, 1.0, 1.0)
    assert [c.case_id for c in cache.cases()] == cache.case_ids


def test_pickled_cases_do_not_carry_their_arrays(tmp_path: Path) -> None:
    case = open_cache(_plan_folder(tmp_path, {"case_00000": PLAN_HASH, "case_00001": PLAN_HASH})).case("case_00000")
    assert float(case.image.sum()) == 0.5 * np.prod(SHAPE)  # maps opened before pickling
    _ = case.locations("kidney"), case.label, case.mapping
    payload = pickle.dumps(case)
    assert len(payload) < 4096 < case.image.nbytes
    copy = pickle.loads(payload)
    assert isinstance(copy, CachedCase) and copy.case_id == "case_00000"
    np.testing.assert_array_equal(copy.label, case.label)
    assert isinstance(copy.image, np.memmap)


def test_open_cache_without_a_plan(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a preprocessing cache .*run scripts/preprocess.py"):
        open_cache(tmp_path)


def test_a_case_from_another_plan_is_refused(tmp_path: Path) -> None:
    cache = open_cache(_plan_folder(tmp_path, {"case_00000": PLAN_HASH, "case_00001": "b" * 64}))
    assert cache.case("case_00000").case_id == "case_00000"
    with pytest.raises(ValueError, match="case_00001 was preprocessed with other parameters"):
        cache.case("case_00001")
    with pytest.raises(ValueError, match="other parameters"):
        cache.cases()
    with pytest.raises(KeyError, match="case_00002 is not in the cache"):
        cache.case("case_00002")


def test_a_case_without_meta_is_refused(tmp_path: Path) -> None:
    cache = open_cache(_plan_folder(tmp_path, {"case_00000": PLAN_HASH, "case_00001": PLAN_HASH}))
    (cache.folder / CASES_DIR / "case_00000" / META_FILE).unlink()
    with pytest.raises(ValueError, match="missing or unreadable meta.json"):
        cache.case("case_00000")
    assert cache.case("case_00001").case_id == "case_00001"
