"""Search an experiment's hyperparameters with Optuna (3D Residual U-Net or 2D UNETR): each trial a short training run.

Usage::

    python scripts/hyperparameter_search.py --config configs/resunet3d_search.yaml --trials 30 [--data DIR]
    python scripts/hyperparameter_search.py --config configs/unetr2d_search.yaml --trials 30 \
        [--storage STORAGE] [--study-name NAME] [--worker-rank I] [--set key=value ...]

The search config names the base experiment (any model: configs/resunet3d*.yaml,
configs/unetr2d*.yaml), the overrides that make trials short and the search space (see
``utils/training/search.py``); ``--set`` overrides its settings, e.g. ``--set sampler_seed=1`` or
``--set pruner.n_warmup_steps=20``. Everything goes to ``<output_dir>/<study_name>/``: ``study.db``
(the default storage), ``trials/trial_NNNN/`` run folders, ``results.csv``, ``best_config.yaml``
(train it with the model's script: ``scripts/train_3d_unet.py`` or ``scripts/train_unetr.py``
``--config``), ``optimization_history.html/.png`` and ``param_importances.html/.png``.

Storages (--storage):
  (none)                        SQLite in the study folder: one worker at a time.
  journal:PATH  (or journal)    an Optuna journal file (default <study folder>/study.journal): several
                                workers on one machine or a shared file system (flock must work on it).
  postgresql://USER@HOST/DB     any Optuna RDB URL (also mysql+pymysql://...): several workers on
                                several machines, through a database server.

Several workers: start the same command N times (one GPU each; scripts/launch_search_tmux.sh on one
machine, scripts/slurm/search.sbatch as a SLURM array). They share the study: each takes the next
trial (a queued retry first), ``--trials`` counts finished trials of all workers, and each stops once
the study holds that many (a worker waits while the running trials would reach it, in case one dies).
Give each worker its own ``--worker-rank`` (0, 1, ...) so their samplers draw different parameters.

Run the same command again to continue an interrupted search: ``--trials`` counts the trials already
finished, and a trial that was killed is retried with its parameters from its ``last.pt``, by this
worker or another one: on SQLite or a database server once its heartbeat is ``grace_seconds`` old; on a
journal file as soon as another worker can take the dead worker's lock file (<study folder>/workers/).

Exit status: 0 when the study has the trials asked for and the reports are written, 1 when it
stopped on an error or was interrupted by Ctrl-C (rerun to continue), 2 on usage errors, 75 when
SIGTERM or SIGUSR1 stopped the worker (a trial's training saved its ``last.pt`` and its retry is
queued; requeue or rerun to continue).
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
from utils.training.search import SearchStopped, StopRequest, run_search
from utils.training.stop_signals import EXIT_INTERRUPTED, STOP_SIGNALS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str] | None = None, *, doc: str = __doc__) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(doc.splitlines()[2:]))
    parser.add_argument("--config", type=Path, required=True,
                        help="search YAML, e.g. configs/resunet3d_search.yaml or configs/unetr2d_search.yaml")
    parser.add_argument("--trials", type=int, required=True,
                        help="finished (complete or pruned) trials wanted in the study, counting earlier runs' "
                             "and other workers'")
    parser.add_argument("--storage", default=None,
                        help="default: sqlite:///<output_dir>/<study_name>/study.db (one worker); journal:PATH "
                             "(several workers on a shared file system); an Optuna RDB URL such as "
                             "postgresql://user@host/db (several workers, a database server)")
    parser.add_argument("--study-name", default=None, help="study name and folder (default: study_name of the config)")
    parser.add_argument("--worker-rank", type=int, default=0,
                        help="this worker's index among workers started together (varies its sampler seed)")
    parser.add_argument("--data", default=None, help="raw KiTS19-layout folder (default: data_dir of the experiment, "
                                                     "then $KITS19_DATA)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a search-config value, e.g. --set sampler_seed=1 (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, program: str = "hyperparameter_search.py", doc: str = __doc__) -> int:
    """Run one search worker; returns the exit status."""
    args = parse_args(argv, doc=doc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(Path(program).stem)
    try:
        if args.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {args.trials}")
        if args.worker_rank < 0:
            raise ValueError(f"--worker-rank must be >= 0, got {args.worker_rank}")
        config = load_search_config(args.config, args.set)
        if args.study_name is not None:
            config = dataclasses.replace(config, study_name=args.study_name)
    except (ValueError, FileNotFoundError) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    # Between trials a scheduler's SIGTERM/SIGUSR1 stops the worker; during a trial the training's own
    # handlers take over (it saves last.pt, the trial's retry is queued) and give these back afterwards.
    stop = StopRequest()
    for number in STOP_SIGNALS:
        signal.signal(number, lambda signum, frame: stop.set(signal.Signals(signum).name))
    try:
        result = run_search(config, trials=args.trials, storage=args.storage, data_dir=args.data,
                            worker_rank=args.worker_rank, stop=stop)
    except TrainingInterrupted as error:  # SIGTERM/SIGUSR1 during a trial: its last.pt is saved
        log.warning("%s; the trial is retried from there: run the same command again to continue the study", error)
        return EXIT_INTERRUPTED
    except SearchStopped as error:
        log.warning("%s: run the same command again to continue the study", error)
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
