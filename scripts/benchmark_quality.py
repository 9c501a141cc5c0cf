"""Held-out quality benchmark: train both models on one train set, score them on CTs they never saw.

Usage::

    python scripts/benchmark_quality.py [--masks ../shared/kits19] [--train-cases 60] [--test-cases 20]
                                        [--out reports/quality] [--work data/quality] [--models 3d,2d]
                                        [--config3d configs/resunet3d_quick.yaml]
                                        [--config2d configs/unetr2d_quick.yaml]
                                        [--epochs3d N] [--epochs2d N] [--set3d section.key=value] [--set2d ...]
                                        [--locator3d CONFIG] [--locator-epochs N] [--set-locator ...]
                                        [--extra-train-masks DIR] [--postprocess [--choose-postprocessing]]
                                        [--require-masks] [--matrix 160] [--seed 0] [--workers 1] [--bootstrap 10000]

Data: CTs synthesised around real KiTS19 masks (``--masks``, default ``../shared/kits19`` beside the
repository), split by case id: test = ``case_00150`` … ``case_00169`` (``--test-cases M``: the first
M of them), train = ``case_00000`` … ``case_{N-1}`` (``--train-cases N``, at most 150). Without the
mask folder the benchmark runs on procedural synthetic cases (``--matrix``; test cases with master
seed ``--seed`` + 1) and warns that its numbers are not comparable with the README's table;
``--require-masks`` refuses that fallback. Data, cache and runs go to ``--work`` and are reused.
``--extra-train-masks DIR`` adds the cases of a second mask folder to the train set only, e.g. KiTS23's
(``../shared/kits23``: its cysts rendered in the CT and labelled kidney, as KiTS19 labels them); its
ids that ``--masks`` also holds are the same patients and are left out.

Each model (``--models``: ``3d`` = resunet3d, ``2d`` = unetr2d) trains from its quick config
(``--epochs3d`` / ``--epochs2d``: default the config's epochs; ``--set3d`` / ``--set2d``: any other
setting), its final weights (``last.pt``) segment every test case from the raw CT and are scored in
the CT's original grid (KiTS19 Dice, surface Dice, HD95). With ``--locator3d CONFIG`` the 3D model
is the second stage of a two-stage model (e.g. ``--config3d configs/resunet3d_kidney_quick.yaml
--locator3d configs/resunet3d_quick.yaml``): the locator is trained first on the same train set
(``--locator-epochs``, ``--set-locator``), the 3D model then segments around the kidneys it finds,
and the budget adds both stages. ``--postprocess`` scores post-processed predictions; with
``--choose-postprocessing`` each model first segments its validation cases (held-out train cases)
and chooses its smallest tumour component there (``scripts/choose_postprocessing.py``), which the
test cases are then segmented with. Writes into ``--out``: ``quality.json``
(settings, split, machine, per model the training budget, summary metrics, per-case tumour Dice and
its distribution, the learning curve), ``quality.md`` (the table and the command line),
``learning_curves.png``, ``dice_per_case.png``, one evaluation report folder per model and, with
both models, ``comparison/``. Prints the table.

Exit status: 0 when every test case was scored, 1 when a test case was not scored or training or
evaluation stopped on an error (the message says why), 2 on usage errors (bad options, no masks with
``--require-masks``, a case id without a mask, an output folder inside the mask folder).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from utils.benchmarks.quality import (
    DEFAULT_MASKS_DIR,
    MODELS,
    QualityPlan,
    format_quality_table,
    prepare_quality_benchmark,
    run_quality_benchmark,
)
from utils.inference.segment import add_restore_argument
from utils.networks.checkpoints import CheckpointError
from utils.training.engine import NonFiniteLossError, TrainingInterrupted

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROGRAM = "benchmark_quality.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    defaults = QualityPlan()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=Path, default=DEFAULT_MASKS_DIR,
                        help="KiTS19-layout folder of real segmentations (default ../shared/kits19)")
    parser.add_argument("--require-masks", action="store_true", help="refuse to fall back to procedural cases")
    parser.add_argument("--train-cases", type=int, default=defaults.train_cases,
                        help=f"train on case_00000 … case_{{N-1}} (default {defaults.train_cases}, at most 150)")
    parser.add_argument("--test-cases", type=int, default=defaults.test_cases,
                        help=f"test on the first M of case_00150 … case_00169 (default {defaults.test_cases})")
    parser.add_argument("--out", type=Path, default=defaults.out_dir, help=f"reports (default {defaults.out_dir})")
    parser.add_argument("--work", type=Path, default=defaults.work_dir,
                        help=f"synthetic data, cache and training runs, reused (default {defaults.work_dir})")
    parser.add_argument("--models", default=",".join(defaults.models),
                        help=f"comma-separated subset of {','.join(MODELS)} (3d = resunet3d, 2d = unetr2d)")
    parser.add_argument("--config3d", type=Path, default=defaults.config_3d, help="3D experiment config")
    parser.add_argument("--config2d", type=Path, default=defaults.config_2d, help="2D experiment config")
    parser.add_argument("--epochs3d", type=int, default=None, help="3D training epochs (default: the config's)")
    parser.add_argument("--epochs2d", type=int, default=None, help="2D training epochs (default: the config's)")
    parser.add_argument("--set3d", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the 3D experiment config (repeatable)")
    parser.add_argument("--set2d", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the 2D experiment config (repeatable)")
    parser.add_argument("--locator3d", type=Path, default=None, metavar="CONFIG",
                        help="make the 3D model a second stage (configs/resunet3d_kidney_quick.yaml): train this "
                             "experiment config first as its locator, on the same train set")
    parser.add_argument("--locator-epochs", type=int, default=None, help="the locator's epochs (default: its config's)")
    parser.add_argument("--set-locator", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the locator's experiment config (repeatable)")
    parser.add_argument("--extra-train-masks", type=Path, default=None, metavar="DIR",
                        help="a second folder of real masks (e.g. ../shared/kits23) whose cases join the train set "
                             "only, cysts labelled kidney; ids --masks also holds are left out")
    parser.add_argument("--matrix", type=int, default=defaults.matrix,
                        help=f"in-plane size of procedural fallback cases (default {defaults.matrix})")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="master seed of the synthetic CTs and of the comparison's bootstrap (default 0)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="processes generating cases")
    parser.add_argument("--postprocess", action="store_true",
                        help="score post-processed predictions (largest kidneys, tumour touching kidney only)")
    parser.add_argument("--choose-postprocessing", action="store_true",
                        help="with --postprocess: choose each model's smallest tumour component on its validation "
                             "cases before the test cases (scripts/choose_postprocessing.py)")
    add_restore_argument(parser)
    parser.add_argument("--bootstrap", type=int, default=defaults.bootstrap_resamples,
                        help=f"bootstrap resamples of the comparison (default {defaults.bootstrap_resamples})")
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace, command: str) -> QualityPlan:
    """The plan of the parsed command line (``ValueError`` on a bad value, naming it)."""
    return QualityPlan(out_dir=args.out, work_dir=args.work, masks_dir=args.masks, train_cases=args.train_cases,
                       test_cases=args.test_cases,
                       models=tuple(key.strip() for key in args.models.split(",") if key.strip()),
                       config_3d=args.config3d, config_2d=args.config2d, epochs_3d=args.epochs3d,
                       epochs_2d=args.epochs2d, overrides_3d=tuple(args.set3d), overrides_2d=tuple(args.set2d),
                       locator_3d=args.locator3d, locator_epochs=args.locator_epochs,
                       locator_overrides=tuple(args.set_locator), extra_masks_dir=args.extra_train_masks,
                       require_masks=args.require_masks, matrix=args.matrix, seed=args.seed, workers=args.workers,
                       bootstrap_resamples=args.bootstrap, postprocess=args.postprocess,
                       choose_postprocessing=args.choose_postprocessing, restore=args.restore,
                       command=command)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        prepared = prepare_quality_benchmark(build_plan(args, shlex.join(["python", f"scripts/{PROGRAM}",
                                                                          *arguments])))
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_quality_benchmark(prepared, show_progress=True)
    except (TrainingInterrupted, NonFiniteLossError, CheckpointError, OSError, ValueError) as error:
        logging.getLogger(PROGRAM).error("the benchmark stopped: %s", error)
        return EXIT_FAILED
    print(format_quality_table(result.models))
    print(f"report: {result.markdown_path} and {result.json_path}")
    failed = {m.model: [f["case_id"] for f in m.failures] for m in result.models if m.failures}
    if failed:
        logging.getLogger(PROGRAM).error("test cases without a score (counted as Dice 0): %s", failed)
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
