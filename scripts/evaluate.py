"""Score a folder of predicted label maps against KiTS19 (or KiTS23) ground truth, on each CT's original grid.

Usage::

    python scripts/evaluate.py --gt DATA_DIR --pred PRED_DIR --out OUT_DIR [--tolerance-mm 2.0]
                               [--dataset kits19|kits23] [--only-predicted] [--allow-inside-input]

``DATA_DIR`` holds ``case_XXXXX/segmentation.nii.gz`` (and ``imaging.nii.gz``, whose header
gives each case's grid); ``PRED_DIR`` holds ``case_XXXXX.nii.gz`` or ``prediction_XXXXX.nii.gz``
label maps (0 background, 1 kidney, 2 tumour). Per case: kidney (label > 0) and tumour
(label == 2) Dice, surface Dice at ``--tolerance-mm`` and HD95 in mm. As in the KiTS19
challenge, a ground-truth case without a prediction is a failure (Dice and surface Dice 0,
HD95 missing) and counts in the summary; ``--only-predicted`` scores only the cases that have a
prediction. The number of cases without a prediction is printed either way. With ``--dataset
kits23`` the labels are 0-3 (3 cyst) and the scored structures are KiTS23's hierarchical
evaluation regions (kidney and masses {1, 2, 3}, masses {2, 3}, tumour {2}), each with the
challenge's surface-Dice tolerance (``--tolerance-mm`` is then not used). Writes
``OUT_DIR/metrics.json`` and ``OUT_DIR/metrics.csv``, prints the summary; ``OUT_DIR`` may not
lie inside either input folder (unless ``--allow-inside-input``), and existing metrics files
there are only replaced when an earlier evaluation wrote them; both are checked before scoring.

Exit status: 0 when every prediction was scored, 1 when a prediction was refused (shape,
affine or labels wrong, unreadable) or none was scored, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.data.dataset_definitions import DATASETS
from utils.data.output_guard import add_guard_argument
from utils.evaluation.predictions import EvaluationResult, evaluate_predictions
from utils.metrics.surface import DEFAULT_TOLERANCE_MM

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Score KiTS predictions: Dice, surface Dice and HD95 in mm.")
    parser.add_argument("--gt", type=Path, required=True, help="KiTS data folder with case_XXXXX/segmentation.nii.gz")
    parser.add_argument("--pred", type=Path, required=True,
                        help="folder of case_XXXXX.nii.gz or prediction_XXXXX.nii.gz label maps")
    parser.add_argument("--out", type=Path, required=True, help="output folder for metrics.json and metrics.csv")
    parser.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM,
                        help=f"surface-Dice tolerance in mm (default {DEFAULT_TOLERANCE_MM}; KiTS23 regions use "
                             "the challenge's own)")
    parser.add_argument("--dataset", default="kits19", choices=sorted(DATASETS),
                        help="kits19 (labels 0-2: kidney = label > 0, tumour = 2; default) or kits23 (labels 0-3, "
                             "hierarchical evaluation regions)")
    parser.add_argument("--only-predicted", action="store_true",
                        help="score only the cases that have a prediction (default: a case without a "
                             "prediction scores Dice 0, as in KiTS19)")
    add_guard_argument(parser)
    return parser.parse_args(argv)


def print_summary(result: EvaluationResult) -> None:
    """Print one line per metric (mean, std, median, n, missing) and where the files are."""
    print(f"{'metric':<22} {'mean':>8} {'std':>8} {'median':>8} {'n':>5} {'missing':>8}")
    for metric, row in result.summary.items():
        if not isinstance(row, dict):  # mean_dice, cases
            continue
        cells = " ".join("       -" if row[key] is None else f"{row[key]:8.4f}" for key in ("mean", "std", "median"))
        print(f"{metric:<22} {cells} {row['n']:>5} {row['missing']:>8}")
    outcome = "left out" if result.only_predicted else "scored as failures"
    print(f"{predicted_count(result)} predictions scored, {len(result.missing)} cases without a prediction "
          f"({outcome}), {len(result.refused)} refused, {len(result.warnings)} warnings; "
          f"written {result.json_path} and {result.csv_path}")


def predicted_count(result: EvaluationResult) -> int:
    """How many cases were scored from a prediction file (not as a missing-prediction failure)."""
    return len(result.cases) - (0 if result.only_predicted else len(result.missing))


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        result = evaluate_predictions(args.gt, args.pred, args.out, tolerance_mm=args.tolerance_mm,
                                      show_progress=True, only_predicted=args.only_predicted,
                                      allow_inside_input=args.allow_inside_input, dataset=args.dataset)
    except (ValueError, FileNotFoundError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print_summary(result)
    if result.refused or not predicted_count(result):
        return EXIT_REFUSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
