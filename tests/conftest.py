"""Shared test fixtures: the real KiTS19 label folder (skipped when absent), a tiny cache, a quiet wandb."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _real_kits19_dir() -> Path:
    configured = os.environ.get("KITS19_LABELS_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "kits19"


@pytest.fixture(scope="session")
def real_kits19_dir() -> Path:
    """The folder of real KiTS19 segmentations (labels only); skips the test when absent."""
    folder = _real_kits19_dir()
    if not (folder / "case_00000" / "segmentation.nii.gz").is_file():
        pytest.skip(f"real KiTS19 segmentations not found at {folder}")
    return folder


def _real_kits23_dir() -> Path:
    configured = os.environ.get("KITS23_LABELS_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "kits23"


@pytest.fixture(scope="session")
def real_kits23_dir() -> Path:
    """The folder of real KiTS23 segmentations (labels only, case_00400 ... case_00499); skips the test when
    absent (``KITS23_LABELS_DIR`` names another folder)."""
    folder = _real_kits23_dir()
    if not (folder / "case_00400" / "segmentation.nii.gz").is_file():
        pytest.skip(f"real KiTS23 segmentations not found at {folder} (set KITS23_LABELS_DIR to their folder)")
    return folder


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A preprocessed cache of four small synthetic cases (4 mm voxels), shared by the dataset tests."""
    from utils.config.data import PreprocessingConfig, SplitConfig
    from utils.preprocessing.cache import open_cache
    from utils.preprocessing.preprocess import preprocess_dataset
    from utils.synthetic.dataset import SyntheticOptions, generate_dataset

    root = tmp_path_factory.mktemp("tiny_cache")
    generate_dataset(root / "data", 4, seed=3, options=SyntheticOptions(matrix=64), show_progress=False)
    config = PreprocessingConfig(cache_dir=str(root / "cache"), target_spacing=(4.0, 4.0, 4.0))
    result = preprocess_dataset(root / "data", config, SplitConfig(validation_fraction=0.25), show_progress=False)
    return open_cache(result.folder)


def _labels_by_hand() -> np.ndarray:
    """``(6, 8, 8)`` labels, kidney (1) and tumour (2) pixels per slice: 9/0, 8/1, 9/0, 1/0, 0/4, 0/0.

    27 kidney and 5 tumour voxels; two tumours (26-connected components of label 2).
    """
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[0:3, 0:3, 0:3] = 1
    labels[1, 1, 1] = 2
    labels[3, 3, 3] = 1
    labels[4, 6:8, 6:8] = 2
    return labels


@pytest.fixture
def hand_made_labels():
    """A function returning a fresh copy of small labels whose statistics are known by hand."""
    return _labels_by_hand


def _make_cached_case(folder: Path, case_id: str, labels: np.ndarray, spacing=(2.0, 1.0, 1.0)):
    """A hand-made cached case whose image value is the voxel's flat index."""
    from utils.analysis.slice_statistics import classify_slices
    from utils.preprocessing.cache import CachedCase, write_case_folder

    image = np.arange(labels.size, dtype=np.float32).reshape(labels.shape)
    meta = {"case_id": case_id, "shape": list(labels.shape), "mapping": {"resampled_spacing": list(spacing)},
            "slice_classes": classify_slices(labels).tolist()}
    locations = {"kidney": np.argwhere(labels == 1), "tumour": np.argwhere(labels == 2)}
    case_folder = write_case_folder(folder, case_id, {"image.npy": image, "label.npy": labels}, locations, meta)
    return CachedCase(case_folder, meta)


@pytest.fixture
def make_cached_case():
    """A function ``(folder, case_id, labels, spacing=(2, 1, 1)) -> CachedCase`` writing a hand-made case."""
    return _make_cached_case


@pytest.fixture(scope="session")
def tiny_data(tiny_cache) -> Path:
    """The raw synthetic folder behind the shared tiny cache (four 64 x 64 cases)."""
    return Path(tiny_cache.plan["source_data"])
