"""The command line of the evaluation scripts (``scripts/eval_unet.py``, ``scripts/eval_unetr.py``).

Both scripts are :func:`run_evaluation_script` with their model key: it writes their usage text
(:data:`EVALUATION_USAGE`) and calls :func:`run_evaluation_command`, which checks the run holds
that model, calls :func:`utils.evaluation.run.evaluate_run` and prints the summary. A
cross-validated experiment folder (holding ``cross_validation.json``) is evaluated out of fold
instead (:func:`utils.evaluation.cross_validation.evaluate_cross_validation`); one of its
``fold_<k>`` folders is a run like any other.

The scores are those of the model's dataset (its experiment config's ``dataset``): KiTS19's kidney
and tumour, printed by key (``kidney_dice``); KiTS23's hierarchical evaluation regions, printed by
region in words (``kidney and masses Dice``) after one line stating how the regions are built
and their surface-Dice tolerances.

Exit status: 0 when every case was scored, 1 when a case was refused or the evaluation
failed (the message says why), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.config.experiment import load_experiment_config
from utils.data.dataset_definitions import KITS19
from utils.data.output_guard import add_guard_argument
from utils.evaluation.cross_validation import (
    CrossValidationEvaluation,
    evaluate_cross_validation,
    is_cross_validation_folder,
)
from utils.evaluation.predictions import describe_metric, describe_regions
from utils.evaluation.run import CASE_SELECTIONS, EVALUATION_SCRIPTS, RunEvaluation, evaluate_run
from utils.inference.segment import add_restore_argument
from utils.metrics.scoring import dice_names, metric_names
from utils.metrics.surface import DEFAULT_TOLERANCE_MM
from utils.networks.checkpoints import CheckpointError
from utils.training.cross_validation import load_cross_validation

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: The usage text shared by the evaluation scripts, after each script's own summary.
EVALUATION_USAGE = """Usage::

    python {script} --run checkpoints/<run> [--data DIR] [--cases validation|all] [--device cuda] [--tta]
    python {script} --run checkpoints/<experiment> [--data DIR]     # a cross-validated experiment

Segments the run's validation cases (or every labelled case of ``--data``) from their raw CTs
with ``best.pt``, writes ``reports/<run>/predictions/``, ``metrics.json``, ``metrics.csv``,
``inference.json`` and ``case_scores.png``, and prints the mean and median of every metric
(those of the model's dataset: KiTS19 kidney and tumour, KiTS23 its evaluation regions).
For a cross-validated experiment folder (``cross_validation.json``, every fold finished) every
case is segmented by the fold that held it out (out-of-fold) into one report,
``reports/<experiment>/``, which also gives each case's fold and the means per fold.
The report folder may not lie inside the data folder (unless ``--allow-inside-input``), and
files there are only replaced when an earlier evaluation wrote them; both are checked before
the model is loaded.

Exit status: 0 when every case was scored, 1 when a case was refused, 2 on usage errors.
"""


def parse_evaluation_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """Parse the evaluation command line (``--run``, ``--data``, ``--cases``, ``--reports``, ``--out``,
    ``--device``, ``--tta``, ``--postprocess``)."""
    lines = description.strip().splitlines()
    parser = argparse.ArgumentParser(description=lines[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(lines[2:]))
    parser.add_argument("--run", type=Path, required=True, metavar="RUN_DIR",
                        help="training run folder (or a .pt), or a cross-validated experiment folder")
    parser.add_argument("--data", default=None, help="KiTS-layout folder with CTs and segmentations of the "
                                                     "model's dataset (default: data_dir of the run's config, "
                                                     "then $KITS19_DATA)")
    parser.add_argument("--cases", choices=CASE_SELECTIONS, default="validation",
                        help="the run's validation split (default; for an experiment: every case, out of fold) "
                             "or every labelled case of --data")
    parser.add_argument("--reports", type=Path, default=Path("reports"), help="root of report folders")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default REPORTS/<run-name>)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--tta", action="store_true", help="average over mirrored inputs")
    parser.add_argument("--postprocess", action="store_true",
                        help="largest kidneys, tumour (KiTS23: and cyst) touching kidney only, and the "
                             "smallest tumour component the run chose on its validation cases, if any "
                             "(scripts/choose_postprocessing.py)")
    add_restore_argument(parser)
    parser.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM,
                        help=f"surface-Dice tolerance in mm (default {DEFAULT_TOLERANCE_MM})")
    add_guard_argument(parser)
    return parser.parse_args(argv)


def check_run_model(run: Path, model_name: str) -> None:
    """Refuse a run folder whose ``config.yaml`` (an experiment folder whose manifest) names another model,
    naming the right script."""
    config_path = run / "config.yaml"
    name = None
    if is_cross_validation_folder(run):
        name = load_cross_validation(run).model_name
    elif run.is_dir() and config_path.is_file():
        name = load_experiment_config(config_path).model.name
    if name is not None:
        if name != model_name:
            raise ValueError(f"{run} holds a {name!r} model, but this script evaluates {model_name!r}; use "
                             f"{EVALUATION_SCRIPTS.get(name, 'the script of that model')}")


def format_evaluation(result: RunEvaluation | CrossValidationEvaluation) -> str:
    """The report folder, per-metric mean, median and missing counts, any refused case and, for an
    out-of-fold evaluation, the number of cases and mean Dice of each fold.

    The metrics are those of the result's dataset: KiTS19's by key (as always), another dataset's
    by region in words (:func:`utils.evaluation.predictions.describe_metric`), after a line on how
    its regions are built and their tolerances (:func:`utils.evaluation.predictions.describe_regions`).
    """
    summary = result.evaluation.summary
    dataset = result.dataset
    kind = "original grid"
    if isinstance(result, CrossValidationEvaluation):
        kind = f"out-of-fold, {len(result.fold_summaries)} folds, original grid"
    lines = [f"report: {result.report_folder} ({len(result.evaluation.cases)} case(s), {kind})"]
    names = metric_names(dataset)
    width = 20 if dataset is KITS19 else max(len(describe_metric(name, dataset)) for name in names)
    if dataset is not KITS19:
        lines.append(f"  {describe_regions(dataset)}")
    for name in names:
        stats = summary[name]
        mean = "-" if stats["mean"] is None else f"{stats['mean']:.3f}"
        median = "-" if stats["median"] is None else f"{stats['median']:.3f}"
        lines.append(f"  {describe_metric(name, dataset):<{width}} mean {mean:>8}  median {median:>8}  "
                     f"missing {stats['missing']}")
    if isinstance(result, CrossValidationEvaluation):
        for fold in result.fold_summaries:
            means = "  ".join(f"{describe_metric(name, dataset)} "
                              f"{'-' if fold['mean'][name] is None else format(fold['mean'][name], '.3f')}"
                              for name in dice_names(dataset))
            lines.append(f"  fold {fold['fold']}: {fold['n_cases']} case(s)  {means}")
    lines += [f"refused {r['case_id']}: {r['reason']}" for r in result.evaluation.refused]
    return "\n".join(lines)


def run_evaluation_command(argv: list[str] | None, *, model_name: str, description: str) -> int:
    """Parse the command line, evaluate, print the summary; returns the exit status."""
    args = parse_evaluation_args(argv, description)
    program = Path(EVALUATION_SCRIPTS[model_name]).name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_run_model(args.run, model_name)
        if is_cross_validation_folder(args.run) and args.cases == "validation":
            result = evaluate_cross_validation(args.run, data_dir=args.data, reports_dir=args.reports,
                                               out_dir=args.out, device=args.device, tta=args.tta,
                                               postprocess=args.postprocess, restore=args.restore,
                                               tolerance_mm=args.tolerance_mm,
                                               allow_inside_input=args.allow_inside_input)
        else:
            result = evaluate_run(args.run, data_dir=args.data, cases=args.cases, reports_dir=args.reports,
                                  out_dir=args.out, device=args.device, tta=args.tta, postprocess=args.postprocess,
                                  restore=args.restore, tolerance_mm=args.tolerance_mm,
                                  allow_inside_input=args.allow_inside_input)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        logging.getLogger(program).error("%s", error)
        return EXIT_FAILED
    print(format_evaluation(result))
    return EXIT_FAILED if result.evaluation.refused else EXIT_OK


def run_evaluation_script(model_name: str, summary: str, argv: list[str] | None = None) -> int:
    """Run the evaluation script of ``model_name`` (``resunet3d`` or ``unetr2d``); returns the exit status.

    ``summary`` is the script's docstring (a one-line summary, then what is particular to the
    model); ``--help`` prints it, then :data:`EVALUATION_USAGE`. ``argv`` defaults to ``sys.argv[1:]``.
    """
    if model_name not in EVALUATION_SCRIPTS:
        raise ValueError(f"model_name must be one of {sorted(EVALUATION_SCRIPTS)}, got {model_name!r}")
    usage = EVALUATION_USAGE.format(script=EVALUATION_SCRIPTS[model_name])
    return run_evaluation_command(argv, model_name=model_name, description=f"{summary.strip()}\n\n{usage}")
