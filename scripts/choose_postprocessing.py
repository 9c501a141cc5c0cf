"""Choose a run's smallest tumour component on its validation cases and store it beside the checkpoint.

Usage::

    python scripts/eval_unet.py --run checkpoints/<run>/last.pt --cases validation --postprocess --out reports/<run>_val
    python scripts/choose_postprocessing.py reports/<run>_val [--candidates 0 0.5 1 2 3 5] [--dry-run]

    # a cross-validated experiment: chosen on its out-of-fold cases, for its fold ensemble
    python scripts/eval_unet.py --run checkpoints/<experiment> --postprocess --out reports/<experiment>_oof
    python scripts/choose_postprocessing.py reports/<experiment>_oof

The report's post-processed validation predictions are re-scored with each threshold (tumour
components under it become kidney; the kidney region label > 0 does not move) and the threshold
with the highest mean Dice over the validation cases is kept (a tie keeps the smaller; 0 means no
relabelling). It is written to ``postprocessing.json`` beside the checkpoint the report was made
with (its name and SHA-256 recorded), and from then on ``--postprocess`` with that checkpoint
applies it (``segment.py``, ``eval_*.py``, ``benchmark_quality.py``); ``inference.json`` of each
evaluation records the ``min_tumour_ml`` used. The table goes to stdout and, with the figure
``postprocessing_choice.png``, into the report folder as ``postprocessing_choice.md``.
An experiment's out-of-fold report writes ``postprocessing.json`` into the experiment folder (the
SHA-256 of every fold checkpoint recorded), and the fold ensemble loaded from that folder applies
it. See :mod:`utils.evaluation.postprocessing_choice`.

Refused before anything is written, with a message naming the file: a report of other than the
run's validation cases or an experiment's out-of-fold cases (the test cases must never choose),
one not post-processed or already made with a rule, the fold ensemble's own report, a checkpoint
changed since the report, or an output inside the data folder.

Exit status: 0 when the choice was made (and written unless ``--dry-run``), 1 when it could not
be, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.data.output_guard import OutputGuardError, add_guard_argument
from utils.evaluation.postprocessing_choice import (
    DEFAULT_CANDIDATES_ML,
    check_choice_outputs,
    check_validation_report,
    choose_min_tumour_ml,
    format_choice_table,
    write_choice,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Choose the smallest tumour component kept, on a run's validation "
                                                 "cases (an experiment's out-of-fold cases), and store it beside its "
                                                 "checkpoint (in the experiment folder).")
    parser.add_argument("report", type=Path, help="report folder of the run's validation cases, post-processed "
                                                  "(eval_unet.py / eval_unetr.py --cases validation --postprocess), "
                                                  "or an experiment's out-of-fold report (--run EXPERIMENT "
                                                  "--postprocess)")
    parser.add_argument("--candidates", type=float, nargs="+", default=list(DEFAULT_CANDIDATES_ML),
                        help="thresholds to try, in ml (0 is always tried; default "
                             f"{' '.join(f'{c:g}' for c in DEFAULT_CANDIDATES_ML)})")
    parser.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    add_guard_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Choose (and write) the threshold; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if any(not c >= 0 for c in args.candidates):
        print(f"choose_postprocessing.py: error: --candidates must be volumes >= 0 ml, got {args.candidates}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        inference, _, checkpoint = check_validation_report(args.report)
        if not args.dry_run:
            check_choice_outputs(checkpoint, inference.get("data_dir"), allow_inside_input=args.allow_inside_input)
        choice = choose_min_tumour_ml(args.report, candidates=args.candidates)
        print(format_choice_table(choice))
        print(f"\nchosen: {choice.min_tumour_ml:g} ml on {len(choice.case_ids)} {choice.cases_name} case(s) of "
              f"{args.report}")
        if args.dry_run:
            print("dry run: nothing written")
            return EXIT_OK
        path = write_choice(choice, allow_inside_input=args.allow_inside_input)
    except OutputGuardError as error:
        print(f"choose_postprocessing.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as error:
        print(f"choose_postprocessing.py: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    model = f"the fold ensemble of {checkpoint}" if checkpoint.is_dir() else str(checkpoint)
    print(f"wrote {path}: --postprocess with {model} now applies it")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
