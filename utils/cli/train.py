"""The command line of the training scripts (``scripts/train_3d_unet.py``, ``scripts/train_unetr.py``).

Both scripts are :func:`run_training_script` with their model key: it writes their usage text
(:data:`TRAINING_USAGE`), parses the arguments, loads the config (or the run folder's saved one
with ``--resume``), checks it names the script's model, and calls :func:`utils.training.engine.train`.

Exit status: 0 when training finished, 1 when it stopped on an error (the message says why;
checkpoints already written are intact), 2 on usage errors, 75 when SIGTERM or SIGUSR1 stopped
it after saving ``last.pt`` (requeue the job; ``--resume`` or ``--auto-resume`` continues it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.config.experiment import ExperimentConfig, load_experiment_config
from utils.networks.checkpoints import CheckpointError
from utils.training.engine import NonFiniteLossError, TrainingInterrupted, train
from utils.training.run_folder import CONSOLE_LOG
from utils.training.stop_signals import EXIT_INTERRUPTED

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: The script that trains each model, named in the error when a config goes to the wrong one.
TRAINING_SCRIPTS = {"resunet3d": "scripts/train_3d_unet.py", "unetr2d": "scripts/train_unetr.py"}

#: The usage text shared by the training scripts, after each script's own summary.
TRAINING_USAGE = """Usage::

    python {script} --config configs/{model}.yaml [--data DIR] [--set section.key=value ...] [--wandb]
    python {script} --config configs/{model}_quick.yaml   # learns on a CPU in minutes
    python {script} --resume checkpoints/<run> [--set training.epochs=N]
    accelerate launch --num_processes 4 {script} --config configs/{model}.yaml
    python {script} --config configs/{model}.yaml --set training.run_name=NAME --auto-resume   # start or continue NAME

The data folder is preprocessed into the cache first (cases already cached are skipped). Each
run writes ``checkpoints/<run>/``: ``config.yaml``, ``last.pt``, ``best.pt``,
``training_progress.json`` and ``train.log``. ``--resume`` continues a run from ``last.pt``
with the config saved in its folder (``--set`` may still change, e.g., ``training.epochs``).

Exit status: 0 when training finished, 1 when it stopped on an error (the message says why;
checkpoints already written are intact), 2 on usage errors, 75 when SIGTERM or SIGUSR1 (a
scheduler's time limit or pre-emption) stopped it after saving ``last.pt`` mid-epoch.
"""


def parse_training_args(argv: list[str] | None, *, description: str, example_config: str) -> argparse.Namespace:
    """Parse ``--config``, ``--data``, ``--resume``, ``--auto-resume``, ``--set`` and ``--wandb``."""
    lines = description.strip().splitlines()
    parser = argparse.ArgumentParser(description=lines[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(lines[2:]))
    parser.add_argument("--config", type=Path, default=None,
                        help=f"experiment YAML (e.g. {example_config}); not needed with --resume")
    parser.add_argument("--data", default=None, help="raw KiTS19-layout folder (default: data_dir of the config, "
                                                     "then $KITS19_DATA)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the run in this folder from its last.pt, with its saved config.yaml")
    parser.add_argument("--auto-resume", action="store_true",
                        help="with training.run_name set: continue that run when its folder holds last.pt, else "
                             f"start it (for jobs that are requeued; the folder may hold only {CONSOLE_LOG})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set training.epochs=10 (repeatable)")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline without an API key)")
    return parser.parse_args(argv)


def load_training_config(args: argparse.Namespace, model_name: str) -> ExperimentConfig:
    """The run's config: ``--config`` (or ``RUN_DIR/config.yaml`` with ``--resume``) with ``--set`` applied.

    Raises:
        ValueError: neither ``--config`` nor ``--resume``, an invalid config, or one for another model.
        FileNotFoundError: the config file does not exist.
    """
    if args.resume is None and args.config is None:
        raise ValueError("give --config CONFIG.yaml for a new run, or --resume RUN_DIR")
    if getattr(args, "auto_resume", False):
        if args.resume is not None or args.config is None:
            raise ValueError("--auto-resume needs --config (with training.run_name set), not --resume")
        config = load_experiment_config(args.config, args.set)
        if config.training.run_name is None:
            raise ValueError("--auto-resume needs a run name: add --set training.run_name=NAME")
        folder = Path(config.training.output_dir) / config.training.run_name
        if (folder / "last.pt").is_file():
            args.resume = folder
    path = args.resume / "config.yaml" if args.resume is not None else args.config
    config = load_experiment_config(path, args.set)
    if config.model.name != model_name:
        raise ValueError(f"{path}: model.name is {config.model.name!r}, but this script trains {model_name!r}; "
                         f"use {TRAINING_SCRIPTS.get(config.model.name, 'the script of that model')}")
    return config


def run_training_command(argv: list[str] | None, *, model_name: str, description: str, example_config: str) -> int:
    """Parse the command line, train, print the run folder; returns the exit status."""
    args = parse_training_args(argv, description=description, example_config=example_config)
    program = Path(TRAINING_SCRIPTS[model_name]).name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_training_config(args, model_name)
    except (ValueError, FileNotFoundError) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = train(config, data_dir=args.data, resume=args.resume, wandb=True if args.wandb else None)
    except TrainingInterrupted as error:
        logging.getLogger(program).warning("%s", error)
        return EXIT_INTERRUPTED
    except (NonFiniteLossError, CheckpointError, OSError, ValueError) as error:
        logging.getLogger(program).error("%s", error)
        return EXIT_FAILED
    if result.is_main_process:
        print(f"run folder: {result.run_folder}; best epoch {result.best_epoch} "
              f"(mean of kidney and tumour Dice on the cache grid: {result.best_score})")
    return EXIT_OK


def run_training_script(model_name: str, summary: str, argv: list[str] | None = None) -> int:
    """The training script of ``model_name``: its ``--help`` is ``summary`` then :data:`TRAINING_USAGE`.

    Args:
        model_name: a key of :data:`TRAINING_SCRIPTS` (``resunet3d``, ``unetr2d``).
        summary: the script's docstring: a one-line summary, then what is particular to the model.
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status of :func:`run_training_command`.
    """
    if model_name not in TRAINING_SCRIPTS:
        raise ValueError(f"model_name must be one of {sorted(TRAINING_SCRIPTS)}, got {model_name!r}")
    usage = TRAINING_USAGE.format(script=TRAINING_SCRIPTS[model_name], model=model_name)
    return run_training_command(argv, model_name=model_name, description=f"{summary.strip()}\n\n{usage}",
                                example_config=f"configs/{model_name}.yaml, or configs/{model_name}_quick.yaml for CPU")
