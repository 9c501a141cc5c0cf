"""Benchmark a fold ensemble against one fold: seconds per CT, file to file, and their ratio.

Usage::

    python scripts/benchmark_ensemble.py [--config configs/resunet3d_quick.yaml] [--folds 5] [--repeats 2]
                                         [--matrix 128] [--device cpu|cuda] [--tta] [--out timing.json]
                                         [--set section.key=value ...]

Writes ``--folds`` checkpoints of the config with random weights as the ``fold_<k>`` run folders
of a temporary experiment folder, generates one synthetic CT (``--matrix`` voxels in plane), and
segments it through ``utils.inference.segment.segment_file`` with the first fold alone and with
the ensemble of every fold (one preprocessing pass, the softmax of every model averaged). Prints
the seconds per CT of each and the ratio ensemble/single; ``--out`` also writes them as JSON.
The defaults run in well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from utils.benchmarks.ensemble import benchmark_ensemble, format_ensemble_timing
from utils.config.experiment import load_experiment_config
from utils.data.nifti_io import write_bytes_atomic
from utils.inference.segment import select_device

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "resunet3d_quick.yaml",
                        help="experiment config of every fold (default configs/resunet3d_quick.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the config (repeatable)")
    parser.add_argument("--folds", type=int, default=5, help="models in the ensemble (default 5)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each after a warm-up (default 2)")
    parser.add_argument("--matrix", type=int, default=128,
                        help="in-plane voxels of the synthetic CT (default 128)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation for both")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit status (2 on usage errors)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        device = select_device(args.device)
        config = load_experiment_config(args.config, args.set)
        with tempfile.TemporaryDirectory(prefix="benchmark_ensemble_") as scratch:
            result = benchmark_ensemble(config, scratch, folds=args.folds, repeats=args.repeats, matrix=args.matrix,
                                        device=device, tta=args.tta)
    except (ValueError, FileNotFoundError) as error:
        print(f"benchmark_ensemble.py: error: {error}", file=sys.stderr)
        return 2
    print(format_ensemble_timing(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.out, (json.dumps(result.as_dict(), indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
