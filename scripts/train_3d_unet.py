"""Train the 3D Residual U-Net on KiTS19 (or the built-in synthetic data).

Usage::

    python scripts/train_3d_unet.py --config configs/resunet3d.yaml [--data DIR] [--set section.key=value ...] [--wandb]
    python scripts/train_3d_unet.py --resume checkpoints/<run> [--set training.epochs=1500]
    accelerate launch --num_processes 4 scripts/train_3d_unet.py --config configs/resunet3d.yaml

The data folder is preprocessed into the cache first (cases already cached are skipped). Each
run writes ``checkpoints/<run>/``: ``config.yaml``, ``last.pt``, ``best.pt``,
``training_progress.json`` and ``train.log``. ``--resume`` continues a run from ``last.pt``
with the config saved in its folder (``--set`` may still change, e.g., ``training.epochs``).

Exit status: 0 when training finished, 1 when it stopped on an error (the message says why;
checkpoints already written are intact), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.checkpoints import CheckpointError
from utils.experiment_config import load_experiment_config
from utils.training_engine import NonFiniteLossError, train

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--config", type=Path, default=None,
                        help="experiment YAML (e.g. configs/resunet3d.yaml, or configs/resunet3d_quick.yaml for CPU); "
                             "not needed with --resume")
    parser.add_argument("--data", default=None, help="raw KiTS19-layout folder (default: data_dir of the config, "
                                                     "then $KITS19_DATA)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the run in this folder from its last.pt, with its saved config.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set training.epochs=10 (repeatable)")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline without an API key)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.resume is None and args.config is None:
            raise ValueError("give --config CONFIG.yaml for a new run, or --resume RUN_DIR")
        config_path = args.resume / "config.yaml" if args.resume is not None else args.config
        config = load_experiment_config(config_path, args.set)
    except (ValueError, FileNotFoundError) as error:
        print(f"train_3d_unet.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = train(config, data_dir=args.data, resume=args.resume, wandb=True if args.wandb else None)
    except (NonFiniteLossError, CheckpointError, OSError, ValueError) as error:
        logging.getLogger("train_3d_unet").error("%s", error)
        return EXIT_FAILED
    if result.is_main_process:
        print(f"run folder: {result.run_folder}; best epoch {result.best_epoch} "
              f"(mean of kidney and tumour Dice on the cache grid: {result.best_score})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
