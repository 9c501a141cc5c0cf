"""Benchmark the data pipeline: augmented patches from the cache vs. the per-sample pattern, and memory.

Usage::

    python scripts/benchmark_data.py [--cases 3] [--matrix 512] [--patches 100] [--baseline-patches N]
                                     [--large-slices 1059] [--workers 2] [--work DIR] [--out bench.json]

In one run, on the same synthetic KiTS19-sized cases (generated into ``--work``, a temporary
folder by default):

1. seconds to produce ``--patches`` augmented 80x160x160 training patches from the
   preprocessing cache, and the same from the raw NIfTI files with the per-sample pattern
   (load, reorient, resample, normalise, crop, then the same centring and augmentation);
   target: the cache at least 20x faster per patch;
2. peak memory of preprocessing one 512x512x``--large-slices`` case in a fresh process, against
   only loading it (target: within 6 GB). ``--large-slices 0`` skips this part.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from utils.benchmarks.data_loading import (
    format_timings,
    measure_peak_memory,
    summarise,
    time_cache_patches,
    time_per_sample_patches,
)
from utils.config.data import AugmentationConfig, PatchDatasetConfig, PreprocessingConfig, SplitConfig
from utils.data.nifti_io import write_bytes_atomic
from utils.preprocessing.cache import open_cache
from utils.preprocessing.preprocess import preprocess_dataset
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

MEMORY_TARGET_GB = 6.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3, help="synthetic cases to sample patches from (default 3)")
    parser.add_argument("--matrix", type=int, default=512, help="in-plane size of those cases (default 512)")
    parser.add_argument("--patches", type=int, default=100, help="patches timed from the cache (default 100)")
    parser.add_argument("--baseline-patches", type=int, default=None,
                        help="patches timed the per-sample way (default: as --patches)")
    parser.add_argument("--large-slices", type=int, default=1059,
                        help="slices of the 512x512 case whose preprocessing memory is measured (0: skip)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating and preprocessing (default 2)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the data and caches (default: temporary)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> dict:
    """Generate, preprocess, time and measure; print the tables; return the figures."""
    config = PreprocessingConfig(cache_dir=str(work / "cache"))
    patch_config, augmentation = PatchDatasetConfig(), AugmentationConfig()
    generate_dataset(work / "data", args.cases, seed=0, options=SyntheticOptions(matrix=args.matrix),
                     workers=args.workers)
    result = preprocess_dataset(work / "data", config, SplitConfig(), workers=args.workers)
    cache = open_cache(result.folder)
    print(f"cases: {', '.join(f'{cid} {tuple(cache.case(cid).mapping.original_shape)}' for cid in cache.case_ids)}")
    ours = time_cache_patches(cache, patch_config, augmentation, args.patches)
    baseline = time_per_sample_patches(cache, work / "data", patch_config, augmentation,
                                       args.baseline_patches or args.patches)
    print("\n".join(format_timings(ours, baseline)))
    figures = {"patches": summarise([ours, baseline]),
               "speedup_per_patch": baseline.seconds_per_patch / ours.seconds_per_patch}
    if args.large_slices > 0:
        spacing = (0.5, 0.78125, 0.78125)
        options = SyntheticOptions(matrix=512, spacing=spacing, coverage_mm=(args.large_slices * spacing[0],) * 2)
        summary = generate_dataset(work / "large", 1, seed=0, options=options)[0]
        memory = measure_peak_memory(work / "large", work / "large_cache", config)
        ratio = memory["preprocess"]["peak_gb"] / memory["load_only"]["peak_gb"]
        print(f"largest case {summary.shape}: peak memory preprocessing {memory['preprocess']['peak_gb']:.2f} GB "
              f"({memory['preprocess']['seconds']:.0f} s) vs loading only {memory['load_only']['peak_gb']:.2f} GB "
              f"({ratio:.2f}x); target <= {MEMORY_TARGET_GB:.0f} GB")
        figures["memory"] = {"shape": list(summary.shape), **memory, "ratio_to_load_only": ratio}
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        figures = run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="benchmark_data_") as scratch:
            figures = run(args, Path(scratch))
    if args.out:
        write_bytes_atomic(args.out, (json.dumps(figures, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
