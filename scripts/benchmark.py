"""Benchmark training and inference speed: the baseline configuration against ours, on one device, in one run.

Usage::

    python scripts/benchmark.py [--device cuda|cpu] [--out bench.json] [--work DIR] [--parts train3d,segment]
                                [--steps N] [--compare-steps N] [--ablation] [--set3d section.key=value] [--set2d ...]

Measures, for the baseline (plain per-sample datasets, batch 4, fp16, 4 loader workers, one
sliding window at a time) and for ours (the experiment configs with their ``performance``
settings): (a) 3D Residual U-Net training end to end, patches/s; (b) 2D UNETR training end to
end, slices/s; (c) sliding-window inference of a 160 x 256 x 256 preprocessed volume; (d)
segmenting a synthetic 512 x 512 x 200 CT at 0.78 x 0.78 x 2.5 mm from NIfTI file to NIfTI file;
(e) peak GPU memory of each; (f) both settings trained the same number of steps, validation Dice.
Prints a table with the ratios ours/baseline and, with ``--out``, writes them as JSON.
Every timed training step, baseline and ours, is the training engine's own step
(``utils.training.step.train_step``) run through ``accelerate`` with the setting's precision.
``--ablation`` also trains ours with each speed option off in turn: what each option bought.

On CUDA the full recipes (``configs/resunet3d.yaml``, ``configs/unetr2d.yaml``) and KiTS19 sizes
are used; on the CPU the quick configs and small shapes, in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from utils.benchmarks.suite import PARTS, cpu_plan, format_benchmark, gpu_plan, run_benchmark
from utils.data.nifti_io import write_bytes_atomic
from utils.inference.segment import select_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the synthetic data and caches, reused by later runs (default: temporary)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps of ours (default by device)")
    parser.add_argument("--compare-steps", type=int, default=None,
                        help="training steps of the comparison (default by device)")
    parser.add_argument("--ablation", action="store_true",
                        help="also train ours with each speed option off, one at a time (what each option bought)")
    parser.add_argument("--set3d", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the 3D experiment config (repeatable)")
    parser.add_argument("--set2d", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the 2D experiment config (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        device = select_device(args.device)
    except ValueError as error:
        print(f"benchmark.py: error: {error}", file=sys.stderr)
        return 2
    plan = gpu_plan() if device.type == "cuda" else cpu_plan()
    plan = replace(plan, steps=args.steps or plan.steps, compare_steps=args.compare_steps or plan.compare_steps,
                   ablation=args.ablation)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    try:
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
            result = run_benchmark(plan, args.work, device, parts=parts, overrides_3d=args.set3d,
                                   overrides_2d=args.set2d)
        else:
            with tempfile.TemporaryDirectory(prefix="benchmark_") as scratch:
                result = run_benchmark(plan, scratch, device, parts=parts, overrides_3d=args.set3d,
                                       overrides_2d=args.set2d)
    except ValueError as error:
        print(f"benchmark.py: error: {error}", file=sys.stderr)
        return 2
    print(format_benchmark(result))
    if args.out:
        write_bytes_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
