"""The command line of the training scripts (``scripts/train_3d_unet.py``, ``scripts/train_unetr.py``).

Both scripts are :func:`run_training_script` with their model key: it writes their usage text
(:data:`TRAINING_USAGE`), parses the arguments, loads the config (or the run folder's saved one
with ``--resume``), checks it names the script's model, refuses a run folder or cache inside the
data folder (before any folder is created), and calls :func:`utils.training.engine.train`.

Exit status: 0 when training finished, 1 when it stopped on an error (the message says why;
checkpoints already written are intact), 2 on usage errors (including a resume refused because
it changes settings it may not, or names other data than the run's), 75 when SIGTERM or
SIGUSR1 stopped it after saving ``last.pt`` (requeue the job; ``--resume`` or ``--auto-resume``
continues it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path

from utils.config.experiment import ExperimentConfig, load_experiment_config
from utils.data.output_guard import OutputGuardError, add_guard_argument, check_output_location
from utils.networks.checkpoints import CheckpointError
from utils.training.engine import NonFiniteLossError, TrainingInterrupted, describe_selection_score, train
from utils.training.resume import RESUMABLE_KEYS, ResumeRefused, auto_resume_folder, recorded_data_dir
from utils.training.run_folder import CONSOLE_LOG
from utils.training.setup import was_logged
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
run writes ``checkpoints/<run>/``: ``config.yaml``, ``data.json`` (the data folder, case ids
and cache plan hash it trains on), ``last.pt``, ``best.pt``, ``training_progress.json`` and
``train.log``. Neither the run folder nor the cache may lie inside the data folder.

``--resume`` continues a run from ``last.pt`` (from scratch when it was killed before its first
``last.pt``) with the config saved in its folder, on the data recorded in ``data.json`` (give
``--data`` when that folder has moved; other cases or another plan hash are refused). The run
folder is changed only once the checkpoint has loaded. ``--auto-resume`` resumes the run when
its folder holds ``config.yaml``, else starts it. A resume may change only these settings (any
other ``--set`` is refused with exit status 2, naming each key: start a new run instead)::

{resumable}

Exit status: 0 when training finished, 1 when it stopped on an error (the message says why;
checkpoints already written are intact), 2 on usage errors (a refused resume included), 75 when
SIGTERM or SIGUSR1 (a scheduler's time limit or pre-emption) stopped it after saving ``last.pt``.
"""


def parse_training_args(argv: list[str] | None, *, description: str, example_config: str) -> argparse.Namespace:
    """Parse ``--config``, ``--data``, ``--resume``, ``--auto-resume``, ``--set`` and ``--wandb``."""
    lines = description.strip().splitlines()
    parser = argparse.ArgumentParser(description=lines[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(lines[2:]))
    parser.add_argument("--config", type=Path, default=None,
                        help=f"experiment YAML (e.g. {example_config}); not needed with --resume")
    parser.add_argument("--data", default=None, help="raw KiTS-layout folder of the config's dataset (default: "
                                                     "data_dir of the config, then $KITS19_DATA)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the run in this folder from its last.pt (from scratch when it has none "
                             "yet), with its saved config.yaml and the data recorded in its data.json")
    parser.add_argument("--auto-resume", action="store_true",
                        help="with training.run_name set: continue that run when its folder holds config.yaml, "
                             f"else start it (for jobs that are requeued; the folder may hold only {CONSOLE_LOG})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set training.epochs=10 (repeatable); with a resume "
                             f"only {', '.join(RESUMABLE_KEYS)}")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline without an API key)")
    add_guard_argument(parser)
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
        args.resume = auto_resume_folder(folder)
    path = args.resume / "config.yaml" if args.resume is not None else args.config
    config = load_experiment_config(path, args.set)
    if config.model.name != model_name:
        raise ValueError(f"{path}: model.name is {config.model.name!r}, but this script trains {model_name!r}; "
                         f"use {TRAINING_SCRIPTS.get(config.model.name, 'the script of that model')}")
    return config


def check_training_outputs(args: argparse.Namespace, config: ExperimentConfig) -> None:
    """Refuse a run folder (or ``training.output_dir``) or cache folder inside the data folder, before any work.

    The data folder is ``--data``, else (resuming) the one the run recorded, else the config's
    ``data_dir``, else ``KITS19_DATA``; none known, or not an existing folder: nothing to check here.

    Raises:
        OutputGuardError: naming both folders (``--allow-inside-input`` lifts the rule).
    """
    data = args.data
    if data is None and args.resume is not None:
        data = recorded_data_dir(args.resume)
    data = data or config.data_dir or os.environ.get("KITS19_DATA") or None
    if data is None or not Path(data).expanduser().is_dir():
        return  # no data folder to protect (training itself says what is missing)
    allow = getattr(args, "allow_inside_input", False)
    if args.resume is not None:
        run_folder, what = Path(args.resume), "the run folder"
    elif config.training.run_name is not None:
        run_folder, what = Path(config.training.output_dir) / config.training.run_name, "the run folder"
    else:
        run_folder, what = Path(config.training.output_dir), "training.output_dir"
    check_output_location(run_folder, [data], what=what, allow_inside_input=allow)
    check_output_location(config.preprocessing.cache_dir, [data], what="preprocessing.cache_dir",
                          allow_inside_input=allow)


def run_training_command(argv: list[str] | None, *, model_name: str, description: str, example_config: str) -> int:
    """Parse the command line, train, print the run folder; returns the exit status."""
    args = parse_training_args(argv, description=description, example_config=example_config)
    program = Path(TRAINING_SCRIPTS[model_name]).name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_training_config(args, model_name)
        check_training_outputs(args, config)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # OutputGuardError is a ValueError
        print(f"{program}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = train(config, data_dir=args.data, resume=args.resume, wandb=True if args.wandb else None)
    except TrainingInterrupted as error:
        logging.getLogger(program).warning("%s", error)
        return EXIT_INTERRUPTED
    except (ResumeRefused, OutputGuardError) as error:
        if not was_logged(error):
            logging.getLogger(program).error("%s", error)
        return EXIT_USAGE
    except (NonFiniteLossError, CheckpointError, OSError, ValueError) as error:
        if not was_logged(error):
            logging.getLogger(program).error("%s", error)
        return EXIT_FAILED
    if result.is_main_process:
        print(f"run folder: {result.run_folder}; best epoch {result.best_epoch} "
              f"({describe_selection_score(config.dataset)} on the cache grid: {result.best_score})")
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
    usage = TRAINING_USAGE.format(script=TRAINING_SCRIPTS[model_name], model=model_name,
                                  resumable=textwrap.fill(", ".join(RESUMABLE_KEYS), 92, initial_indent="    ",
                                                          subsequent_indent="    ", break_on_hyphens=False))
    return run_training_command(argv, model_name=model_name, description=f"{summary.strip()}\n\n{usage}",
                                example_config=f"configs/{model_name}.yaml, or configs/{model_name}_quick.yaml for CPU")
