"""Train the 3D Residual U-Net on KiTS19 (or the built-in synthetic data).

Usage::

    python scripts/train_3d_unet.py --config configs/resunet3d.yaml [--data DIR] [--set section.key=value ...] [--wandb]
    python scripts/train_3d_unet.py --resume checkpoints/<run> [--set training.epochs=1500]
    accelerate launch --num_processes 4 scripts/train_3d_unet.py --config configs/resunet3d.yaml
    python scripts/train_3d_unet.py --config configs/resunet3d.yaml --set training.run_name=NAME --auto-resume   # start or continue NAME

The data folder is preprocessed into the cache first (cases already cached are skipped). Each
run writes ``checkpoints/<run>/``: ``config.yaml``, ``last.pt``, ``best.pt``,
``training_progress.json`` and ``train.log``. ``--resume`` continues a run from ``last.pt``
with the config saved in its folder (``--set`` may still change, e.g., ``training.epochs``).

Exit status: 0 when training finished, 1 when it stopped on an error (the message says why;
checkpoints already written are intact), 2 on usage errors, 75 when SIGTERM or SIGUSR1 (a
scheduler's time limit or pre-emption) stopped it after saving ``last.pt`` mid-epoch.
"""

from __future__ import annotations

import sys

from utils.cli.train import run_training_command


def main(argv: list[str] | None = None) -> int:
    return run_training_command(argv, model_name="resunet3d", description=__doc__,
                                example_config="configs/resunet3d.yaml, or configs/resunet3d_quick.yaml for CPU")


if __name__ == "__main__":
    sys.exit(main())
