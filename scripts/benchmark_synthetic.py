"""Time the synthetic generator on one core at KiTS19's median case size (512 x 512 x 107).

    python scripts/benchmark_synthetic.py [--cases 3] [--from-masks DIR] [--out bench.json]

Prints seconds per case for generating and for writing, and, as a baseline measured in the same
run, the time to write the same two volumes as .nii.gz; the target is under 20 s per case.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"  # one core, as the target is stated

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from utils.data.nifti_io import load_nifti, read_voxels, save_nifti, write_bytes_atomic  # noqa: E402
from utils.synthetic.dataset import SyntheticOptions, find_masks, generate_case, synthesise_image_for_mask  # noqa: E402

MEDIAN_CASE = SyntheticOptions(matrix=512, spacing=(3.0, 0.78125, 0.78125), coverage_mm=(321.0, 321.0))
TARGET_S = 20.0


def _time(function: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds that ``function(*args)`` took, and what it returned."""
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def _save_pair(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, folder: Path) -> None:
    save_nifti(image, affine, folder / "imaging.nii.gz")
    save_nifti(labels, affine, folder / "segmentation.nii.gz")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3, help="procedural cases to time (default 3)")
    parser.add_argument("--from-masks", default=None, help="also time CT synthesis around these real masks")
    parser.add_argument("--mask-cases", type=int, default=2, help="how many masks to time (default 2)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.cases):
            generate_s, (image, labels, affine) = _time(generate_case, index, 0, MEDIAN_CASE)
            write_s, _ = _time(_save_pair, image, labels, affine, Path(scratch))
            noise = np.random.default_rng(index).integers(-1024, 1500, image.shape, dtype=np.int16)
            baseline_s, _ = _time(save_nifti, noise, affine, Path(scratch) / "baseline.nii.gz")
            rows.append({"case": f"procedural {index}", "shape": list(image.shape), "generate_s": generate_s,
                         "write_s": write_s, "baseline_write_s": baseline_s})
        if args.from_masks:
            for mask in find_masks(args.from_masks)[: args.mask_cases]:
                source = load_nifti(mask)
                labels = read_voxels(source, np.uint8)
                generate_s, image = _time(synthesise_image_for_mask, labels, source.affine, np.random.default_rng(0))
                write_s, _ = _time(save_nifti, image, source.affine, Path(scratch) / "imaging.nii.gz")
                rows.append({"case": f"from mask {mask.parent.name}", "shape": list(labels.shape),
                             "generate_s": generate_s, "write_s": write_s, "baseline_write_s": None})
    print(f"{'case':<26} {'shape':<18} {'generate s':>10} {'write s':>8} "
          f"{'total s':>8} {'/target':>8} {'/baseline':>9}")
    for row in rows:
        total = row["generate_s"] + row["write_s"]
        row["total_s"], row["total_over_target"] = total, total / TARGET_S
        ratio = f"{total / row['baseline_write_s']:.1f}x" if row["baseline_write_s"] else "-"
        print(f"{row['case']:<26} {str(tuple(row['shape'])):<18} {row['generate_s']:>10.2f} {row['write_s']:>8.2f} "
              f"{total:>8.2f} {total / TARGET_S:>8.2f} {ratio:>9}")
    print(f"target: < {TARGET_S:.0f} s per case on one core; baseline: gzip-writing one int16 volume of the same size")
    if args.out:
        write_bytes_atomic(Path(args.out), (json.dumps(rows, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
