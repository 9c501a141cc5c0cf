"""Shared test fixtures: the real KiTS19 label folder (skipped when absent) and a quiet wandb."""

from __future__ import annotations

import os
from pathlib import Path

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
