"""Compare two evaluated runs or cross-validated experiments (e.g. resunet3d and unetr2d) case by case.

Usage::

    python scripts/compare_models.py RUN_A RUN_B --out reports/comparison \
        [--reports-dir reports] [--bootstrap 10000] [--seed 0] [--allow-inside-input]

``RUN_A`` and ``RUN_B`` are report folders (holding ``metrics.json`` and ``inference.json``) or
training run folders ``checkpoints/<run>/``, whose report folder is ``<reports-dir>/<run>/``
(written by ``scripts/eval_unet.py`` for resunet3d runs, ``scripts/eval_unetr.py`` for unetr2d),
or cross-validated experiment folders (``cross_validation.json``), whose out-of-fold report is
``<reports-dir>/<experiment>/`` (``eval_*.py --run EXPERIMENT``): two experiments on the same cases
are then paired on every case, each case scored with the prediction of the fold that held it out,
and the report says the predictions are out-of-fold and gives k.
Writes ``comparison.md``, ``comparison.html`` (self-contained), ``comparison.json`` and the
figures ``boxplots.png`` and ``dice_scatter.png`` into ``--out``. Differences are B - A. Both runs
must have been scored on the same dataset: two KiTS23 runs are compared on KiTS23's hierarchical
evaluation regions (named in words in the tables, with the regions' rule and tolerances stated
once); a KiTS19 run and a KiTS23 run are refused (exit status 1), the message naming both.
``--out`` may not be, or lie inside, either run's folder or report folder (unless
``--allow-inside-input``), and an existing report there is only replaced when an earlier
comparison wrote it; both are checked before anything is read.

Exit status: 0 when the report was written, 1 when it could not be (missing or invalid report,
no shared case), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.data.output_guard import OutputGuardError, add_guard_argument, check_output_location
from utils.evaluation.comparison import resolve_report_folder
from utils.evaluation.report import check_comparison_folder, write_comparison_report

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Compare two evaluated runs: paired statistics, figures, report.")
    parser.add_argument("run_a", type=Path, help="run A: report folder, training run folder or cross-validated "
                                                 "experiment folder")
    parser.add_argument("run_b", type=Path, help="run B: report folder, training run folder or cross-validated "
                                                 "experiment folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the comparison report")
    parser.add_argument("--reports-dir", type=Path, default=Path("reports"),
                        help="folder of the runs' and experiments' report folders (default reports)")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    add_guard_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.bootstrap < 1:
        print(f"compare_models.py: error: --bootstrap must be >= 1, got {args.bootstrap}", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_output_location(args.out, [run for run in (args.run_a, args.run_b) if run.exists()], what="--out",
                              allow_inside_input=args.allow_inside_input)
    except OutputGuardError as error:
        print(f"compare_models.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        folders = (resolve_report_folder(args.run_a, args.reports_dir),
                   resolve_report_folder(args.run_b, args.reports_dir))
    except FileNotFoundError as error:
        print(f"compare_models.py: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    try:
        check_comparison_folder(args.out, folders, allow_inside_input=args.allow_inside_input)
    except OutputGuardError as error:
        print(f"compare_models.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        paths = write_comparison_report(*folders, args.out, n_resamples=args.bootstrap, seed=args.seed,
                                        allow_inside_input=args.allow_inside_input)
    except (ValueError, FileNotFoundError) as error:
        print(f"compare_models.py: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    for path in paths.values():
        print(f"written: {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
