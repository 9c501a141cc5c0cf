"""Measurements behind ``scripts/benchmark_data.py``: patches from the cache vs. the per-sample pattern.

Two ways of producing the same augmented training patches from the same cases, timed in one run:

* **cache** (ours): :class:`utils.datasets.patches.PatchDataset` reading regions from the
  memory-mapped preprocessing cache;
* **per-sample** (the common pattern this toolkit replaces): for every patch, MONAI loads the
  case's NIfTI files, reorients, resamples to the target spacing, clips and normalises with the
  same fingerprint, crops to the body; the patch is then centred and augmented by exactly the
  same code as ours, so the ratio measures the data pipeline alone.

And the peak memory (maximum resident set size of a fresh process) of preprocessing one case,
against a baseline of only loading that case in a fresh process.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)
from torch.utils.data import Dataset

from utils.config.data import AugmentationConfig, PatchDatasetConfig, PreprocessingConfig, SplitConfig
from utils.data.case_discovery import discover_cases
from utils.data.case_validation import load_case
from utils.data.progress import progress
from utils.datasets.augmentation import SampleAugmenter
from utils.datasets.patches import PatchDataset, background_value, read_region
from utils.preprocessing.cache import PreprocessedCache
from utils.preprocessing.preprocess import preprocess_dataset
from utils.preprocessing.resampling import CANONICAL_AXCODES


@dataclass(frozen=True)
class PatchTiming:
    """Seconds to produce ``patches`` augmented patches one after another in this process."""

    name: str
    patches: int
    seconds: float

    @property
    def seconds_per_patch(self) -> float:
        """Mean seconds per patch."""
        return self.seconds / self.patches


def time_cache_patches(cache: PreprocessedCache, config: PatchDatasetConfig, augmentation: AugmentationConfig,
                       patches: int, seed: int = 0, show_progress: bool = True) -> PatchTiming:
    """Time ``patches`` samples of the cache-backed :class:`PatchDataset` (all cases of the cache)."""
    dataset = PatchDataset(cache.cases(), config, augmentation, seed=seed, pad_value=background_value(cache))
    start = time.perf_counter()
    for index in progress(range(patches), desc="cache patches", disable=not show_progress):
        dataset[index]
    return PatchTiming("cache", patches, time.perf_counter() - start)


def build_per_sample_loader(cache: PreprocessedCache) -> Compose:
    """MONAI's load → reorient → resample → clip and normalise → crop-to-body chain for one case."""
    plan = cache.plan["preprocessing"]
    norm = cache.plan["normalisation"]
    low, high = norm["clip_low_hu"], norm["clip_high_hu"]
    body = (plan["body_threshold_hu"] - norm["mean_hu"]) / norm["std_hu"]
    keys = ["image", "label"]
    return Compose([
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="".join(CANONICAL_AXCODES), labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=plan["target_spacing"], mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=(low - norm["mean_hu"]) / norm["std_hu"],
                             b_max=(high - norm["mean_hu"]) / norm["std_hu"], clip=True),
        CropForegroundd(keys=keys, source_key="image", select_fn=lambda x: x > body, allow_smaller=True),
    ])


class PerSamplePatchDataset(Dataset):
    """The per-sample pattern as a dataset: every item loads and preprocesses its case's NIfTI files.

    Item ``i`` draws its case, centre and augmentation from ``numpy.random.default_rng([seed, 0, i])``
    like :class:`PatchDataset`, but from the MONAI chain of :func:`build_per_sample_loader` run on
    the raw files, so its cost is what a plain dataset without a cache pays for every patch.

    Items: ``image`` ``(1, *patch_size)`` float32 and ``label`` uint8.
    """

    def __init__(self, cache: PreprocessedCache, data_dir: str | Path, config: PatchDatasetConfig,
                 augmentation: AugmentationConfig, *, case_ids: Sequence[str] | None = None, seed: int = 0):
        files = {c.case_id: c for c in discover_cases(data_dir).cases}
        self.files = [files[case_id] for case_id in (cache.case_ids if case_ids is None else case_ids)]
        self.loader = build_per_sample_loader(cache)
        self.augmenter = SampleAugmenter(augmentation, 3)
        self.config = config
        self.pad = background_value(cache)
        self.seed = seed

    def __len__(self) -> int:
        return self.config.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 0, index])
        case = self.files[int(rng.integers(len(self.files)))]
        data = self.loader({"image": str(case.imaging), "label": str(case.segmentation)})
        image, label = np.asarray(data["image"][0]), np.asarray(data["label"][0]).astype(np.uint8)
        centre = _draw_centre(label, self.config, rng)
        spacing = tuple(float(s) for s in data["image"].pixdim[:3])
        draw = self.augmenter.draw_spatial(rng, tuple(self.config.patch_size), spacing)
        image, label = self.augmenter.apply(
            torch.from_numpy(read_region(image, centre, draw.region_size, self.pad))[None],
            torch.from_numpy(read_region(label, centre, draw.region_size, 0, np.uint8))[None],
            draw, rng)
        return {"image": image, "label": label}


def time_per_sample_patches(cache: PreprocessedCache, data_dir: str | Path, config: PatchDatasetConfig,
                            augmentation: AugmentationConfig, patches: int, seed: int = 0,
                            show_progress: bool = True) -> PatchTiming:
    """Time ``patches`` samples made the per-sample way from the raw NIfTI files of the cache's cases."""
    dataset = PerSamplePatchDataset(cache, data_dir, config, augmentation, seed=seed)
    start = time.perf_counter()
    for index in progress(range(patches), desc="per-sample patches", disable=not show_progress):
        dataset[index]
    return PatchTiming("per-sample", patches, time.perf_counter() - start)


def _draw_centre(label: np.ndarray, config: PatchDatasetConfig, rng: np.random.Generator) -> tuple[int, ...]:
    """The same class-balanced centring as the cache dataset, found by scanning the label map."""
    u = rng.random()
    order = (2, 1) if u < config.tumour_share else (1, 2) if u < config.tumour_share + config.kidney_share else ()
    for value in order:
        locations = np.argwhere(label == value)
        if len(locations):
            return tuple(int(v) for v in locations[int(rng.integers(len(locations)))])
    return tuple(int(rng.integers(n)) for n in label.shape)


def measure_peak_memory(data_dir: str | Path, cache_dir: str | Path, config: PreprocessingConfig) -> dict[str, Any]:
    """Peak resident memory (GB) of preprocessing ``data_dir`` in a fresh process, and of only loading its cases.

    Each measurement runs in its own spawned process (so earlier allocations do not count);
    the figure is the process's maximum resident set size, imports included.
    """
    context = multiprocessing.get_context("spawn")
    results = {}
    for name, target in (("load_only", _load_only), ("preprocess", _preprocess_only)):
        queue = context.Queue()
        process = context.Process(target=target, args=(str(data_dir), str(cache_dir), config, queue))
        start = time.perf_counter()
        process.start()
        peak_kb = queue.get()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"the {name} measurement process failed with exit code {process.exitcode}")
        results[name] = {"peak_gb": peak_kb / 1024 ** 2, "seconds": time.perf_counter() - start}
    return results


def peak_resident_kb() -> int:
    """This process's peak resident memory in KiB since it started (``VmHWM`` on Linux).

    ``ru_maxrss`` is not used where ``/proc`` exists: a spawned process inherits its parent's
    figure across ``fork`` and ``exec``, so it would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _load_only(data_dir: str, cache_dir: str, config: PreprocessingConfig, queue: Any) -> None:
    for case in discover_cases(data_dir).cases:
        load_case(case)
    queue.put(peak_resident_kb())


def _preprocess_only(data_dir: str, cache_dir: str, config: PreprocessingConfig, queue: Any) -> None:
    preprocess_dataset(data_dir, config, SplitConfig(scheme="holdout"), cache_dir=cache_dir, workers=1,
                       show_progress=False)
    queue.put(peak_resident_kb())


def format_timings(cache: PatchTiming, per_sample: PatchTiming) -> list[str]:
    """Table lines comparing the two timings (the ratio is per patch)."""
    ratio = per_sample.seconds_per_patch / cache.seconds_per_patch
    return [f"{'pipeline':<12} {'patches':>7} {'seconds':>8} {'s/patch':>8}",
            *(f"{t.name:<12} {t.patches:>7} {t.seconds:>8.2f} {t.seconds_per_patch:>8.4f}"
              for t in (cache, per_sample)),
            f"cache is {ratio:.1f}x faster per patch than the per-sample pattern (target: >= 20x)"]


def summarise(rows: Sequence[PatchTiming]) -> dict[str, Any]:
    """JSON-ready figures of the timings."""
    return {t.name: {"patches": t.patches, "seconds": t.seconds, "seconds_per_patch": t.seconds_per_patch}
            for t in rows}
