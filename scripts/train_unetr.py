"""Train the 2D UNETR on axial slices of KiTS19 (or the built-in synthetic data).

Usage::

    python scripts/train_unetr.py --config configs/unetr2d.yaml [--data DIR] [--set section.key=value ...] [--wandb]
    python scripts/train_unetr.py --resume checkpoints/<run> [--set training.epochs=600]
    python scripts/train_unetr.py --config checkpoints/<search>/best_config.yaml   # a search's best trial
    accelerate launch --num_processes 4 scripts/train_unetr.py --config configs/unetr2d.yaml
    python scripts/train_unetr.py --config configs/unetr2d.yaml --set training.run_name=NAME --auto-resume   # start or continue NAME

It uses the same cache, split, engine and run folder as the 3D model: class-balanced,
augmented axial slices for training; every axial slice of each validation volume predicted,
stacked back into a volume and scored per case with the same KiTS19 Dice. Each run writes
``checkpoints/<run>/``: ``config.yaml``, ``last.pt``, ``best.pt``, ``training_progress.json``
and ``train.log``.

Exit status: 0 when training finished, 1 when it stopped on an error (the message says why;
checkpoints already written are intact), 2 on usage errors, 75 when SIGTERM or SIGUSR1 (a
scheduler's time limit or pre-emption) stopped it after saving ``last.pt`` mid-epoch.
"""

from __future__ import annotations

import sys

from utils.cli.train import run_training_command


def main(argv: list[str] | None = None) -> int:
    return run_training_command(argv, model_name="unetr2d", description=__doc__,
                                example_config="configs/unetr2d.yaml, or configs/unetr2d_quick.yaml for CPU")


if __name__ == "__main__":
    sys.exit(main())
