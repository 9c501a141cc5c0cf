"""Check a KiTS19 (or, with ``--dataset kits23``, KiTS23) data folder before training: which cases are
usable, and what is wrong with the rest.

Usage::

    python scripts/check_data.py --data DIR [--dataset kits19|kits23] [--full] [--json OUT.json] [--workers K]
                                [--allow-inside-input]

``DIR`` holds the ``case_XXXXX`` folders (default: the ``KITS19_DATA`` environment variable).
The default check reads headers only (seconds for the whole dataset); ``--full`` reads every
voxel (minutes). Prints dataset warnings, one table row per case and a summary line.
``--json`` may not lie inside ``DIR`` (unless ``--allow-inside-input``) and only replaces an
earlier report of this command, never another file.

Exit status: 0 when no case is unusable, 1 when any case is unusable (or none was found),
2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from utils.data.case_discovery import resolve_data_dir
from utils.data.case_validation import CaseReport, DatasetReport, validate_dataset
from utils.data.dataset_definitions import DATASETS, DatasetLayoutError
from utils.data.nifti_io import write_bytes_atomic
from utils.data.output_guard import add_guard_argument, check_output_location, check_overwrite, is_own_json

EXIT_OK, EXIT_UNUSABLE, EXIT_USAGE = 0, 1, 2
#: Top-level keys of every JSON report (:meth:`DatasetReport.to_dict`): how an earlier report is recognised.
REPORT_KEYS = ("data_dir", "full", "warnings", "counts", "cases")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Check a KiTS19 data folder (case_XXXXX/imaging.nii.gz, segmentation.nii.gz)."
    )
    parser.add_argument("--data", default=None, help="folder holding the case_XXXXX folders (default: $KITS19_DATA)")
    parser.add_argument("--dataset", default="kits19", choices=sorted(DATASETS),
                        help="which challenge's labels and layout: kits19 (labels 0-2, kits.json; default) or "
                             "kits23 (labels 0-3 with the cyst, kits23.json)")
    parser.add_argument(
        "--full", action="store_true", help="read every voxel: also finds corrupt data, NaN and bad labels"
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT.json", help="also write the full report as JSON"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes checking cases in parallel (default 1)")
    add_guard_argument(parser)
    return parser.parse_args(argv)


def format_case_row(report: CaseReport) -> str:
    """One table row: case, status, shape, spacing in mm, reasons."""
    shape = "x".join(str(n) for n in report.shape) if report.shape is not None else "-"
    spacing = ",".join(f"{s:.3g}" for s in report.spacing) if report.spacing is not None else "-"
    reasons = "; ".join(f"{p.path.name if p.path else '-'}: {p.code}: {p.message}" for p in report.problems) or "-"
    return f"{report.case_id:<12} {report.status:<15} {shape:<14} {spacing:<18} {reasons}"


def print_report(report: DatasetReport) -> None:
    """Print dataset warnings, the per-case table and a summary line to stdout."""
    for warning in report.listing.warnings:
        print(f"warning: {warning}")
    print(f"{'case':<12} {'status':<15} {'shape (ZYX)':<14} {'spacing mm':<18} reasons")
    for case_report in report.reports:
        print(format_case_row(case_report))
    counts = report.counts
    depth = "full (voxels read)" if report.full else "fast (headers only; --full reads voxels)"
    print(
        f"{len(report.reports)} cases in {report.listing.data_dir}: {counts['ok']} ok, "
        f"{counts['inference_only']} inference-only (no segmentation), {counts['unusable']} unusable; "
        f"{len(report.listing.warnings)} dataset warnings; check: {depth}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the check; return the exit status."""
    args = parse_args(argv)
    # Dataset warnings are printed with the report below; do not log them a second time.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s: %(message)s")
    try:
        data_dir = resolve_data_dir(args.data)
        if args.json is not None:
            check_output_location(args.json, [data_dir], what="--json", allow_inside_input=args.allow_inside_input)
            if not args.json.parent.is_dir():
                raise FileNotFoundError(f"folder for --json {args.json.parent} does not exist")
            check_overwrite(args.json, is_own_json(REPORT_KEYS), what="--json")
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
    except (ValueError, FileNotFoundError) as error:
        print(f"check_data.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = validate_dataset(data_dir, full=args.full, show_progress=True, workers=args.workers,
                                  dataset=args.dataset)
    except DatasetLayoutError as error:
        print(f"check_data.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print_report(report)
    if args.json is not None:
        write_bytes_atomic(args.json, (json.dumps(report.to_dict(), indent=2) + "\n").encode("utf-8"))
        print(f"report written to {args.json}")
    if not report.reports or report.unusable:
        return EXIT_UNUSABLE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
