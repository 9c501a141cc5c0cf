"""The command line of ``scripts/cross_validate.py``: k-fold cross-validation training of one experiment.

:func:`run_cross_validation_command` parses the arguments, loads the config (``--set`` applied),
refuses an experiment folder or cache inside the data folder (before any folder is created) and
calls :func:`utils.training.cross_validation.train_cross_validation`.

Exit status: 0 when every requested fold is finished, 1 when a fold failed (or another process
is training it), 2 on usage errors (a config that is not ``kfold``, a rerun that changes the
experiment, an output inside the data folder, a refused resume), 75 when SIGTERM or SIGUSR1
stopped it after the fold in training saved ``last.pt`` (rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from utils.config.experiment import load_experiment_config
from utils.data.output_guard import OutputGuardError, add_guard_argument, check_output_location
from utils.networks.checkpoints import CheckpointError
from utils.training.cross_validation import (
    MANIFEST,
    CrossValidationError,
    FoldBusy,
    check_request,
    train_cross_validation,
)
from utils.training.engine import NonFiniteLossError, TrainingInterrupted
from utils.training.resume import ResumeRefused
from utils.training.setup import was_logged
from utils.training.stop_signals import EXIT_INTERRUPTED

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROGRAM = "cross_validate.py"

USAGE = """Usage::

    python scripts/cross_validate.py --config configs/resunet3d.yaml --experiment cv5 --set split.scheme=kfold
    python scripts/cross_validate.py --config CONFIG --experiment cv5 --fold 2     # one fold (one job per fold)
    sbatch scripts/slurm/cross_validate.sbatch                                      # a SLURM array, one fold a task

The config's split must be ``split.scheme: kfold`` with ``split.folds: k``. Each fold is a normal
run folder, ``<training.output_dir>/<experiment>/fold_<k>/``, beside the manifest
``cross_validation.json`` (config, split, data, and each fold's status and best score).
Rerunning the command skips finished folds and continues an interrupted one from its
``last.pt``; a rerun with another config (other than where the data and cache are, or how fast),
split or data is refused, naming the keys. Neither the experiment folder nor the cache may lie
inside the data folder.

Exit status: 0 when every requested fold is finished, 1 when a fold failed (or another process
trains it), 2 on usage errors, 75 when SIGTERM or SIGUSR1 stopped it after saving ``last.pt``.
"""


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """Parse ``--config``, ``--experiment``, ``--fold``, ``--data``, ``--set``, ``--wandb`` and the output guard."""
    lines = description.strip().splitlines()
    parser = argparse.ArgumentParser(prog=PROGRAM, description=lines[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(lines[2:]))
    parser.add_argument("--config", type=Path, required=True, help="experiment YAML with split.scheme: kfold")
    parser.add_argument("--experiment", required=True, metavar="NAME",
                        help="the experiment's folder name under training.output_dir")
    parser.add_argument("--fold", default="all", metavar="all|K",
                        help="train every fold one after the other (default), or only fold K")
    parser.add_argument("--data", default=None, help="raw KiTS19-layout folder (default: data_dir of the config, "
                                                     "then $KITS19_DATA)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set split.folds=5 (repeatable)")
    parser.add_argument("--wandb", action="store_true", help="log every fold to Weights & Biases")
    add_guard_argument(parser)
    return parser.parse_args(argv)


def _check_outputs(args: argparse.Namespace, config, folder: Path) -> None:
    data = args.data or config.data_dir or os.environ.get("KITS19_DATA") or None
    if data is None or not Path(data).expanduser().is_dir():
        return  # no data folder to protect (training itself says what is missing)
    allow = args.allow_inside_input
    check_output_location(folder, [data], what="the experiment folder", allow_inside_input=allow)
    check_output_location(config.preprocessing.cache_dir, [data], what="preprocessing.cache_dir",
                          allow_inside_input=allow)


def run_cross_validation_command(argv: list[str] | None = None, description: str = __doc__) -> int:
    """Parse the command line, train the folds, print a line per fold; returns the exit status."""
    args = parse_args(argv, f"{description.strip()}\n\n{USAGE}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(PROGRAM)
    try:
        config = load_experiment_config(args.config, args.set)
        folder, _ = check_request(config, args.experiment, args.fold)
        _check_outputs(args, config, folder)
    except (ValueError, FileNotFoundError) as error:  # OutputGuardError, CrossValidationError are ValueErrors
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = train_cross_validation(config, args.experiment, fold=args.fold, data_dir=args.data,
                                        wandb=True if args.wandb else None)
    except TrainingInterrupted as error:
        log.warning("%s", error)
        return EXIT_INTERRUPTED
    except (CrossValidationError, ResumeRefused, OutputGuardError, FileExistsError) as error:
        if not was_logged(error):
            log.error("%s", error)
        return EXIT_USAGE
    except (FoldBusy, NonFiniteLossError, CheckpointError, OSError, ValueError) as error:
        if not was_logged(error):
            log.error("%s", error)
        return EXIT_FAILED
    for outcome in result.folds:
        print(f"fold {outcome.fold}: {outcome.status} ({outcome.action}); best epoch {outcome.best_epoch}, "
              f"mean of kidney and tumour Dice on the cache grid: {outcome.best_score}; {outcome.run_folder}")
    print(f"experiment folder: {result.folder} (manifest {result.folder / MANIFEST})")
    return EXIT_OK if result.all_finished else EXIT_FAILED
