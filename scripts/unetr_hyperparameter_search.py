"""Search the 2D UNETR's hyperparameters with Optuna: each trial a short training run.

Usage::

    python scripts/unetr_hyperparameter_search.py --config configs/unetr2d_search.yaml --trials 30 \
        [--storage sqlite:///path/study.db] [--study-name NAME] [--data DIR] [--set key=value ...]

The search config names the base experiment, the overrides that make trials short and the
search space (see ``utils/training/search.py``); ``--set`` overrides its settings, e.g.
``--set sampler_seed=1`` or ``--set pruner.n_warmup_steps=20``. Everything goes to
``<output_dir>/<study_name>/``: ``study.db`` (unless ``--storage``), ``trials/trial_NNNN/`` run
folders, ``results.csv``, ``best_config.yaml`` (train it with ``scripts/train_unetr.py --config``),
``optimization_history.html/.png`` and ``param_importances.html/.png``.

Run the same command again to continue an interrupted search: ``--trials`` counts the trials
already finished, and a trial that was killed is retried with its parameters from its ``last.pt``.

Exit status: 0 when the study has the trials asked for and the reports are written, 1 when it
stopped on an error or was interrupted (rerun to continue), 2 on usage errors, 75 when SIGTERM
or SIGUSR1 stopped a trial's training after saving its ``last.pt`` (rerun to continue; the trial
is retried from there).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from utils.config.search import load_search_config
from utils.networks.checkpoints import CheckpointError
from utils.training.engine import TrainingInterrupted
from utils.training.search import run_search
from utils.training.stop_signals import EXIT_INTERRUPTED

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--config", type=Path, required=True, help="search YAML, e.g. configs/unetr2d_search.yaml")
    parser.add_argument("--trials", type=int, required=True,
                        help="finished (complete or pruned) trials wanted in the study, counting earlier runs'")
    parser.add_argument("--storage", default=None,
                        help="Optuna RDB storage URL (default: sqlite:///<output_dir>/<study_name>/study.db)")
    parser.add_argument("--study-name", default=None, help="study name and folder (default: study_name of the config)")
    parser.add_argument("--data", default=None, help="raw KiTS19-layout folder (default: data_dir of the experiment, "
                                                     "then $KITS19_DATA)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a search-config value, e.g. --set sampler_seed=1 (repeatable)")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("unetr_hyperparameter_search")
    try:
        if args.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {args.trials}")
        config = load_search_config(args.config, args.set)
        if args.study_name is not None:
            config = dataclasses.replace(config, study_name=args.study_name)
    except (ValueError, FileNotFoundError) as error:
        print(f"unetr_hyperparameter_search.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM queues the trial's retry like Ctrl-C
    try:
        result = run_search(config, trials=args.trials, storage=args.storage, data_dir=args.data)
    except TrainingInterrupted as error:  # SIGTERM/SIGUSR1 during a trial: its last.pt is saved
        log.warning("%s; the trial is retried from there: run the same command again to continue the study", error)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        log.error("interrupted: run the same command again to continue the study")
        return EXIT_FAILED
    except (RuntimeError, CheckpointError, OSError, ValueError) as error:
        log.error("%s", error)
        return EXIT_FAILED
    print(f"study folder: {result.study_folder}; {result.finished_trials} finished trials; best trial "
          f"{result.best_trial} (mean of kidney and tumour Dice on the cache grid: {result.best_value})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
